"""Packed weight codes to floats in registers, for the split-K kernels of ``quant_splitk_kernels``.

Weights (``WKIND``): 0 int8, 4 codes per 32-bit word; 1 int4 packed by ``kiln.quantize.ops.pack_int4`` (code
``8j+c`` of a word at bit ``8 (c % 4) + 4 (c // 4)``); 2 float8 e4m3, 4 per word. Codes become fp32 with
integer ops on the bits (the exponent trick of Kim et al., arXiv:2211.10017), or with the inline-PTX
``prmt`` forms on the GPU (a plain-op twin for the interpreter); :func:`code_shift` and :func:`code_bias`
turn the sums of those values back into exact ``q - z`` sums.
"""

from __future__ import annotations

import triton
import triton.language as tl

ONE_BITS = tl.constexpr(0x3F800000)  # the bits of 1.0
E4M3_SCALE = tl.constexpr(2.0**120)  # e4m3 exponent/mantissa bits at fp32's positions, times this, = value


@triton.jit
def _place(wd, p: tl.constexpr, to: tl.constexpr):
    """The bits of ``wd`` (uint32) shifted so that bit ``p`` lands on bit ``to``."""
    if p > to:
        return wd >> (p - to)
    elif p < to:
        return wd << (to - p)
    else:
        return wd


@triton.jit
def _code(wd, c: tl.constexpr, WKIND: tl.constexpr):
    """Code ``c`` of every word ``wd`` (uint32) as the fp32 ``1 + u / 2**F``: two integer ops, exact.

    ``u`` is the unsigned code (int4: ``q``; int8: ``q + 128``) and ``F`` its width (see :func:`code_shift`),
    placed in the top mantissa bits of 1.0. e4m3 codes become their values.
    """
    if WKIND == 1:  # code c of a pack_int4 word sits at bit 8 (c % 4) + 4 (c // 4): move it to bits 19..22
        v = ((_place(wd, (c % 4) * 8 + (c // 4) * 4, 19) & 0x780000) | ONE_BITS).to(tl.float32, bitcast=True)
    elif WKIND == 0:  # byte c to bits 15..22, its top bit flipped (q + 128)
        v = ((_place(wd, c * 8, 15) & 0x7F8000) ^ 0x3FC00000).to(tl.float32, bitcast=True)
    else:  # e4m3 (quantized weights hold no NaN): sign, then exponent and mantissa under fp32's
        b = wd >> (c * 8)
        bits = ((b & 0x80) << 24) | ((b & 0x7F) << 20)
        v = bits.to(tl.float32, bitcast=True) * E4M3_SCALE
    return v


# The same values with inline PTX (GPU only): ``prmt`` copies a byte of codes under the exponent
# byte 0x3F, so a whole word takes 11 (int4) or 5 (int8) instructions instead of ~2 per code.
# int4: nibbles masked into bytes, byte j under 0x3F: 0.5 + c / 256 (outputs are codes 0..7).
PRMT_INT4 = tl.constexpr("""{
.reg .b32 lo, hi, e;
mov.b32 e, 0x3F000000;
and.b32 lo, $8, 0x0F0F0F0F;
shr.u32 hi, $8, 4;
and.b32 hi, hi, 0x0F0F0F0F;
prmt.b32 $0, lo, e, 0x7044;
prmt.b32 $1, lo, e, 0x7144;
prmt.b32 $2, lo, e, 0x7244;
prmt.b32 $3, lo, e, 0x7344;
prmt.b32 $4, hi, e, 0x7044;
prmt.b32 $5, hi, e, 0x7144;
prmt.b32 $6, hi, e, 0x7244;
prmt.b32 $7, hi, e, 0x7344;
}""")
# int8: q + 128 as byte 1 of 0x3F80xx00: 1 + (q + 128) / 32768.
PRMT_INT8 = tl.constexpr("""{
.reg .b32 u, e;
mov.b32 e, 0x3F800000;
xor.b32 u, $4, 0x80808080;
prmt.b32 $0, u, e, 0x7604;
prmt.b32 $1, u, e, 0x7614;
prmt.b32 $2, u, e, 0x7624;
prmt.b32 $3, u, e, 0x7634;
}""")


@triton.jit
def _codes_prmt(wu, WKIND: tl.constexpr):
    """Every code of the words ``wu`` with :data:`PRMT_INT4` / :data:`PRMT_INT8`, or the plain-op twins (interpreter)."""
    if WKIND == 1:
        return tl.inline_asm_elementwise(PRMT_INT4, "=r,=r,=r,=r,=r,=r,=r,=r,r", [wu], dtype=(tl.float32,) * 8,
                                         is_pure=True, pack=1)  # fmt: skip
    else:
        return tl.inline_asm_elementwise(PRMT_INT8, "=r,=r,=r,=r,r", [wu], dtype=(tl.float32,) * 4,
                                         is_pure=True, pack=1)  # fmt: skip


@triton.jit
def _int4_code(wu, c: tl.constexpr):
    """Code ``c`` (0..15) of every ``pack_int4`` word ``wu`` (uint32): bit ``8 (c % 4) + 4 (c // 4)`` on."""
    return (wu >> ((c % 4) * 8 + (c // 4) * 4)) & 0xF


@triton.jit
def _code_twin(wu, c: tl.constexpr, WKIND: tl.constexpr):
    """The value :func:`_codes_prmt` gives code ``c``, from plain ops (the interpreter runs no PTX)."""
    if WKIND == 1:
        u = _int4_code(wu, c)
        return ((u << 16) | 0x3F000000).to(tl.float32, bitcast=True)
    else:
        u = ((wu >> (c * 8)) & 0xFF) ^ 0x80
        return ((u << 8) | ONE_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_code(wu, codes, c: tl.constexpr, WKIND: tl.constexpr, PRMT: tl.constexpr, USE_ASM: tl.constexpr):
    """Code ``c`` as the GEMV multiplies it: :func:`_code`, or the ``prmt`` form (``codes``) / its twin."""
    if PRMT:
        if USE_ASM:
            v = codes[c]
        else:
            v = _code_twin(wu, c, WKIND)
    else:
        v = _code(wu, c, WKIND)
    return v


@triton.jit
def code_shift(WKIND: tl.constexpr, PRMT: tl.constexpr):
    """``2**F`` for :func:`_code`: ``sum (q - z) x = 2**F sum v x - code_bias(z) sum x``."""
    if PRMT:
        if WKIND == 1:
            return 256.0
        else:
            return 32768.0
    else:
        if WKIND == 1:
            return 16.0
        else:
            return 256.0


@triton.jit
def code_bias(z, WKIND: tl.constexpr, PRMT: tl.constexpr):
    """What ``2**F v`` exceeds ``q - z`` by (``z`` the zero point as fp32): ``2**F v0 + offset + z``."""
    if PRMT:
        if WKIND == 1:
            return z + 128.0  # 256 * 0.5
        else:
            return z + 32896.0  # 32768 + 128
    else:
        if WKIND == 1:
            return z + 16.0
        else:
            return z + 384.0  # 256 + 128


@triton.jit
def _k_order(wd, zb, s, WKIND: tl.constexpr, CPW: tl.constexpr, SCALE: tl.constexpr):
    """Words (BN, BKW) -> (BN, BKW * CPW) fp32 ``q - z`` (times ``s`` per word if ``SCALE``) in K order.

    ``tl.join`` stacks codes in registers: ``join(join(a, b), join(c, d))[..., i, j]`` is code
    ``2 i + j`` when a, b, c, d are codes 0, 2, 1, 3.
    """
    BN: tl.constexpr = wd.shape[0]
    BKW: tl.constexpr = wd.shape[1]
    if CPW == 8:
        lo = tl.join(tl.join(_exact(wd, 0, zb, WKIND), _exact(wd, 4, zb, WKIND)),
                     tl.join(_exact(wd, 2, zb, WKIND), _exact(wd, 6, zb, WKIND)))  # fmt: skip
        hi = tl.join(tl.join(_exact(wd, 1, zb, WKIND), _exact(wd, 5, zb, WKIND)),
                     tl.join(_exact(wd, 3, zb, WKIND), _exact(wd, 7, zb, WKIND)))  # fmt: skip
        v = tl.join(lo, hi)  # [..., a, b, c] = code 4a + 2b + c
    else:
        v = tl.join(tl.join(_exact(wd, 0, zb, WKIND), _exact(wd, 2, zb, WKIND)),
                    tl.join(_exact(wd, 1, zb, WKIND), _exact(wd, 3, zb, WKIND)))  # fmt: skip
    v = tl.reshape(v, (BN, BKW, CPW))
    if SCALE:
        v = v * s[:, :, None]
    return tl.reshape(v, (BN, BKW * CPW))


@triton.jit
def _exact(wd, c: tl.constexpr, zb, WKIND: tl.constexpr):
    """Code ``c`` of the words as the exact fp32 ``q - z`` (one fma after :func:`_code`); e4m3: its value."""
    v = _code(wd, c, WKIND)
    if WKIND != 2:
        v = v * code_shift(WKIND, False) - zb
    return v


# The GEMV's packed form (``PACKED``, int4 codes and bf16 x only): a word's eight codes become four bf16x2 pairs in
# x's pair order (codes 2p, 2p + 1). The nibbles are masked into bytes, and ``prmt`` puts two of them under the byte
# 0xC3 taken from the zero-point pair itself (bf16 -(128 + z) is 0xC3zz): 0xC3q is -(128 + q). One ``fma`` by -1 with
# that pair leaves the exact q - z, four more multiply them by the x pairs and sum them in bf16x2: about 20
# instructions a word where the fp32 form takes about 31 (benchmarks/gemv_sass.py), at the price of bf16 rounding
# inside each word's sum of eight products (the word sums add up in fp32). No constant needs a register: an ``or``
# with a second immediate (the first form) had ptxas materialize it again for every word. $1: the word; $2..$5: x
# pairs 0..3 (bf16x2); $6: the pair of -(128 + z), exact in bf16 for integer z in 0..127 (int4 zero points are
# 0..15); $0: the word's sum as fp32.
PACKED_INT4_BF16 = tl.constexpr("""{
.reg .b32 v, h, u, d, acc, z, m1;
.reg .f32 flo, fhi, fs;
mov.b32 z, 0;
mov.b32 m1, 0xBF80BF80;
and.b32 v, $1, 0x0F0F0F0F;
shr.u32 h, $1, 4;
and.b32 h, h, 0x0F0F0F0F;
prmt.b32 u, v, $6, 0x5150;
fma.rn.bf16x2 d, u, m1, $6;
fma.rn.bf16x2 acc, d, $2, z;
prmt.b32 u, h, $6, 0x5150;
fma.rn.bf16x2 d, u, m1, $6;
fma.rn.bf16x2 acc, d, $4, acc;
prmt.b32 u, v, $6, 0x5352;
fma.rn.bf16x2 d, u, m1, $6;
fma.rn.bf16x2 acc, d, $3, acc;
prmt.b32 u, h, $6, 0x5352;
fma.rn.bf16x2 d, u, m1, $6;
fma.rn.bf16x2 acc, d, $5, acc;
shl.b32 u, acc, 16;
and.b32 v, acc, 0xFFFF0000;
mov.b32 flo, u;
mov.b32 fhi, v;
add.f32 fs, flo, fhi;
mov.b32 $0, fs;
}""")


@triton.jit
def _round_bf16(f):
    """fp32 ``f`` rounded to the nearest bf16 (ties to even), as fp32 (finite values)."""
    b = f.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _fma_bf16(a, c):
    """``a + c`` (fp32 values, ``a`` an exact product) rounded once to bf16, as ``fma.rn.bf16x2`` rounds: the fp32 sum
    is made round-to-odd (its error, by Knuth's two-sum, nudges an even last bit toward the exact value), which
    a rounding to 16 fewer bits then turns into the correctly rounded result (no double rounding)."""
    s = a + c
    bb = s - a
    err = (a - (s - bb)) + (c - bb)
    b = s.to(tl.uint32, bitcast=True)
    nudge = (err != 0.0) & ((b & 1) == 0)
    b = tl.where(nudge, tl.where((err > 0.0) == (s > 0.0), b + 1, b - 1), b)
    return _round_bf16(b.to(tl.float32, bitcast=True))


@triton.jit
def packed_word_sums(wu, x0, x1, x2, x3, zs, USE_ASM: tl.constexpr):
    """Each word's ``sum_c (q_c - z) x_c`` of its eight int4 codes in bf16x2 arithmetic (:data:`PACKED_INT4_BF16`),
    as fp32 (BN, BKW). ``wu``: the words (uint32); ``x0..x3``: the bf16 x pairs of codes (0, 1) .. (6, 7) as int32;
    ``zs``: the zero points (fp32, broadcast over the words; integers 0..127, as int4 zero points are: the PTX
    takes -(128 + z) as an exact bf16). Without PTX (the interpreter): the same operations in the same order, each
    ``fma`` rounded once to bf16 on the fp32 bits (:func:`_fma_bf16`)."""
    if USE_ASM:
        nz = ((-(zs + 128.0)).to(tl.uint32, bitcast=True) >> 16).to(tl.int32)  # bf16 -(128 + z): exact
        nz = tl.broadcast_to(nz | (nz << 16), wu.shape)
        out = tl.inline_asm_elementwise(
            PACKED_INT4_BF16, "=r,r,r,r,r,r,r",
            [wu, tl.broadcast_to(x0[None, :], wu.shape), tl.broadcast_to(x1[None, :], wu.shape),
             tl.broadcast_to(x2[None, :], wu.shape), tl.broadcast_to(x3[None, :], wu.shape), nz],
            dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
    else:
        acc_lo = tl.zeros(wu.shape, dtype=tl.float32)
        acc_hi = tl.zeros(wu.shape, dtype=tl.float32)
        acc_lo, acc_hi = _packed_pair_twin(wu, x0, 0, zs, acc_lo, acc_hi)  # the asm's order: codes 0-1, 4-5,
        acc_lo, acc_hi = _packed_pair_twin(wu, x2, 2, zs, acc_lo, acc_hi)  # 2-3, 6-7
        acc_lo, acc_hi = _packed_pair_twin(wu, x1, 1, zs, acc_lo, acc_hi)
        acc_lo, acc_hi = _packed_pair_twin(wu, x3, 3, zs, acc_lo, acc_hi)
        out = acc_lo + acc_hi
    return out


@triton.jit
def _packed_pair_twin(wu, xp, p: tl.constexpr, zs, acc_lo, acc_hi):
    """One ``fma.rn.bf16x2`` of :data:`PACKED_INT4_BF16` on codes ``2p``, ``2p + 1`` and their x pair, in fp32 bits."""
    xlo = (xp << 16).to(tl.float32, bitcast=True)
    xhi = (xp & -65536).to(tl.float32, bitcast=True)
    qlo = _int4_code(wu, 2 * p).to(tl.float32)
    qhi = _int4_code(wu, 2 * p + 1).to(tl.float32)
    return _fma_bf16((qlo - zs) * xlo, acc_lo), _fma_bf16((qhi - zs) * xhi, acc_hi)
