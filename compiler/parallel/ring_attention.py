"""Ring attention: context parallelism for long prefills.

Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite
Context" (arXiv:2310.01889). The token axis is split over the W ranks of a group; every rank
keeps its queries and passes its keys and values around the ring, W - 1 hops, with
``torch.distributed`` P2P (``batch_isend_irecv``, the next hop in flight while the current
block is computed). Each block's partial attention is merged with the online softmax
(Milakov & Gimelshein 2018; FlashAttention's rescaling): with per-row log-sum-exps
``l_a, l_b``, ``l = logaddexp(l_a, l_b)`` and ``o = e^(l_a - l) o_a + e^(l_b - l) o_b``.

Causality is decided by *positions*, not indices: every token carries its global position,
so any assignment of tokens to ranks is exact, including the load-balanced **zigzag**
split (rank r holds chunks r and 2W - 1 - r of 2W, so every rank does the same causal
work); a key block wholly in the future of a rank's queries is skipped.

``kiln::ring_attention(q, k, v, positions, causal, scale, group_name)`` is the IR operator
(``group_name`` ``""``: the default process group); with no process group, or a group of
one, it is ordinary attention. Its reference is checked against ``kiln::attention``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.fx import Node

from kiln.errors import ConfigError
from kiln.ops import invariant

NEG_INF = float("-inf")


def block_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """Attention of queries over one key block: (out (B, Hq, Tq, D) fp32, lse (B, Hq, Tq) fp32).

    Rows that may attend to no key of the block have lse -inf and output 0.
    """
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)  # (B, Hq, Tk, D)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-2, -1)) * scale  # (B, Hq, Tq, Tk)
    if causal:
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, Tq)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # all-masked rows: exp(-inf - -inf) = nan -> 0
    return torch.matmul(probs, vf), lse


def merge_blocks(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Online-softmax merge of two partial attentions over disjoint key sets."""
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    wa = torch.where(finite, torch.exp(lse_a - lse), 0.0)[..., None]
    wb = torch.where(finite, torch.exp(lse_b - lse), 0.0)[..., None]
    return wa * out_a + wb * out_b, lse


def resolve_group(group_name: str) -> dist.ProcessGroup | None:
    """The process group called ``group_name`` (``""``: the default group); None without torch.distributed."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    if not group_name:
        return dist.group.WORLD
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    causal: bool = True,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """This rank's share of attention over the whole ring's keys (see the module docstring).

    ``q`` (B, Hq, Tq, D), ``k``/``v`` (B, Hkv, Tq, D) and ``positions`` (Tq,) hold this rank's
    tokens; key and value heads may be fewer than query heads (GQA). Returns (B, Hq, Tq, D)
    in q's dtype.
    """
    if positions.dim() != 1 or positions.shape[0] != q.shape[2] or k.shape[2] != q.shape[2]:
        raise ConfigError(
            f"ring attention needs one position per local token: q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"positions {tuple(positions.shape)}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    world = dist.get_world_size(group) if group is not None else 1
    q_pos = positions.to(q.device)
    out = torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], NEG_INF, dtype=torch.float32, device=q.device)
    wire = torch.device("cpu") if group is not None and dist.get_backend(group) == "gloo" else q.device
    rank = dist.get_rank(group) if group is not None else 0
    nxt = dist.get_global_rank(group, (rank + 1) % world) if world > 1 else 0
    prv = dist.get_global_rank(group, (rank - 1) % world) if world > 1 else 0
    block = [t.contiguous().to(wire) for t in (k, v, positions.to(torch.int64))]
    sizes = _token_counts(q.shape[2], group, wire) if world > 1 else [q.shape[2]]
    for hop in range(world):
        works = []
        if hop < world - 1:  # pass this block on while computing with it
            n = sizes[(rank - hop - 1) % world]  # the block arriving now started on rank - hop - 1
            incoming = [t.new_empty((*t.shape[:-2], n, t.shape[-1]) if t.dim() > 1 else (n,)) for t in block]
            ops = [dist.P2POp(dist.isend, t, nxt, group) for t in block]
            ops += [dist.P2POp(dist.irecv, t, prv, group) for t in incoming]
            works = dist.batch_isend_irecv(ops)
        kb, vb, kp = (t.to(q.device) for t in block)
        if not causal or bool(kp.min() <= q_pos.max()):  # a block wholly in the future adds nothing
            o, s = block_attention(q, kb, vb, q_pos, kp, causal, scale)
            out, lse = merge_blocks(out, lse, o, s)
        for w in works:
            w.wait()
        if hop < world - 1:
            block = incoming
    return out.to(q.dtype)


def _token_counts(local: int, group: dist.ProcessGroup, wire: torch.device) -> list[int]:
    """Every rank's local token count (shards may differ by one token)."""
    mine = torch.tensor([local], dtype=torch.int64, device=wire)
    counts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, mine, group=group)
    return [int(c) for c in counts]


@torch.library.custom_op("kiln::ring_attention", mutates_args=())
def ring_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    causal: bool = True,
    scale: float | None = None,
    group_name: str = "",
) -> Tensor:
    """``kiln::ring_attention``: causal (by position) or full attention over the ring's tokens."""
    return ring_attention(q, k, v, positions, causal, scale, resolve_group(group_name))


@ring_attention_op.register_fake
def _ring_attention_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    causal: bool = True,
    scale: float | None = None,
    group_name: str = "",
) -> Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@invariant(torch.ops.kiln.ring_attention.default)
def _ring_attention_invariant(node: Node) -> str | None:
    q, k, v, pos = (a.meta.get("val") for a in node.args[:4])  # type: ignore[union-attr]
    if any(t is None for t in (q, k, v, pos)):
        return "q, k, v and positions need shape metadata"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be rank 4 (B, H, T, D), got ranks {q.dim()}, {k.dim()}, {v.dim()}"
    if isinstance(q.shape[1], int) and isinstance(k.shape[1], int) and q.shape[1] % k.shape[1]:
        return f"query heads {q.shape[1]} are not a multiple of kv heads {k.shape[1]}"
    if pos.dim() != 1:
        return f"positions must be one per local token, (T,), got rank {pos.dim()}"
    return None


# --------------------------------------------------------------------------------------
# Splitting a sequence over the ring
# --------------------------------------------------------------------------------------


def shard_indices(num_tokens: int, rank: int, world: int, *, zigzag: bool = True) -> Tensor:
    """Token indices rank ``rank`` holds: contiguous chunk ``rank`` of W, or zigzag chunks r and 2W-1-r of 2W."""
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is not in 0 .. {world - 1}")
    idx = torch.arange(num_tokens)
    if not zigzag:
        return torch.tensor_split(idx, world)[rank]
    chunks = torch.tensor_split(idx, 2 * world)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]])


def gather_tokens(
    local: Tensor, num_tokens: int, axis: int, group: dist.ProcessGroup | None, *, zigzag: bool = True
) -> Tensor:
    """All ranks' shards of a tensor split on ``axis`` by :func:`shard_indices`, reassembled in token order."""
    world = dist.get_world_size(group) if group is not None else 1
    sizes = [len(shard_indices(num_tokens, r, world, zigzag=zigzag)) for r in range(world)]
    if world > 1:  # all_gather takes equal sizes: pad every shard to the largest
        wire = torch.device("cpu") if dist.get_backend(group) == "gloo" else local.device
        width = max(sizes)
        pad = list(local.shape)
        pad[axis] = width - local.shape[axis]
        padded = torch.cat([local.to(wire), local.new_zeros(pad, device=wire)], dim=axis).contiguous()
        slots = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(slots, padded, group=group)
        pieces = [p.narrow(axis, 0, n) for p, n in zip(slots, sizes, strict=True)]
    else:
        pieces = [local]
    order = torch.cat([shard_indices(num_tokens, r, world, zigzag=zigzag) for r in range(world)])
    full = torch.cat([p.to(local.device) for p in pieces], dim=axis)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(num_tokens)
    return full.index_select(axis, inverse.to(local.device))


__all__ = [
    "block_attention",
    "gather_tokens",
    "merge_blocks",
    "resolve_group",
    "ring_attention",
    "ring_attention_op",
    "shard_indices",
]
