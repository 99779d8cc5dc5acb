"""Paged attention in Triton: cache writes, split-K decode and varlen prefill over a paged KV cache.

The CUDA implementation of ``kiln::paged_attention`` (vLLM's layout, Kwon et al. 2023,
"Efficient Memory Management for Large Language Model Serving with PagedAttention"): the new
tokens of every scheduled sequence lie back to back on the token axis of q/k/v (1, H, T, D);
``kv_cache`` (2, num_blocks, block_size, Hkv, D) holds keys ([0]) and values ([1]) in
fixed-size blocks that ``block_tables`` (S, max_blocks) maps to each sequence.

Three kernels, each with a plain-torch reference of the same signature beside it:

- :func:`reshape_and_cache`: writes token ``t``'s key and value at flat slot
  ``slot_mapping[t]`` (negative: skipped), casting to the cache's dtype.
- :func:`paged_decode_attention`: one query token per sequence. Split-K "flash-decoding"
  (Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for long-context inference"; vLLM's
  PagedAttention V2): the grid is (sequences, KV heads, splits); a program loads each
  key/value tile of its split once for the whole GQA group (the ``Hq / Hkv`` query heads
  are the rows of a ``tl.dot``, padded to 16), runs an fp32 online softmax and writes a
  partial output and its log-sum-exp; a second kernel combines the splits. With one split
  the first kernel writes the output directly and the second is not launched.
- :func:`paged_prefill_attention`: several query tokens per sequence (prefill, chunked
  prefill, speculative verification): FlashAttention-2 (Dao 2023, arXiv:2307.08691) with
  grid (query blocks, sequences, Hq), keys and values read through the block table, causal
  with the queries aligned to the end of each sequence's keys (see ``flash_attention.py``).

:func:`paged_attention` writes the cache and dispatches: an all-decode batch goes to the
decode kernel, anything else to the prefill kernel (which also serves one-token sequences).
A decode batch whose every token belongs to a sequence (what a CUDA-graph decode step runs)
with a float cache can skip the write's launch: the decode program whose split holds a
sequence's last position writes its new key and value first (``DECODE_WRITES_KV``). The
prefill kernel can write zeros in the rows of tokens no sequence owns (padding of a graph's
token bucket) instead of a fill of the whole output before it (``PREFILL_ZEROES_UNOWNED``).

Tiles are independent of the cache's block size: each key of a tile finds its block through
the table, so any block size works (powers of two make the index math shifts). Cache dtype
may differ from q's: keys and values are cast to q's dtype as they are loaded, as the
reference does. The contents of the metadata tensors are not validated (that needs a
device-to-host copy): slots, block ids and offsets must be in range.

Quantized cache (issue #7): an int8 or fp8 e4m3 ``kv_cache`` takes ``kv_scales`` (see
``kiln.ops.check_kv_scales``): one fp32 scale per (token, KV head), computed and written by
:func:`reshape_and_cache` beside the codes (``amax / qmax``), or static per-tensor k/v scales
(vLLM's fp8 ``k_scale`` / ``v_scale``). The write is bit-exact against the reference (IEEE
division, fp8 rounded to nearest even by hand). Reads dequantize in registers: codes convert
exactly to the dot's dtype, fp16 under a 16-bit q (int8 by bits, FasterTransformer's
``0x6480 + x`` trick, fp8 by the hardware's paired cvt; q is rounded to fp16 once, exact in
fp16's range), and the scales multiply the score columns (keys) and the probabilities
(values), never a D-wide tile; static scales fold into the softmax scale and the output.
Decode then reads about half the bytes of a bf16 cache (D + 4 bytes per row for int8's
per-token scales, D for fp8).

On the GPU, 16-bit inputs use the tensor cores (``mma``) and ``cp.async`` pipelined 16-byte
loads of K/V; fp32 inputs compute exact fp32 dots on the FMA units and spill registers:
correct, for tests, not fast. The decode tiles and the split heuristic's constants are
starting points until ``benchmarks/decode_attention.py --sweep-splits`` has run on a GPU.

Tensors on the CPU run only in Triton's interpreter: set ``TRITON_INTERPRET=1`` before this
module is imported.
"""

from __future__ import annotations

import math

import torch
import triton

from kiln.backends.triton import _paged_checks
from kiln.backends.triton._paged_cache_kernels import _reshape_and_cache_kernel
from kiln.backends.triton._paged_checks import (
    DECODE_MAX_SPLITS,
    DECODE_MIN_SPLIT_KEYS,
    DECODE_WAVE_MIN_SPLIT_KEYS,
    PREFILL_MAX_SPLITS,
    _cache_strides,
    _check_attention_inputs,
    _check_cache,
    _check_count,
    _check_out,
    _check_scales,
    _check_tokens,
    _describe,
    _dot_precision,
    _fail,
    _num_sms,
    _scale_args,
    _upcast_dot,
    decode_combines_in_kernel,
    decode_min_split_keys,
    decode_num_splits,
    decode_split_slack,
    prefill_num_splits,
)
from kiln.backends.triton._paged_combine import _paged_decode_combine_kernel
from kiln.backends.triton._paged_kernels import _paged_decode_kernel, _paged_prefill_kernel
from kiln.backends.triton._utils import arrival_counters, check_triton_device, next_power_of_2, pdl_enabled
from kiln.backends.triton.paged_attention_reference import (
    paged_attention_reference,
    paged_decode_attention_reference,
    paged_prefill_attention_reference,
    reshape_and_cache_reference,
)
from kiln.ops import KV_CACHE_QMAX

__all__ = [
    "DECODE_MAX_SPLITS",
    "DECODE_MIN_SPLIT_KEYS",
    "DECODE_WAVE_MIN_SPLIT_KEYS",
    "decode_combines_in_kernel",
    "decode_min_split_keys",
    "decode_num_splits",
    "decode_split_slack",
    "paged_attention",
    "paged_attention_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_prefill_attention",
    "paged_prefill_attention_reference",
    "reshape_and_cache",
    "reshape_and_cache_reference",
]

_LOG2E = 1.4426950408889634
#: Split keys combine in the kernel's last-arriving split (one launch) rather than in a second kernel.
#: False restores the combine kernel (A/B measurements; the two differ only in summation order). On an
#: H100 the 1B decode step takes 1.329 ms with it, 1.371 ms without (benchmarks/RESULTS.md).
FUSED_COMBINE = True
#: The decode kernel's choice: None asks :func:`decode_combines_in_kernel` (in the kernel with few splits or
#: many (sequence, KV head) groups, else the combine kernel); True / False force one (A/B switch).
DECODE_FUSED_COMBINE: bool | None = None
#: Prefill programs take every query head of a KV group (rows = tokens x group), so each key tile is read
#: once per group instead of once per query head. On an H100 the 1B prefix-cache hit (128 new tokens over
#: 2,176 keys) takes 2.407 ms with it, 2.465 ms without (benchmarks/RESULTS.md); False is the A/B switch.
PACK_GQA = True
#: An all-decode batch whose every token belongs to a sequence (a CUDA-graph decode step) writes the new
#: keys and values in the decode kernel, a float cache only: one launch a layer fewer. On an H100 the 1B
#: batch-1 step took 1.189 ms with it, 1.192 ms without (benchmarks/RESULTS.md, session 12; CUDA tests
#: pass). False: the separate :func:`reshape_and_cache` launch (A/B switch).
DECODE_WRITES_KV = True
#: Mixed steps: the prefill kernel writes zeros in the rows of tokens no sequence owns instead of a fill
#: of the whole output first. On an H100 the 1B prefix-cache hit's TTFT fell from 2.368 to 2.314 ms
#: (session 12). False: the fill (A/B switch).
PREFILL_ZEROES_UNOWNED = True
#: Partial outputs the decode kernel's in-kernel combine loads at once (unrolled, so their L2 round trips
#: overlap). H100, batch 1, 32 splits at 16k keys (session 11): chunk 1 39.7 us, 4 36.1 us, 8 36.2 us
#: (and 8 spills registers with 32-key tiles).
COMBINE_CHUNK = 4


# ----------------------------------------------------------------------------- fast paths


def reshape_and_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """Write token ``t``'s key and value (1, Hkv, T, D) into ``kv_cache`` at flat slot ``slot_mapping[t]``.

    ``slot = block * block_size + offset``; a negative slot skips the token (padding). Values
    are cast to the cache's dtype; an int8 / fp8 cache stores symmetric codes
    (``kiln.ops.quantize_kv``, bit-exact): with static ``kv_scales`` (2,), ``x / s``
    saturated; with per-token ``kv_scales`` (2, blocks, block_size, Hkv), each (token, KV
    head) row gets ``s = amax / qmax``, written beside its codes. ``slot_mapping`` is (T,)
    int64 (or int32); slots are not range-checked (that would need a device-to-host copy).
    """
    name = "reshape_and_cache"
    _check_cache(name, kv_cache)
    scale_mode = _check_scales(name, kv_cache, kv_scales)
    _, _, page_size, hkv, d = kv_cache.shape
    _check_tokens(name, "k", k, hkv, d)
    _check_tokens(name, "v", v, hkv, d)
    if k.shape != v.shape:
        _fail(name, f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    t = k.shape[2]
    if (
        not isinstance(slot_mapping, torch.Tensor)
        or slot_mapping.dtype not in (torch.int64, torch.int32)
        or (slot_mapping.shape != (t,))
    ):
        _fail(
            name,
            f"slot_mapping must be a ({t},) int64 tensor (one slot per token), got {_describe(slot_mapping)}",
        )
    check_triton_device(name, _paged_checks._INTERPRET, k, v, kv_cache, slot_mapping)
    if t == 0 or hkv == 0:
        return
    d_pad = next_power_of_2(d)
    block_h = min(next_power_of_2(hkv), max(1, 2048 // d_pad))  # <= 2048 elements per program
    scales, *scale_strides = _scale_args(kv_cache, kv_scales)
    pdl = pdl_enabled(k.device, _paged_checks._INTERPRET)
    _reshape_and_cache_kernel[(t, triton.cdiv(hkv, block_h))](
        k, v, kv_cache, slot_mapping, scales,
        k.stride(1), k.stride(2), k.stride(3), v.stride(1), v.stride(2), v.stride(3),
        *_cache_strides(kv_cache), *scale_strides, hkv, page_size,
        HEAD_DIM=d, BLOCK_H=block_h, BLOCK_D=d_pad, SCALE_MODE=scale_mode,
        QMAX=KV_CACHE_QMAX.get(kv_cache.dtype, 0.0), INT_CODES=kv_cache.dtype == torch.int8, USE_PDL=pdl,
        num_warps=4, launch_pdl=pdl,
    )  # fmt: skip


def paged_decode_attention(
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
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its cached keys (split-K flash-decoding).

    Args:
        q: (1, Hq, T, D); the query of sequence ``s`` is token ``query_start_loc[s]`` (token
            ``s`` when ``query_start_loc`` is None, which needs ``T == num_seqs``).
        kv_cache: (2, num_blocks, block_size, Hkv, D), any supported dtype; ``Hq % Hkv == 0``.
        block_tables: (S, max_blocks) int32 block ids of each sequence.
        seq_lens: (S,) int32 cached tokens of each sequence, the new one included (it attends to all).
        query_start_loc: optional (S + 1,) int32 token offsets; every sequence must own 0 or 1 token.
        scale: softmax scale; default ``1 / sqrt(D)``.
        kv_scales: the scales of an int8 / fp8 cache (see :func:`reshape_and_cache`); codes are
            dequantized in registers.
        num_splits: splits of each sequence's keys (1..``DECODE_MAX_SPLITS``); default
            :func:`decode_num_splits` of ``max_seq_len``.
        max_seq_len: the longest ``seq_lens`` entry, only for the default ``num_splits``; default
            ``max_blocks * block_size`` (known without a device-to-host copy).
        out: optional (1, Hq, T, D) buffer of q's dtype. Rows of tokens owned by no sequence are
            not written.
        new_kv: optional ``(k, v, slot_mapping)`` as :func:`reshape_and_cache` takes them, written by
            this kernel (a float cache only): sequence ``s``'s token is its key position
            ``seq_lens[s] - 1``, and every token must belong to a sequence (tokens of none are not
            written). Saves the cache write's launch.

    Returns:
        (1, Hq, T, D) in q's dtype. Nothing here copies device data to the host, so a fixed
        ``num_splits`` makes the call capturable in a CUDA graph.
    """
    name = "paged_decode_attention"
    scale_mode = _check_attention_inputs(
        name, q, kv_cache, block_tables, seq_lens, query_start_loc, kv_scales
    )
    out = _check_out(name, out, q)
    _, hq, t, d = q.shape
    _, _, page_size, hkv, _ = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    if query_start_loc is None and t != num_seqs:
        _fail(
            name, f"without query_start_loc, q must hold one token per sequence: T={t}, num_seqs={num_seqs}"
        )
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * page_size
    _check_count(name, "max_seq_len", max_seq_len, 0)
    sms = _num_sms(q.device)
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, hkv, max_seq_len, sms, d)
    _check_count(name, "num_splits", num_splits, 1, DECODE_MAX_SPLITS)
    if num_seqs == 0 or out.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    group = hq // hkv
    d_pad = max(16, next_power_of_2(d))
    qsl = query_start_loc if query_start_loc is not None else seq_lens  # unused pointer when absent
    if num_splits == 1:  # write the output directly, no combine
        part = out[0].transpose(0, 1).unsqueeze(2)  # (T, Hq, 1, D) view
        lse = part  # unused
        lse_strides = (0, 0, 0)
    else:
        part = torch.empty(t, hq, num_splits, d, dtype=torch.float32, device=q.device)  # (T, Hq, splits, D)
        lse = torch.empty(t, hq, num_splits, dtype=torch.float32, device=q.device)  # (T, Hq, splits)
        lse_strides = lse.stride()
    keys_bucket = next_power_of_2(max(16, triton.cdiv(max_seq_len, num_splits)))
    scales, *scale_strides = _scale_args(kv_cache, kv_scales)
    if DECODE_FUSED_COMBINE is None:
        fused = FUSED_COMBINE and decode_combines_in_kernel(num_splits, num_seqs, hkv, sms)
    else:
        fused = num_splits > 1 and DECODE_FUSED_COMBINE
    cnt = arrival_counters(q.device, num_seqs * hkv) if fused else seq_lens  # unused pointer when not fused
    min_keys = decode_min_split_keys(num_seqs, hkv, sms, DECODE_MIN_SPLIT_KEYS, DECODE_WAVE_MIN_SPLIT_KEYS)
    slack = decode_split_slack(num_seqs, hkv, sms, min_keys)
    pdl = pdl_enabled(q.device, _paged_checks._INTERPRET)
    write: dict = {}
    if new_kv is not None:
        k, v, slots = new_kv
        if scale_mode != 0:
            _fail(name, "new_kv takes a float cache; an int8 / fp8 cache is written by reshape_and_cache")
        for what, x in (("k", k), ("v", v)):
            _check_tokens(name, what, x, hkv, d)
            if x.shape[2] != t:
                _fail(name, f"{what} must hold q's {t} tokens, got {_describe(x)}")
        if not isinstance(slots, torch.Tensor) or slots.dtype not in (torch.int64, torch.int32) or slots.shape != (t,):
            _fail(name, f"slot_mapping must be a ({t},) int64 tensor, got {_describe(slots)}")
        check_triton_device(name, _paged_checks._INTERPRET, k, v, slots)
        write = dict(WRITE_KV=True, K=k, V=v, Slots=slots, stride_kh=k.stride(1), stride_kt=k.stride(2),
                     stride_kd=k.stride(3), stride_vh=v.stride(1), stride_vt=v.stride(2), stride_vd=v.stride(3))  # fmt: skip
    _paged_decode_kernel[(num_seqs, hkv, num_splits)](
        q, kv_cache, block_tables, seq_lens, qsl, part, lse, scales,
        q.stride(1), q.stride(2), q.stride(3), *_cache_strides(kv_cache), *scale_strides, block_tables.stride(0),
        *part.stride(), *lse_strides,
        out, out.stride(1), out.stride(2), out.stride(3), cnt,
        group, num_splits, scale * _LOG2E, min_keys, slack, keys_bucket, next_power_of_2(num_seqs * hkv),
        HAS_QUERY_START=query_start_loc is not None, WRITE_LSE=num_splits > 1, FUSED=fused, PAGE_SIZE=page_size,
        HEAD_DIM=d, HEAD_DIM_PAD=d_pad, GROUP_PAD=max(16, next_power_of_2(group)),
        DOT_PRECISION=_dot_precision(q.dtype), UPCAST_DOT=_upcast_dot(q.dtype),
        SCALE_MODE=scale_mode, INT_CODES=kv_cache.dtype == torch.int8,
        DOT_FP16=scale_mode > 0 and q.dtype != torch.float32, SPLITS_PAD=DECODE_MAX_SPLITS if fused else 1,
        COMBINE_CHUNK=COMBINE_CHUNK, USE_PDL=pdl, launch_pdl=pdl, **write,  # one variant for every split count
    )  # fmt: skip
    if num_splits > 1 and not fused:
        _paged_decode_combine_kernel[(num_seqs, hq)](
            part, lse, qsl, out, *part.stride(), *lse.stride(), out.stride(1), out.stride(2), out.stride(3),
            num_splits, HAS_QUERY_START=query_start_loc is not None, HEAD_DIM=d,
            HEAD_DIM_PAD=next_power_of_2(d), SPLITS_PAD=next_power_of_2(num_splits), num_warps=4,
            USE_PDL=pdl, launch_pdl=pdl,
        )  # fmt: skip
    return out


def paged_prefill_attention(
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
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    zero_unowned: bool = False,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix and themselves.

    Sequence ``s`` owns query tokens ``query_start_loc[s]:query_start_loc[s+1]`` of q
    (1, Hq, T, D), already written to the cache, and attends over its first ``seq_lens[s]``
    cached keys; query ``i`` of ``n`` sees keys ``j <= i + seq_lens[s] - n``. Any query length
    works, one included. ``max_query_len`` (the longest query) sizes the grid: a smaller value
    drops rows. Rows of tokens owned by no sequence are not written, or with ``zero_unowned``
    written as zeros (by the kernel: no fill of ``out`` first). ``num_splits``: splits of
    each row block's keys (1..``PREFILL_MAX_SPLITS``, merged by a combine kernel); default
    :func:`prefill_num_splits` of ``max_seq_len`` (default: the block table's capacity, which
    is what a CUDA graph must assume). Other arguments as in :func:`paged_decode_attention`.
    """
    name = "paged_prefill_attention"
    scale_mode = _check_attention_inputs(
        name, q, kv_cache, block_tables, seq_lens, query_start_loc, kv_scales
    )
    out = _check_out(name, out, q)
    _check_count(name, "max_query_len", max_query_len, 0)
    _, hq, _, d = q.shape
    _, _, page_size, hkv, _ = kv_cache.shape
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_query_len == 0 or out.numel() == 0:
        return out.zero_() if zero_unowned else out
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if num_splits is None:
        bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * page_size
        num_splits = prefill_num_splits(max_query_len, num_seqs, hq, bound, _num_sms(q.device))
    _check_count(name, "num_splits", num_splits, 1, PREFILL_MAX_SPLITS)
    t = q.shape[2]
    fused = num_splits > 1 and FUSED_COMBINE
    zero_in_kernel = zero_unowned and (num_splits == 1 or fused)  # the combine kernel skips unowned tokens
    if zero_unowned and not zero_in_kernel:
        out.zero_()
    if num_splits == 1:
        part, lse = out, out  # written directly; lse unused
        part_strides = (out.stride(1), out.stride(2), 0, out.stride(3))
        lse_strides = (0, 0, 0)
    else:
        part = torch.empty(t, hq, num_splits, d, dtype=torch.float32, device=q.device)  # (T, Hq, splits, D)
        if fused:  # every split writes its owned rows' log-sum-exps; the last one combines only those
            lse = torch.empty(t, hq, num_splits, dtype=torch.float32, device=q.device)
        else:  # the combine kernel visits every token: unowned ones must read -inf
            lse = torch.full((t, hq, num_splits), float("-inf"), dtype=torch.float32, device=q.device)
        part_strides = (part.stride(1), part.stride(0), part.stride(2), part.stride(3))
        lse_strides = lse.stride()

    pack = PACK_GQA and hq > hkv
    rows_max = max_query_len * (hq // hkv if pack else 1)  # rows of the longest query
    heads_per_grid = hkv if pack else hq

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(rows_max, meta["BLOCK_M"]), num_seqs, heads_per_grid * num_splits)

    scales, *scale_strides = _scale_args(kv_cache, kv_scales)
    # one counter per (row block, sequence, head); 16 rows: the smallest BLOCK_M the autotuner may pick
    cnt = arrival_counters(q.device, triton.cdiv(rows_max, 16) * num_seqs * heads_per_grid) if fused else seq_lens
    pdl = pdl_enabled(q.device, _paged_checks._INTERPRET)
    _paged_prefill_kernel[grid](
        q, kv_cache, block_tables, seq_lens, query_start_loc, part, lse, scales,
        q.stride(1), q.stride(2), q.stride(3), *_cache_strides(kv_cache), *scale_strides, block_tables.stride(0),
        *part_strides, *lse_strides,
        out, out.stride(1), out.stride(2), out.stride(3), cnt,
        hq // hkv, num_splits, scale * _LOG2E, next_power_of_2(rows_max),
        WRITE_LSE=num_splits > 1, FUSED=fused, PACK_GQA=pack, PAGE_SIZE=page_size, HEAD_DIM=d, HEAD_DIM_PAD=max(16, next_power_of_2(d)),
        DOT_PRECISION=_dot_precision(q.dtype), UPCAST_DOT=_upcast_dot(q.dtype),
        SCALE_MODE=scale_mode, INT_CODES=kv_cache.dtype == torch.int8,
        DOT_FP16=scale_mode > 0 and q.dtype != torch.float32, SPLITS_PAD=PREFILL_MAX_SPLITS if fused else 1,
        USE_PDL=pdl, launch_pdl=pdl, ZERO_UNOWNED=zero_in_kernel, T=t,
    )  # fmt: skip
    if num_splits > 1 and not fused:  # per token: every split's partial, weighted by its log-sum-exp
        _paged_decode_combine_kernel[(t, hq)](
            part, lse, query_start_loc, out, *part.stride(), *lse.stride(), out.stride(1), out.stride(2),
            out.stride(3), num_splits, HAS_QUERY_START=False, HEAD_DIM=d, HEAD_DIM_PAD=next_power_of_2(d),
            SPLITS_PAD=next_power_of_2(num_splits), SKIP_EMPTY=True, num_warps=4,
        )  # fmt: skip
    return out


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float | None = None,
    kv_scales: torch.Tensor | None = None,
    *,
    max_query_len: int | None = None,
) -> torch.Tensor:
    """``kiln::paged_attention`` on the GPU: :func:`reshape_and_cache`, then decode or prefill attention.

    An all-decode batch (every query length <= 1) runs :func:`paged_decode_attention`, any
    other batch :func:`paged_prefill_attention`. Without ``max_query_len`` this reads three
    numbers back from the device in one copy (the longest query, the tokens owned by
    sequences and the longest sequence), the call's only synchronization; a caller that knows
    them (a CUDA-graph decode step: ``max_query_len=1`` and every token owned) passes
    ``max_query_len`` and nothing is copied. Rows of tokens owned by no sequence are zero,
    as in the reference. An int8 / fp8 cache takes its ``kv_scales`` (quantize on write,
    dequantize in registers on read).
    """
    name = "paged_attention"
    _check_attention_inputs(name, q, kv_cache, block_tables, seq_lens, query_start_loc, kv_scales)
    if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[2] != q.shape[2]:
        _fail(name, f"k must be (1, Hkv, T, D) with q's T={q.shape[2]} tokens, got {_describe(k)}")
    t, num_seqs = q.shape[2], seq_lens.shape[0]
    max_seq_len = None
    if max_query_len is None:
        if num_seqs == 0:
            reshape_and_cache(k, v, kv_cache, slot_mapping, kv_scales)
            return torch.zeros_like(q)
        stats = torch.stack([
            (query_start_loc[1:] - query_start_loc[:-1]).max(), query_start_loc[-1] - query_start_loc[0], seq_lens.max()
        ]).tolist()  # fmt: skip  # the one device-to-host copy
        max_query_len, owned, max_seq_len = (int(x) for x in stats)
        all_owned = owned == t
    else:
        _check_count(name, "max_query_len", max_query_len, 0)
        all_owned = max_query_len == 1 and t == num_seqs  # the caller's promise for a decode batch
    if max_query_len <= 1 and all_owned and DECODE_WRITES_KV and kv_scales is None and num_seqs > 0:
        return paged_decode_attention(  # the decode kernel writes each sequence's new key and value itself
            q, kv_cache, block_tables, seq_lens, query_start_loc, scale,
            max_seq_len=max_seq_len, out=torch.empty_like(q), new_kv=(k, v, slot_mapping),
        )  # fmt: skip
    reshape_and_cache(k, v, kv_cache, slot_mapping, kv_scales)  # validates k, v and slot_mapping before writing
    if max_query_len <= 1:
        return paged_decode_attention(
            q, kv_cache, block_tables, seq_lens, query_start_loc, scale,
            kv_scales=kv_scales, max_seq_len=max_seq_len, out=torch.empty_like(q) if all_owned else torch.zeros_like(q),
        )  # fmt: skip
    return paged_prefill_attention(
        q,
        kv_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        max_query_len,
        scale,
        kv_scales=kv_scales,
        out=torch.empty_like(q) if all_owned or PREFILL_ZEROES_UNOWNED else torch.zeros_like(q),
        max_seq_len=max_seq_len,
        zero_unowned=not all_owned and PREFILL_ZEROES_UNOWNED,  # the prefill kernel writes them, no fill first
    )
