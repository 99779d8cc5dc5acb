"""The RMSNorm kernel (``kiln.backends.triton.rms_norm``) against ``kiln::rms_norm``'s plain-torch reference.

Interpreted on the CPU (``conftest.py`` sets ``TRITON_INTERPRET=1``) on random rows, with ragged widths
(not a power of two), leading dimensions, a strided input, and weights of another dtype than x.
"""

from __future__ import annotations

import pytest
import torch

from kiln.backends.triton.rms_norm import add_rms_norm, rms_norm
from kiln.ops import add_rms_norm_reference, rms_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: summation order; 16-bit: the normalized value may round to the neighbouring 16-bit number
TOL = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.mark.parametrize(("dtype", "upcast"), [(torch.float32, False), (torch.float32, True),
                                               (torch.bfloat16, True), (torch.float16, True)])  # fmt: skip
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 100), (7, 384)])
def test_kernel_equals_reference(dtype: torch.dtype, upcast: bool, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)
    w = (1 + torch.randn(shape[-1], generator=g) / 4).to(DEVICE, dtype)
    got, want = rms_norm(x, w, 1e-5, upcast), rms_norm_reference(x, w, 1e-5, upcast)
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOL[dtype] * want.float().abs().max().item(), err


def test_strided_rows_and_fp32_weight_on_16bit_rows() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 96, generator=g).to(DEVICE, torch.bfloat16)
    x = base[:, ::2]  # last-dim stride 2: copied to contiguous rows first
    w = torch.randn(48, generator=g).to(DEVICE)  # fp32 weight: the output is fp32, as torch promotes
    got, want = rms_norm(x, w, 1e-6, True), rms_norm_reference(x, w, 1e-6, True)
    assert got.dtype == torch.float32
    # the normalized row is rounded to bf16 first: one bf16 step (2^-8 relative) apart at most
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6)


def test_refusals() -> None:
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(4, device=DEVICE), 1e-5, False)
    with pytest.raises(ValueError, match="upcast=True"):
        rms_norm(x.to(torch.bfloat16), torch.ones(8, device=DEVICE, dtype=torch.bfloat16), 1e-5, False)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(("dtype", "upcast"), [(torch.float32, False), (torch.bfloat16, True)])
def test_wide_rows_take_the_chunked_kernel(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, upcast: bool,
                                           residual: bool) -> None:  # fmt: skip
    """Rows over MAX_D are read twice in WIDE_BLOCK chunks (here 100 and 384 elements in chunks of 32,
    the last one ragged; then one real row of MAX_D + 100) and equal the reference."""
    from kiln.backends.triton import rms_norm as mod

    g = torch.Generator().manual_seed(11 + residual)
    calls: list[str] = []
    for d, max_d, chunk in ((100, 64, 32), (384, 64, 32), (mod.MAX_D + 100, mod.MAX_D, mod.WIDE_BLOCK)):
        monkeypatch.setattr(mod, "MAX_D", max_d)
        monkeypatch.setattr(mod, "WIDE_BLOCK", chunk)
        wide = mod._rms_norm_wide_kernel
        monkeypatch.setattr(mod, "_rms_norm_wide_kernel", _Recorder(wide, calls))
        rows = 1 if d > 1000 else 3
        x, r = ((torch.randn(rows, d, generator=g) * 3).to(DEVICE, dtype) for _ in range(2))
        w = (1 + torch.randn(d, generator=g) / 4).to(DEVICE, dtype)
        if residual:
            (got, total), (want, want_total) = add_rms_norm(x, r, w, 1e-5, upcast), add_rms_norm_reference(x, r, w, 1e-5, upcast)
            assert torch.equal(total, want_total)
        else:
            got, want = rms_norm(x, w, 1e-5, upcast), rms_norm_reference(x, w, 1e-5, upcast)
        err = (got.float() - want.float()).abs().max().item()
        assert err <= TOL[dtype] * want.float().abs().max().item(), (d, err)
        monkeypatch.setattr(mod, "_rms_norm_wide_kernel", wide)
    assert len(calls) == 3


class _Recorder:
    """A stand-in for a jitted kernel that records each launch and forwards it."""

    def __init__(self, kernel: object, calls: list[str]) -> None:
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid: tuple[int, ...]):  # noqa: ANN204
        self.calls.append("wide")
        return self.kernel[grid]  # type: ignore[index]


def test_dtype_refusal() -> None:
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        rms_norm(torch.randn(2, 8, device=DEVICE), torch.ones(8, device=DEVICE, dtype=torch.float64), 1e-5, False)


@pytest.mark.parametrize(("dtype", "upcast"), [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True)])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 100)])
def test_add_rms_norm_sums_exactly_and_normalizes_the_sum(dtype: torch.dtype, upcast: bool, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x, r = ((torch.randn(shape, generator=g) * 3).to(DEVICE, dtype) for _ in range(2))
    w = (1 + torch.randn(shape[-1], generator=g) / 4).to(DEVICE, dtype)
    (got, total), (want, want_total) = add_rms_norm(x, r, w, 1e-5, upcast), add_rms_norm_reference(x, r, w, 1e-5, upcast)
    assert torch.equal(total, want_total)  # the residual stream: rounded as torch's add rounds
    assert got.dtype == want.dtype and got.shape == want.shape
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOL[dtype] * want.float().abs().max().item(), err
    with pytest.raises(ValueError, match="residual must match"):
        add_rms_norm(x, r[..., :1], w, 1e-5, upcast)
