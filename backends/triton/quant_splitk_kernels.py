"""Split-K weight-streaming kernels for quantized linears at decode sizes (``kiln::qlinear_*``, M <= 16).

A decode step reads every weight once and does little arithmetic per byte, so these kernels are
written for bytes in flight, after the split-K GEMVs of FasterTransformer / TensorRT-LLM and
GemLite (Badri, 2024): the grid covers (N tiles x K splits), enough programs to keep all
SMs streaming. A program reads ``BLOCK_N`` output channels' packed codes as 32-bit words along K
(the weight's contiguous dimension: 16-byte coalesced loads, the next K step's loads issued
before the current one is computed), turns codes into floats in registers with shifts and masks
(the exponent trick of Kim et al., arXiv:2211.10017: ``u | 0x4B000000`` is the fp32 ``2**23 + u``,
so subtracting ``2**23 + zero_point`` leaves the exact ``q - zero_point``), multiplies them with
the activations and applies each group's scale once per (row, word or K step). The code-to-float
helpers are in ``_quant_codes``.

The K splits combine without a second launch or a zeroed output: each split stores its fp32
partial sums into a workspace ``(SPLIT, M, N)``, then (after a barrier, one thread, release /
acquire: CUTLASS's serial split-K semaphore) bumps the tile's arrival counter; the split that
arrives last adds the partials up in a fixed order (deterministic), adds the bias, casts and
stores the output, and resets the counter to zero for the next launch on the stream.

- :func:`wo_gemv_kernel`: one row of x per program (rows sharing a weight tile run side by
  side, so M > 1 re-reads it from L2), CUDA-core FMAs reduced with ``tl.sum``.
- :func:`wo_dot_kernel`: ``BLOCK_M`` (16) rows per program, the decoded tile in x's dtype
  (exact: ``q - z`` are small integers, e4m3 values fit bf16/fp16) multiplied with ``tl.dot``.

Weights (``WKIND``): 0 int8, 4 codes per word; 1 int4 packed by ``kiln.quantize.ops.pack_int4``
(8 codes per word: byte ``i`` holds code ``8j+i`` in its low and ``8j+4+i`` in its high nibble,
so code ``8j+c`` sits at bit ``8 (c % 4) + 4 (c // 4)``: decoding by those shifts yields codes in
K order and the activations load contiguously); 2 float8 e4m3, 4 per word. Scales (``SMODE``):
0 one, 1 per output channel, 2 per (channel, group of ``GW`` words); ``GROUP_PER_STEP`` when a
K step of ``BLOCK_KW`` words never leaves a group (one scale per row and step), else one
scale per word. ``X_CODES``: x holds int8 codes with a per-row or per-tensor scale and zero point
(``kiln::qlinear_w8a8``), multiplied as floats (exact products, fp32 sums, as the reference).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.backends.triton._quant_codes import (
    _codes_prmt,
    _gemv_code,
    _k_order,
    code_bias,
    code_shift,
    packed_word_sums,
)
from kiln.backends.triton._utils import pdl_release, pdl_wait


@triton.jit
def _wsz_loads(
    kw0, kw_end, w_rows, s_ptr, z_ptr, offs_n, n_mask, offs_w,
    stride_sn, stride_sg, stride_zn, stride_zg,
    SMODE: tl.constexpr, HAS_ZP: tl.constexpr, GW: tl.constexpr, GROUP_PER_STEP: tl.constexpr,
    EVEN_K: tl.constexpr,
):  # fmt: skip
    """Weight words (BN, BKW) of the K step at word ``kw0`` and its group scales / zero points.

    Words from ``kw_end`` on (the split's end) are masked: a prefetch past the last step moves no bytes.
    ``EVEN_K`` (whole K steps everywhere): one mask per step, so each thread's words load as one vector.
    Scales / zero points: (BN,) with ``GROUP_PER_STEP``, else (BN, BKW); (BN,) zeros without groups.
    """
    kw = kw0 + offs_w
    if EVEN_K:
        k_ok = (tl.zeros_like(offs_w) + kw0) < kw_end
    else:
        k_ok = kw < kw_end
    wd = tl.load(w_rows + kw[None, :], mask=n_mask[:, None] & k_ok[None, :], other=0)
    if SMODE == 2:
        if GROUP_PER_STEP:
            g = kw0 // GW
            sm = n_mask & (tl.zeros_like(offs_n) + kw0 < kw_end)
            s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=sm, other=0.0)
            if HAS_ZP:
                z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=sm, other=0).to(tl.float32)
            else:
                z = s
        else:
            g = kw // GW
            sm = n_mask[:, None] & k_ok[None, :]
            s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg, mask=sm, other=0.0)
            if HAS_ZP:
                z = tl.load(z_ptr + offs_n[:, None] * stride_zn + g[None, :] * stride_zg, mask=sm, other=0).to(
                    tl.float32
                )
            else:
                z = s
    else:
        s = tl.zeros((offs_n.shape[0],), dtype=tl.float32)
        z = s
    return wd, s, z


@triton.jit
def _x_pairs(x_row, kw0, kw_end, offs_w, CPW: tl.constexpr):
    """The 16-bit x of the K step at word ``kw0`` as int32 pairs: 4 (int4) or 2 (int8, repeated) (BKW,) loads.

    Words from ``kw_end`` on are masked (a prefetch past the split's last step reads nothing)."""
    x_words = x_row + (kw0 + offs_w) * (CPW // 2)
    ok = kw0 + offs_w < kw_end
    x0 = tl.load(x_words, mask=ok, other=0)
    x1 = tl.load(x_words + 1, mask=ok, other=0)
    if CPW == 8:
        x2 = tl.load(x_words + 2, mask=ok, other=0)
        x3 = tl.load(x_words + 3, mask=ok, other=0)
    else:
        x2 = x0
        x3 = x1
    return x0, x1, x2, x3


@triton.jit
def _pick(p: tl.constexpr, a, b, c, d):
    """``(a, b, c, d)[p]`` for a compile-time ``p``."""
    if p == 0:
        v = a
    elif p == 1:
        v = b
    elif p == 2:
        v = c
    else:
        v = d
    return v


@triton.jit
def _row_zero(z_ptr, offs_n, n_mask, stride_zn, HAS_ZP: tl.constexpr, ZP_DEFAULT: tl.constexpr):
    """(BN,) per-channel / per-tensor zero points as fp32 (SMODE 0, 1)."""
    if HAS_ZP:
        z = tl.load(z_ptr + offs_n * stride_zn, mask=n_mask, other=0).to(tl.float32)
    else:
        z = tl.zeros(offs_n.shape, dtype=tl.float32) + ZP_DEFAULT
    return z


@triton.jit
def _step_zero(z, z_row, SMODE: tl.constexpr, HAS_ZP: tl.constexpr, ZP_DEFAULT: tl.constexpr,
               GROUP_PER_STEP: tl.constexpr):  # fmt: skip
    """The zero points of a K step as fp32, shaped to broadcast over the (BN, BKW) words."""
    if SMODE == 2:
        if not HAS_ZP:
            z = tl.zeros(z.shape, dtype=tl.float32) + ZP_DEFAULT
        if GROUP_PER_STEP:
            zs = z[:, None]
        else:
            zs = z
    else:
        zs = z_row[:, None]
    return zs


@triton.jit
def _scale_rows(y, s_ptr, offs_n, n_mask, stride_sn, SMODE: tl.constexpr):
    """Per-channel / per-tensor weight scales applied to a (.., BN) result (SMODE 0, 1)."""
    if SMODE == 1:
        y = y * tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)
    elif SMODE == 0:
        y = y * tl.load(s_ptr)
    return y


@triton.jit
def _finish(
    acc, offs_m, offs_n, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, tile, pid_k, SPLIT,
    HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr, RED: tl.constexpr,
):  # fmt: skip
    """Partial sums ``acc`` (BM, BN) of split ``pid_k`` -> ``y``: at once, or by the split arriving last.

    The last split reads the others' partials ``RED`` splits per load (independent loads in
    flight, not one round trip per split) and adds them in split order.
    """
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if IS_SPLIT:
        part = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k.to(tl.int64) * M * N + part, acc, mask=mask)
        tl.debug_barrier()  # every thread's partials stored before one thread counts the program in
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")  # release: partials; acquire: others'
        if arrived == SPLIT - 1:  # the other splits' partials are all stored
            tot = tl.zeros(acc.shape, dtype=tl.float32)
            offs_s = tl.arange(0, RED)
            for s0 in range(0, SPLIT, RED):
                ss = s0 + offs_s
                ptrs = ws_ptr + ss.to(tl.int64)[:, None, None] * M * N + part[None, :, :]
                chunk = tl.load(ptrs, mask=(ss < SPLIT)[:, None, None] & mask[None, :, :], other=0.0,
                                cache_modifier=".cg")  # fmt: skip
                tot += tl.sum(chunk, axis=0)
            if HAS_BIAS:
                tot += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, tot.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(cnt_ptr + tile, 0)  # ready for the next launch (launches on a stream run in turn)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "N", "KW", "STEPS", "SPLIT"])
def wo_gemv_kernel(
    x_ptr, xs_ptr, xz_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, KW, STEPS, SPLIT,
    stride_xm, stride_wn, stride_sn, stride_sg, stride_zn, stride_zg, stride_ym,
    WKIND: tl.constexpr,  # 0 int8, 1 packed int4, 2 e4m3
    SMODE: tl.constexpr,  # 0 one scale, 1 per channel, 2 per (channel, group)
    HAS_ZP: tl.constexpr,
    ZP_DEFAULT: tl.constexpr,  # zero point without a tensor (8 for symmetric int4, else 0)
    HAS_BIAS: tl.constexpr,
    GW: tl.constexpr,  # words per group (SMODE 2)
    GROUP_PER_STEP: tl.constexpr,  # GW % BLOCK_KW == 0: one group per K step
    X_CODES: tl.constexpr,  # x: int8 codes, scale xs and zero point xz (w8a8)
    XS_PER_ROW: tl.constexpr, HAS_XZP: tl.constexpr,
    IS_SPLIT: tl.constexpr,  # SPLIT > 1
    EVEN_K: tl.constexpr,  # KW % BLOCK_KW == 0
    XP: tl.constexpr,  # x read as: 0 its own dtype, one load per code; 1 / 2 bf16 / fp16 pairs in int32 words
    PRMT: tl.constexpr,  # int4 / int8 codes with the ``prmt`` PTX of :data:`PRMT_INT4` / :data:`PRMT_INT8`
    DEPTH: tl.constexpr,  # K steps whose loads are in flight while one is computed (1 or 2); 0: each step
    # loads its own words at its start, left to Triton's software pipeliner (STAGES)
    BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr,  # words per row per K step
    USE_ASM: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # programmatic dependent launch (``kiln.backends.triton._utils.PDL``)
    RELEASE_LATE: tl.constexpr = True,  # PDL: let the next kernel launch after the K loop, not at the start
    XPRE: tl.constexpr = False,  # XP > 0: the next K step's x pairs are loaded with this step's, not after
    STAGES: tl.constexpr = 1,  # the K loop's software-pipelining depth (DEPTH 0: cp.async into shared memory)
    PACKED: tl.constexpr = False,  # int4 codes, bf16 x pairs (XP 1): each word summed in bf16x2 (packed_word_sums)
):  # fmt: skip
    """``y[m, n] = sum_k x[m, k] (q[n, k] - z) s (+ b[n])`` for one ``m``, ``BLOCK_N`` channels, split ``pid_k``.

    Split ``pid_k`` covers ``STEPS`` K steps of ``BLOCK_KW`` words from word ``pid_k * STEPS * BLOCK_KW``.
    """
    CPW: tl.constexpr = 8 if WKIND == 1 else 4  # codes per 32-bit word
    pdl_release(USE_PDL and not RELEASE_LATE)
    pid = tl.program_id(0)
    pid_m = pid % M  # the rows of x sharing a weight tile run side by side (L2 reuse)
    pid_n = pid // M
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BLOCK_KW)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # (BN, 1)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    kw_lo = pid_k * STEPS * BLOCK_KW
    kw_end = tl.minimum(KW, kw_lo + STEPS * BLOCK_KW)
    n_steps = tl.cdiv(kw_end - kw_lo, BLOCK_KW)
    if SMODE == 2:
        z_row = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        z_row = _row_zero(z_ptr, offs_n, n_mask, stride_zn, HAS_ZP, ZP_DEFAULT)
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    # the first K steps' weights (constants) are requested before the wait for the previous kernel's x
    if DEPTH > 0:
        wd, s, z = _wsz_loads(kw_lo, kw_end, w_rows, s_ptr, z_ptr, offs_n, n_mask, offs_w,
                              stride_sn, stride_sg, stride_zn, stride_zg, SMODE, HAS_ZP, GW, GROUP_PER_STEP,
                              EVEN_K)  # fmt: skip
    if DEPTH == 2:
        wd2, s2, z2 = _wsz_loads(kw_lo + BLOCK_KW, kw_end, w_rows, s_ptr, z_ptr, offs_n, n_mask, offs_w,
                                 stride_sn, stride_sg, stride_zn, stride_zg, SMODE, HAS_ZP, GW, GROUP_PER_STEP,
                                 EVEN_K)  # fmt: skip
    pdl_wait(USE_PDL)
    if X_CODES:
        if HAS_XZP:
            if XS_PER_ROW:
                xz = tl.load(xz_ptr + pid_m).to(tl.float32)
            else:
                xz = tl.load(xz_ptr).to(tl.float32)
        else:
            xz = 0.0
    if XPRE:
        xq0, xq1, xq2, xq3 = _x_pairs(x_row, kw_lo, kw_end, offs_w, CPW)
    for i in tl.range(n_steps, num_stages=STAGES):
        kw0 = kw_lo + i * BLOCK_KW
        if DEPTH == 0:  # this step's bytes, requested here (Triton's pipeliner may issue them stages ahead)
            wd, s, z = _wsz_loads(kw0, kw_end, w_rows, s_ptr, z_ptr, offs_n, n_mask, offs_w,
                                  stride_sn, stride_sg, stride_zn, stride_zg, SMODE, HAS_ZP, GW,
                                  GROUP_PER_STEP, EVEN_K)  # fmt: skip
        else:  # the bytes of step i + DEPTH are requested before this step is computed
            nwd, ns, nz = _wsz_loads(kw0 + DEPTH * BLOCK_KW, kw_end, w_rows, s_ptr, z_ptr, offs_n, n_mask, offs_w,
                                     stride_sn, stride_sg, stride_zn, stride_zg, SMODE, HAS_ZP, GW,
                                     GROUP_PER_STEP, EVEN_K)  # fmt: skip
        if XPRE:  # and x of step i + 1 (an L2 round trip that would otherwise stall every step)
            nx0, nx1, nx2, nx3 = _x_pairs(x_row, kw0 + BLOCK_KW, kw_end, offs_w, CPW)
        wu = wd.to(tl.uint32, bitcast=True)
        if PACKED:  # each word's eight products summed in bf16x2 arithmetic, q - z exact (no bias to undo)
            if XPRE:
                px0, px1, px2, px3 = xq0, xq1, xq2, xq3
            else:
                px0, px1, px2, px3 = _x_pairs(x_row, kw0, kw_end, offs_w, CPW)
            part = packed_word_sums(wu, px0, px1, px2, px3,
                                    _step_zero(z, z_row, SMODE, HAS_ZP, ZP_DEFAULT, GROUP_PER_STEP), USE_ASM)  # fmt: skip
        else:
            if PRMT and USE_ASM:
                codes = _codes_prmt(wu, WKIND)
            else:
                codes = (wu,)
            x_ok = kw0 + offs_w < kw_end
            part = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)  # sum v x over each word's codes
            xsum = tl.zeros((BLOCK_KW,), dtype=tl.float32)  # sum x over each word's codes (shared by the rows)
            # every op stays in the words' layout (no shuffles, no shared memory); x of code c of each word:
            if XP == 0:  # one load per code
                x_words = x_row + (kw0 + offs_w) * CPW
                for c in tl.static_range(CPW):
                    if EVEN_K:
                        xc = tl.load(x_words + c).to(tl.float32)
                    else:
                        xc = tl.load(x_words + c, mask=x_ok, other=0.0).to(tl.float32)
                    if X_CODES:
                        xc = xc - xz
                    part += _gemv_code(wu, codes, c, WKIND, PRMT, USE_ASM) * xc[None, :]
                    xsum += xc
            else:  # 16-bit x read as int32 pairs: codes 2p and 2p + 1 of each word
                x_words = x_row + (kw0 + offs_w) * (CPW // 2)
                for p in tl.static_range(CPW // 2):
                    if XPRE:
                        xp = _pick(p, xq0, xq1, xq2, xq3)
                    elif EVEN_K:
                        xp = tl.load(x_words + p)
                    else:
                        xp = tl.load(x_words + p, mask=x_ok, other=0)
                    if XP == 1:  # bf16: the upper half of an fp32
                        xlo = (xp << 16).to(tl.float32, bitcast=True)
                        xhi = (xp & -65536).to(tl.float32, bitcast=True)
                    else:  # fp16
                        xlo = xp.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                        xhi = (xp >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                    part += _gemv_code(wu, codes, 2 * p, WKIND, PRMT, USE_ASM) * xlo[None, :]
                    part += _gemv_code(wu, codes, 2 * p + 1, WKIND, PRMT, USE_ASM) * xhi[None, :]
                    xsum += xlo + xhi
            if WKIND != 2:  # sum (q - z) x = 2**F sum v x - (2**F + offset + z) sum x, per word
                zb = code_bias(_step_zero(z, z_row, SMODE, HAS_ZP, ZP_DEFAULT, GROUP_PER_STEP), WKIND, PRMT)
                part = part * code_shift(WKIND, PRMT) - zb * xsum[None, :]
        if SMODE == 2:
            if GROUP_PER_STEP:
                acc += part * s[:, None]
            else:
                acc += part * s  # (BN, BKW): per word
        else:
            acc += part
        if DEPTH == 2:
            wd, s, z = wd2, s2, z2
            wd2, s2, z2 = nwd, ns, nz
        elif DEPTH == 1:
            wd, s, z = nwd, ns, nz
        if XPRE:
            xq0, xq1, xq2, xq3 = nx0, nx1, nx2, nx3
    y = _scale_rows(tl.sum(acc, axis=1), s_ptr, offs_n, n_mask, stride_sn, SMODE)
    if X_CODES:
        if XS_PER_ROW:
            y = y * tl.load(xs_ptr + pid_m)
        else:
            y = y * tl.load(xs_ptr)
    offs_m = pid_m + tl.arange(0, 1)
    pdl_release(USE_PDL and RELEASE_LATE)  # the K loop is done: the next kernel's programs may take SM slots
    _finish(y[None, :], offs_m, offs_n, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, pid, pid_k, SPLIT,
            HAS_BIAS, IS_SPLIT, 4)  # fmt: skip


@triton.jit(do_not_specialize=["M", "N", "KW", "STEPS", "SPLIT"])
def wo_dot_kernel(
    x_ptr, xs_ptr, xz_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, KW, STEPS, SPLIT,
    stride_xm, stride_wn, stride_sn, stride_sg, stride_zn, stride_zg, stride_ym,
    WKIND: tl.constexpr, SMODE: tl.constexpr, HAS_ZP: tl.constexpr, ZP_DEFAULT: tl.constexpr,
    HAS_BIAS: tl.constexpr, GW: tl.constexpr, GROUP_PER_STEP: tl.constexpr,
    X_CODES: tl.constexpr, XS_PER_ROW: tl.constexpr, HAS_XZP: tl.constexpr, IS_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter with bf16: its tl.dot multiplies bf16 bit patterns (triton#11584)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    RELEASE_LATE: tl.constexpr = True,
):  # fmt: skip
    """:func:`wo_gemv_kernel` for ``BLOCK_M`` rows of x at once: the decoded tile times x with ``tl.dot``.

    Whole K steps only (``KW % BLOCK_KW == 0``; the launcher checks): no K masks.
    """
    EVEN_K: tl.constexpr = True
    CPW: tl.constexpr = 8 if WKIND == 1 else 4
    BK: tl.constexpr = BLOCK_KW * CPW
    pdl_release(USE_PDL and not RELEASE_LATE)
    m_tiles = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % m_tiles
    pid_n = pid // m_tiles
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BLOCK_KW)
    offs_k = tl.arange(0, BK)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    if X_CODES:
        dt = tl.bfloat16
    else:
        dt = x_ptr.dtype.element_ty
    kw_lo = pid_k * STEPS * BLOCK_KW
    kw_end = tl.minimum(KW, kw_lo + STEPS * BLOCK_KW)
    n_steps = tl.cdiv(kw_end - kw_lo, BLOCK_KW)
    if SMODE == 2:
        z_row = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        z_row = _row_zero(z_ptr, offs_n, n_mask, stride_zn, HAS_ZP, ZP_DEFAULT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    wd, s, z = _wsz_loads(kw_lo, kw_end, w_rows, s_ptr, z_ptr, offs_n, n_mask, offs_w,
                          stride_sn, stride_sg, stride_zn, stride_zg, SMODE, HAS_ZP, GW, GROUP_PER_STEP, EVEN_K)  # fmt: skip
    pdl_wait(USE_PDL)  # the first weights are in flight; x is the previous kernel's output
    if X_CODES:
        if HAS_XZP:
            if XS_PER_ROW:
                xz = tl.load(xz_ptr + offs_m, mask=m_mask, other=0).to(tl.float32)[:, None]
            else:
                xz = tl.load(xz_ptr).to(tl.float32)
        else:
            xz = 0.0
    for i in range(n_steps):
        kw0 = kw_lo + i * BLOCK_KW
        nwd, ns, nz = _wsz_loads(kw0 + BLOCK_KW, kw_end, w_rows, s_ptr, z_ptr, offs_n, n_mask, offs_w,
                                 stride_sn, stride_sg, stride_zn, stride_zg, SMODE, HAS_ZP, GW,
                                 GROUP_PER_STEP, EVEN_K)  # fmt: skip
        kx = kw0 * CPW + offs_k
        xt = tl.load(x_rows + kx[None, :], mask=m_mask[:, None], other=0.0)
        if X_CODES:
            xt = (xt.to(tl.float32) - xz).to(dt)  # |q - z| <= 255: exact in bf16
        zb = code_bias(_step_zero(z, z_row, SMODE, HAS_ZP, ZP_DEFAULT, GROUP_PER_STEP), WKIND, False)
        wt = _k_order(wd.to(tl.uint32, bitcast=True), zb, s, WKIND, CPW, SMODE == 2 and not GROUP_PER_STEP).to(dt)  # exact without word scales
        if UPCAST_DOT:
            part = tl.dot(xt.to(tl.float32), tl.trans(wt).to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(xt, tl.trans(wt), input_precision=DOT_PRECISION)
        if SMODE == 2 and GROUP_PER_STEP:
            acc += part * s[None, :]
        else:
            acc += part
        wd, s, z = nwd, ns, nz
    acc = _scale_rows(acc, s_ptr, offs_n, n_mask, stride_sn, SMODE)
    if X_CODES:
        if XS_PER_ROW:
            acc = acc * tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
        else:
            acc = acc * tl.load(xs_ptr)
    pdl_release(USE_PDL and RELEASE_LATE)
    _finish(acc, offs_m, offs_n, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, pid, pid_k, SPLIT,
            HAS_BIAS, IS_SPLIT, 4)  # fmt: skip
