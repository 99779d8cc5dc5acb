"""Tests for kiln.backends.triton.paged_attention against its plain-torch references.

Without a GPU the kernels run in Triton's interpreter on small CPU tensors (``conftest.py``
sets ``TRITON_INTERPRET=1`` before the kernel module is imported). Caches and outputs are
filled with random data or NaN first, so a kernel that reads a wrong block or skips a row
fails; block tables are random permutations, never contiguous.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

from paged_testing import _assert_close, _batch, _min_split_keys, _poisoned_like  # noqa: E402

from kiln.backends.triton import _paged_checks  # noqa: E402
from kiln.backends.triton._paged_checks import PREFILL_MAX_SPLITS, prefill_num_splits  # noqa: E402
from kiln.backends.triton.paged_attention import (  # noqa: E402
    decode_min_split_keys,
    decode_num_splits,
    paged_attention,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    reshape_and_cache,
    reshape_and_cache_reference,
)
from kiln.ops import paged_attention_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not _paged_checks._INTERPRET:
    pytest.skip(
        "no CUDA, and the kernel module was imported before TRITON_INTERPRET=1", allow_module_level=True
    )


# ----------------------------------------------------------------------------- cache writes


@pytest.mark.parametrize(
    "dtype,cache_dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
    ids=["fp32", "fp32-to-bf16", "bf16"],
)
def test_reshape_and_cache_matches_reference(dtype: torch.dtype, cache_dtype: torch.dtype) -> None:
    b = _batch([20, 0, 5], [7, 13, 1], 4, 2, 64, dtype, cache_dtype, seed=1)
    slots = b.slot_mapping.clone()
    slots[[3, 10]] = -1  # padding tokens: skipped
    k = b.k.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous (1, Hkv, T, D)
    cache, ref = b.kv_cache.clone(), b.kv_cache.clone()
    reshape_and_cache(k, b.v, cache, slots)
    reshape_and_cache_reference(k, b.v, ref, slots)
    if _paged_checks._INTERPRET and dtype != cache_dtype:
        # The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even: 1 ulp.
        torch.testing.assert_close(cache.float(), ref.float(), atol=0.0, rtol=2.0**-7)
    else:
        assert torch.equal(cache, ref)  # a cast and a copy: bit-exact
    assert not torch.equal(cache, b.kv_cache)  # something was written
    written = cache.view(2, -1, 2, 64)[:, b.slot_mapping[3]]
    assert torch.equal(written, b.kv_cache.view(2, -1, 2, 64)[:, b.slot_mapping[3]])  # -1: untouched


def test_reshape_and_cache_odd_heads_and_dim() -> None:
    # Hkv = 3 and D = 40: both padded inside the kernel; a non-power-of-two block size of 12.
    b = _batch([3, 30], [9, 2], 3, 3, 40, torch.float32, page=12, seed=2)
    cache, ref = b.kv_cache.clone(), b.kv_cache.clone()
    reshape_and_cache(b.k, b.v, cache, b.slot_mapping)
    reshape_and_cache_reference(b.k, b.v, ref, b.slot_mapping)
    assert torch.equal(cache, ref)


# ----------------------------------------------------------------------------- decode


def _decode_cases() -> list[tuple]:
    """(Hq, Hkv, D, dtype, num_splits): every head layout, dim and dtype; splits rotated."""
    heads = [(4, 2), (4, 1), (2, 2)]
    cases, i = [], 0
    for dtype in (torch.float32, torch.bfloat16):
        for d in (16, 64):
            for hq, hkv in heads:
                cases.append((hq, hkv, d, dtype, (None, 3, 1)[i % 3]))
                i += 1
    return cases


def _decode_id(c: tuple) -> str:
    hq, hkv, d, dtype, splits = c
    return f"H{hq}x{hkv}-D{d}-{str(dtype)[6:]}-splits{splits or 'auto'}"


@pytest.mark.parametrize("case", _decode_cases(), ids=_decode_id)
def test_decode_matches_reference(case: tuple) -> None:
    hq, hkv, d, dtype, splits = case
    b = _batch([0, 16, 39], [1, 1, 1], hq, hkv, d, dtype, seed=zlib.crc32(_decode_id(case).encode()))
    args = (b.q, b.kv_cache, b.block_tables, b.seq_lens)  # context lengths 1, 17 and 40
    out = paged_decode_attention(*args, num_splits=splits, out=_poisoned_like(b.q))
    ref = paged_decode_attention_reference(*args)
    assert out.shape == b.q.shape and out.dtype == dtype
    _assert_close(out, ref)
    # Through query_start_loc too (the op's layout): the same answer.
    out2 = paged_decode_attention(*args, b.query_start_loc, num_splits=splits, out=_poisoned_like(b.q))
    _assert_close(out2, ref)


def test_decode_many_and_empty_splits_and_scale() -> None:
    # 4 splits of a 17-key context: 2 tiles, so splits 2 and 3 hold no key; a 40-key context
    # in 3 tiles over 4 splits. The combine must weight empty splits by zero.
    b = _batch([16, 39], [1, 1], 4, 2, 16, torch.float32, seed=3)
    args = (b.q, b.kv_cache, b.block_tables, b.seq_lens)
    for splits in (2, 4, 7):
        out = paged_decode_attention(*args, scale=0.3, num_splits=splits, out=_poisoned_like(b.q))
        _assert_close(out, paged_decode_attention_reference(*args, scale=0.3))
    with pytest.raises(AssertionError):  # the scale is honoured
        _assert_close(out, paged_decode_attention_reference(*args))


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_decode_combine_loads_partials_in_chunks(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # the in-kernel combine loads COMBINE_CHUNK partial outputs at a time: split counts that are not a
    # multiple of it (the last chunk runs past the last split with weight 0) and empty splits
    import kiln.backends.triton.paged_attention as pa

    monkeypatch.setattr(pa, "COMBINE_CHUNK", chunk)
    monkeypatch.setattr(pa, "DECODE_FUSED_COMBINE", True)  # whatever decode_combines_in_kernel says
    _min_split_keys(monkeypatch, 4)
    b = _batch([3, 9, 25, 58], [1, 1, 1, 1], 4, 2, 16, torch.float32, seed=10 + chunk)  # 4, 10, 26, 59 keys
    # (10 keys: 3 of the launch's 5 or 7 splits)
    args = (b.q, b.kv_cache, b.block_tables, b.seq_lens)
    for splits in (2, 5, 7):
        out = paged_decode_attention(*args, num_splits=splits, out=_poisoned_like(b.q))
        _assert_close(out, paged_decode_attention_reference(*args))


def test_decode_combine_choice_follows_the_heuristic(monkeypatch: pytest.MonkeyPatch) -> None:
    # DECODE_FUSED_COMBINE None: decode_combines_in_kernel picks the in-kernel merge (arrival counters) or the
    # combine kernel; both exact
    import kiln.backends.triton.paged_attention as pa

    fused_launches = []
    counters = pa.arrival_counters
    monkeypatch.setattr(pa, "arrival_counters", lambda *a: fused_launches.append(a) or counters(*a))
    b = _batch([3, 9, 25, 58], [1, 1, 1, 1], 4, 2, 16, torch.float32, seed=5)
    args = (b.q, b.kv_cache, b.block_tables, b.seq_lens)
    for splits, sms in ((4, 64), (5, 64), (5, 8)):  # 4 sequences x 2 KV heads = 8 groups
        monkeypatch.setattr(pa, "_num_sms", lambda _device, n=sms: n)
        fused_launches.clear()
        out = paged_decode_attention(*args, num_splits=splits, out=_poisoned_like(b.q))
        _assert_close(out, paged_decode_attention_reference(*args))
        assert len(fused_launches) == pa.decode_combines_in_kernel(splits, 4, 2, sms)
    assert fused_launches  # the last launch (many groups for its SMs) merged in the kernel


def test_decode_combine_heuristic() -> None:
    from kiln.backends.triton.paged_attention import decode_combines_in_kernel

    assert not decode_combines_in_kernel(1, 1, 8, 132)  # one split: nothing to merge
    assert decode_combines_in_kernel(4, 1, 8, 132)  # few splits: in the kernel, no second launch
    assert not decode_combines_in_kernel(16, 1, 8, 132)  # batch 1, long context: the combine kernel
    assert not decode_combines_in_kernel(17, 4, 8, 132)  # 32 groups
    assert decode_combines_in_kernel(5, 16, 8, 132)  # 128 groups: merges overlap the other groups' work


def test_decode_cache_dtype_differs_from_q() -> None:
    b = _batch([5, 33], [1, 1], 4, 2, 64, torch.float32, cache_dtype=torch.bfloat16, seed=4)
    args = (b.q, b.kv_cache, b.block_tables, b.seq_lens)
    _assert_close(paged_decode_attention(*args, num_splits=2), paged_decode_attention_reference(*args))


def test_decode_num_splits_heuristic() -> None:
    # groups (sequences x KV heads) filling half the SMs or more: ~2 programs per SM, >= 1024 keys a split,
    # a power of two
    assert decode_num_splits(64, 8, 32768, 132) == 1  # a large batch fills the GPU already
    assert decode_num_splits(256, 8, 32768, 132) == 1
    assert decode_num_splits(16, 8, 32768, 132) == 2  # cdiv(264, 128) = 3, rounded down
    assert decode_num_splits(16, 8, 4096, 132) == 2
    assert decode_num_splits(16, 8, 1024, 132) == 1  # no split under DECODE_WAVE_MIN_SPLIT_KEYS keys
    assert decode_num_splits(16, 8, 2047, 132) == 1  # ... nor of fewer keys than that
    assert decode_num_splits(9, 8, 65536, 132) == 4  # 72 groups: cdiv(264, 72) = 4
    assert decode_num_splits(12, 8, 65536, 132) == 2  # 96 groups: cdiv(264, 96) = 3, rounded down
    assert decode_num_splits(64, 4, 1040, 132) == 1  # a TP-2 shard of batch 64: 256 groups, 1040 // 1024 = 1
    assert decode_num_splits(64, 4, 4096, 132) == 2  # cdiv(264, 256) = 2
    # fewer groups: >= 128 keys a split (64 from 4k keys on), at most DECODE_AUTO_MAX_SPLITS
    assert decode_num_splits(4, 8, 4096, 132) == 17
    assert decode_num_splits(1, 8, 16384, 132) == 64
    assert decode_num_splits(1, 8, 4096, 132) == 64  # 64-key splits for a long context
    assert decode_num_splits(1, 8, 4095, 132) == 32  # below DECODE_LONG_CONTEXT_KEYS: 128-key splits
    assert decode_num_splits(1, 8, 2048, 132) == 16
    assert decode_num_splits(1, 8, 4096, 132, head_dim=256) == 32  # the combine's (splits, D) tile capped
    assert decode_num_splits(1, 8, 1024, 132) == 8  # no split under DECODE_MIN_SPLIT_KEYS keys
    assert decode_num_splits(1, 8, 272, 132) == 3  # a short CUDA-graph capacity stays merged in the kernel
    assert decode_num_splits(1, 8, 0, 132) == 1
    assert decode_min_split_keys(1, 8, 132) == 128 and decode_min_split_keys(16, 8, 132) == 1024


# ----------------------------------------------------------------------------- prefill


MIXED = ([20, 0, 30], [7, 13, 1])  # chunked prefill after a 20-token prefix, a fresh prompt, a decode


@pytest.mark.parametrize(
    "hq,hkv,d,dtype",
    [
        (4, 2, 16, torch.float32),
        (4, 1, 64, torch.float32),
        (2, 2, 64, torch.bfloat16),
        (4, 2, 16, torch.bfloat16),
    ],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_prefill_matches_reference(hq: int, hkv: int, d: int, dtype: torch.dtype) -> None:
    b = _batch(*MIXED, hq, hkv, d, dtype, seed=hq * 100 + hkv * 10 + d)
    write_kv = reshape_and_cache_reference
    write_kv(b.k, b.v, b.kv_cache, b.slot_mapping)
    args = (b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.max_query_len)
    out = paged_prefill_attention(*args, out=_poisoned_like(b.q))
    _assert_close(out, paged_prefill_attention_reference(*args))


def test_prefill_long_query_spans_query_blocks() -> None:
    # 40 new tokens after a 25-token prefix: two query blocks, the diagonal crossing key tiles.
    b = _batch([25, 3], [40, 2], 2, 1, 16, torch.float32, seed=5)
    reshape_and_cache_reference(b.k, b.v, b.kv_cache, b.slot_mapping)
    args = (b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.max_query_len)
    _assert_close(
        paged_prefill_attention(*args, out=_poisoned_like(b.q)), paged_prefill_attention_reference(*args)
    )


@pytest.mark.parametrize("num_splits", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_split_keys_match_reference(num_splits: int, dtype: torch.dtype) -> None:
    # A question after a long cached prefix (the prefix-cache hit), a fresh prompt, a decode token, and two
    # padding tokens owned by no sequence: splits hold whole key tiles, some of them empty for short rows.
    b = _batch([70, 0, 33], [40, 9, 1], 4, 2, 16, dtype, seed=num_splits)
    reshape_and_cache_reference(b.k, b.v, b.kv_cache, b.slot_mapping)
    pad = torch.randn(1, 4, 2, 16, generator=torch.Generator().manual_seed(9)).to(b.q.device, dtype)
    q = torch.cat([b.q, pad], dim=2)  # (1, Hq, T + 2, D): the last two rows belong to no sequence
    args = (q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.max_query_len)
    out = paged_prefill_attention(*args, out=_poisoned_like(q), num_splits=num_splits)
    t = b.q.shape[2]
    _assert_close(out[:, :, :t], paged_prefill_attention_reference(*args)[:, :, :t])
    assert out[:, :, t:].isnan().all()  # unowned rows are not written, as with one split
    one = paged_prefill_attention(*args, out=_poisoned_like(q), num_splits=1)
    _assert_close(out[:, :, :t], one[:, :, :t])


def test_splits_combine_in_the_last_split_as_the_combine_kernel_does(monkeypatch: pytest.MonkeyPatch) -> None:
    # FUSED_COMBINE: the split arriving last merges the partials in the kernel (no second launch). Against the
    # separate combine kernel: equal up to fp32 summation order; repeatable bit for bit; counters left at zero.
    import kiln.backends.triton.paged_attention as pa
    from kiln.backends.triton import _utils as triton_utils

    _min_split_keys(monkeypatch, 8)  # so that these short contexts use several splits
    b = _batch([70, 0, 33], [40, 9, 1], 4, 2, 16, torch.float32, seed=21)
    reshape_and_cache_reference(b.k, b.v, b.kv_cache, b.slot_mapping)
    pre = (b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.max_query_len)
    d = _batch([16, 39, 5], [1, 1, 1], 4, 2, 16, torch.float32, seed=22)
    dec = (d.q, d.kv_cache, d.block_tables, d.seq_lens)
    runs = {}
    for fused in (True, False, True):
        monkeypatch.setattr(pa, "FUSED_COMBINE", fused)
        runs.setdefault(fused, []).append((
            paged_prefill_attention(*pre, out=_poisoned_like(b.q), num_splits=3),
            paged_decode_attention(*dec, num_splits=4, out=_poisoned_like(d.q)),
        ))  # fmt: skip
    (fp, fd), (fp2, fd2) = runs[True]
    (sp, sd), = runs[False]
    assert torch.equal(fp, fp2) and torch.equal(fd, fd2)
    torch.testing.assert_close(fp, sp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fd, sd, rtol=1e-6, atol=1e-6)
    _assert_close(fd, paged_decode_attention_reference(*dec))
    assert all(int(buf.abs().sum()) == 0 for buf in triton_utils._COUNTERS.values())


@pytest.mark.parametrize(("hq", "hkv"), [(4, 2), (6, 2), (3, 1), (2, 2)])
@pytest.mark.parametrize(("num_splits", "fused"), [(1, True), (3, True), (3, False)])
def test_prefill_packed_query_heads_match_reference(
    hq: int, hkv: int, num_splits: int, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PACK_GQA: a program's rows are (token, query head) pairs of one KV head (groups of 2, 3 and 1, so row
    # blocks end mid-token), over a cached prefix, a fresh prompt and a decode token, with two padding rows.
    import kiln.backends.triton.paged_attention as pa

    monkeypatch.setattr(pa, "PACK_GQA", True)
    monkeypatch.setattr(pa, "FUSED_COMBINE", fused)
    b = _batch([70, 0, 33], [40, 9, 1], hq, hkv, 16, torch.float32, seed=hq * 10 + hkv + num_splits)
    reshape_and_cache_reference(b.k, b.v, b.kv_cache, b.slot_mapping)
    pad = torch.randn(1, hq, 2, 16, generator=torch.Generator().manual_seed(9)).to(b.q.device)
    q = torch.cat([b.q, pad], dim=2)
    args = (q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.max_query_len)
    out = paged_prefill_attention(*args, out=_poisoned_like(q), num_splits=num_splits)
    t = b.q.shape[2]
    _assert_close(out[:, :, :t], paged_prefill_attention_reference(*args)[:, :, :t])
    assert out[:, :, t:].isnan().all()  # rows owned by no sequence stay unwritten


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "per-head"])
@pytest.mark.parametrize(("num_splits", "fused"), [(1, True), (3, True), (3, False)])
def test_prefill_zeroes_unowned_rows_itself(num_splits: int, fused: bool, pack: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # zero_unowned: rows of tokens before the first sequence's and after the last one's are written as zeros (by
    # the prefill kernel with one split or the in-kernel merge; by a fill where the combine kernel merges), over
    # a NaN-poisoned output; the owned rows equal the reference. 3 leading and 37 trailing tokens: more than one
    # 16-token stripe per row-block program.
    import kiln.backends.triton.paged_attention as pa

    monkeypatch.setattr(pa, "PACK_GQA", pack)
    monkeypatch.setattr(pa, "FUSED_COMBINE", fused)
    b = _batch([70, 0, 33], [40, 9, 1], 6, 2, 16, torch.float32, seed=31 + num_splits)
    reshape_and_cache_reference(b.k, b.v, b.kv_cache, b.slot_mapping)
    gen = torch.Generator().manual_seed(5)
    lead, tail = (torch.randn(1, 6, n, 16, generator=gen).to(b.q.device) for n in (3, 37))
    q = torch.cat([lead, b.q, tail], dim=2)
    starts = b.query_start_loc + 3
    args = (q, b.kv_cache, b.block_tables, b.seq_lens, starts, b.max_query_len)
    out = paged_prefill_attention(*args, out=_poisoned_like(q), num_splits=num_splits, zero_unowned=True)
    t = b.q.shape[2]
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert torch.equal(out[:, :, 3 + t :], torch.zeros_like(out[:, :, 3 + t :]))
    _assert_close(out[:, :, 3 : 3 + t], paged_prefill_attention_reference(*args)[:, :, 3 : 3 + t])
    none = b.seq_lens[:0], starts[:1]  # no sequence at all: every row is zero
    empty = paged_prefill_attention(q, b.kv_cache, b.block_tables[:0], none[0], none[1], 1, out=_poisoned_like(q),
                                    zero_unowned=True)  # fmt: skip
    assert torch.equal(empty, torch.zeros_like(q))


def test_prefill_num_splits_heuristic() -> None:
    assert prefill_num_splits(128, 1, 32, 2192, 132) == 5  # 64 programs: split up to ~2 per SM
    assert prefill_num_splits(128, 1, 32, 1024, 132) == 2  # no split under PREFILL_MIN_SPLIT_KEYS keys
    assert prefill_num_splits(2304, 1, 32, 4096, 132) == 1  # a long prompt fills the GPU by itself
    assert prefill_num_splits(5, 1, 32, 32768, 132) == 1  # verification rows: decode-like, not split
    assert prefill_num_splits(64, 1, 2, 1 << 20, 132) == PREFILL_MAX_SPLITS  # capped


# ----------------------------------------------------------------------------- the op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["mixed", "decode"])
def test_paged_attention_matches_op_reference(kind: str, dtype: torch.dtype) -> None:
    cached, new = MIXED if kind == "mixed" else ([0, 16, 39], [1, 1, 1])
    b = _batch(cached, new, 4, 2, 64, dtype, seed=6)
    inputs = (b.q, b.k, b.v)
    meta = (b.slot_mapping, b.block_tables, b.seq_lens, b.query_start_loc)
    cache, ref_cache = b.kv_cache.clone(), b.kv_cache.clone()
    out = paged_attention(*inputs, cache, *meta)
    ref = paged_attention_reference(*inputs, ref_cache, *meta)
    assert torch.equal(cache, ref_cache)
    _assert_close(out, ref)
    if kind == "decode":  # the sync-free call a CUDA-graph decode step makes
        _assert_close(paged_attention(*inputs, b.kv_cache.clone(), *meta, max_query_len=1), ref)


@pytest.mark.parametrize("fused", [True, False], ids=["merge-in-kernel", "combine-kernel"])
def test_decode_kernel_writes_the_new_keys_and_values(fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # DECODE_WRITES_KV: an all-decode batch (eager, and as a CUDA-graph step calls it) writes each sequence's new
    # key and value from the split that holds its position, with no reshape_and_cache launch; the cache equals the
    # reference's bit for bit and the output is the reference's. Short splits, so the writer is the 1st..5th split.
    import kiln.backends.triton.paged_attention as pa

    _min_split_keys(monkeypatch, 8)
    monkeypatch.setattr(pa, "DECODE_FUSED_COMBINE", fused)
    monkeypatch.setattr(pa, "DECODE_WRITES_KV", True)
    launches: list[str] = []
    plain = pa.reshape_and_cache
    monkeypatch.setattr(pa, "reshape_and_cache", lambda *a: launches.append("write") or plain(*a))
    b = _batch([0, 16, 39, 70], [1, 1, 1, 1], 4, 2, 16, torch.bfloat16, seed=41)
    inputs, meta = (b.q, b.k, b.v), (b.slot_mapping, b.block_tables, b.seq_lens, b.query_start_loc)
    ref_cache = b.kv_cache.clone()
    ref = paged_attention_reference(*inputs, ref_cache, *meta)
    for kw in ({}, {"max_query_len": 1}):
        cache = b.kv_cache.clone()
        out = paged_attention(*inputs, cache, *meta, **kw)
        assert torch.equal(cache, ref_cache)
        _assert_close(out, ref)
    assert launches == []
    monkeypatch.setattr(pa, "DECODE_WRITES_KV", False)  # the A/B switch: the separate write
    cache = b.kv_cache.clone()
    _assert_close(paged_attention(*inputs, cache, *meta, max_query_len=1), ref)
    assert torch.equal(cache, ref_cache) and launches == ["write"]


def test_paged_attention_padding_tokens_are_zero() -> None:
    # Two trailing padding tokens: slot -1, owned by no sequence (a padded CUDA-graph batch).
    b = _batch([0, 16], [1, 1], 4, 2, 16, torch.float32, seed=7)
    q = torch.cat([b.q, torch.randn_like(b.q)], dim=2)  # (1, Hq, 4, D)
    k, v = torch.cat([b.k, b.k], dim=2), torch.cat([b.v, b.v], dim=2)
    slots = torch.cat([b.slot_mapping, torch.full_like(b.slot_mapping, -1)])
    meta = (slots, b.block_tables, b.seq_lens, b.query_start_loc)
    out = paged_attention(q, k, v, b.kv_cache.clone(), *meta)
    ref = paged_attention_reference(q, k, v, b.kv_cache.clone(), *meta)
    assert torch.equal(out[:, :, 2:], torch.zeros_like(out[:, :, 2:]))
    _assert_close(out, ref)


@pytest.mark.parametrize("zero_in_kernel", [False, True], ids=["fill", "kernel-zeroes"])
def test_paged_attention_splits_a_short_query_over_a_long_prefix(zero_in_kernel: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # The op's heuristic on a GPU-sized device: 40 new tokens over 1,100 cached ones (a prefix-cache hit), a fresh
    # 3-token prompt and two padding tokens; eager (lengths read back) and CUDA-graph style (max_query_len given).
    # The padding rows are zero whether a fill or the prefill kernel (PREFILL_ZEROES_UNOWNED) writes them.
    import kiln.backends.triton.paged_attention as pa

    monkeypatch.setattr(pa, "PREFILL_ZEROES_UNOWNED", zero_in_kernel)
    empty = torch.empty_like

    def poisoned(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:  # nothing may stay unwritten
        out = empty(x, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(pa.torch, "empty_like", poisoned)

    chosen: list[int] = []
    heuristic = pa.prefill_num_splits
    monkeypatch.setattr(pa, "_num_sms", lambda device: 512)
    monkeypatch.setattr(pa, "prefill_num_splits", lambda *a: chosen.append(heuristic(*a)) or chosen[-1])
    b = _batch([1100, 0], [40, 3], 2, 1, 16, torch.float32, seed=11)
    q = torch.cat([b.q, torch.randn_like(b.q[:, :, :2])], dim=2)
    k, v = torch.cat([b.k, b.k[:, :, :2]], dim=2), torch.cat([b.v, b.v[:, :, :2]], dim=2)
    slots = torch.cat([b.slot_mapping, torch.full((2,), -1, dtype=b.slot_mapping.dtype, device=b.slot_mapping.device)])
    meta = (slots, b.block_tables, b.seq_lens, b.query_start_loc)
    ref = paged_attention_reference(q, k, v, b.kv_cache.clone(), *meta)
    for kw in ({}, {"max_query_len": 64}):
        out = paged_attention(q, k, v, b.kv_cache.clone(), *meta, **kw)
        assert torch.equal(out[:, :, -2:], torch.zeros_like(out[:, :, -2:]))  # padding rows: zero, as before
        _assert_close(out, ref)
    assert len(chosen) == 2 and all(n > 1 for n in chosen), chosen  # both calls split the keys


def test_registered_as_the_cuda_kernel_of_the_op() -> None:
    from kiln.backends.triton import KERNELS, register_cuda_kernels

    register_cuda_kernels()
    assert "kiln.paged_attention" in KERNELS


# ----------------------------------------------------------------------------- validation


def test_validation_errors() -> None:
    b = _batch([3], [2], 4, 2, 16, torch.float32)
    meta = (b.block_tables, b.seq_lens, b.query_start_loc)
    with pytest.raises(ValueError, match=r"kv_cache must be \(2, num_blocks"):
        paged_prefill_attention(b.q, b.kv_cache[0], *meta, 2)
    with pytest.raises(ValueError, match="multiple of the cache's KV heads"):
        paged_prefill_attention(b.q[:, :3], b.kv_cache, *meta, 2)
    with pytest.raises(ValueError, match="head dim 8 does not match"):
        paged_prefill_attention(b.q[..., :8], b.kv_cache, *meta, 2)
    with pytest.raises(ValueError, match="seq_lens must be a 1-D int32"):
        paged_prefill_attention(b.q, b.kv_cache, b.block_tables, b.seq_lens.long(), b.query_start_loc, 2)
    with pytest.raises(ValueError, match="query_start_loc must have leading shape"):
        paged_prefill_attention(b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc[:1], 2)
    with pytest.raises(ValueError, match="max_query_len"):
        paged_prefill_attention(b.q, b.kv_cache, *meta, -1)
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        paged_prefill_attention(b.q.double(), b.kv_cache, *meta, 2)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(b.q[:, :, :1], b.kv_cache, b.block_tables, b.seq_lens, num_splits=0)
    with pytest.raises(ValueError, match="one token per sequence"):
        paged_decode_attention(b.q, b.kv_cache, b.block_tables, b.seq_lens)
    with pytest.raises(ValueError, match="out must match"):
        paged_decode_attention(b.q[:, :, :1], b.kv_cache, b.block_tables, b.seq_lens, out=b.q)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        reshape_and_cache(b.k, b.v, b.kv_cache, b.slot_mapping[:1])
    with pytest.raises(ValueError, match="k has 4 heads but the cache holds 2"):
        reshape_and_cache(b.q, b.q, b.kv_cache, b.slot_mapping)
    cache = b.kv_cache.clone()
    with pytest.raises(ValueError, match="q and k|k must be"):
        paged_attention(b.q, b.k[:, :, :1], b.v, cache, b.slot_mapping, *meta)
    assert torch.equal(cache, b.kv_cache)  # rejected before anything was written


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_paged_checks, "_INTERPRET", False)
    b = _batch([3], [1], 2, 2, 16, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        paged_decode_attention(b.q.cpu(), b.kv_cache.cpu(), b.block_tables.cpu(), b.seq_lens.cpu())


# ----------------------------------------------------------------------------- CUDA only


@pytest.mark.skipif(not CUDA, reason="needs CUDA: long contexts are too slow for the interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_cuda_long_contexts(dtype: torch.dtype) -> None:
    # Llama-3-8B heads; decode at 1..5000 keys with the heuristic's splits, then a mixed prefill.
    b = _batch([0, 700, 4999, 2047], [1, 1, 1, 1], 32, 8, 128, dtype, seed=8)
    args = (b.q, b.kv_cache, b.block_tables, b.seq_lens)
    _assert_close(
        paged_decode_attention(*args, out=_poisoned_like(b.q)), paged_decode_attention_reference(*args)
    )
    b = _batch([1000, 0, 300, 4000], [300, 700, 1, 5], 32, 8, 128, dtype, seed=9)
    reshape_and_cache(b.k, b.v, b.kv_cache, b.slot_mapping)
    args = (b.q, b.kv_cache, b.block_tables, b.seq_lens, b.query_start_loc, b.max_query_len)
    _assert_close(
        paged_prefill_attention(*args, out=_poisoned_like(b.q)), paged_prefill_attention_reference(*args)
    )
