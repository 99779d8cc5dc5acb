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
    (float) or boolean (True = attend) and broadcasts to (B, Hq, Tq, Tk). A query row that
    may attend to no key at all outputs zeros.
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
    # a query that may attend to nothing gets output 0 (as SDPA and the flash kernel), not NaN
    probs = torch.where(scores.amax(dim=-1, keepdim=True) == float("-inf"), 0.0, probs)
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


# --------------------------------------------------------------------------------------
# kiln::paged_attention — write new K/V into a block-paged cache, attend over the cache.
# --------------------------------------------------------------------------------------


@torch.library.custom_op("kiln::paged_attention", mutates_args=("kv_cache",))
def paged_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float | None = None,
) -> Tensor:
    """Causal attention of a flattened batch of sequences over a block-paged KV cache.

    Layout (vLLM's, Kwon et al. 2023): the token axis of ``q``/``k``/``v`` (1, H, T, D)
    holds the new tokens of every scheduled sequence back to back; sequence ``i`` owns
    tokens ``query_start_loc[i]:query_start_loc[i+1]``. ``kv_cache`` (2, num_blocks,
    block_size, Hkv, D) holds keys ([0]) and values ([1]); token ``t``'s key and value are
    written at flat slot ``slot_mapping[t]`` (``block * block_size + offset``; negative:
    skip). Sequence ``i`` then attends over its first ``seq_lens[i]`` cached tokens, found
    through ``block_tables[i]``, with its queries aligned to the end (causal).
    """
    return paged_attention_reference(q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, scale)


def write_kv_cache(k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    """Reference cache write: ``kv_cache[:, slot]`` <- the token's key and value (slot < 0: skipped)."""
    _, num_blocks, block_size, hkv, d = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, hkv, d)  # (2, slots, Hkv, D)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    flat[0, slots] = k[0].transpose(0, 1)[keep].to(kv_cache.dtype)  # (T, Hkv, D)
    flat[1, slots] = v[0].transpose(0, 1)[keep].to(kv_cache.dtype)


def gather_kv(kv_cache: Tensor, block_table: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """The first ``length`` cached keys and values of one sequence, as (1, Hkv, length, D)."""
    block_size = kv_cache.shape[2]
    n_blocks = (length + block_size - 1) // block_size
    blocks = block_table[:n_blocks].long()
    k = kv_cache[0, blocks].flatten(0, 1)[:length]  # (length, Hkv, D)
    v = kv_cache[1, blocks].flatten(0, 1)[:length]
    return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)


def paged_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float | None = None,
) -> Tensor:
    """The plain-torch reference of ``kiln::paged_attention`` (one sequence at a time)."""
    write_kv_cache(k, v, kv_cache, slot_mapping)
    out = torch.zeros_like(q)  # (1, Hq, T, D); rows of padding tokens stay zero
    starts = query_start_loc.tolist()
    for i, length in enumerate(seq_lens.tolist()):
        lo, hi = starts[i], starts[i + 1]
        if hi == lo:
            continue
        ks, vs = gather_kv(kv_cache, block_tables[i], length)
        out[:, :, lo:hi] = attention_reference(q[:, :, lo:hi], ks.to(q.dtype), vs.to(q.dtype), None, True, scale)
    return out


@paged_attention.register_fake
def _paged_attention_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float | None = None,
) -> Tensor:
    return torch.empty_like(q)


@invariant(torch.ops.kiln.paged_attention.default)
def _paged_attention_invariant(node: Node) -> str | None:
    q, k, v, cache = (a.meta.get("val") for a in node.args[:4])  # type: ignore[union-attr]
    if cache is None or cache.dim() != 5 or cache.shape[0] != 2:
        return "kv_cache must be (2, num_blocks, block_size, Hkv, D)"
    if k.shape[1] != cache.shape[3] or k.shape[-1] != cache.shape[4]:
        return f"k (heads {k.shape[1]}, dim {k.shape[-1]}) does not match the cache (heads {cache.shape[3]}, dim {cache.shape[4]})"
    if isinstance(q.shape[1], int) and q.shape[1] % k.shape[1]:
        return f"query heads {q.shape[1]} are not a multiple of kv heads {k.shape[1]}"
    return None


__all__ = [
    "INVARIANTS",
    "attention",
    "attention_reference",
    "gather_kv",
    "invariant",
    "is_kiln_op",
    "paged_attention",
    "paged_attention_reference",
    "write_kv_cache",
]
