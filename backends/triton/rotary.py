"""Rotary position embedding in one Triton kernel: the CUDA implementation of ``kiln::rotary``.

RoPE (Su et al. 2021, "RoFormer") with the ``rotate_half`` convention of Llama and GPT-NeoX:
``out = x * cos + cat(-x2, x1) * sin`` for the halves ``x1, x2`` of the last dimension. A captured
model writes it as five element-wise ops per tensor (two products, a negation, a concatenation, a
sum), each its own kernel of a few microseconds in a decode step, twice per layer (queries and
keys). Here one program rotates ``BLOCK_R`` rows: it reads both halves of each row once and writes
both halves of the result.

The result equals the op-by-op graph's exactly: each product is rounded to x's dtype before the
sum, as torch rounds each op's output, and the compiler is told not to fuse a product with the sum
into one FMA (``enable_fp_fusion=False``), which would skip that rounding in fp32. The reference is
:func:`kiln.ops.rotary_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.backends.triton._utils import (
    check_triton_device,
    interpret_mode,
    next_power_of_2,
    pdl_enabled,
    pdl_release,
    pdl_wait,
    round_to,
)

_INTERPRET = interpret_mode()
#: The widest head dimension one program rotates (registers hold a block of rows); wider heads are shared
#: out in column chunks over the grid's second axis.
MAX_D = 1024
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rotate_rows(
    x_ptr, cos_ptr, sin_ptr, out_ptr, block,
    n_rows, d1, d2, half,
    sx0, sx1, sx2, sxd, sc0, sc1, sc2, scd, ss0, ss1, ss2, ssd, so0, so1, so2, sod,
    BLOCK_R: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """Rows ``[block * BLOCK_R, +BLOCK_R)`` of the (n0, d1, d2, D) views, columns ``[HALF * pid1, +HALF)`` of each half
    (``pid1``: the grid's second axis); a row index is ``(i0 * d1 + i1) * d2 + i2``."""
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    r = rows.to(tl.int64)
    i2 = r % d2
    i1 = (r // d2) % d1
    i0 = r // (d2 * d1)
    cols = tl.program_id(1) * HALF + tl.arange(0, HALF)
    mask = row_ok[:, None] & (cols < half)[None, :]
    c64 = cols.to(tl.int64)[None, :]
    xo = (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None] + c64 * sxd
    co = (i0 * sc0 + i1 * sc1 + i2 * sc2)[:, None] + c64 * scd
    so = (i0 * ss0 + i1 * ss1 + i2 * ss2)[:, None] + c64 * ssd
    oo = (i0 * so0 + i1 * so1 + i2 * so2)[:, None] + c64 * sod
    x1 = tl.load(x_ptr + xo, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + xo + half * sxd, mask=mask, other=0.0)
    c1 = tl.load(cos_ptr + co, mask=mask, other=0.0)
    c2 = tl.load(cos_ptr + co + half * scd, mask=mask, other=0.0)
    s1 = tl.load(sin_ptr + so, mask=mask, other=0.0)
    s2 = tl.load(sin_ptr + so + half * ssd, mask=mask, other=0.0)
    dt = out_ptr.dtype.element_ty
    # each product rounded to x's dtype, then the sum (as the op-by-op graph rounds every op)
    a1 = round_to(x1.to(tl.float32) * c1.to(tl.float32), dt)
    b1 = round_to(-(x2.to(tl.float32)) * s1.to(tl.float32), dt)
    a2 = round_to(x2.to(tl.float32) * c2.to(tl.float32), dt)
    b2 = round_to(x1.to(tl.float32) * s2.to(tl.float32), dt)
    tl.store(out_ptr + oo, round_to(a1 + b1, dt).to(dt), mask=mask)
    tl.store(out_ptr + oo + half * sod, round_to(a2 + b2, dt).to(dt), mask=mask)


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    n_rows, d1, d2, half,
    sx0, sx1, sx2, sxd, sc0, sc1, sc2, scd, ss0, ss1, ss2, ssd, so0, so1, so2, sod,
    BLOCK_R: tl.constexpr, HALF: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """Program ``pid``: rows ``[pid * BLOCK_R, +BLOCK_R)`` of x."""
    pdl_release(USE_PDL)
    pdl_wait(USE_PDL)
    _rotate_rows(x_ptr, cos_ptr, sin_ptr, out_ptr, tl.program_id(0), n_rows, d1, d2, half,
                 sx0, sx1, sx2, sxd, sc0, sc1, sc2, scd, ss0, ss1, ss2, ssd, so0, so1, so2, sod, BLOCK_R, HALF)  # fmt: skip


@triton.jit
def _rotary_pair_kernel(
    x_ptr, xc_ptr, xs_ptr, xo_ptr, y_ptr, yc_ptr, ys_ptr, yo_ptr, x_blocks,
    nx, xd1, xd2, ny, yd1, yd2, half,
    sx0, sx1, sx2, sxd, sc0, sc1, sc2, scd, ss0, ss1, ss2, ssd, so0, so1, so2, sod,
    ty0, ty1, ty2, tyd, tc0, tc1, tc2, tcd, ts0, ts1, ts2, tsd, to0, to1, to2, tod,
    BLOCK_R: tl.constexpr, HALF: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """Programs ``[0, x_blocks)`` rotate x's rows, the rest y's: two tensors (a layer's queries and keys), one launch."""
    pdl_release(USE_PDL)
    pdl_wait(USE_PDL)
    pid = tl.program_id(0)
    if pid < x_blocks:
        _rotate_rows(x_ptr, xc_ptr, xs_ptr, xo_ptr, pid, nx, xd1, xd2, half,
                     sx0, sx1, sx2, sxd, sc0, sc1, sc2, scd, ss0, ss1, ss2, ssd, so0, so1, so2, sod,
                     BLOCK_R, HALF)  # fmt: skip
    else:
        _rotate_rows(y_ptr, yc_ptr, ys_ptr, yo_ptr, pid - x_blocks, ny, yd1, yd2, half,
                     ty0, ty1, ty2, tyd, tc0, tc1, tc2, tcd, ts0, ts1, ts2, tsd, to0, to1, to2, tod,
                     BLOCK_R, HALF)  # fmt: skip


#: Rows one program rotates.
_BLOCK_R = 16


def _half_chunk(d: int) -> tuple[int, int]:
    """Half of head dimension ``d``, and the columns of each half one program rotates (a power of two)."""
    half = d // 2
    return half, min(next_power_of_2(half), MAX_D // 2)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """``t`` with leading dimensions merged or padded to (n0, d1, d2, D)."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    while t.dim() > 4:  # merge the two leading dims (a view where the strides allow it, else a copy)
        t = t.flatten(0, 1)
    return t


def _prepare(name: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Check one rotation; its output and launch arguments ``[n_rows, d1, d2, *strides of x, cos, sin, out]``."""
    if x.dtype not in _FLOATS or cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise ValueError(f"{name}: x, cos and sin must share one of float32, float16, bfloat16; got {x.dtype}, "
                         f"{cos.dtype}, {sin.dtype}")  # fmt: skip
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"{name}: the last dimension must be even, got shape {tuple(x.shape)}")
    try:
        cos_b, sin_b = torch.broadcast_to(cos, x.shape), torch.broadcast_to(sin, x.shape)
    except RuntimeError as e:
        raise ValueError(f"{name}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must broadcast to x "
                         f"{tuple(x.shape)}") from e  # fmt: skip
    if x.dim() > 4:  # leading dims merged below: a contiguous output merges without a copy
        x = x.contiguous()
    out = torch.empty_like(x)  # x's layout (a permuted view's too), as torch's element-wise ops give
    x4, c4, s4, o4 = (_as_4d(t) for t in (x, cos_b, sin_b, out))
    n0, d1, d2, _ = x4.shape
    strides = [*x4.stride(), *c4.stride(), *s4.stride(), *o4.stride()]
    return out, [(x4, c4, s4, o4), n0 * d1 * d2, d1, d2, strides]


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``kiln::rotary`` on the GPU: ``x * cos + rotate_half(x) * sin``, cos and sin broadcast to x's shape."""
    check_triton_device("rotary", _INTERPRET, x, cos, sin)
    out, (tensors, n_rows, d1, d2, strides) = _prepare("rotary", x, cos, sin)
    if n_rows:
        pdl = pdl_enabled(x.device, _INTERPRET)
        half, chunk = _half_chunk(x.shape[-1])
        _rotary_kernel[(triton.cdiv(n_rows, _BLOCK_R), triton.cdiv(half, chunk))](
            *tensors, n_rows, d1, d2, half, *strides,
            BLOCK_R=_BLOCK_R, HALF=chunk, USE_PDL=pdl, num_warps=4,
            enable_fp_fusion=False, launch_pdl=pdl,
        )  # fmt: skip
    return out


def rotary_pair(
    x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kiln::rotary_pair`` on the GPU: ``(rotary(x, cos, sin), rotary(y, cos, sin))`` in one launch."""
    check_triton_device("rotary_pair", _INTERPRET, x, y, cos, sin)
    if x.dim() == 0 or y.dim() == 0 or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"rotary_pair: x and y must share the last dimension, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")  # fmt: skip
    ox, (tx, nx, xd1, xd2, sx) = _prepare("rotary_pair", x, cos, sin)
    oy, (ty, ny, yd1, yd2, sy) = _prepare("rotary_pair", y, cos, sin)
    x_blocks = triton.cdiv(nx, _BLOCK_R)
    blocks = x_blocks + triton.cdiv(ny, _BLOCK_R)
    if blocks:
        pdl = pdl_enabled(x.device, _INTERPRET)
        half, chunk = _half_chunk(x.shape[-1])
        _rotary_pair_kernel[(blocks, triton.cdiv(half, chunk))](
            *tx, *ty, x_blocks, nx, xd1, xd2, ny, yd1, yd2, half, *sx, *sy,
            BLOCK_R=_BLOCK_R, HALF=chunk, USE_PDL=pdl, num_warps=4, enable_fp_fusion=False,
            launch_pdl=pdl,
        )  # fmt: skip
    return ox, oy


__all__ = ["MAX_D", "rotary", "rotary_pair"]
