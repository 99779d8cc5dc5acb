"""Paged-cache writes and cache-code conversions shared by the paged-attention kernels.

``_reshape_and_cache_kernel`` stores new keys and values (float, or int8 / fp8 e4m3 codes with
static or per-token scales); ``_quantize_tile`` and ``_codes_to`` convert between values and
codes, also inside the attention kernels (``_paged_kernels.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.backends.triton._utils import pdl_release, pdl_wait


@triton.jit
def _round_to_e4m3(y):
    """fp32 ``y`` (|y| <= 448) rounded to the nearest fp8 e4m3 value, ties to even, still in fp32.

    Done by hand so that the cast after it is exact: Triton's interpreter drops the carry when
    a cast rounds up into the next binade (31.6 -> 16, not 32). Same result as the GPU's
    ``cvt.rn.satfinite`` and torch's cast.
    """
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3  # exponent of y's e4m3 ulp (subnormals: 2^-9)
    ulp = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    t = tl.abs(y) * inv  # exact: a power of two; t < 16
    t = (t + 8388608.0) - 8388608.0  # round half to even at 2^23
    return tl.where(bits < 0, -t, t) * ulp  # the sign bit, so -0.001 -> -0 as the cast gives


@triton.jit
def _quantize_tile(x, s, QMAX: tl.constexpr, INT_CODES: tl.constexpr, CODE_TY: tl.constexpr):
    """Codes of fp32 ``x`` for scales ``s`` (broadcasting): the fp32 ops of ``kiln.ops.quantize_kv``."""
    y = tl.math.div_rn(x, tl.where(s == 0.0, 1.0, s))  # IEEE division, as torch: bit-exact codes
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)  # static scales saturate
    if INT_CODES:
        codes = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5)).to(CODE_TY)  # half away from zero
    else:
        codes = _round_to_e4m3(y).to(CODE_TY)  # fp8 e4m3: nearest even; the cast is exact
    return codes


@triton.jit
def _codes_to(x, DOT_TY: tl.constexpr, INT_CODES: tl.constexpr):
    """Cache values ``x`` in the dot's dtype. int8 codes into fp16 by bits (FasterTransformer's trick:
    ``0x6480 + x`` is the fp16 ``1152 + x``) to spare the quarter-rate int-to-float conversions."""
    if INT_CODES:
        if DOT_TY == tl.float16:
            bits = (x.to(tl.int32) + 0x6480).to(tl.int16)
            y = bits.to(tl.float16, bitcast=True) - 1152.0
        else:
            y = x.to(tl.float32).to(DOT_TY)  # through fp32: the interpreter mis-converts int8 -> bf16
    else:
        y = x.to(DOT_TY)  # fp8 e4m3 -> fp16: one hardware cvt per two values
    return y


@triton.jit
def _reshape_and_cache_kernel(
    K, V, Cache, Slots, Scales,
    stride_kh, stride_kt, stride_kd,
    stride_vh, stride_vt, stride_vd,
    stride_cc, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_sc, stride_sb, stride_ss, stride_sh,
    num_kv_heads, page_size,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SCALE_MODE: tl.constexpr,  # 0 float cache; 1 static per-tensor scales; 2 per-(token, head) scales, written here
    QMAX: tl.constexpr,  # largest code: 127 (int8), 448 (fp8 e4m3)
    INT_CODES: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # programmatic dependent launch (``kiln.backends.triton._utils.PDL``)
):  # fmt: skip
    """One program: BLOCK_H heads of token ``t``'s key and value. Grid (T, cdiv(Hkv, BLOCK_H))."""
    pdl_release(USE_PDL)
    pdl_wait(USE_PDL)
    t = tl.program_id(0)
    slot = tl.load(Slots + t).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < num_kv_heads
    mask = h_ok[:, None] & (offs_d < HEAD_DIM)[None, :]  # (BLOCK_H, BLOCK_D)
    t64 = t.to(tl.int64)
    k_ptrs = K + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd
    v_ptrs = V + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd
    k = tl.load(k_ptrs, mask=mask, other=0.0)  # masked lanes 0: they never win the amax
    v = tl.load(v_ptrs, mask=mask, other=0.0)
    dst = Cache + (slot // page_size) * stride_cb + (slot % page_size) * stride_cs
    dst = dst + offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd
    code_ty = Cache.dtype.element_ty
    if SCALE_MODE == 0:
        tl.store(dst, k.to(code_ty), mask=mask)
        tl.store(dst + stride_cc, v.to(code_ty), mask=mask)
    elif SCALE_MODE == 1:
        k_s = tl.load(Scales)
        v_s = tl.load(Scales + stride_sc)
        tl.store(dst, _quantize_tile(k.to(tl.float32), k_s, QMAX, INT_CODES, code_ty), mask=mask)
        tl.store(dst + stride_cc, _quantize_tile(v.to(tl.float32), v_s, QMAX, INT_CODES, code_ty), mask=mask)
    else:
        kf = k.to(tl.float32)
        vf = v.to(tl.float32)
        qmax = tl.full([BLOCK_H], QMAX, tl.float32)
        k_s = tl.math.div_rn(tl.max(tl.abs(kf), 1), qmax)  # (BLOCK_H,) amax / qmax
        v_s = tl.math.div_rn(tl.max(tl.abs(vf), 1), qmax)
        tl.store(dst, _quantize_tile(kf, k_s[:, None], QMAX, INT_CODES, code_ty), mask=mask)
        tl.store(dst + stride_cc, _quantize_tile(vf, v_s[:, None], QMAX, INT_CODES, code_ty), mask=mask)
        s_dst = Scales + (slot // page_size) * stride_sb + (slot % page_size) * stride_ss + offs_h * stride_sh
        tl.store(s_dst, k_s, mask=h_ok)
        tl.store(s_dst + stride_sc, v_s, mask=h_ok)
