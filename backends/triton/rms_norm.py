"""RMSNorm in one Triton kernel: the CUDA implementation of ``kiln::rms_norm``.

A captured Llama spells RMSNorm as six to eight element-wise and reduction ops (cast to fp32,
square, mean, add eps, rsqrt, multiply, cast back, scale), each its own kernel of a few
microseconds in a decode step. Here one program reads a row once, sums its squares in fp32,
scales it and writes it: one launch per norm. With ``UPCAST`` the normalized row is rounded to
x's dtype before the weight multiplies it, as Hugging Face's ``LlamaRMSNorm`` does; the product
is computed in fp32 and rounded once (as torch multiplies 16-bit tensors). Rows wider than
``MAX_D`` (more than registers hold) take a second kernel that walks the row in ``WIDE_BLOCK``
chunks twice: once summing squares (and storing the residual sum), once normalizing what it
reads again. The reference is :func:`kiln.ops.rms_norm_reference`.
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
#: The widest row normalized from registers in one pass; wider rows are read twice, in chunks.
MAX_D = 16384
#: Elements of a wide row one program holds at a time.
WIDE_BLOCK = 4096
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, D, stride_x, stride_r, stride_out, stride_sum, eps,
    UPCAST: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    pdl_wait(USE_PDL)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    h = x.to(tl.float32)
    if HAS_RESIDUAL:  # the residual add first, rounded to x's dtype as torch's add stores it
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
        h = round_to(h + r.to(tl.float32), x.dtype)
        tl.store(sum_ptr + row * stride_sum + offs, h.to(x.dtype), mask=mask)
    mean_sq = tl.sum(h * h, axis=0) / D
    y = h * (1.0 / tl.sqrt(mean_sq + eps))
    if UPCAST:
        y = y.to(x.dtype).to(tl.float32)  # rounded to x's dtype before the scale
    tl.store(out_ptr + row * stride_out + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_wide_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, D, stride_x, stride_r, stride_out, stride_sum, eps,
    UPCAST: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    pdl_wait(USE_PDL)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):  # pass 1: squares (and the residual sum, stored rounded)
        mask = start + offs < D
        h = tl.load(x_ptr + row * stride_x + start + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + row * stride_r + start + offs, mask=mask, other=0.0)
            h = round_to(h.to(tl.float32) + r.to(tl.float32), h.dtype)
            tl.store(sum_ptr + row * stride_sum + start + offs, h, mask=mask)
        hf = h.to(tl.float32)
        acc += hf * hf
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / D + eps)
    if HAS_RESIDUAL:
        tl.debug_barrier()  # the sums this program stored are read back below
    for start in range(0, D, BLOCK):  # pass 2: normalize and scale
        mask = start + offs < D
        if HAS_RESIDUAL:
            h = tl.load(sum_ptr + row * stride_sum + start + offs, mask=mask, other=0.0)
        else:
            h = tl.load(x_ptr + row * stride_x + start + offs, mask=mask, other=0.0)
        y = h.to(tl.float32) * rstd
        if UPCAST:
            y = y.to(h.dtype).to(tl.float32)
        w = tl.load(w_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + start + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def _check(name: str, x: torch.Tensor, weight: torch.Tensor, upcast: bool) -> int:
    d = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != d:
        raise ValueError(f"{name}: weight must be ({d},), got {tuple(weight.shape)}")
    if x.dtype not in _FLOATS or weight.dtype not in _FLOATS:
        raise ValueError(f"{name}: x and weight must be float32, float16 or bfloat16, got {x.dtype} and {weight.dtype}")
    if not upcast and x.dtype != torch.float32:
        raise ValueError(f"{name}: a {x.dtype} input is normalized in fp32 (upcast=True); the kernel does not "
                         "reproduce 16-bit arithmetic op by op")  # fmt: skip
    return d


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    rows = t.reshape(-1, d)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, upcast: bool,
            d: int) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    rows = _rows(x, d)
    res = _rows(residual, d) if residual is not None else rows
    weight = weight.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    total = torch.empty(rows.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    wide = d > MAX_D  # read twice in chunks; else the row lives in registers, more warps for wider rows
    kernel, block = (_rms_norm_wide_kernel, WIDE_BLOCK) if wide else (_rms_norm_kernel, next_power_of_2(d))
    pdl = pdl_enabled(x.device, _INTERPRET)
    if rows.shape[0]:
        kernel[(rows.shape[0],)](
            rows, res, weight, out, total, d, rows.stride(0), res.stride(0), out.stride(0), total.stride(0), float(eps),
            UPCAST=upcast, HAS_RESIDUAL=residual is not None, BLOCK=block, USE_PDL=pdl,
            num_warps=8 if wide else 4 if block <= 2048 else 8 if block <= 8192 else 16, launch_pdl=pdl,
        )  # fmt: skip
    return out.reshape(x.shape), (total.reshape(x.shape) if residual is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, upcast: bool) -> torch.Tensor:
    """``kiln::rms_norm`` on the GPU: one program per row of ``x`` (any leading shape, last dim D)."""
    check_triton_device("rms_norm", _INTERPRET, x, weight)
    d = _check("rms_norm", x, weight, upcast)
    return _launch(x, None, weight, eps, upcast, d)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, upcast: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kiln::add_rms_norm`` on the GPU: ``(rms_norm(x + residual), x + residual)``, one program per row."""
    check_triton_device("add_rms_norm", _INTERPRET, x, residual, weight)
    d = _check("add_rms_norm", x, weight, upcast)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: residual must match x {tuple(x.shape)} {x.dtype}, got "
                         f"{tuple(residual.shape)} {residual.dtype}")  # fmt: skip
    out, total = _launch(x, residual, weight, eps, upcast, d)
    assert total is not None
    return out, total


__all__ = ["MAX_D", "WIDE_BLOCK", "add_rms_norm", "rms_norm"]
