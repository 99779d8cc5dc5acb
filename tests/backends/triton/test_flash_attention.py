"""Tests for kiln.backends.triton.flash_attention against its plain-torch reference.

Without a GPU the kernels run in Triton's interpreter on small CPU tensors. Triton decides
interpreted vs compiled when ``@triton.jit`` runs, i.e. when the kernel module is imported,
so ``TRITON_INTERPRET`` is set here before that import. With CUDA the same grid runs compiled
on the GPU, plus larger prefill shapes.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

from kiln.backends.triton import flash_attention as fa  # noqa: E402
from kiln.backends.triton.flash_attention import (  # noqa: E402
    attention_reference,
    attention_varlen_reference,
    flash_attention,
    flash_attention_varlen,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not fa._INTERPRET:
    pytest.skip(
        "no CUDA, and the kernel module was imported before TRITON_INTERPRET=1 was set",
        allow_module_level=True,
    )

TOL = {  # (atol, rtol) against the fp32 reference rounded to the input dtype
    torch.float32: (1e-4, 1e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def _randn(*shape: int, dtype: torch.dtype, device: str = DEVICE) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=device)


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert not out.isnan().any(), "output holds NaN: some rows were never written"
    atol, rtol = TOL[out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def _poisoned_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


# ----------------------------------------------------------------------------- dense grid


def _dense_cases() -> list[tuple]:
    """(B, Hq, Hkv, Tq, Tk, D, causal, dtype): every length pair, D, mask and dtype; heads and B rotated."""
    heads = [(2, 2), (4, 2), (4, 1)]
    lengths = [(1, 1), (17, 17), (64, 64), (17, 64), (1, 64), (64, 17)]
    dims = [16, 64]
    cases = []
    i = 0
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            for tq, tk in lengths:
                for d in dims:
                    hq, hkv = heads[i % len(heads)]
                    b = 1 + (i // 3) % 2
                    cases.append((b, hq, hkv, tq, tk, d, causal, dtype))
                    i += 1
    # Extra head dims and fp16: non-power-of-two D is padded and masked inside the kernel.
    cases += [
        (1, 4, 2, 33, 33, 80, True, torch.float32),
        (2, 2, 1, 17, 40, 128, True, torch.bfloat16),
        (1, 4, 4, 40, 40, 32, False, torch.float16),
        (1, 2, 1, 20, 50, 96, False, torch.float16),
        (1, 2, 1, 17, 17, 256, True, torch.float32),
    ]
    return cases


def _case_id(c: tuple) -> str:
    b, hq, hkv, tq, tk, d, causal, dtype = c
    return f"B{b}-H{hq}x{hkv}-T{tq}x{tk}-D{d}-{'causal' if causal else 'full'}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", _dense_cases(), ids=_case_id)
def test_dense_matches_reference(case: tuple) -> None:
    b, hq, hkv, tq, tk, d, causal, dtype = case
    torch.manual_seed(zlib.crc32(_case_id(case).encode()))
    q = _randn(b, hq, tq, d, dtype=dtype)  # (B, Hq, Tq, D)
    k = _randn(b, hkv, tk, d, dtype=dtype)  # (B, Hkv, Tk, D)
    v = _randn(b, hkv, tk, d, dtype=dtype)
    out = flash_attention(q, k, v, causal=causal, out=_poisoned_like(q))
    ref = attention_reference(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype
    _assert_close(out, ref)


def test_causal_is_end_aligned_and_unseen_rows_are_zero() -> None:
    # Tq > Tk: query i sees keys j <= i + Tk - Tq, so the first Tq - Tk rows see nothing.
    q = _randn(1, 2, 20, 16, dtype=torch.float32)
    k = _randn(1, 2, 8, 16, dtype=torch.float32)
    v = _randn(1, 2, 8, 16, dtype=torch.float32)
    out = flash_attention(q, k, v, causal=True, out=_poisoned_like(q))
    assert torch.equal(out[:, :, :12], torch.zeros_like(out[:, :, :12]))
    # Row 12 sees exactly key 0, so its output is v[0].
    torch.testing.assert_close(out[:, :, 12], v[:, :, 0], atol=1e-5, rtol=1e-5)
    # The last query row sees every key: it equals non-causal attention for that row.
    full = attention_reference(q[:, :, -1:], k, v, causal=False)
    torch.testing.assert_close(out[:, :, -1:], full, atol=1e-4, rtol=1e-4)


def test_scale_and_strided_inputs() -> None:
    # (B, T, H, D) activations viewed as (B, H, T, D) without a copy; custom softmax scale.
    dtype = torch.bfloat16
    q = _randn(2, 24, 4, 64, dtype=dtype).transpose(1, 2)  # (B, Hq, Tq, D), non-contiguous
    k = _randn(2, 40, 2, 64, dtype=dtype).transpose(1, 2)  # (B, Hkv, Tk, D)
    v = _randn(2, 40, 2, 64, dtype=dtype).transpose(1, 2)
    out = flash_attention(q, k, v, causal=True, scale=0.3)
    _assert_close(out, attention_reference(q, k, v, causal=True, scale=0.3))
    with pytest.raises(AssertionError):  # the scale is honoured: the default gives another answer
        _assert_close(out, attention_reference(q, k, v, causal=True))


def test_empty_keys_give_zeros_and_empty_queries_give_empty() -> None:
    q = _randn(1, 2, 5, 16, dtype=torch.float32)
    k = _randn(1, 2, 0, 16, dtype=torch.float32)
    out = flash_attention(q, k, k, causal=False, out=_poisoned_like(q))
    assert torch.equal(out, torch.zeros_like(q))
    q0 = _randn(1, 2, 0, 16, dtype=torch.float32)
    assert flash_attention(q0, q, q, causal=True).shape == (1, 2, 0, 16)


# ----------------------------------------------------------------------------- varlen


def _pack(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(T_s, H, D)] -> (total, H, D) and int32 cu_seqlens (num_seqs + 1,)."""
    lens = torch.tensor([0] + [s.shape[0] for s in seqs])
    cu = torch.cumsum(lens, 0).to(torch.int32).to(seqs[0].device)
    return torch.cat(seqs), cu


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_varlen_matches_per_sequence_reference(causal: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(7)
    hq, hkv, d = 4, 2, 64
    lens_q, lens_k = [5, 17, 40], [5, 33, 40]  # middle sequence: Tq < Tk (chunked prefill)
    qs = [_randn(t, hq, d, dtype=dtype) for t in lens_q]  # (T_s, Hq, D)
    ks = [_randn(t, hkv, d, dtype=dtype) for t in lens_k]  # (T_s, Hkv, D)
    vs = [_randn(t, hkv, d, dtype=dtype) for t in lens_k]
    q, cu_q = _pack(qs)
    k, cu_k = _pack(ks)
    v, _ = _pack(vs)
    out = flash_attention_varlen(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, out=_poisoned_like(q)
    )
    assert out.shape == q.shape
    for s in range(3):
        ref = attention_reference(
            qs[s].transpose(0, 1)[None],
            ks[s].transpose(0, 1)[None],
            vs[s].transpose(0, 1)[None],
            causal=causal,
        )[0].transpose(0, 1)  # (T_s, Hq, D)
        _assert_close(out[cu_q[s] : cu_q[s + 1]], ref)
    ref_all = attention_varlen_reference(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    _assert_close(out, ref_all)


# ----------------------------------------------------------------------------- validation


def _qkv(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        _randn(1, 4, 8, 16, dtype=dtype),
        _randn(1, 2, 8, 16, dtype=dtype),
        _randn(1, 2, 8, 16, dtype=dtype),
    )


@pytest.mark.parametrize("fn", [flash_attention, attention_reference], ids=["kernel", "reference"])
def test_validation_errors(fn) -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="rank 4"):
        fn(q[0], k, v, causal=False)
    with pytest.raises(ValueError, match="share a dtype"):
        fn(q.half(), k, v, causal=False)
    with pytest.raises(ValueError, match="not supported"):
        fn(q.to(torch.float64), k.to(torch.float64), v.to(torch.float64), causal=False)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        fn(q[:, :3], k, v, causal=False)
    with pytest.raises(ValueError, match="head dim 512"):
        big = _randn(1, 2, 4, 512, dtype=torch.float32)
        fn(big, big, big, causal=False)
    with pytest.raises(ValueError, match="same head dim"):
        fn(q, k[..., :8], v[..., :8], causal=False)
    with pytest.raises(ValueError, match="same batch size"):
        fn(q, torch.cat([k, k]), torch.cat([v, v]), causal=False)
    with pytest.raises(ValueError, match="out must match"):
        fn(q, k, v, causal=False, out=torch.empty_like(q[:, :2]))


def test_varlen_validation_errors() -> None:
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in _qkv())  # (T, H, D)
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="rank 3"):
        flash_attention_varlen(q[None], k, v, cu, cu, 8, 8, causal=True)
    with pytest.raises(ValueError, match="1-D int32"):
        flash_attention_varlen(q, k, v, cu.long(), cu, 8, 8, causal=True)
    with pytest.raises(ValueError, match="same length"):
        flash_attention_varlen(
            q, k, v, cu, torch.tensor([0, 4, 8], dtype=torch.int32, device=DEVICE), 8, 8, causal=True
        )
    with pytest.raises(ValueError, match="max_seqlen_q"):
        flash_attention_varlen(q, k, v, cu, cu, -1, 8, causal=True)


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fa, "_INTERPRET", False)
    q, k, v = (t.cpu() for t in _qkv())
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        flash_attention(q, k, v, causal=True)


# ----------------------------------------------------------------------------- CUDA only


@pytest.mark.skipif(not CUDA, reason="needs CUDA: large shapes are too slow for the interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "shape",
    [
        (2, 8, 2, 1024, 1024, 128),
        (1, 8, 1, 256, 1024, 128),
        (2, 4, 4, 1000, 1000, 64),
        (1, 8, 2, 777, 777, 80),
        (1, 4, 2, 300, 300, 256),
    ],
    ids=lambda s: "B{}-H{}x{}-T{}x{}-D{}".format(*s),
)
def test_cuda_prefill_shapes(shape: tuple[int, ...], causal: bool, dtype: torch.dtype) -> None:
    b, hq, hkv, tq, tk, d = shape
    torch.manual_seed(0)
    q, k, v = (
        _randn(b, hq, tq, d, dtype=dtype),
        _randn(b, hkv, tk, d, dtype=dtype),
        _randn(b, hkv, tk, d, dtype=dtype),
    )
    out = flash_attention(q, k, v, causal=causal, out=_poisoned_like(q))
    _assert_close(out, attention_reference(q, k, v, causal=causal))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_varlen_long_sequences() -> None:
    torch.manual_seed(1)
    dtype, hq, hkv, d = torch.bfloat16, 8, 2, 128
    lens_q, lens_k = [100, 1000, 513, 1], [100, 1500, 513, 900]
    qs = [_randn(t, hq, d, dtype=dtype) for t in lens_q]
    ks = [_randn(t, hkv, d, dtype=dtype) for t in lens_k]
    vs = [_randn(t, hkv, d, dtype=dtype) for t in lens_k]
    (q, cu_q), (k, cu_k), (v, _) = _pack(qs), _pack(ks), _pack(vs)
    out = flash_attention_varlen(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, out=_poisoned_like(q)
    )
    _assert_close(out, attention_varlen_reference(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True))
