"""The int8 / fp8 paged KV cache: quantizing cache writes and dequantizing attention kernels.

Kernels run in Triton's interpreter on small CPU tensors (``conftest.py``) against the
plain-torch references; the references' quantized attention is checked against full-precision
attention within an error bound derived from the format (random data, never zeros). Stale
cache blocks hold random codes and scales, so a kernel reading a wrong block or scale fails.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

from kiln.backends.triton import _paged_checks  # noqa: E402
from kiln.backends.triton.paged_attention import (  # noqa: E402
    paged_attention,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    reshape_and_cache,
    reshape_and_cache_reference,
)
from kiln.ops import (  # noqa: E402
    KV_CACHE_QMAX,
    attention_reference,
    dequantize_kv,
    paged_attention_reference,
    quantize_kv,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not _paged_checks._INTERPRET:
    pytest.skip(
        "no CUDA, and the kernel module was imported before TRITON_INTERPRET=1", allow_module_level=True
    )

INT8, FP8 = torch.int8, torch.float8_e4m3fn
FORMATS = [(INT8, "token"), (FP8, "tensor"), (FP8, "token"), (INT8, "tensor")]
TOL = {torch.float32: (2e-4, 2e-4), torch.bfloat16: (2e-2, 2e-2)}
PAGE = 16


def _fid(f: tuple) -> str:
    return f"{'int8' if f[0] == INT8 else 'fp8'}-per-{f[1]}"


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert not out.isnan().any(), "output holds NaN: some rows were never written"
    atol, rtol = TOL[out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def _quantized(x: torch.Tensor, dtype: torch.dtype, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of a float cache (2, blocks, page, Hkv, D), per token or per tensor (amax)."""
    if mode == "token":
        return quantize_kv(x, dtype)
    scales = x.abs().flatten(1).amax(1) / KV_CACHE_QMAX[dtype]  # (2,)
    return torch.stack([quantize_kv(x[c], dtype, scales[c])[0] for c in (0, 1)]), scales


@dataclass
class Batch:
    q: torch.Tensor  # (1, Hq, T, D)
    k: torch.Tensor  # (1, Hkv, T, D)
    v: torch.Tensor
    kv_cache: torch.Tensor  # (2, blocks, PAGE, Hkv, D) int8 / fp8 codes of random data
    kv_scales: torch.Tensor  # (2,) or (2, blocks, PAGE, Hkv) fp32
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int


def _batch(cached: list[int], new: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype,
           fmt: tuple, seed: int = 0) -> Batch:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    lens = [c + n for c, n in zip(cached, new, strict=True)]
    need = [-(-n // PAGE) for n in lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.randint(0, num_blocks, (len(lens), max(need) + 1), generator=gen, dtype=torch.int32)
    slots, used = [], 0
    for s, (c, n) in enumerate(zip(cached, new, strict=True)):
        tables[s, : need[s]] = perm[used : used + need[s]]
        used += need[s]
        slots += [int(tables[s, p // PAGE]) * PAGE + p % PAGE for p in range(c, c + n)]
    codes, scales = _quantized(torch.randn(2, num_blocks, PAGE, hkv, d, generator=gen) * 2, *fmt)
    t = sum(new)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    return Batch(
        q=rand(1, hq, t, d), k=rand(1, hkv, t, d) * 2, v=rand(1, hkv, t, d) * 2,
        kv_cache=codes.to(DEVICE), kv_scales=scales.to(DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE), block_tables=tables.to(DEVICE),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor([0, *new]).cumsum(0).to(torch.int32).to(DEVICE), max_query_len=max(new),
    )  # fmt: skip


# ----------------------------------------------------------------------------- the format


@pytest.mark.parametrize("dtype", [INT8, FP8], ids=["int8", "fp8"])
def test_quantize_round_trip_within_the_format_error_bound(dtype: torch.dtype) -> None:
    x = (
        torch.randn(64, 4, 128, generator=torch.Generator().manual_seed(0))
        * torch.logspace(-3, 2, 64)[:, None, None]
    )
    codes, s = quantize_kv(x, dtype)  # per row
    assert codes.dtype == dtype and s.shape == (64, 4)
    err = (dequantize_kv(codes, s) - x).abs()
    step = s.unsqueeze(-1)
    # int8: half a code step; e4m3: half an ulp (3 mantissa bits) of a normal, 2^-10 of a step below 2^-6
    bound = step / 2 if dtype == INT8 else torch.maximum(x.abs() * 2.0**-4, step * 2.0**-10)
    assert (err <= bound * (1 + 1e-6)).all()
    assert (codes.float().abs().amax(-1) == KV_CACHE_QMAX[dtype]).all()  # amax maps to the largest code
    # a static scale saturates out-of-range values, and an all-zero row gets scale 0 and codes 0
    sat, _ = quantize_kv(x[-1:] * 10, dtype, torch.tensor(1.0))
    assert sat.float().abs().max() == KV_CACHE_QMAX[dtype]
    zc, zs = quantize_kv(torch.zeros(3, 8), dtype)
    assert (zs == 0).all() and (zc.float() == 0).all()


@pytest.mark.parametrize("fmt", [(INT8, "token"), (FP8, "tensor")], ids=_fid)
def test_quantized_attention_within_the_format_error_bound(fmt: tuple) -> None:
    # |o' - o| <= max|dv| + (e^(2 eps) - 1) max|v| with eps the largest score error (keys), elementwise.
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, n, 64, generator=gen) for n in (8, 300, 300))
    scale = 1 / 8
    cache = torch.stack([k[0].transpose(0, 1), v[0].transpose(0, 1)]).unsqueeze(2)  # (2, 300, 1, Hkv=4, D)
    codes, scales = _quantized(cache, *fmt)
    kq, vq = (dequantize_kv(codes[c], scales[c]).squeeze(1).transpose(0, 1)[None] for c in (0, 1))
    exact = attention_reference(q, k, v, None, True, scale)
    approx = attention_reference(q, kq, vq, None, True, scale)
    step = scales.unsqueeze(-1) if fmt[1] == "token" else scales.view(2, 1, 1, 1, 1)
    dmax = (step / 2 if fmt[0] == INT8 else torch.maximum(cache.abs() * 2.0**-4, step * 2.0**-10)).expand_as(
        cache
    )
    dk, dv = (dmax[c].squeeze(1).transpose(0, 1)[None] for c in (0, 1))  # (1, H, 300, D) elementwise bounds
    eps = scale * torch.einsum("bhqd,bhkd->bhqk", q.abs(), dk).amax(-1)  # worst score error per query
    bound = dv.amax(dim=(2, 3))[..., None, None] + (torch.exp(2 * eps) - 1)[..., None] * v.abs().amax()
    err = (approx - exact).abs()
    assert (err <= bound).all()
    rel = err.norm() / exact.norm()
    assert err.max() < bound.min() / 10  # random data stays far from the worst case
    assert 0 < rel < (0.02 if fmt[0] == INT8 else 0.08), rel  # measured: 0.85% (int8), 4.1% (fp8)


# ----------------------------------------------------------------------------- cache writes


@pytest.mark.parametrize("fmt", FORMATS, ids=_fid)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantizing_cache_write_is_bit_exact(fmt: tuple, dtype: torch.dtype) -> None:
    b = _batch([20, 0, 5], [7, 13, 1], 4, 2, 40, dtype, fmt, seed=zlib.crc32(f"{fmt}{dtype}".encode()))
    k = b.k.clone()
    k[:, 1, 4] = 0  # an all-zero row: scale 0, codes 0
    k = k.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous (1, Hkv, T, D)
    slots = b.slot_mapping.clone()
    slots[[3, 10]] = -1  # padding tokens: skipped
    cache, ref = b.kv_cache.clone(), b.kv_cache.clone()
    scales, ref_scales = b.kv_scales.clone(), b.kv_scales.clone()
    reshape_and_cache(k, b.v, cache, slots, scales)
    reshape_and_cache_reference(k, b.v, ref, slots, ref_scales)
    assert torch.equal(cache.view(torch.uint8), ref.view(torch.uint8))  # same codes, bit for bit
    assert torch.equal(scales, ref_scales)
    assert not torch.equal(cache.view(torch.uint8), b.kv_cache.view(torch.uint8))  # something was written
    if fmt[1] == "token":
        assert not torch.equal(scales, b.kv_scales)
        skipped = b.slot_mapping[3]
        assert torch.equal(scales.view(2, -1, 2)[:, skipped], b.kv_scales.view(2, -1, 2)[:, skipped])
        zero = slots[4]
        assert (scales.view(2, -1, 2)[0, zero, 1] == 0).all()
    else:
        assert torch.equal(scales, b.kv_scales)  # static scales are read, never written


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("fmt", FORMATS, ids=_fid)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_reads_quantized_cache_like_the_reference(fmt: tuple, dtype: torch.dtype) -> None:
    seed = zlib.crc32(f"dec{fmt}{dtype}".encode())
    b = _batch([0, 16, 39], [1, 1, 1], 4, 2, 64, dtype, fmt, seed=seed)
    args = (b.q, b.kv_cache, b.block_tables, b.seq_lens)  # contexts 1, 17, 40
    ref = paged_decode_attention_reference(*args, kv_scales=b.kv_scales)
    for splits in (1, 3):
        out = paged_decode_attention(
            *args, kv_scales=b.kv_scales, num_splits=splits, out=torch.full_like(b.q, math.nan)
        )
        _assert_close(out, ref)
    # the scales matter: the same codes with other scales give another answer
    wrong = b.kv_scales * 1.5
    assert not torch.allclose(
        paged_decode_attention_reference(*args, kv_scales=wrong).float(), ref.float(), atol=1e-2
    )


@pytest.mark.parametrize("fmt", FORMATS, ids=_fid)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_reads_quantized_cache_like_the_reference(fmt: tuple, dtype: torch.dtype) -> None:
    # chunked prefill after a 20-token prefix, a fresh 13-token prompt, a decode; GQA 4:2, D 16
    b = _batch([20, 0, 30], [7, 13, 1], 4, 2, 16, dtype, fmt, seed=zlib.crc32(f"pre{fmt}{dtype}".encode()))
    reshape_and_cache_reference(b.k, b.v, b.kv_cache, b.slot_mapping, b.kv_scales)
    args = (b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.max_query_len)
    ref = paged_prefill_attention_reference(*args, kv_scales=b.kv_scales)
    for splits in (1, 3):  # split keys: scaled partials merged by their log-sum-exps
        out = paged_prefill_attention(*args, kv_scales=b.kv_scales, out=torch.full_like(b.q, math.nan),
                                      num_splits=splits)  # fmt: skip
        _assert_close(out, ref)


@pytest.mark.parametrize("fmt", [(INT8, "token"), (FP8, "tensor")], ids=_fid)
@pytest.mark.parametrize("kind", ["mixed", "decode"])
def test_paged_attention_op_with_quantized_cache(kind: str, fmt: tuple) -> None:
    cached, new = ([20, 0, 30], [7, 13, 1]) if kind == "mixed" else ([0, 16, 39], [1, 1, 1])
    b = _batch(cached, new, 4, 2, 64, torch.bfloat16, fmt, seed=6)
    meta = (b.slot_mapping, b.block_tables, b.seq_lens, b.query_start_loc)
    cache, ref_cache = b.kv_cache.clone(), b.kv_cache.clone()
    scales, ref_scales = b.kv_scales.clone(), b.kv_scales.clone()
    out = paged_attention(b.q, b.k, b.v, cache, *meta, None, scales)
    ref = paged_attention_reference(b.q, b.k, b.v, ref_cache, *meta, None, ref_scales)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8)) and torch.equal(
        scales, ref_scales
    )
    _assert_close(out, ref)
    # the registered op (CPU: the reference) agrees, and the graph-level call mutates both buffers
    cache2, scales2 = b.kv_cache.clone(), b.kv_scales.clone()
    out2 = torch.ops.kiln.paged_attention(b.q, b.k, b.v, cache2, *meta, None, scales2)
    assert torch.equal(cache2.view(torch.uint8), ref_cache.view(torch.uint8)) and torch.equal(
        scales2, ref_scales
    )
    torch.testing.assert_close(out2, ref)


# ----------------------------------------------------------------------------- validation


def test_quantized_cache_validation_errors() -> None:
    b = _batch([3], [1], 4, 2, 16, torch.float32, (INT8, "token"))
    meta = (b.block_tables, b.seq_lens)
    with pytest.raises(ValueError, match="needs kv_scales"):
        paged_decode_attention(b.q, b.kv_cache, *meta)
    with pytest.raises(ValueError, match="fit neither"):
        paged_decode_attention(b.q, b.kv_cache, *meta, kv_scales=b.kv_scales[:, :, :, :1])
    with pytest.raises(ValueError, match="must be float32"):
        paged_decode_attention(b.q, b.kv_cache, *meta, kv_scales=b.kv_scales.half())
    with pytest.raises(ValueError, match="only for an int8 or fp8 cache"):
        paged_decode_attention(b.q, b.kv_cache.float(), *meta, kv_scales=b.kv_scales)
    with pytest.raises(ValueError, match="needs kv_scales"):
        reshape_and_cache(b.k, b.v, b.kv_cache.clone(), b.slot_mapping)
    with pytest.raises(ValueError, match="kv_cache dtype torch.uint8 is not supported"):
        reshape_and_cache(b.k, b.v, b.kv_cache.view(torch.uint8), b.slot_mapping, b.kv_scales)
