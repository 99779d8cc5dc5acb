"""Validating an ONNX artifact: ``onnx.checker``, then ONNX Runtime (ORT_ENABLE_ALL) against eager.

The reference is the compiled graph itself on the eager backend, one batch row at a time
(it was captured with batch 1), at several batch sizes and lengths. The generation artifact
is checked step by step: a prefill on an empty cache, one decode token, then a 2-token chunk,
each against a full recompute without cache. Loading the artifact also writes ONNX Runtime's
optimized graph, from which the fused operators it formed are counted.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.fx import Node
from torch.utils import _pytree as pytree

from kiln.backends.onnx.kv_cache import CacheLayout
from kiln.backends.onnx.prepare import make_feed, past_feed
from kiln.errors import ExportError

if TYPE_CHECKING:
    from kiln.compile import CompiledModel

#: Relative error (max |ort - eager| / max |eager|) accepted by validation, per dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}

#: Session options kiln loads artifacts with. ONNX Runtime fuses a weight ``DequantizeLinear`` +
#: ``MatMul`` into ``MatMulNBits``, by default at accuracy level 4 (activations quantized to int8
#: per block: ~1% relative error on a weight-only int8 model); level 0 keeps float activations,
#: the numerics of kiln's weight-only reference.
SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}

#: Standard ONNX ops that count as fusions when ONNX Runtime forms them from smaller ones.
_STANDARD_FUSED = {"Attention", "Gelu", "LayerNormalization", "RMSNormalization", "RotaryEmbedding"}


@dataclass
class Validation:
    """What :func:`validate_artifact` measured."""

    max_rel_error: float  # max |ort - eager| / max |eager| over every check
    max_abs_error: float  # max |ort - eager|
    checks: list[str] = field(default_factory=list)  # e.g. "batch 2 x 9 tokens"
    fused_ops: dict[str, int] = field(default_factory=dict)  # ORT-fused op -> count
    op_counts: dict[str, int] = field(default_factory=dict)  # every op of the ORT-optimized graph


def ort_session(path: Path, optimized: Path | None = None, threads: int | None = None) -> Any:
    """An ORT_ENABLE_ALL CPU session; ``optimized`` receives ONNX Runtime's optimized graph."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    for key, value in SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    if threads:
        so.intra_op_num_threads = threads
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", optimized.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1048576")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def op_counts(path: Path) -> dict[str, int]:
    """Node counts by op (``com.microsoft.X`` for other domains) of an ONNX file's main graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for n in model.graph.node:
        key = f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def is_fused(key: str) -> bool:
    """Whether an op of the ORT-optimized graph is a fused kernel (contrib or ORT-internal)."""
    import onnx

    if "." in key:  # a non-default domain: com.microsoft ...
        return True
    return key in _STANDARD_FUSED or not onnx.defs.has(key)


def _errors(a: np.ndarray, b: torch.Tensor) -> tuple[float, float]:
    """(relative, absolute) max error where eager is finite (fully masked rows are NaN there)."""
    ref = b.detach().float().numpy()
    finite = np.isfinite(ref)
    if a.shape != ref.shape:
        return float("inf"), float("inf")
    if not finite.any():
        return 0.0, 0.0
    got = a.astype(np.float32)[finite]
    if not np.isfinite(got).all():
        return float("inf"), float("inf")
    abs_err = float(np.max(np.abs(got - ref[finite])))
    return abs_err / max(float(np.max(np.abs(ref[finite]))), 1e-30), abs_err


def eager_rows(compiled: CompiledModel, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The compiled graph's outputs, one batch row at a time (it was captured with batch 1), concatenated."""
    gm = compiled.graph_module
    constants = compiled.capture.constants
    batch = next(iter(feed.values())).shape[0]
    rows = []
    with torch.no_grad():
        for b in range(batch):
            out = gm(**{k: v[b : b + 1] for k, v in feed.items()}, **constants)
            rows.append([t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)])
    return [torch.cat(parts, 0) for parts in zip(*rows, strict=True)]


def _compare(
    compiled: CompiledModel, session: Any, names: list[str], token_inputs: list[str], batch: int, tokens: int
) -> list[tuple[np.ndarray, torch.Tensor]]:
    feed = make_feed(compiled.capture.inputs, token_inputs, batch, tokens, seed=1000 * batch + tokens)
    got = session.run(None, {n: feed[n].numpy() for n in names})
    return list(zip(got, eager_rows(compiled, feed), strict=True))


def _compare_cached(
    compiled: CompiledModel, session: Any, names: list[str], token_inputs: list[str], layout: CacheLayout,
    batch: int, tokens: int,
) -> list[tuple[np.ndarray, torch.Tensor]]:
    """Prefill ``tokens`` on an empty cache, decode 1, then a 2-token chunk; each vs a recompute."""
    seed = 1000 * batch + tokens
    captured = compiled.capture.inputs
    full = make_feed(captured, token_inputs, batch, tokens + 3, seed=seed)
    want = eager_rows(compiled, full)[0]
    past = past_feed(layout, batch, 0, seed, onnx_names=True)
    pairs, start = [], 0
    for step in (tokens, 1, 2):
        chunk = make_feed(captured, token_inputs, batch, step, start=start, seed=seed)
        for n in token_inputs:
            if n != "position_ids":
                chunk[n] = full[n][:, start : start + step]
        feed = {**chunk, **past}
        got = session.run(None, {n: feed[n].numpy() for n in names})
        pairs.append((got[0], want[:, start : start + step]))
        presents = got[len(got) - 2 * layout.layers :]
        past = {name: torch.from_numpy(p) for name, p in zip(layout.input_names(), presents, strict=True)}
        start += step
    return pairs


def max_tokens(compiled: CompiledModel) -> int:
    """The token axis's upper bound in the capture (a model's maximum context), or 65536."""
    for axes in compiled.capture.dynamic_shapes.values():
        for dim in axes.values():
            upper = getattr(dim, "max", None)
            if isinstance(upper, int) and upper < 2**31:
                return upper
    return 1 << 16


def output_dtype(compiled: CompiledModel) -> torch.dtype:
    """dtype of the compiled graph's first tensor output (what the tolerance is chosen by)."""
    out = next((n for n in compiled.graph_module.graph.nodes if n.op == "output"), None)
    for leaf in pytree.tree_leaves(out.args[0] if out is not None else ()):
        val = leaf.meta.get("val") if isinstance(leaf, Node) else None
        if isinstance(val, torch.Tensor):
            return val.dtype
    return torch.float32


def validate_artifact(
    compiled: CompiledModel,
    path: Path,
    names: list[str],
    token_inputs: list[str],
    layout: CacheLayout | None,
    batches: Sequence[int],
    lengths: Sequence[int],
    tolerance: float | None = None,
) -> Validation:
    """Check ``path`` with ``onnx.checker`` and against eager; ExportError naming the worst error.

    ``tolerance``: the relative error allowed (default :data:`TOLERANCE` of the output dtype).
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the exported model: {e}") from e
    scratch = Path(tempfile.mkdtemp(prefix=".ort.", dir=path.parent))
    try:
        optimized = scratch / "optimized.onnx"
        try:
            session = ort_session(path, optimized)
        except Exception as e:
            raise ExportError(f"onnxruntime could not load the exported model: {e}") from e
        counts = op_counts(optimized)
        exported = op_counts(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = Validation(0.0, 0.0, fused_ops={k: v for k, v in counts.items() if k not in exported and is_fused(k)},
                        op_counts=counts)
    for batch in batches:
        for tokens in lengths:
            try:
                if layout is None:
                    pairs = _compare(compiled, session, names, token_inputs, batch, tokens)
                else:
                    pairs = _compare_cached(compiled, session, names, token_inputs, layout, batch, tokens)
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ExportError(
                    f"onnxruntime failed to run the artifact at batch {batch} x {tokens} tokens: {first}; "
                    "the artifact was not written"
                ) from e
            for a, b in pairs:
                rel, abs_ = _errors(a, b)
                result.max_rel_error = max(result.max_rel_error, rel)
                result.max_abs_error = max(result.max_abs_error, abs_)
            result.checks.append(f"batch {batch} x {tokens} tokens" + (" + decode 1 + 2" if layout else ""))
    tol = TOLERANCE.get(layout.dtype if layout else output_dtype(compiled), 1e-4)
    tol = max(tol, tolerance) if tolerance is not None else tol
    if result.max_rel_error > tol:
        raise ExportError(
            f"the ONNX artifact disagrees with eager: max relative error {result.max_rel_error:.3g} > {tol:g} "
            f"(max abs {result.max_abs_error:.3g}) over {', '.join(result.checks)}; the artifact was not written. "
            "Pass validate=False to write it anyway, or bisect the passes with kiln.debug."
        )
    return result


__all__ = ["SESSION_CONFIG", "TOLERANCE", "Validation", "eager_rows", "is_fused", "op_counts", "ort_session", "validate_artifact"]
