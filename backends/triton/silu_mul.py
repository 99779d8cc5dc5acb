"""SwiGLU's activation in one Triton kernel: the CUDA implementation of ``kiln::silu_mul``.

A gated MLP (Shazeer 2020, "GLU Variants Improve Transformer"; Llama's MLP) computes
``silu(gate) * up`` between its two projections. The captured graph runs it as two element-wise
kernels (and, with merged gate/up projections, reads both halves as strided views of one GEMV
output); here one program reads a block of rows of both halves once and writes the product, the
silu rounded to the input dtype first as torch's op-by-op graph rounds it. The reference is
:func:`kiln.ops.silu_mul_reference`.
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
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
#: Columns one program covers per row (wider rows take several programs).
BLOCK_COLS = 1024


@triton.jit
def _silu_mul_kernel(
    g_ptr, u_ptr, out_ptr, n_cols, stride_g, stride_u, stride_out, BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_release(USE_PDL)
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = round_to(gf / (1.0 + tl.exp(-gf)), g.dtype)  # silu, stored in g's dtype as torch's op stores it
    tl.store(out_ptr + row * stride_out + cols, round_to(act * u.to(tl.float32), g.dtype).to(g.dtype), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``kiln::silu_mul`` on the GPU: ``silu(gate) * up`` for two tensors of one shape and dtype."""
    check_triton_device("silu_mul", _INTERPRET, gate, up)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dtype not in _FLOATS:
        raise ValueError(f"silu_mul: gate and up must share a shape and a float dtype, got {tuple(gate.shape)} "
                         f"{gate.dtype} and {tuple(up.shape)} {up.dtype}")  # fmt: skip
    n = gate.shape[-1] if gate.dim() else 1
    g2, u2 = (t.reshape(-1, n) for t in (gate, up))
    g2, u2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (g2, u2))
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    block = min(BLOCK_COLS, next_power_of_2(n))
    if g2.shape[0] and n:
        pdl = pdl_enabled(gate.device, _INTERPRET)
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(n, block))](
            g2, u2, out, n, g2.stride(0), u2.stride(0), out.stride(0), BLOCK=block, USE_PDL=pdl, num_warps=4,
            launch_pdl=pdl,
        )  # fmt: skip
    return out.reshape(gate.shape)


__all__ = ["silu_mul"]
