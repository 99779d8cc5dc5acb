"""The rotary embedding's cos / sin tables in one Triton kernel: the CUDA implementation of ``kiln::rotary_table``.

One program computes ``BLOCK_R`` positions' rows of both tables: ``f = position * inv_freq`` (fp32, the
product torch rounds), then ``cos(f)`` and ``sin(f)`` (``tl.cos`` / ``tl.sin``: libdevice's
``__nv_cosf`` / ``__nv_sinf`` on NVIDIA GPUs, the functions torch's CUDA kernels call), times the scale
where it is not 1, cast to the table's dtype and written to both halves of the row (the concatenation).
So the tables equal the op-by-op graph's on the GPU; under the interpreter cos and sin are numpy's, which
may differ from torch's CPU functions in the last fp32 bit. The reference is
:func:`kiln.rotary_table.rotary_table_reference`.
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
)

_INTERPRET = interpret_mode()
#: Rows (positions) one program computes.
_BLOCK_R = 16
#: The widest half-table one program holds; wider ones are shared out over the grid's second axis.
_MAX_HALF = 512


@triton.jit
def _rotary_table_kernel(
    pos_ptr, inv_ptr, cos_ptr, sin_ptr, n_rows, half, stride_p, scale,
    SCALED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """Rows ``[pid0 * BLOCK_R, +BLOCK_R)``, columns ``[pid1 * BLOCK_H, +BLOCK_H)`` of each half."""
    pdl_release(USE_PDL)
    pdl_wait(USE_PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok, col_ok = rows < n_rows, cols < half
    p = tl.load(pos_ptr + rows.to(tl.int64) * stride_p, mask=row_ok, other=0).to(tl.float32)
    inv = tl.load(inv_ptr + cols, mask=col_ok, other=0.0)
    f = p[:, None] * inv[None, :]
    c = tl.cos(f)
    s = tl.sin(f)
    if SCALED:
        c = c * scale
        s = s * scale
    dt = cos_ptr.dtype.element_ty
    offs = rows.to(tl.int64)[:, None] * (2 * half) + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    c, s = c.to(dt), s.to(dt)
    tl.store(cos_ptr + offs, c, mask=mask)
    tl.store(cos_ptr + offs + half, c, mask=mask)
    tl.store(sin_ptr + offs, s, mask=mask)
    tl.store(sin_ptr + offs + half, s, mask=mask)


def rotary_table(
    positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kiln::rotary_table`` on the GPU: the cos and sin tables (``(..., 2H)``, contiguous) in one launch."""
    from kiln.rotary_table import table_problem

    check_triton_device("rotary_table", _INTERPRET, positions, inv_freq)
    problem = table_problem(positions, inv_freq, dtype)
    if problem is not None:
        raise ValueError(f"rotary_table: {problem}")
    half = inv_freq.shape[-1]
    shape = (*positions.shape[:-1], 2 * half)
    cos = torch.empty(shape, dtype=dtype, device=positions.device)
    sin = torch.empty(shape, dtype=dtype, device=positions.device)
    pos = positions.reshape(-1)  # (..., 1) -> rows; a view for the usual strided position ids
    inv = inv_freq.reshape(-1).contiguous()
    n_rows = pos.shape[0]
    if n_rows and half:
        pdl = pdl_enabled(positions.device, _INTERPRET)
        block_h = min(next_power_of_2(half), _MAX_HALF)
        _rotary_table_kernel[(triton.cdiv(n_rows, _BLOCK_R), triton.cdiv(half, block_h))](
            pos, inv, cos, sin, n_rows, half, pos.stride(0), float(scale),
            SCALED=scale != 1.0, BLOCK_R=_BLOCK_R, BLOCK_H=block_h, USE_PDL=pdl, num_warps=4,
            enable_fp_fusion=False, launch_pdl=pdl,
        )  # fmt: skip
    return cos, sin


__all__ = ["rotary_table"]
