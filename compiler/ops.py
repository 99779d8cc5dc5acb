"""kiln's operators: the ``kiln::`` namespace of the IR.

Each op is a ``torch.library.custom_op`` with a fake (meta) implementation, so shapes and
dtypes propagate through passes, the graph re-exports and every backend can consume it.
Each op has exactly one reference implementation in plain torch (registered for every
device); fast kernels register themselves for CUDA in ``kiln.backends.triton`` and must
match the reference.

An op may also declare *invariants*: a function ``check(node) -> str | None`` returning a
reason when the node is malformed. ``kiln.ir.verify`` runs them on every kiln node.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.fx import Node

#: kiln op overload -> invariant checker returning a reason string when the node is malformed.
INVARIANTS: dict[object, Callable[[Node], str | None]] = {}


def invariant(op: object) -> Callable[[Callable[[Node], str | None]], Callable[[Node], str | None]]:
    """Register ``fn`` as the invariant checker of kiln op ``op`` (used by ``kiln.ir.verify``)."""

    def wrap(fn: Callable[[Node], str | None]) -> Callable[[Node], str | None]:
        INVARIANTS[op] = fn
        return fn

    return wrap


def is_kiln_op(target: object) -> bool:
    """Whether an FX node target is an operator of the ``kiln::`` namespace."""
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "kiln"


# --------------------------------------------------------------------------------------
# kiln::attention — scaled dot-product attention with GQA expressed by head counts.
# --------------------------------------------------------------------------------------


@torch.library.custom_op("kiln::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False, scale: float | None = None
) -> Tensor:
    """softmax(q kᵀ · scale + mask) v over (B, H, T, D) tensors.

    ``k`` and ``v`` may have fewer heads than ``q`` (grouped-query attention): query head
    ``h`` reads kv head ``h // (Hq // Hkv)``. ``causal`` masks key ``j`` for query ``i``
    when ``j > i + Tk - Tq`` (queries aligned to the end of the keys). ``mask`` is additive
    (float) or boolean (True = attend) and broadcasts to (B, Hq, Tq, Tk).
    """
    return attention_reference(q, k, v, mask, causal, scale)


def attention_reference(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False, scale: float | None = None
) -> Tensor:
    """The plain-torch reference of ``kiln::attention`` (fp32 math, output in q's dtype)."""
    b, hq, tq, d = q.shape  # (B, Hq, Tq, D)
    hkv, tk = k.shape[1], k.shape[2]  # k, v: (B, Hkv, Tk, D)
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.float()
    kf = k.float().repeat_interleave(group, dim=1)  # (B, Hq, Tk, D)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(qf, kf.transpose(-2, -1)) * scale  # (B, Hq, Tq, Tk)
    if causal:
        i = torch.arange(tq, device=q.device).unsqueeze(1)
        j = torch.arange(tk, device=q.device).unsqueeze(0)
        scores = scores.masked_fill(j > i + (tk - tq), float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).to(q.dtype)  # (B, Hq, Tq, D)


@attention.register_fake
def _attention_fake(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False, scale: float | None = None
) -> Tensor:
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "kiln::attention takes (B, H, T, D)")
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@invariant(torch.ops.kiln.attention.default)
def _attention_invariant(node: Node) -> str | None:
    q, k, v = (a.meta.get("val") for a in node.args[:3])  # type: ignore[union-attr]
    if q is None or k is None or v is None:
        return "q, k and v need shape metadata"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be rank 4 (B, H, T, D), got ranks {q.dim()}, {k.dim()}, {v.dim()}"
    if k.shape[1] != v.shape[1]:
        return f"k and v head counts differ: {k.shape[1]} vs {v.shape[1]}"
    if isinstance(q.shape[1], int) and isinstance(k.shape[1], int) and q.shape[1] % k.shape[1]:
        return f"query heads {q.shape[1]} are not a multiple of kv heads {k.shape[1]}"
    if q.shape[-1] != k.shape[-1]:
        return f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    return None


__all__ = ["INVARIANTS", "attention", "attention_reference", "invariant", "is_kiln_op"]
