"""Merging split-K attention: each split's partial output weighted by its log-sum-exp (Flash-Decoding).

Splitting a sequence's keys across programs (``paged_attention.py``) leaves one partial output and
one log-sum-exp per split and row; ``out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max)``.
:func:`_last_split_combines` does it inside the attention kernels, in the split that arrives last;
:func:`_paged_decode_combine_kernel` is the separate launch it replaces (``FUSED_COMBINE = False``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.backends.triton._utils import pdl_release, pdl_wait


@triton.jit
def _query_token(QueryStart, seq, HAS_QUERY_START: tl.constexpr):
    """(token index, query length) of a decode sequence: from the query starts, or token ``seq`` of length 1."""
    if HAS_QUERY_START:
        t = tl.load(QueryStart + seq)
        q_len = tl.load(QueryStart + seq + 1) - t
    else:
        t = seq
        q_len = 1
    return t, q_len


@triton.jit
def _last_split_combines(
    Counters, tile, num_splits,
    part_ptrs,  # (ROWS, HEAD_DIM_PAD) pointers to split 0's partial outputs (fp32)
    lse_ptrs,  # (ROWS,) pointers to split 0's log-sum-exps (log2 domain)
    stride_ps, stride_ls,  # from one split to the next
    out_ptrs,  # (ROWS, HEAD_DIM_PAD) pointers to the final output
    mask,  # (ROWS, HEAD_DIM_PAD) elements to combine
    row_ok,  # (ROWS,)
    SPLITS_PAD: tl.constexpr,  # a power of two >= num_splits
    CHUNK: tl.constexpr,  # partial outputs loaded at once (unrolled): their L2 round trips overlap
):  # fmt: skip
    """Called by every split of a tile once its partials are stored: the split arriving last merges them.

    The tile's arrival counter orders it (CUTLASS's serial split-K semaphore, as the quantized
    GEMVs do: a barrier so the program's stores are issued, then one release / acquire atomic);
    the last split reads every split's partial through L2 (``.cg``), weights each by
    ``2^(lse_s - max)``, writes the output and resets the counter for the next launch. This
    replaces the separate combine launch (and, in prefill, the log-sum-exp buffer's fill).

    The merge is on the kernel's critical path (the last split waits for nothing else), so its
    loads must not queue one after another: the log-sum-exps come as one (ROWS, SPLITS_PAD) tile
    and the partial outputs ``CHUNK`` splits at a time. The first version's loop of one load per
    split paid an L2 round trip per split, twice. Chunked (4), batch-1 decode on an H100 at 16k keys
    went 39.7 -> 36.1 us, still 5 us behind the separate combine kernel at 32 splits (session 11,
    ``benchmarks/RESULTS.md``): decode merges here only up to ``DECODE_FUSED_MAX_SPLITS`` splits.
    """
    tl.debug_barrier()  # every thread's partials stored before one thread counts the program in
    arrived = tl.atomic_add(Counters + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == num_splits - 1:
        offs_s = tl.arange(0, SPLITS_PAD)
        s_ok = offs_s < num_splits
        lse = tl.load(lse_ptrs[:, None] + offs_s[None, :] * stride_ls, mask=row_ok[:, None] & s_ok[None, :],
                      other=float("-inf"), cache_modifier=".cg")  # (ROWS, SPLITS_PAD)  # fmt: skip
        m = tl.max(lse, 1)
        m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0, output 0
        w = tl.math.exp2(lse - m[:, None])  # (ROWS, SPLITS_PAD); 0 for empty and padding splits
        den = tl.sum(w, 1)
        acc = tl.zeros(mask.shape, dtype=tl.float32)
        for s0 in range(0, num_splits, CHUNK):
            for j in tl.static_range(CHUNK):
                s = s0 + j  # past the last split: reads the last one again, with weight 0
                o = tl.load(part_ptrs + tl.minimum(s, num_splits - 1) * stride_ps, mask=mask, other=0.0,
                            cache_modifier=".cg")  # fmt: skip
                w_s = tl.sum(tl.where(offs_s[None, :] == s, w, 0.0), 1)  # (ROWS,) column s of w
                acc += w_s[:, None] * o
        out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
        tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=mask)
        tl.store(Counters + tile, 0)  # ready for the next launch (launches on a stream run in turn)


@triton.jit(do_not_specialize=["num_splits"])
def _paged_decode_combine_kernel(
    Partial, Lse, QueryStart, Out,
    stride_pt, stride_ph, stride_ps, stride_pd,
    stride_lt, stride_lh, stride_ls,
    stride_oh, stride_ot, stride_od,
    num_splits,
    HAS_QUERY_START: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    SKIP_EMPTY: tl.constexpr = False,  # leave rows whose splits are all empty unwritten (prefill: unowned tokens)
    USE_PDL: tl.constexpr = False,  # programmatic dependent launch (``kiln.backends.triton._utils.PDL``)
):  # fmt: skip
    """One program: one (sequence, query head). out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max).

    Prefill combines per token (grid (T, Hq), no query starts); a token owned by no sequence has
    every log-sum-exp at its initial -inf and, with ``SKIP_EMPTY``, is not written.
    """
    pdl_release(USE_PDL)
    pdl_wait(USE_PDL)  # every input is the attention kernel's output
    seq = tl.program_id(0)
    h = tl.program_id(1)
    t, q_len = _query_token(QueryStart, seq, HAS_QUERY_START)
    if q_len == 0:
        return
    t64 = t.to(tl.int64)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    s_ok = offs_s < num_splits
    lse = tl.load(Lse + t64 * stride_lt + h * stride_lh + offs_s * stride_ls, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    if SKIP_EMPTY:
        if m == float("-inf"):
            return
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0, output 0
    w = tl.math.exp2(lse - m)  # (SPLITS_PAD,)
    denom = tl.sum(w, 0)
    mask = s_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    p_ptrs = (
        Partial + t64 * stride_pt + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :] * stride_pd
    )
    o = tl.load(p_ptrs, mask=mask, other=0.0)  # (SPLITS_PAD, HEAD_DIM_PAD) fp32
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(Out + t64 * stride_ot + h * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)  # fmt: skip
