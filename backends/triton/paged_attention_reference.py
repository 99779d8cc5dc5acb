"""Plain-torch references of the paged-attention kernels, same signatures as the kernels.

Each is the oracle its Triton kernel in ``paged_attention.py`` is tested against; they build
on ``kiln.ops``' reference of ``kiln::paged_attention``.
"""

from __future__ import annotations

import torch

from kiln.backends.triton._paged_checks import (
    _check_attention_inputs,
    _check_count,
    _check_out,
)
from kiln.ops import attention_reference as _attention_reference
from kiln.ops import gather_kv, is_quantized_cache, paged_attention_reference, write_kv_cache


def reshape_and_cache_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """Plain-torch oracle for :func:`reshape_and_cache` (``kiln.ops.write_kv_cache``)."""
    write_kv_cache(k, v, kv_cache, slot_mapping, kv_scales)


def _attend_sequences(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    starts: list[int],
    scale: float | None,
    out: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each sequence's query tokens ``starts[s]:starts[s+1]`` against its gathered cache (fp32 math).

    A float cache is read in q's dtype, a quantized one dequantized to fp32 (as ``kiln.ops``).
    """
    quantized = is_quantized_cache(kv_cache)
    for s, length in enumerate(seq_lens.tolist()):
        lo, hi = starts[s], starts[s + 1]
        if hi > lo:
            ks, vs = gather_kv(kv_cache, block_tables[s], length, kv_scales)  # (1, Hkv, length, D)
            if not quantized:
                ks, vs = ks.to(q.dtype), vs.to(q.dtype)
            o = _attention_reference(q[:, :, lo:hi], ks, vs, None, True, scale)
            out[:, :, lo:hi] = o
    return out


def paged_decode_attention_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    kv_scales: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch oracle for :func:`paged_decode_attention` (``num_splits`` and ``max_seq_len`` are ignored)."""
    name = "paged_decode_attention_reference"
    _check_attention_inputs(name, q, kv_cache, block_tables, seq_lens, query_start_loc, kv_scales)
    out = _check_out(name, out, q)
    num_seqs = seq_lens.shape[0]
    starts = query_start_loc.tolist() if query_start_loc is not None else list(range(num_seqs + 1))
    return _attend_sequences(q, kv_cache, block_tables, seq_lens, starts, scale, out, kv_scales)


def paged_prefill_attention_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float | None = None,
    *,
    kv_scales: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch oracle for :func:`paged_prefill_attention`, one sequence at a time."""
    name = "paged_prefill_attention_reference"
    _check_attention_inputs(name, q, kv_cache, block_tables, seq_lens, query_start_loc, kv_scales)
    out = _check_out(name, out, q)
    _check_count(name, "max_query_len", max_query_len, 0)
    starts = query_start_loc.tolist()
    return _attend_sequences(q, kv_cache, block_tables, seq_lens, starts, scale, out, kv_scales)


__all__ = [
    "paged_attention_reference",
    "paged_decode_attention_reference",
    "paged_prefill_attention_reference",
    "reshape_and_cache_reference",
]
