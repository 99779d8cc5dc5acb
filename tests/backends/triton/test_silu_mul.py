"""The SwiGLU activation kernel (``kiln.backends.triton.silu_mul``) against ``kiln::silu_mul``'s reference.

Interpreted on the CPU (``conftest.py`` sets ``TRITON_INTERPRET=1``) on random data: the strided halves of a
merged gate/up projection, rows wider than one program, and every float dtype.
"""

from __future__ import annotations

import pytest
import torch

from kiln.backends.triton.silu_mul import BLOCK_COLS, silu_mul
from kiln.ops import silu_mul_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the kernel's exp and torch's may differ in the last fp32 bit, which can move a 16-bit rounding by one step
TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [48, BLOCK_COLS + 100])
def test_merged_projection_halves_equal_the_reference(dtype: torch.dtype, width: int) -> None:
    g = torch.Generator().manual_seed(width)
    merged = (torch.randn(1, 5, 2 * width, generator=g) * 4).to(DEVICE, dtype)  # one GEMV's output
    gate, up = merged.split(width, -1)  # strided views, as the step graph has them
    got, want = silu_mul(gate, up), silu_mul_reference(gate, up)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


def test_refusals() -> None:
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="share a shape"):
        silu_mul(x, x[:, :4])
    with pytest.raises(ValueError, match="share a shape"):
        silu_mul(x, x.double())
