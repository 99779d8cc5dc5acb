"""The split-K GEMV (``kiln.backends.triton.gemv``) against ``kiln::gemv``'s plain-torch reference.

Interpreted on the CPU (``conftest.py`` sets ``TRITON_INTERPRET=1``) on small random shapes with
ragged N / K edges and every split count; outputs and fp32 partials are poisoned with NaN first,
so an element the kernels forget to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kiln.backends.triton import gemv as gv
from kiln.ops import gemv_reference

TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _no_pdl(USE_PDL: tl.constexpr):
    """Stands in for ``pdl_wait`` / ``pdl_release`` where the interpreter cannot run them."""
    pass


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(gv, "new_output", poisoned)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == dtype
    assert not torch.isnan(got).any(), "an output element was never written"
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert scale > 0 and err <= TOL[dtype] * scale, f"max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def _operands(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 24, 64), (1, 7, 33), (2, 40, 100), (3, 9, 48), (4, 16, 16)])
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_kernel_matches_the_reference(m: int, n: int, k: int, dtype: torch.dtype, split_k: int) -> None:
    for bias in (False, True):
        x, w, b = _operands(m, n, k, dtype, bias, seed=m * 1000 + n * 10 + k + split_k)
        got = gv.launch(x, w, b, block_n=8, block_k=16, split_k=split_k, num_warps=1, num_stages=1)
        # the reference on the same (rounded) operands, in fp32, rounded once to the output dtype
        _close(got, gemv_reference(x.float(), w.float(), b.float() if bias else None).to(dtype), dtype)


def test_gemv_dispatch_keeps_leading_dims_and_hands_gemms_to_the_matmul() -> None:
    x, w, b = _operands(gv.DISPATCH_M, 12, 32, torch.bfloat16, True, seed=5)
    x3 = x.reshape(1, gv.DISPATCH_M, 32)  # (B, T, K) as the step graph has it
    got = gv.gemv(x3, w, b)
    _close(got, gemv_reference(x3, w, b), torch.bfloat16)
    big = torch.randn(gv.DISPATCH_M + 2, 32).to(DEVICE, torch.bfloat16)  # a GEMM: not the kernel's job
    _close(gv.gemv(big, w, b), gemv_reference(big, w, b), torch.bfloat16)


def test_kernel_refuses_too_many_rows() -> None:
    x, w, _ = _operands(gv.MAX_M + 1, 8, 16, torch.float16, False, seed=1)
    with pytest.raises(ValueError, match="at most"):
        gv.launch(x, w, None, block_n=8, block_k=16, split_k=1)


def test_candidates_start_with_cublas_and_fill_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if gv._INTERPRET:
        pytest.skip("the interpreter has one small tiling; GPU candidates are checked on CUDA")
    monkeypatch.setattr(gv, "TRITON_ONLY", False)  # as by default, whatever KILN_GEMV says
    cands = gv.candidates(1, 2048, 2048)
    assert cands[0].kernel == "cublas" and len(cands) > 2
    for c in cands[1:]:
        p = c.params
        assert 132 <= -(-2048 // p["block_n"]) * p["split_k"] <= 132 * 8


# ---------------------------------------------------------------------------- the skinny (tensor-core) kernel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("m", "n", "k"), [(2, 40, 100), (5, 7, 33), (16, 16, 16), (33, 24, 64), (128, 9, 48)])
@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("fused", [True, False])
def test_skinny_kernel_matches_the_reference(m: int, n: int, k: int, dtype: torch.dtype, split_k: int,
                                             fused: bool) -> None:  # fmt: skip
    for bias in (False, True):
        x, w, b = _operands(m, n, k, dtype, bias, seed=m * 1000 + n * 10 + k + split_k)
        got = gv.launch_skinny(x, w, b, block_n=16, block_k=16, split_k=split_k, num_warps=1, num_stages=1,
                               fused=fused)  # fmt: skip
        _close(got, gemv_reference(x.float(), w.float(), b.float() if bias else None).to(dtype), dtype)


@pytest.mark.parametrize("split_k", [3, 6])  # 6: two rounds of the in-kernel sum's four loads
def test_skinny_in_kernel_sum_equals_the_combine_kernel_and_resets_its_counters(split_k: int) -> None:
    from kiln.backends.triton._utils import arrival_counters

    x, w, b = _operands(20, 40, 96, torch.bfloat16, True, seed=11)
    kw = dict(block_n=16, block_k=16, split_k=split_k, num_warps=1, num_stages=1)
    apart = gv.launch_skinny(x, w, b, **kw, fused=False)
    _close(apart, gemv_reference(x.float(), w.float(), b.float()).to(torch.bfloat16), torch.bfloat16)
    for _ in range(2):  # the second launch finds the counters the first one left: zero
        fused = gv.launch_skinny(x, w, b, **kw)
        assert torch.equal(fused, apart)  # the same sum in the same order
        assert not arrival_counters(x.device, 3)[:3].any()


def test_skinny_kernel_refuses_too_many_rows_and_strided_operands() -> None:
    x, w, _ = _operands(gv.SKINNY_ROWS + 1, 8, 16, torch.float16, False, seed=1)
    with pytest.raises(ValueError, match=f"1 to {gv.SKINNY_ROWS} rows"):
        gv.launch_skinny(x, w, None, block_n=16, block_k=16, split_k=1)
    x, w, _ = _operands(4, 8, 16, torch.float16, False, seed=2)
    with pytest.raises(ValueError, match="K contiguous"):
        gv.launch_skinny(x.t().contiguous().t(), w, None, block_n=16, block_k=16, split_k=1)


def test_gemv_sends_a_few_dozen_rows_to_the_skinny_kernel_when_on(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    real = gv.run

    def spy(c, x, w, b):  # type: ignore[no-untyped-def]
        ran.append(c.kernel)
        return real(c, x, w, b)

    monkeypatch.setattr(gv, "run", spy)
    monkeypatch.setattr(gv, "TUNER", gv.KernelTuner())
    x, w, b = _operands(24, 12, 32, torch.bfloat16, True, seed=7)
    monkeypatch.setattr(gv, "SKINNY_MAX_M", 0)  # off: cuBLAS (the matmul), no tuner key
    _close(gv.gemv(x, w, b), gemv_reference(x, w, b), torch.bfloat16)
    assert ran == [] and gv.TUNER.last is None
    monkeypatch.setattr(gv, "SKINNY_MAX_M", 32)
    x3 = x.reshape(2, 12, 32)  # leading dims kept
    _close(gv.gemv(x3, w, b), gemv_reference(x3, w, b), torch.bfloat16)
    assert ran and set(ran) <= {"skinny", "cublas"}
    assert gv.TUNER.last is not None and gv.TUNER.last.kernel in ("skinny", "cublas")
    ran.clear()
    big = torch.randn(33, 32).to(DEVICE, torch.bfloat16)  # past SKINNY_MAX_M: cuBLAS
    _close(gv.gemv(big, w, b), gemv_reference(big, w, b), torch.bfloat16)
    assert ran == []


def test_skinny_candidates_fit_shared_memory() -> None:
    if gv._INTERPRET:
        pytest.skip("the interpreter has one small tiling; GPU candidates are checked on CUDA")
    for m, n, k in ((64, 3072, 4096), (128, 2048, 2048), (16, 28672, 4096)):
        cands = gv.skinny_candidates(m, n, k)
        assert cands[0].kernel == "cublas" and len(cands) > 2
        for c in cands[1:]:
            p = c.params
            assert (p["num_stages"] + 1) * (gv.skinny_block_m(m) + p["block_n"]) * p["block_k"] * 2 <= gv.SKINNY_SMEM
            assert p["split_k"] == gv.skinny_split(-(-n // p["block_n"]), -(-k // p["block_k"]), m, k)


def test_skinny_split_fills_the_sms_without_needless_partials() -> None:
    assert gv.skinny_split(132 * 4, 32, 64, 4096) == 1  # whole waves already: splitting only adds partials
    assert gv.skinny_split(8, 64, 1, 8192) == 16  # 8 programs on 132 SMs: as many splits as allowed
    assert gv.skinny_split(2, 6, 1, 768) == 3  # at least two K steps a split
    # 48 tiles of 32 K steps: one split leaves 84 SMs idle; 8 splits (384 programs, 3 a busiest SM x 4 steps)
    # beat 2 (96 programs x 16 steps)
    assert gv.skinny_split(48, 32, 64, 4096) == 8
    # with 128 rows over K = 2048 each split's partials weigh as much as an eighth of the weights: fewer splits
    assert gv.skinny_split(48, 16, 128, 2048) < gv.skinny_split(48, 16, 1, 2048)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split_k", [1, 3])
def test_skinny_kernel_under_pdl_counts_the_early_weight_tile_once(monkeypatch: pytest.MonkeyPatch,
                                                                   dtype: torch.dtype, split_k: int) -> None:  # fmt: skip
    """The PDL branch (first weight tile loaded before the wait) run in the interpreter, the wait and release no-ops."""
    if not gv._INTERPRET:
        pytest.skip("on a GPU the PDL branch runs in every CUDA test of the kernel")
    monkeypatch.setattr(gv, "pdl_enabled", lambda device, interpreted: True)
    monkeypatch.setattr(gv, "pdl_wait", _no_pdl)
    monkeypatch.setattr(gv, "pdl_release", _no_pdl)
    x, w, b = _operands(20, 24, 80, dtype, True, seed=21)
    got = gv.launch_skinny(x, w, b, block_n=16, block_k=16, split_k=split_k, num_warps=1, num_stages=1)
    _close(got, gemv_reference(x.float(), w.float(), b.float()).to(dtype), dtype)
