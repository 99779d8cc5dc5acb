"""The Triton kernels behind kiln's quantized linears (``kiln::qlinear_*``); launched by ``quant_gemm.py``.

Weight codes become floats in registers with the exponent trick of FasterTransformer and Kim
et al. ("Who Says Elephants Can't Run", 2022, arXiv:2211.10017): placing an unsigned code
``u`` under the exponent bits of ``2**23`` (fp32), ``128`` (bf16) or ``1024`` (fp16) gives
``magic + u`` exactly, an integer op instead of a slow int-to-float conversion; subtracting
``magic + zero_point`` (exact) leaves ``q - zero_point`` as a small float. On the GPU the
16-bit forms are inline PTX (``prmt`` + one packed ``fma``: two weights per instruction, see
``_INT4_ASM``); the interpreter runs plain-op twins computing the same values. Scales multiply
partial sums once per (row, group), never each weight.

Kernels (every pointer argument follows the shapes of :mod:`kiln.quantize.ops`):

Decode sizes (M <= 16) run the split-K kernels of :mod:`quant_splitk_kernels` instead.

- :func:`wo_mm_kernel`: weight-only GEMM on the tensor cores (``tl.dot``) for M > 16: the
  dequantized tile is ``q - zero_point`` as exact small integers in x's dtype; a K step never
  crosses a group (``BLOCK_K`` divides the group size), so the group scale multiplies the step's
  partial product. ``SMODE == 3`` handles any other group size by dequantizing each element.
- :func:`dequantize_kernel`: dense ``(N, K)`` weights in x's dtype (for cuBLAS at large M).
- :func:`w8a8_kernel`: int8 x int8 GEMM (``tl.dot`` with int32 accumulation), per-token x
  per-channel scales (and an optional activation zero point) applied in the epilogue.
- :func:`row_absmax_kernel` / :func:`quantize_rows_kernel`: per-token dynamic scales and codes.

Weight kinds (``WKIND``): 0 int8 (N, K); 1 int4, uint8 (N, K/2), 8 codes per 32-bit word along
K (``kiln.quantize.ops.pack_int4``; ``tl.join`` / ``tl.permute`` put the nibbles back in K
order, a register renaming); 2 float8 e4m3 (N, K). Scale modes (``SMODE``): 0 one scale;
1 per output channel; 2 per (channel, group of ``G`` along K); 3 per group, any group size.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAGIC_BITS = tl.constexpr(0x4B000000)  # the bits of 2.0 ** 23
MAGIC = tl.constexpr(8388608.0)  # 2.0 ** 23


@triton.jit
def _code_values(b, WKIND: tl.constexpr, USE_ASM: tl.constexpr):
    """Weight storage ``b`` as fp32: ``2**23 + q + 128`` (int8) or e4m3 values; int4: see :func:`_nibble_values`."""
    if WKIND == 0:
        if USE_ASM:
            u = tl.inline_asm_elementwise(
                INT8_F32_ASM, "=r,=r,=r,=r,r", [b], dtype=tl.int32, is_pure=True, pack=4
            )
        else:
            u = (b.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x80) | MAGIC_BITS
        v = u.to(tl.float32, bitcast=True)
    else:
        v = b.to(tl.float32)
    return v


@triton.jit
def _nibble_values(b, USE_ASM: tl.constexpr):
    """Packed int4 bytes ``b`` -> ``(2**23 + low nibble, 2**23 + high nibble)`` as fp32."""
    if USE_ASM:
        lo, hi = tl.inline_asm_elementwise(INT4_F32_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b],
                                           dtype=(tl.int32, tl.int32), is_pure=True, pack=4)  # fmt: skip
    else:
        lo = (b & 0xF).to(tl.int32) | MAGIC_BITS
        hi = (b >> 4).to(tl.int32) | MAGIC_BITS
    return lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True)


@triton.jit
def _k_order_2d(lo, hi, R: tl.constexpr, KB: tl.constexpr):
    """Low / high nibble values of (R, KB) bytes -> (R, 2 KB) in K order.

    ``pack_int4`` puts codes ``8j..8j+3`` in the low nibbles of word ``j`` and ``8j+4..8j+7`` in its
    high nibbles, so each word's four low values come first, then its four high ones. Every
    thread holds whole words, so this is register renaming, no data movement.
    """
    lo4 = tl.reshape(lo, (R, KB // 4, 4))
    hi4 = tl.reshape(hi, (R, KB // 4, 4))
    return tl.reshape(tl.permute(tl.join(lo4, hi4), (0, 1, 3, 2)), (R, 2 * KB))


# Inline PTX for the GPU (the interpreter runs the plain-op twins): bytes -> 16-bit floats, two per op.
# int4: ``prmt`` puts a nibble under the exponent byte of 128.0 (bf16 0x43) / 1024.0 (fp16 0x64),
# giving (128 + u, 128 + v) in one register; one ``fma`` (x 1 + bias) subtracts 128 + z exactly.
# Byte i of the input word is element i: output registers hold elements (0, 1) and (2, 3).
_INT4_ASM = """{
.reg .b32 lo, hi, m, one;
mov.b32 m, @MAGIC@;
mov.b32 one, @ONE@;
and.b32 lo, $4, 0x0F0F0F0F;
shr.u32 hi, $4, 4;
and.b32 hi, hi, 0x0F0F0F0F;
prmt.b32 $0, lo, m, 0x4140;
prmt.b32 $1, lo, m, 0x4342;
prmt.b32 $2, hi, m, 0x4140;
prmt.b32 $3, hi, m, 0x4342;
fma.rn.@T@ $0, $0, one, $5;
fma.rn.@T@ $1, $1, one, $6;
fma.rn.@T@ $2, $2, one, $5;
fma.rn.@T@ $3, $3, one, $6;
}"""


def _int4_asm(magic: str, one: str, ty: str) -> str:
    return _INT4_ASM.replace("@MAGIC@", magic).replace("@ONE@", one).replace("@T@", ty)


INT4_BF16_ASM = tl.constexpr(_int4_asm("0x43434343", "0x3F803F80", "bf16x2"))  # bytes 0x43: 128.0, one: 1.0
INT4_F16_ASM = tl.constexpr(_int4_asm("0x64646464", "0x3C003C00", "f16x2"))  # bytes 0x64: 1024.0, one: 1.0
# int8: ``prmt`` builds 2**23 + (q + 128) as fp32 (bytes [u, 0, 0, 0x4B]); adding -(2**23 + 128 + z) is exact.
_INT8_ASM = """{
.reg .b32 u, m, f0, f1, f2, f3;
xor.b32 u, $2, 0x80808080;
mov.b32 m, 0x4B000000;
prmt.b32 f0, u, m, 0x7440;
prmt.b32 f1, u, m, 0x7441;
prmt.b32 f2, u, m, 0x7442;
prmt.b32 f3, u, m, 0x7443;
add.f32 f0, f0, $3;
add.f32 f1, f1, $4;
add.f32 f2, f2, $5;
add.f32 f3, f3, $6;
cvt.rn.@T@.f32 $0, f1, f0;
cvt.rn.@T@.f32 $1, f3, f2;
}"""
INT8_BF16_ASM = tl.constexpr(_INT8_ASM.replace("@T@", "bf16x2"))
INT8_F16_ASM = tl.constexpr(_INT8_ASM.replace("@T@", "f16x2"))
# fp32 forms for the CUDA-core GEMV: the bits of 2**23 + code, one ``prmt`` per weight.
INT4_F32_ASM = tl.constexpr("""{
.reg .b32 lo, hi, m;
mov.b32 m, 0x4B000000;
and.b32 lo, $8, 0x0F0F0F0F;
shr.u32 hi, $8, 4;
and.b32 hi, hi, 0x0F0F0F0F;
prmt.b32 $0, lo, m, 0x7440;
prmt.b32 $1, lo, m, 0x7441;
prmt.b32 $2, lo, m, 0x7442;
prmt.b32 $3, lo, m, 0x7443;
prmt.b32 $4, hi, m, 0x7440;
prmt.b32 $5, hi, m, 0x7441;
prmt.b32 $6, hi, m, 0x7442;
prmt.b32 $7, hi, m, 0x7443;
}""")
INT8_F32_ASM = tl.constexpr("""{
.reg .b32 u, m;
xor.b32 u, $4, 0x80808080;
mov.b32 m, 0x4B000000;
prmt.b32 $0, u, m, 0x7440;
prmt.b32 $1, u, m, 0x7441;
prmt.b32 $2, u, m, 0x7442;
prmt.b32 $3, u, m, 0x7443;
}""")


@triton.jit
def _dequant_16bit(b, zf, WKIND: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr, X_BF16: tl.constexpr):
    """``q - z`` of a (BLOCK_N, KB) weight tile in bf16 (``X_BF16``) or fp16 with inline PTX; ``zf`` (BLOCK_N,) fp32."""
    if WKIND == 1:
        if X_BF16:
            zbn = tl.broadcast_to((-(zf + 128.0)).to(tl.bfloat16)[:, None], (BLOCK_N, KB))
            lo, hi = tl.inline_asm_elementwise(INT4_BF16_ASM, "=r,=r,=r,=r,r,r,r", [b, zbn],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)  # fmt: skip
        else:
            zbn = tl.broadcast_to((-(zf + 1024.0)).to(tl.float16)[:, None], (BLOCK_N, KB))
            lo, hi = tl.inline_asm_elementwise(INT4_F16_ASM, "=r,=r,=r,=r,r,r,r", [b, zbn],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)  # fmt: skip
        w = _k_order_2d(lo, hi, BLOCK_N, KB)
    elif WKIND == 0:
        zb = tl.broadcast_to((-(zf + (MAGIC + 128.0)))[:, None], (BLOCK_N, KB))
        if X_BF16:
            w = tl.inline_asm_elementwise(INT8_BF16_ASM, "=r,=r,r,r,r,r,r", [b, zb], dtype=tl.bfloat16,
                                          is_pure=True, pack=4)  # fmt: skip
        else:
            w = tl.inline_asm_elementwise(INT8_F16_ASM, "=r,=r,r,r,r,r,r", [b, zb], dtype=tl.float16,
                                          is_pure=True, pack=4)  # fmt: skip
    else:
        if X_BF16:
            w = b.to(tl.float32).to(tl.bfloat16)
        else:
            w = b.to(tl.float16)
    return w


@triton.jit
def _code_bias(z, WKIND: tl.constexpr):
    """What to subtract from :func:`_code_values` to get ``q - z`` (``z`` the zero point as fp32)."""
    if WKIND == 0:
        return z + (MAGIC + 128.0)
    else:
        return z + MAGIC


# --------------------------------------------------------------------------------------
# Weight-only GEMM on the tensor cores
# --------------------------------------------------------------------------------------


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), ``GROUP_M`` tile rows at a time (L2 reuse of columns)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    return pid_m, pid_n


@triton.jit
def wo_mm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_sg, stride_zn, stride_zg, stride_ym,
    G: tl.constexpr,  # group size (elements) when SMODE >= 2
    WKIND: tl.constexpr, SMODE: tl.constexpr, HAS_ZP: tl.constexpr, ZP_DEFAULT: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_ASM: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks
    UPCAST_DOT: tl.constexpr,  # interpreter with bf16: its tl.dot multiplies bf16 bit patterns (triton#11584)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,  # > 1: program_id(1) takes a slice of K and atomically adds into a zeroed y
):  # fmt: skip
    """``y = x @ ((q - z) * s).T (+ b)``: (BLOCK_M, BLOCK_N) tiles, ``tl.dot`` of x with exact ``q - z``.

    ``USE_ASM`` (GPU, 16-bit x): codes become 16-bit floats with the inline PTX of
    :func:`_dequant_16bit`, about 1.5 instructions per int4 weight instead of 4. Split-K gives a
    decode GEMM with few wide N tiles enough programs to fill the GPU.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    KB: tl.constexpr = BLOCK_K // 2 if WKIND == 1 else BLOCK_K  # storage columns per K step
    offs_kb = tl.arange(0, KB)
    KSTORE = K // 2 if WKIND == 1 else K
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    dt = x_ptr.dtype.element_ty
    if SMODE < 2:
        if HAS_ZP:
            z_row = tl.load(z_ptr + offs_n * stride_zn, mask=n_mask, other=0).to(tl.float32)
        else:
            z_row = tl.zeros((BLOCK_N,), dtype=tl.float32) + ZP_DEFAULT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo, k_hi = 0, K
    if SPLIT_K > 1:  # whole K steps per split
        per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = tl.program_id(1) * per
        k_hi = tl.minimum(K, k_lo + per)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kx = k0 + offs_k
        ks = (k0 // 2 if WKIND == 1 else k0) + offs_kb
        if EVEN_K:
            x = tl.load(x_rows + kx[None, :], mask=m_mask[:, None], other=0.0)
            b = tl.load(w_rows + ks[None, :], mask=n_mask[:, None], other=0.0 if WKIND == 2 else 0)
        else:
            x = tl.load(x_rows + kx[None, :], mask=m_mask[:, None] & (kx < K)[None, :], other=0.0)
            b = tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & (ks < KSTORE)[None, :],
                        other=0.0 if WKIND == 2 else 0)  # fmt: skip
        if SMODE == 2:  # the K step lies in one group
            grp = k0 // G
            if HAS_ZP:
                zf = tl.load(z_ptr + offs_n * stride_zn + grp * stride_zg, mask=n_mask, other=0).to(
                    tl.float32
                )
            else:
                zf = tl.zeros((BLOCK_N,), dtype=tl.float32) + ZP_DEFAULT
        elif SMODE < 2:
            zf = z_row
        if SMODE == 3:  # any group size: one (scale, zero) per element
            grp = (k0 + offs_k) // G  # (BK,)
            g_mask = n_mask[:, None] & (kx < K)[None, :]
            if HAS_ZP:
                zg = tl.load(
                    z_ptr + offs_n[:, None] * stride_zn + grp[None, :] * stride_zg, mask=g_mask, other=0
                )
                zb = _code_bias(zg.to(tl.float32), WKIND)
            else:
                zb = _code_bias(tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32) + ZP_DEFAULT, WKIND)
            if WKIND == 1:
                lo, hi = _nibble_values(b, USE_ASM)
                t = _k_order_2d(lo, hi, BLOCK_N, KB) - zb
            elif WKIND == 0:
                t = _code_values(b, WKIND, USE_ASM) - zb
            else:
                t = _code_values(b, WKIND, USE_ASM)
            sg = tl.load(
                s_ptr + offs_n[:, None] * stride_sn + grp[None, :] * stride_sg, mask=g_mask, other=0.0
            )
            w16 = (t * sg).to(dt)
        elif USE_ASM:
            w16 = _dequant_16bit(b, zf, WKIND, BLOCK_N, KB, dt == tl.bfloat16)
        else:
            if WKIND == 1:
                zb = _code_bias(zf, WKIND)[:, None]
                lo, hi = _nibble_values(b, False)
                t = _k_order_2d(lo - zb, hi - zb, BLOCK_N, KB)
            elif WKIND == 0:
                t = _code_values(b, WKIND, False) - _code_bias(zf, WKIND)[:, None]
            else:
                t = _code_values(b, WKIND, False)
            w16 = t.to(dt)
        if UPCAST_DOT:
            part = tl.dot(x.to(tl.float32), tl.trans(w16).to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(x, tl.trans(w16), input_precision=DOT_PRECISION)
        if SMODE == 2:
            acc += (
                part * tl.load(s_ptr + offs_n * stride_sn + grp * stride_sg, mask=n_mask, other=0.0)[None, :]
            )
        else:
            acc += part
    if SMODE == 1:
        acc = acc * tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)[None, :]
    elif SMODE == 0:
        acc = acc * tl.load(s_ptr)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if SPLIT_K > 1:
            bias = bias * (tl.program_id(1) == 0).to(tl.float32)
        acc += bias
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(
            y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :], sem="relaxed"
        )
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def dequantize_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr,
    N, K, G,
    stride_wn, stride_sn, stride_sg, stride_zn, stride_zg, stride_on,
    WKIND: tl.constexpr, SMODE: tl.constexpr, HAS_ZP: tl.constexpr, ZP_DEFAULT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``out[n, k] = (q[n, k] - z) * s`` in ``out``'s dtype (fp32 math, like the reference)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    KB: tl.constexpr = BLOCK_K // 2 if WKIND == 1 else BLOCK_K
    ks = (k0 // 2 if WKIND == 1 else k0) + tl.arange(0, KB)
    n_mask = offs_n < N
    mask = n_mask[:, None] & (offs_k < K)[None, :]
    b = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + ks[None, :],
                mask=n_mask[:, None] & (ks < (K // 2 if WKIND == 1 else K))[None, :], other=0.0 if WKIND == 2 else 0)  # fmt: skip
    if WKIND == 1:
        lo, hi = _nibble_values(b, False)
        v = _k_order_2d(lo, hi, BLOCK_N, KB)
    else:
        v = _code_values(b, WKIND, False)
    if SMODE >= 2:
        grp = offs_k // G
        sp = offs_n[:, None] * stride_sn + grp[None, :] * stride_sg
        zp = offs_n[:, None] * stride_zn + grp[None, :] * stride_zg
    else:
        sp = offs_n[:, None] * stride_sn + offs_k[None, :] * 0
        zp = offs_n[:, None] * stride_zn + offs_k[None, :] * 0
    if WKIND != 2:
        if HAS_ZP:
            z = tl.load(z_ptr + zp, mask=mask, other=0).to(tl.float32)
        else:
            z = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32) + ZP_DEFAULT
        v = v - _code_bias(z, WKIND)
    w = v * tl.load(s_ptr + sp, mask=mask, other=0.0)
    tl.store(
        out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + offs_k[None, :],
        w.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


# --------------------------------------------------------------------------------------
# W8A8: int8 x int8 -> int32
# --------------------------------------------------------------------------------------


@triton.jit
def w8a8_kernel(
    x_ptr, xs_ptr, xz_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    XS_PER_ROW: tl.constexpr, WS_PER_ROW: tl.constexpr, HAS_XZP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``y = ((x - xz) * xs) @ (w * ws).T (+ b)`` with an exact int32 ``x @ w.T`` on the int8 tensor cores."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k < K)[None, :]
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask, other=0)
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask, other=0)
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
        if HAS_XZP:
            w_sum += tl.sum(w.to(tl.int32), axis=1)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out = acc.to(tl.float32)
    if XS_PER_ROW:
        xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
    else:
        xs = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(xs_ptr)
    if HAS_XZP:  # sum_k (x - xz) w = x @ w - xz * sum_k w
        if XS_PER_ROW:
            xz = tl.load(xz_ptr + offs_m, mask=m_mask, other=0).to(tl.float32)
        else:
            xz = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(xz_ptr).to(tl.float32)
        out -= xz[:, None] * w_sum.to(tl.float32)[None, :]
    if WS_PER_ROW:
        ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    else:
        ws = tl.zeros((BLOCK_N,), dtype=tl.float32) + tl.load(ws_ptr)
    out = out * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------
# Dynamic per-token quantization of activations
# --------------------------------------------------------------------------------------


@triton.jit
def _round_e4m3(v):
    """``v`` (|v| <= 448) rounded half-to-even onto the e4m3 grid, so the cast to e4m3 is exact everywhere."""
    bits = v.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(
        tl.float32, bitcast=True
    )  # 3 mantissa bits
    sub = (tl.abs(v) + 24576.0) - 24576.0  # 1.5 * 2**14: multiples of 2**-9, then v's sign (-0 too)
    subnormal = (sub.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)


@triton.jit
def row_absmax_kernel(x_ptr, out_ptr, K, stride_xm, inv_qmax, BLOCK_K: tl.constexpr):
    """``out[m] = max(max_k |x[m, k]|, 1e-8) * inv_qmax`` (fp32): the per-token scale of ``kiln::dynamic_scale``."""
    m = tl.program_id(0)
    row = x_ptr + m.to(tl.int64) * stride_xm
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    tl.store(out_ptr + m, tl.maximum(tl.max(amax, axis=0), 1e-8) * inv_qmax)


@triton.jit
def quantize_rows_kernel(
    x_ptr, s_ptr, z_ptr, q_ptr, K, stride_xm, stride_qm, qmin, qmax,
    S_PER_ROW: tl.constexpr, HAS_ZP: tl.constexpr, IS_FLOAT: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Codes of one row: ``clamp(round_half_even(x / s) + z, qmin, qmax)`` (integers) or ``clamp(x / s)`` (e4m3)."""
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + m) if S_PER_ROW else tl.load(s_ptr)
    v = tl.math.div_rn(x, s)  # IEEE division, as the reference's fp32 ``x / scale``
    if IS_FLOAT:
        q = _round_e4m3(tl.minimum(tl.maximum(v, qmin), qmax))
    else:
        if HAS_ZP:
            z = (tl.load(z_ptr + m) if S_PER_ROW else tl.load(z_ptr)).to(tl.float32)
        else:
            z = 0.0
        v = tl.minimum(tl.maximum(v, qmin - z - 1.0), qmax - z + 1.0)  # now |v| < 2**22
        r = (v + 12582912.0) - 12582912.0  # 1.5 * 2**23: round half to even, exactly
        q = tl.minimum(tl.maximum(r + z, qmin), qmax)
    tl.store(q_ptr + m.to(tl.int64) * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
