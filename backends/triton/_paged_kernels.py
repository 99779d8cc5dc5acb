"""The Triton kernels of paged attention and their autotune lists (used by ``paged_attention.py``).

See ``paged_attention.py`` for the layouts and the algorithms (vLLM's PagedAttention,
Kwon et al. 2023; Flash-Decoding; FlashAttention-2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.backends.triton._paged_cache_kernels import _codes_to
from kiln.backends.triton._paged_checks import _INTERPRET
from kiln.backends.triton._paged_combine import _last_split_combines, _query_token
from kiln.backends.triton._utils import pdl_release, pdl_wait
from kiln.backends.triton.timing import autotune_bench

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- autotuning


#: (BLOCK_N, num_warps, num_stages) of the decode kernel, timed by its autotuner per key bucket.
DECODE_TILES = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3), (32, 4, 4), (64, 8, 4), (32, 4, 2)]
#: The tiles a 16-bit float cache is timed with. On an H100 (benchmarks/RESULTS.md, session 16: each tile alone
#: on four shapes, batch 64 x 1k keys with 4 and 8 KV heads, batch 4 x 4k, batch 1 x 16k) one of these three was
#: the fastest of the seven on every shape; the other four were 4-30% slower. The autotuner, timing all seven, lost
#: up to 10% to a noisy pick (34.9 against 31.6 us at batch 4 x 4k). Quantized caches keep every tile (not swept).
DECODE_FLOAT_TILES = [(64, 4, 2), (128, 4, 2), (32, 4, 4)]


def _decode_configs() -> list[triton.Config]:
    """Key tiles for decode. Memory-bound: the tile size and pipelining depth set the bytes in flight."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in DECODE_TILES]


def _prune_decode_configs(
    configs: list[triton.Config], named_args: dict, **kwargs: object
) -> list[triton.Config]:
    """A float cache's tiles: :data:`DECODE_FLOAT_TILES`; then drop tiles whose pipelined K/V buffers
    (stages x 2 x BLOCK_N x D) overflow ~200 KB of shared memory."""
    if len(configs) <= 1:
        return configs
    args = {**named_args, **kwargs}
    if args["Cache"].dtype in (torch.bfloat16, torch.float16):
        configs = [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in DECODE_FLOAT_TILES]
    row_bytes = 2 * int(args["HEAD_DIM_PAD"]) * args["Cache"].element_size()  # one key + one value
    fits = [c for c in configs if c.num_stages * c.kwargs["BLOCK_N"] * row_bytes <= 200 * 1024]
    return fits or [min(configs, key=lambda c: c.num_stages * c.kwargs["BLOCK_N"])]


_PREFILL_FALLBACK_TILE = (64, 32, 4, 2)  # fits shared memory for every head dim and dtype


def _prefill_configs() -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N) tiles for prefill, after the dense kernel's H100 sweep plus one short-query tile
    and one for a short query over a long cached prefix (``benchmarks/prefill_attention.py`` prints the
    autotuner's time for each).

    The interpreter tile has BLOCK_M != BLOCK_N so the causal diagonal spans two key tiles.
    """
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # 64 x 128: second (30.0 us) to the fallback tile (29.4) on the 1B prefix-cache hit (128 queries x 4 heads over
    # 2,176 keys, D 64; H100, session 12), ahead of 128 x 128 (32.9); a 128 x 32 tile tried there took 37.4 us
    tiles = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), _PREFILL_FALLBACK_TILE, (64, 128, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def _prune_prefill_configs(
    configs: list[triton.Config], named_args: dict, **kwargs: object
) -> list[triton.Config]:
    """Drop tiles that cannot fit shared memory (D = 256) or pad short queries to many rows."""
    if len(configs) <= 1:
        return configs
    args = {**named_args, **kwargs}
    d_pad, q_bucket = int(args["HEAD_DIM_PAD"]), int(args["Q_BUCKET"])
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if (bm, bn, c.num_warps, c.num_stages) == _PREFILL_FALLBACK_TILE:
            kept.append(c)
        elif d_pad >= 256 and (bm > 64 or bn > 32):
            continue
        elif bm > max(32, q_bucket):
            continue
        else:
            kept.append(c)
    return kept


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _paged_attn_inner(
    acc,  # (M, HEAD_DIM_PAD) fp32 running numerator
    l_i,  # (M,) fp32 running row sum
    m_i,  # (M,) fp32 running row max (log2 domain, scaled)
    q,  # (M, HEAD_DIM_PAD) query rows, compute dtype
    k_base,  # cache pointer at (K, block 0, offset 0, this kv head)
    v_base,  # same for V
    table,  # this sequence's row of the block table
    stride_cb,
    stride_cs,
    stride_cd,
    s_base,  # per-token scales at (K, block 0, offset 0, this kv head) (PER_TOKEN only)
    stride_sc,
    stride_sb,
    stride_ss,
    last_key,  # (M,) int32: row i sees keys j <= last_key[i] (causal only)
    seq_len,
    lo,
    hi,
    qk_scale,  # softmax scale * log2(e)
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    INPUT_DTYPE: tl.constexpr,  # the dtype of the dots' operands
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    PER_TOKEN: tl.constexpr,  # codes with one scale per (token, KV head) (SCALE_MODE 2)
    INT_CODES: tl.constexpr,  # int8 codes (see _codes_to)
):
    """Stream cached key tiles ``[lo, hi)`` through the online softmax; MASKED for the tail/diagonal.

    Quantized codes convert exactly to the input dtype (int8 and e4m3 values are all bf16 /
    fp16 numbers); per-token scales multiply the score columns (keys) and the probabilities
    (values) in fp32, never the D-wide tiles. Static scales are folded in by the caller.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_key = start_n + offs_n  # (BLOCK_N,) positions in the sequence
        key_ok = offs_key < seq_len
        if MASKED:
            blocks = tl.load(table + offs_key // PAGE_SIZE, mask=key_ok, other=0)
        else:
            blocks = tl.load(table + offs_key // PAGE_SIZE)
        kv_off = blocks.to(tl.int64) * stride_cb + (offs_key % PAGE_SIZE) * stride_cs  # (BLOCK_N,)
        if PER_TOKEN:
            s_off = blocks.to(tl.int64) * stride_sb + (offs_key % PAGE_SIZE) * stride_ss
            s_ptrs = s_base + s_off  # (BLOCK_N,)
            if MASKED:
                k_s = tl.load(s_ptrs, mask=key_ok, other=0.0)
                v_s = tl.load(s_ptrs + stride_sc, mask=key_ok, other=0.0)
            else:
                k_s = tl.load(s_ptrs)
                v_s = tl.load(s_ptrs + stride_sc)
        k_ptrs = k_base + kv_off[None, :] + offs_d[:, None] * stride_cd  # (D, BLOCK_N)
        v_ptrs = v_base + kv_off[:, None] + offs_d[None, :] * stride_cd  # (BLOCK_N, D)
        if MASKED:
            k = tl.load(k_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        k = _codes_to(
            k, INPUT_DTYPE, INT_CODES
        )  # cache dtype -> q's dtype, as the reference rounds (codes: exact)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)  # (M, BLOCK_N) fp32
        if PER_TOKEN:
            qk = qk * k_s[None, :]  # q . (codes * s) = (q . codes) * s
        if MASKED:
            visible = key_ok[None, :]
            if IS_CAUSAL:
                visible = visible & (offs_key[None, :] <= last_key[:, None])
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            m_shift = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # nothing visible yet: exp2 -> 0, not NaN
            qk = qk - m_shift[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_shift = m_ij
            qk = qk * qk_scale - m_shift[:, None]
        p = tl.math.exp2(qk)  # (M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        v = _codes_to(v, INPUT_DTYPE, INT_CODES)
        if PER_TOKEN:
            # sum_n p_n (codes_n * s_n) = sum_n (p_n * s_n) codes_n; l_i keeps the plain p
            p = p * v_s[None, :]
        p = p.to(INPUT_DTYPE)  # P @ V in the input dtype, as on the tensor cores
        if UPCAST_DOT:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _static_scales(Scales, stride_sc, qk_scale, SCALE_MODE: tl.constexpr):
    """``(qk_scale, v_scale)`` with static per-tensor scales folded in: s_k into the softmax scale, s_v out."""
    if SCALE_MODE == 1:
        qk_scale = qk_scale * tl.load(Scales)
        v_scale = tl.load(Scales + stride_sc)
    else:
        v_scale = 1.0  # unused
    return qk_scale, v_scale


@triton.autotune(
    configs=_decode_configs(),
    key=["KEYS_BUCKET", "GROUPS_BUCKET", "HEAD_DIM_PAD", "GROUP_PAD", "PAGE_SIZE", "WRITE_LSE"],
    prune_configs_by={"early_config_prune": _prune_decode_configs},
    do_bench=autotune_bench,
)
@triton.jit(do_not_specialize=["num_splits", "KEYS_BUCKET", "GROUPS_BUCKET", "min_split_keys", "split_slack"])
def _paged_decode_kernel(
    Q, Cache, BlockTables, SeqLens, QueryStart, Out, Lse, Scales,
    stride_qh, stride_qt, stride_qd,
    stride_cc, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_sc, stride_sb, stride_ss, stride_sh,
    stride_bt,
    stride_ot, stride_oh, stride_os, stride_od,  # Out: partial (T, Hq, splits, D) or final (T, Hq, 1, D) view
    stride_lt, stride_lh, stride_ls,
    Final, stride_fh, stride_ft, stride_fd, Counters,  # FUSED: the (1, Hq, T, D) output and arrival counters
    group_size, num_splits, qk_scale,
    min_split_keys,  # FUSED: a sequence uses (its length + split_slack) // this of the num_splits splits
    split_slack,  # min_split_keys - 1: cdiv(length, min_split_keys) splits; 0: length // min_split_keys
    KEYS_BUCKET,  # autotune key: next power of two of the keys per split
    GROUPS_BUCKET,  # autotune key: next power of two of the (sequence, KV head) groups (programs per split)
    HAS_QUERY_START: tl.constexpr,
    WRITE_LSE: tl.constexpr,  # several splits: write partial outputs and log-sum-exps
    FUSED: tl.constexpr,  # ... and the last split of each (sequence, KV head) combines them into Final
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    SCALE_MODE: tl.constexpr,  # 0 float cache, 1 static per-tensor scales, 2 per-(token, KV head) scales
    INT_CODES: tl.constexpr,
    DOT_FP16: tl.constexpr,  # quantized cache under 16-bit q: dots in fp16 (codes exact, cheap conversions)
    BLOCK_N: tl.constexpr,
    SPLITS_PAD: tl.constexpr = 1,  # FUSED: a power of two >= num_splits (the combine's log-sum-exp tile)
    COMBINE_CHUNK: tl.constexpr = 4,  # FUSED: partial outputs the combine loads at once
    USE_PDL: tl.constexpr = False,
    WRITE_KV: tl.constexpr = False,  # write the new token's key and value (float cache) before attending
    K=None, V=None, Slots=None, stride_kh=0, stride_kt=0, stride_kd=0, stride_vh=0, stride_vt=0, stride_vd=0,
):  # fmt: skip
    """One program: every query head of one KV head, over one split of one sequence's keys.

    ``WRITE_KV``: the sequence's new token (its query token ``t``, key position ``seq_len - 1``) is
    written to the cache at ``Slots[t]`` by the one split whose keys hold that position, before it
    reads them: :func:`reshape_and_cache`'s launch is saved. Every token must belong to a sequence.
    """
    pdl_release(USE_PDL)
    pdl_wait(USE_PDL)
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    t, q_len = _query_token(QueryStart, seq, HAS_QUERY_START)
    if q_len == 0:
        return
    seq_len = tl.load(SeqLens + seq)
    n_splits = num_splits
    if FUSED:  # splits of this sequence that hold keys (a graph's num_splits is sized for the cache's
        # capacity, a short context uses a few); the rest stop here
        n_splits = tl.maximum(1, tl.minimum(num_splits, (seq_len + split_slack) // min_split_keys))
        if split >= n_splits:
            return
    per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), n_splits) * BLOCK_N  # whole tiles per split
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    full_k = (seq_len // BLOCK_N) * BLOCK_N

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    if WRITE_KV:
        if (seq_len - 1) // per_split == split:  # this split's keys hold the new token
            _write_new_kv(K, V, Slots, Cache, t.to(tl.int64), kvh.to(tl.int64), offs_d,
                          stride_kh, stride_kt, stride_kd, stride_vh, stride_vt, stride_vd,
                          stride_cc, stride_cb, stride_cs, stride_ch, stride_cd, PAGE_SIZE, HEAD_DIM)  # fmt: skip
    heads = kvh * group_size + offs_g  # (GROUP_PAD,) query heads of this KV group
    row_ok = (offs_g < group_size)[:, None] & (offs_d < HEAD_DIM)[None, :]
    t64 = t.to(tl.int64)
    q = tl.load(
        Q + t64 * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd, mask=row_ok, other=0.0
    )
    if DOT_FP16:
        q = q.to(tl.float16)  # exact for |q| in [2^-14, 65504]
    if UPCAST_DOT:
        q = q.to(tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    k_base = Cache + kvh.to(tl.int64) * stride_ch
    s_base = Scales + kvh.to(tl.int64) * stride_sh
    table = BlockTables + seq.to(tl.int64) * stride_bt
    qk_scale, v_scale = _static_scales(Scales, stride_sc, qk_scale, SCALE_MODE)
    # Whole tiles unmasked, then the sequence's ragged last tile (if this split holds it) masked.
    acc, l_i, m_i = _paged_attn_inner(
        acc, l_i, m_i, q, k_base, k_base + stride_cc, table, stride_cb, stride_cs, stride_cd,
        s_base, stride_sc, stride_sb, stride_ss,
        offs_g, seq_len, lo, tl.maximum(lo, tl.minimum(hi, full_k)), qk_scale,
        False, False, PAGE_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, tl.float16 if DOT_FP16 else Q.dtype.element_ty,
        DOT_PRECISION, UPCAST_DOT,
        SCALE_MODE == 2, INT_CODES,
    )  # fmt: skip
    acc, l_i, m_i = _paged_attn_inner(
        acc, l_i, m_i, q, k_base, k_base + stride_cc, table, stride_cb, stride_cs, stride_cd,
        s_base, stride_sc, stride_sb, stride_ss,
        offs_g, seq_len, tl.maximum(lo, full_k), hi, qk_scale,
        True, False, PAGE_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, tl.float16 if DOT_FP16 else Q.dtype.element_ty,
        DOT_PRECISION, UPCAST_DOT,
        SCALE_MODE == 2, INT_CODES,
    )  # fmt: skip

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]  # an empty split (or context) gives 0
    if SCALE_MODE == 1:
        out = out * v_scale
    o_ptrs = (
        Out + t64 * stride_ot + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :] * stride_od
    )
    if FUSED:
        if n_splits == 1:  # one split holds every key: the output directly, nothing to combine
            tl.store(Final + t64 * stride_ft + heads[:, None] * stride_fh + offs_d[None, :] * stride_fd,
                     out.to(Final.dtype.element_ty), mask=row_ok)  # fmt: skip
            return
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok)
    if WRITE_LSE:
        lse = tl.where(
            l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe)
        )  # log2 domain; empty split: -inf
        tl.store(Lse + t64 * stride_lt + heads * stride_lh + split * stride_ls, lse, mask=offs_g < group_size)
        if FUSED:
            _last_split_combines(
                Counters, seq * tl.num_programs(1) + kvh, n_splits,
                o_ptrs - split * stride_os, Lse + t64 * stride_lt + heads * stride_lh, stride_os, stride_ls,
                Final + t64 * stride_ft + heads[:, None] * stride_fh + offs_d[None, :] * stride_fd,
                row_ok, offs_g < group_size, SPLITS_PAD, COMBINE_CHUNK,
            )  # fmt: skip


@triton.jit
def _write_new_kv(
    K, V, Slots, Cache, t64, kvh64, offs_d,
    stride_kh, stride_kt, stride_kd, stride_vh, stride_vt, stride_vd,
    stride_cc, stride_cb, stride_cs, stride_ch, stride_cd,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Token ``t``'s key and value of KV head ``kvh`` into its cache slot (a float cache: a cast), then a
    barrier, so that every thread of the program reads them back from the cache."""
    slot = tl.load(Slots + t64).to(tl.int64)
    if slot >= 0:
        d_ok = offs_d < HEAD_DIM
        k = tl.load(K + kvh64 * stride_kh + t64 * stride_kt + offs_d * stride_kd, mask=d_ok, other=0.0)
        v = tl.load(V + kvh64 * stride_vh + t64 * stride_vt + offs_d * stride_vd, mask=d_ok, other=0.0)
        dst = Cache + (slot // PAGE_SIZE) * stride_cb + (slot % PAGE_SIZE) * stride_cs + kvh64 * stride_ch
        tl.store(dst + offs_d * stride_cd, k.to(Cache.dtype.element_ty), mask=d_ok)
        tl.store(dst + stride_cc + offs_d * stride_cd, v.to(Cache.dtype.element_ty), mask=d_ok)
    tl.debug_barrier()


@triton.jit
def _zero_unowned_rows(
    Final, stride_fh, stride_ft, stride_fd, QueryStart, last_seq, T, hp, group_size,
    PACK_GQA: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):  # fmt: skip
    """Zeros in the rows of head ``hp`` (its KV group's heads with PACK_GQA) for tokens outside
    ``[QueryStart[0], QueryStart[last_seq + 1])``, shared out among the grid's row-block programs."""
    ZT: tl.constexpr = 16
    first = tl.load(QueryStart)
    end = tl.load(QueryStart + last_seq + 1)
    n_free = first + (T - end)  # unowned tokens: [0, first) and [end, T)
    offs_t = tl.arange(0, ZT)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    zeros = tl.zeros([ZT, HEAD_DIM_PAD], dtype=Final.dtype.element_ty)
    if PACK_GQA:
        h0 = hp * group_size
        n_heads = group_size
    else:
        h0 = hp
        n_heads = 1
    base = Final + h0.to(tl.int64) * stride_fh
    for i0 in range(tl.program_id(0) * ZT, n_free, tl.num_programs(0) * ZT):
        idx = i0 + offs_t
        tok = tl.where(idx < first, idx, end + idx - first).to(tl.int64)
        mask = (idx < n_free)[:, None] & (offs_d < HEAD_DIM)[None, :]
        for j in range(n_heads):
            tl.store(base + j * stride_fh + tok[:, None] * stride_ft + offs_d[None, :] * stride_fd, zeros, mask=mask)


@triton.autotune(
    configs=_prefill_configs(),
    key=["Q_BUCKET", "HEAD_DIM_PAD", "PAGE_SIZE", "WRITE_LSE", "PACK_GQA"],
    prune_configs_by={"early_config_prune": _prune_prefill_configs},
    do_bench=autotune_bench,
)
@triton.jit(do_not_specialize=["Q_BUCKET", "num_splits"])
def _paged_prefill_kernel(
    Q, Cache, BlockTables, SeqLens, QueryStart, Out, Lse, Scales,
    stride_qh, stride_qt, stride_qd,
    stride_cc, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_sc, stride_sb, stride_ss, stride_sh,
    stride_bt,
    stride_oh, stride_ot, stride_os, stride_od,  # Out: final (1, Hq, T, D) or partial (T, Hq, splits, D)
    stride_lt, stride_lh, stride_ls,
    Final, stride_fh, stride_ft, stride_fd, Counters,  # FUSED: the (1, Hq, T, D) output and arrival counters
    group_size, num_splits, qk_scale,
    Q_BUCKET,  # autotune key: next power of two of the longest query
    WRITE_LSE: tl.constexpr,  # several splits: write partial outputs and log-sum-exps
    FUSED: tl.constexpr,  # ... and the last split of each (row block, sequence, head) combines them into Final
    PACK_GQA: tl.constexpr,  # a program's rows are (token, query head) pairs of one KV head: grid (.., S, Hkv x splits)
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    INT_CODES: tl.constexpr,
    DOT_FP16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS_PAD: tl.constexpr = 1,  # FUSED: a power of two >= num_splits (the combine's log-sum-exp tile)
    USE_PDL: tl.constexpr = False,  # programmatic dependent launch (``kiln.backends.triton._utils.PDL``)
    ZERO_UNOWNED: tl.constexpr = False,  # write zeros to Final's rows of tokens no sequence owns (T tokens in all)
    T=0,
):  # fmt: skip
    """One program: BLOCK_M query rows of one (sequence, query head), over one split of their keys.

    Grid (query blocks, S, Hq x splits); with ``PACK_GQA`` (row blocks of tokens x group, S, Hkv x splits),
    every query head of a KV group in one program (the grouped-query packing of FlashAttention-3 and
    vLLM's unified attention: each key tile read once per group). With one split the program writes the
    output; with several it writes its partial output and log-sum-exp per row for the combine.
    """
    pdl_release(USE_PDL)
    pdl_wait(USE_PDL)
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (last) rows launch first
    seq = tl.program_id(1)
    hp = tl.program_id(2) // num_splits  # the query head, or with PACK_GQA the KV head
    split = tl.program_id(2) % num_splits
    q_start = tl.load(QueryStart + seq)
    q_len = tl.load(QueryStart + seq + 1) - q_start
    if ZERO_UNOWNED:  # the last sequence's split-0 programs zero the tokens before the first and after the last
        if (seq == tl.num_programs(1) - 1) & (split == 0):
            _zero_unowned_rows(Final, stride_fh, stride_ft, stride_fd, QueryStart, seq, T, hp, group_size,
                               PACK_GQA, HEAD_DIM, HEAD_DIM_PAD)  # fmt: skip
    # Rows: one per query token (of head hp), or with PACK_GQA one per (token, query head of KV head hp),
    # row r = token * group + head-in-group, so every key tile loaded serves the whole group.
    r0 = start_m * BLOCK_M
    offs_r = r0 + tl.arange(0, BLOCK_M)
    if PACK_GQA:
        if r0 >= q_len * group_size:
            return
        offs_m = offs_r // group_size  # query token within the sequence
        heads = hp * group_size + offs_r % group_size
        t_lo = r0 // group_size  # the block's first and last tokens
        t_hi = (r0 + BLOCK_M - 1) // group_size
        kvh = hp.to(tl.int64)
    else:
        if r0 >= q_len:
            return
        offs_m = offs_r
        heads = hp + tl.zeros_like(offs_r)
        t_lo = r0
        t_hi = r0 + BLOCK_M - 1
        kvh = (hp // group_size).to(tl.int64)
    seq_len = tl.load(SeqLens + seq)

    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = offs_m < q_len
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = (q_start + offs_m).to(tl.int64)  # token indices
    q = tl.load(
        Q + heads[:, None] * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=mask, other=0.0
    )
    if DOT_FP16:
        q = q.to(tl.float16)  # exact for |q| in [2^-14, 65504]
    if UPCAST_DOT:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    # Causal, end-aligned: token i sees keys j <= i + (seq_len - q_len) (the cached prefix and itself).
    diag = seq_len - q_len
    last_key = offs_m + diag
    full_k = (seq_len // BLOCK_N) * BLOCK_N
    hi = tl.minimum(seq_len, t_hi + 1 + diag)  # past the last row's last key
    lo_mask = tl.minimum((tl.maximum(t_lo + diag + 1, 0) // BLOCK_N) * BLOCK_N, full_k)
    k_base = Cache + kvh * stride_ch
    s_base = Scales + kvh * stride_sh
    table = BlockTables + seq.to(tl.int64) * stride_bt
    qk_scale, v_scale = _static_scales(Scales, stride_sc, qk_scale, SCALE_MODE)
    # This split's keys: whole tiles [k_lo, k_hi) of the row block's [0, hi); unmasked below lo_mask.
    per_split = tl.cdiv(tl.cdiv(hi, BLOCK_N), num_splits) * BLOCK_N
    k_lo = split * per_split
    k_hi = tl.minimum(k_lo + per_split, hi)
    acc, l_i, m_i = _paged_attn_inner(
        acc, l_i, m_i, q, k_base, k_base + stride_cc, table, stride_cb, stride_cs, stride_cd,
        s_base, stride_sc, stride_sb, stride_ss,
        last_key, seq_len, k_lo, tl.maximum(k_lo, tl.minimum(k_hi, lo_mask)), qk_scale,
        False, True, PAGE_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, tl.float16 if DOT_FP16 else Q.dtype.element_ty,
        DOT_PRECISION, UPCAST_DOT,
        SCALE_MODE == 2, INT_CODES,
    )  # fmt: skip
    acc, l_i, m_i = _paged_attn_inner(
        acc, l_i, m_i, q, k_base, k_base + stride_cc, table, stride_cb, stride_cs, stride_cd,
        s_base, stride_sc, stride_sb, stride_ss,
        last_key, seq_len, tl.maximum(k_lo, lo_mask), k_hi, qk_scale,
        True, True, PAGE_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, tl.float16 if DOT_FP16 else Q.dtype.element_ty,
        DOT_PRECISION, UPCAST_DOT,
        SCALE_MODE == 2, INT_CODES,
    )  # fmt: skip
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]  # rows that see no key (of this split) output 0
    if SCALE_MODE == 1:
        out = out * v_scale
    heads64 = heads.to(tl.int64)
    tl.store(Out + heads64[:, None] * stride_oh + rows[:, None] * stride_ot + split * stride_os
             + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=mask)  # fmt: skip
    if WRITE_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))  # log2 domain; no key: -inf
        tl.store(Lse + rows * stride_lt + heads64 * stride_lh + split * stride_ls, lse, mask=row_ok)
        if FUSED:
            tile = (hp * tl.num_programs(1) + seq) * tl.num_programs(0) + tl.program_id(0)
            _last_split_combines(
                Counters, tile, num_splits,
                Out + heads64[:, None] * stride_oh + rows[:, None] * stride_ot + offs_d[None, :] * stride_od,
                Lse + rows * stride_lt + heads64 * stride_lh, stride_os, stride_ls,
                Final + heads64[:, None] * stride_fh + rows[:, None] * stride_ft + offs_d[None, :] * stride_fd,
                mask, row_ok, SPLITS_PAD, 1,  # BLOCK_M-row partials: one split at a time (registers)
            )  # fmt: skip
