"""Debugging aids: find the pass that broke a model.

``bisect`` runs the pipeline on a fresh capture, executes the graph after every pass on
the example inputs, and reports the first pass after which the outputs diverge from the
eager model beyond tolerance, with the IR before and after that pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves

from kiln.capture import capture
from kiln.compile import CompileConfig, _run_pipeline
from kiln.pass_manager import PassRecord


@dataclass
class BisectResult:
    """Where outputs first diverged from eager (``pass_name is None``: they never did)."""

    pass_name: str | None  # the first pass after which outputs diverge
    index: int | None  # its 1-based position in the pipeline
    max_abs_error: float  # largest |compiled - eager| after that pass (0.0 when none diverged)
    ir_before: str | None  # the IR before that pass
    ir_after: str | None  # the IR after it
    errors: list[tuple[str, float]] = field(default_factory=list)  # (pass, max abs error) for each pass run

    @property
    def diverged(self) -> bool:
        return self.pass_name is not None

    def __str__(self) -> str:
        if not self.diverged:
            return f"no divergence: outputs match eager after all {len(self.errors)} passes"
        return (
            f"outputs diverge after pass {self.index} {self.pass_name!r} (max abs error {self.max_abs_error:.3g})\n"
            f"--- IR before ---\n{self.ir_before}--- IR after ---\n{self.ir_after}"
        )


def _max_error(got: Any, want: Any) -> float:
    a, b = tree_leaves(got), tree_leaves(want)
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if isinstance(y, torch.Tensor):
            if not isinstance(x, torch.Tensor) or x.shape != y.shape:
                return float("inf")
            diff = (x.double() - y.double()).abs()
            if diff.numel():
                worst = max(worst, float(diff.nan_to_num(nan=float("inf")).max()))
    return worst


def bisect(
    model: torch.nn.Module,
    example_inputs: Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    config: CompileConfig | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> BisectResult:
    """Find the first pass after which the compiled graph's outputs leave eager's.

    A pass diverges when some output element differs by more than ``atol + rtol * |eager|``.
    """
    config = config or CompileConfig()
    captured = capture(model, example_inputs, example_kwargs, dynamic=config.dynamic)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            want = model(**captured.inputs)
    finally:
        for m, training in modes.items():
            m.training = training
    scale = max((float(t.abs().max()) for t in tree_leaves(want) if isinstance(t, torch.Tensor) and t.numel()), default=0.0)
    tolerance = atol + rtol * scale
    result = BisectResult(None, None, 0.0, None, None)
    previous: dict[str, str | None] = {"ir": None}

    def on_step(record: PassRecord, gm: GraphModule) -> None:
        with torch.no_grad():
            err = _max_error(gm(**captured.inputs), want)
        result.errors.append((record.name, err))
        if err > tolerance and result.pass_name is None:
            result.pass_name, result.index, result.max_abs_error = record.name, record.index, err
            result.ir_before, result.ir_after = previous["ir"], record.ir
        previous["ir"] = record.ir

    gm = captured.module()
    from kiln.ir import print_ir

    previous["ir"] = print_ir(gm)
    _run_pipeline(gm, captured, config, record_ir=True, on_step=on_step)
    return result


__all__ = ["BisectResult", "bisect"]
