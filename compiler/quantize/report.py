"""What quantization cost: per-layer weight and output errors, memory before/after, perplexity.

- **weight error** (per layer): ``‖W - W_q‖ / ‖W‖`` with ``W_q`` the dequantized weight in the
  original input coordinates (smoothing undone), recorded by ``insert-qdq``.
- **output error** (per layer): ``‖y - y_q‖ / ‖y‖`` over calibration-like inputs, where ``y`` is
  the full-precision layer's output and ``y_q`` is the quantized graph's computation for that
  layer (smoothing, activation Q/DQ and the qlinear) applied to the *same* full-precision
  input: each layer's own error, not the error accumulated upstream.
- **logits error**: ``‖logits - logits_q‖ / ‖logits‖`` of the whole model on those inputs.
- **memory**: bytes of the constants each graph holds (unique tensors read by ``get_attr``).
- **perplexity**: :func:`kiln.eval.perplexity` of both models on the same tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from kiln.ir import PASS_KEY
from kiln.quantize.ops import QLINEAR_OPS

QUANT_PASSES = ("insert-qdq", "lower-qdq", "convert-qat")
QUANT_META = "kiln_quant"


@dataclass
class LayerReport:
    """One quantized linear."""

    name: str  # module path
    shape: tuple[int, int]  # (out, in)
    weights: str  # weight format, e.g. "int4 g128 asym"
    activations: str  # activation format or "-"
    op: str  # what the linear became: "qlinear_w4a16", ... or "dequantize+linear" / "qdq"
    weight_error: float | None  # ‖W - W_q‖ / ‖W‖
    output_error: float | None = None  # ‖y - y_q‖ / ‖y‖ on the same full-precision input
    bytes_fp: int | None = None  # the weight in the model's dtype
    bytes_q: int | None = None  # codes + scales + zero points


@dataclass
class QuantReport:
    """The whole report; ``format()`` renders it as text, ``to_json()`` as JSON."""

    config: str  # QuantConfig.describe()
    layers: list[LayerReport] = field(default_factory=list)
    bytes_before: int = 0  # constants of the full-precision graph
    bytes_after: int = 0  # constants of the quantized graph
    logits_error: float | None = None
    perplexity_fp: float | None = None
    perplexity_q: float | None = None
    eval_tokens: int = 0  # tokens perplexity was measured on

    @property
    def perplexity_increase(self) -> float | None:
        """Relative perplexity increase (0.01 = +1%)."""
        if self.perplexity_fp is None or self.perplexity_q is None:
            return None
        return self.perplexity_q / self.perplexity_fp - 1.0

    def format(self) -> str:
        rows = [("layer", "shape", "weights", "activations", "op", "weight err", "output err", "KiB fp -> q")]
        for r in self.layers:
            kib = f"{r.bytes_fp / 1024:.0f} -> {r.bytes_q / 1024:.0f}" if r.bytes_fp is not None and r.bytes_q is not None else "-"
            rows.append((r.name, f"{r.shape[0]}x{r.shape[1]}", r.weights, r.activations, r.op, _f(r.weight_error),
                         _f(r.output_error), kib))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"quantization: {self.config}"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        return "\n".join(lines + self.summary())

    def summary(self) -> list[str]:
        """The whole-model lines: memory, logits error, perplexity."""
        mib = 2**20
        lines = [f"memory (graph constants): {self.bytes_before / mib:.2f} MiB -> {self.bytes_after / mib:.2f} MiB "
                 f"({self.bytes_after / max(self.bytes_before, 1):.1%})"]
        if self.logits_error is not None:
            lines.append(f"logits relative error: {self.logits_error:.4f}")
        if self.perplexity_increase is not None:
            lines.append(f"perplexity: {self.perplexity_fp:.4f} -> {self.perplexity_q:.4f} "
                         f"({self.perplexity_increase:+.2%}) on {self.eval_tokens:,} tokens")
        return lines

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def graph_bytes(gm: GraphModule) -> int:
    """Bytes of the unique tensors the graph's ``get_attr`` nodes read."""
    seen: dict[tuple[int, int], int] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        t: Any = gm
        for part in str(n.target).split("."):
            t = getattr(t, part)
        if isinstance(t, Tensor):
            seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
    return sum(seen.values())


def quantized_nodes(gm: GraphModule) -> dict[str, Node]:
    """Module path -> the node computing that quantized linear (a qlinear, or a linear over a dequantize)."""
    out: dict[str, Node] = {}
    for n in gm.graph.nodes:
        is_q = n.target in QLINEAR_OPS
        is_dq_linear = n.target == torch.ops.aten.linear.default and isinstance(n.args[1], Node) and \
            n.args[1].target == torch.ops.kiln.dequantize.default
        stack = n.meta.get("nn_module_stack")
        if (is_q or is_dq_linear) and stack:
            out[list(stack.values())[-1][0]] = n
    return out


def _cone(root: Node) -> tuple[list[Node], Node]:
    """The quantization nodes computing ``root`` from one original value (the leaf), in graph order."""
    seen, leaves, stack = {root}, set(), [root]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in seen or a in leaves:
                continue
            if a.op == "get_attr" or a.meta.get(PASS_KEY) in QUANT_PASSES:
                seen.add(a)
                stack.append(a)
            else:
                leaves.add(a)
    if len(leaves) != 1:
        raise ValueError(f"%{root.name} reads {len(leaves)} values from outside the quantization nodes")
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    return sorted(seen, key=order.__getitem__), leaves.pop()


def _run_cone(gm: GraphModule, nodes: list[Node], leaf: Node, x: Tensor) -> Tensor:
    env: dict[Node, Any] = {leaf: x}
    for n in nodes:
        if n.op == "get_attr":
            t: Any = gm
            for part in str(n.target).split("."):
                t = getattr(t, part)
            env[n] = t
        else:
            args = map_arg(n.args, env.__getitem__)
            kwargs = map_arg(n.kwargs, env.__getitem__)
            env[n] = n.target(*args, **kwargs)  # type: ignore[operator]
    return env[nodes[-1]]


@torch.no_grad()
def layer_output_errors(model: nn.Module, gm: GraphModule, samples: Sequence[Mapping[str, Tensor]]) -> dict[str, float]:
    """Per quantized layer, ``‖y - y_q‖ / ‖y‖`` with ``y_q`` computed from the full-precision input."""
    cones = {path: _cone(node) for path, node in quantized_nodes(gm).items()}
    acc = {path: [0.0, 0.0] for path in cones}
    hooks = []

    def hook(path: str):  # noqa: ANN202
        nodes, leaf = cones[path]

        def fn(module: nn.Module, args: tuple, out: Tensor) -> None:
            y_q = _run_cone(gm, nodes, leaf, args[0])
            acc[path][0] += (y_q.float() - out.float()).pow(2).sum().item()
            acc[path][1] += out.float().pow(2).sum().item()

        return fn

    for path, module in model.named_modules():
        if path in cones:
            hooks.append(module.register_forward_hook(hook(path)))
    try:
        for sample in samples:
            model(**sample)
    finally:
        for h in hooks:
            h.remove()
    return {p: (e / r) ** 0.5 if r > 0 else 0.0 for p, (e, r) in acc.items()}


class _Callable(nn.Module):
    """A compiled model as an ``nn.Module`` taking ``input_ids`` (for kiln.eval); holds no parameters."""

    def __init__(self, compiled: Any) -> None:
        super().__init__()
        self._compiled = [compiled]

    def forward(self, input_ids: Tensor) -> Any:
        return self._compiled[0](input_ids)


def as_module(compiled: Any) -> nn.Module:
    """Wrap a :class:`kiln.CompiledModel` so ``kiln.eval.perplexity`` can score it."""
    return _Callable(compiled)


def static_batch(compiled: Any) -> bool:
    """Whether the compiled graph was captured with a fixed batch of 1 (score one window at a time)."""
    for n in compiled.graph_module.graph.nodes:
        if n.op == "placeholder" and isinstance(n.meta.get("val"), Tensor):
            return isinstance(n.meta["val"].shape[0], int)
    return True


@torch.no_grad()
def quant_report(
    model: nn.Module,
    compiled: Any,
    *,
    samples: Sequence[Mapping[str, Tensor]] | None = None,
    eval_tokens: Tensor | None = None,
    perplexity_fp: float | None = None,
    seq_len: int = 512,
    batch_size: int = 8,
    progress: bool = True,
) -> QuantReport:
    """Measure ``compiled`` (a quantized :class:`kiln.CompiledModel`) against ``model``.

    Args:
        model: the full-precision model the compiled one was made from.
        compiled: the quantized CompiledModel.
        samples: inputs (dicts) for per-layer and logits errors; default: the first 4 windows of
            ``eval_tokens`` (or none: errors are skipped).
        eval_tokens: a 1-D token stream to measure perplexity on (None: skipped).
        perplexity_fp: the full-precision perplexity on ``eval_tokens``, if already known.
        seq_len, batch_size: perplexity windows (a batch-1 capture scores one window at a time).
    """
    from kiln.eval import logits_of, perplexity

    gm = compiled.graph_module
    layers_meta = gm.meta.get(QUANT_META, {})
    fp_bytes = graph_bytes(compiled.capture.gm) if compiled.capture.gm is not None else 0
    rep = QuantReport(config=compiled.config.quant.describe(), bytes_before=fp_bytes, bytes_after=graph_bytes(gm))
    if samples is None and eval_tokens is not None:
        n = min(4, max(1, (eval_tokens.numel() - 1) // seq_len))
        samples = [{"input_ids": eval_tokens[i * seq_len : (i + 1) * seq_len][None]} for i in range(n)]
    errors = layer_output_errors(model, gm, samples) if samples else {}
    for path, rec in layers_meta.items():
        if "weights" not in rec:
            continue
        rep.layers.append(LayerReport(
            name=path, shape=tuple(rec["shape"]), weights=rec["weights"], activations=rec.get("activations", "-"),
            op=rec.get("op", "qdq"), weight_error=rec.get("weight_error"), output_error=errors.get(path),
            bytes_fp=rec.get("bytes_fp"), bytes_q=rec.get("bytes_q"),
        ))
    if samples:
        num = den = 0.0
        for sample in samples:
            ref = logits_of(model(**sample)).float()
            out = logits_of(compiled(**sample)).float()
            num += (out - ref).pow(2).sum().item()
            den += ref.pow(2).sum().item()
        rep.logits_error = (num / den) ** 0.5
    if eval_tokens is not None:
        bs = 1 if static_batch(compiled) else batch_size
        rep.eval_tokens = int(eval_tokens.numel())
        rep.perplexity_fp = perplexity_fp if perplexity_fp is not None else perplexity(
            model, eval_tokens, seq_len=seq_len, batch_size=batch_size, progress=progress)
        rep.perplexity_q = perplexity(as_module(compiled), eval_tokens, seq_len=seq_len, batch_size=bs, progress=progress)
    return rep


__all__ = [
    "LayerReport",
    "QuantReport",
    "as_module",
    "graph_bytes",
    "layer_output_errors",
    "quant_report",
    "quantized_nodes",
    "static_batch",
]
