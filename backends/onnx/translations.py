"""ONNX translations of kiln's operators, for ``torch.onnx.export``'s ``custom_translation_table``.

Every ``kiln::`` op that can reach an exported graph has an entry in :data:`TRANSLATIONS`,
written with ONNX Script ops and traced by the exporter (``trace_only``). Preference order:
a standard ONNX operator, then an ONNX Runtime contrib operator, then a decomposition into
standard operators. Later passes add their ops here with :func:`register_translation`.

``kiln::attention`` maps to the ONNX ``Attention`` operator (opset 23,
https://onnx.ai/onnx/operators/onnx__Attention.html) when the target opset is >= 23 and
the installed ONNX Runtime runs it (probed once, :func:`ort_runs_attention`); otherwise
to a MatMul / Softmax decomposition. kiln's causal mask is aligned to the *end* of the keys
(key ``j`` is hidden from query ``i`` when ``j > i + Tk - Tq``) while ONNX ``Attention``'s
``is_causal`` without a past cache is aligned to the start, so ``is_causal=1`` is only used
when the query and key lengths are the same symbolic dimension; otherwise the translation
builds the end-aligned mask itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from onnxscript import opset18 as op18
from onnxscript import opset23 as op23

from kiln import ops  # noqa: F401  (registers torch.ops.kiln.*)

#: kiln op overload -> factory ``(opset) -> translation function`` for the exporter.
TRANSLATIONS: dict[torch._ops.OpOverload, Callable[[int], Callable[..., Any]]] = {}

#: The opset kiln exports with unless told otherwise (opset 23 brings ``Attention``).
DEFAULT_OPSET = 23

_FLOAT = 1  # onnx.TensorProto.FLOAT
_BOOL = 9  # onnx.TensorProto.BOOL


def register_translation(
    op: torch._ops.OpOverload,
) -> Callable[[Callable[[int], Callable[..., Any]]], Callable[[int], Callable[..., Any]]]:
    """Register ``factory(opset) -> translation`` as the ONNX translation of kiln op ``op``."""

    def wrap(factory: Callable[[int], Callable[..., Any]]) -> Callable[[int], Callable[..., Any]]:
        TRANSLATIONS[op] = factory
        return factory

    return wrap


def translation_table(opset: int) -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    """The ``custom_translation_table`` for ``torch.onnx.export`` at ``opset``."""
    return {op: factory(opset) for op, factory in TRANSLATIONS.items()}


@functools.cache
def ort_runs_attention() -> bool:
    """Whether the installed onnxruntime runs opset-23 ``Attention`` (GQA, causal) on the CPU."""
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        def vi(name: str, heads: int) -> Any:
            return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, heads, 2, 4])

        node = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1)
        graph = helper.make_graph([node], "probe", [vi("q", 2), vi("k", 1), vi("v", 1)], [vi("y", 2)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
        onnx.checker.check_model(model)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        q = np.ones((1, 2, 2, 4), np.float32)
        k = np.ones((1, 1, 2, 4), np.float32)
        (y,) = session.run(None, {"q": q, "k": k, "v": k})
        return bool(np.allclose(y, 1.0))
    except Exception:
        return False


# --------------------------------------------------------------------------------------
# kiln::attention
# --------------------------------------------------------------------------------------


def _same_dim(a: Any, b: Any) -> bool:
    """Whether two ONNX IR dims are provably equal (same int, or same symbolic name)."""
    if a is None or b is None:
        return False
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return getattr(a, "value", None) is not None and a.value == getattr(b, "value", None)


def _lengths_equal(q: Any, k: Any) -> bool:
    qs, ks = getattr(q, "shape", None), getattr(k, "shape", None)
    if qs is None or ks is None or len(qs) != 4 or len(ks) != 4:
        return False
    return _same_dim(qs[2], ks[2])


def _end_aligned_causal(q: Any, k: Any, op: Any) -> Any:
    """bool (Tq, Tk): key ``j`` visible to query ``i`` iff ``j <= i + Tk - Tq``."""
    tq = op.Squeeze(op.Shape(q, start=2, end=3))
    tk = op.Squeeze(op.Shape(k, start=2, end=3))
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    i = op.Unsqueeze(op.Add(op.Range(zero, tq, one), op.Sub(tk, tq)), op.Constant(value_ints=[1]))  # (Tq, 1)
    j = op.Unsqueeze(op.Range(zero, tk, one), op.Constant(value_ints=[0]))  # (1, Tk)
    return op.LessOrEqual(j, i)


def _combine(causal_mask: Any, mask: Any | None, q: Any, op: Any) -> Any:
    """One ``attn_mask`` from the causal bool mask and the user's bool/additive mask."""
    if mask is None:
        return causal_mask
    if mask.dtype is not None and int(mask.dtype) == _BOOL:
        return op.And(causal_mask, mask)
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), q)
    return op.Where(causal_mask, op.CastLike(mask, q), neg_inf)


def _full_mask(mask: Any, q: Any, k: Any, op: Any) -> Any:
    """``mask`` expanded to (..., Tq, Tk): ONNX Runtime's Attention broadcasts only the leading axes."""
    shape = getattr(mask, "shape", None)
    qs, ks = getattr(q, "shape", None), getattr(k, "shape", None)
    if shape is not None and qs is not None and ks is not None and len(shape) >= 2:
        if _same_dim(shape[-2], qs[2]) and _same_dim(shape[-1], ks[2]):
            return mask
    rank = len(shape) if shape is not None else 4
    lead = [op.Constant(value_ints=[1] * (rank - 2))] if rank > 2 else []
    target = op.Concat(*lead, op.Shape(q, start=2, end=3), op.Shape(k, start=2, end=3), axis=0)
    return op.Expand(mask, target)


def _attention_onnx23(
    q: Any, k: Any, v: Any, mask: Any | None = None, causal: bool = False, scale: float | None = None
) -> Any:
    """``kiln::attention`` as one ONNX ``Attention`` node (4-D inputs: head counts from shapes)."""
    op = op23
    is_causal = 0
    if causal and _lengths_equal(q, k):
        is_causal = 1  # start- and end-aligned causal coincide when Tq == Tk
    elif causal:
        mask = _combine(_end_aligned_causal(q, k, op), mask, q, op)
    elif mask is not None and mask.dtype is not None and int(mask.dtype) != _BOOL:
        mask = op.CastLike(mask, q)
    if mask is not None:
        mask = _full_mask(mask, q, k, op)
    y, _, _, _ = op.Attention(q, k, v, mask, is_causal=is_causal, scale=scale)
    return y


def _attention_decomposed(
    q: Any, k: Any, v: Any, mask: Any | None = None, causal: bool = False, scale: float | None = None
) -> Any:
    """``kiln::attention`` as MatMul / Softmax in fp32 (any opset >= 18): the reference, in ONNX."""
    op = op18
    qf, kf, vf = op.Cast(q, to=_FLOAT), op.Cast(k, to=_FLOAT), op.Cast(v, to=_FLOAT)
    hq, hkv = q.shape[1] if q.shape is not None else None, k.shape[1] if k.shape is not None else None
    if not (isinstance(hq, int) and isinstance(hkv, int)):
        raise ValueError("kiln::attention's decomposition needs static head counts")
    if hq != hkv:  # grouped-query attention: repeat each kv head hq // hkv times
        group = hq // hkv

        def repeat(t: Any) -> Any:
            b = op.Shape(t, start=0, end=1)  # t: (B, Hkv, Tk, D)
            rest = op.Shape(t, start=2, end=4)
            groups = op.Constant(value_ints=[hkv, group])
            expanded = op.Expand(op.Unsqueeze(t, op.Constant(value_ints=[2])), op.Concat(b, groups, rest, axis=0))
            heads = op.Constant(value_ints=[hq])
            return op.Reshape(expanded, op.Concat(b, heads, rest, axis=0))  # (B, Hq, Tk, D)

        kf, vf = repeat(kf), repeat(vf)
    if scale is None:
        d = op.Cast(op.Shape(q, start=3, end=4), to=_FLOAT)
        scale_v = op.Div(op.Constant(value_float=1.0), op.Sqrt(d))
    else:
        scale_v = op.Constant(value_float=float(scale))
    scores = op.Mul(op.MatMul(qf, op.Transpose(kf, perm=[0, 1, 3, 2])), scale_v)  # (B, Hq, Tq, Tk)
    neg_inf = op.Constant(value_float=float("-inf"))
    if causal:
        scores = op.Where(_end_aligned_causal(q, k, op), scores, neg_inf)
    if mask is not None:
        if mask.dtype is not None and int(mask.dtype) == _BOOL:
            scores = op.Where(mask, scores, neg_inf)
        else:
            scores = op.Add(scores, op.Cast(mask, to=_FLOAT))
    probs = op.Softmax(scores, axis=-1)
    return op.CastLike(op.MatMul(probs, vf), q)  # (B, Hq, Tq, D)


@register_translation(torch.ops.kiln.attention.default)
def attention_translation(opset: int) -> Callable[..., Any]:
    """ONNX ``Attention`` at opset >= 23 when onnxruntime runs it, else the decomposition."""
    if opset >= 23 and ort_runs_attention():
        return _attention_onnx23
    return _attention_decomposed


__all__ = [
    "DEFAULT_OPSET",
    "TRANSLATIONS",
    "attention_translation",
    "ort_runs_attention",
    "register_translation",
    "translation_table",
]
