"""Batches and checks shared by the paged-attention kernel tests (``tests/backends/triton/test_paged_attention.py``,
``test_decode_splits.py``): random paged caches with random block tables, NaN-poisoned outputs, dtype tolerances."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}
PAGE = 16


def _min_split_keys(monkeypatch: pytest.MonkeyPatch, keys: int) -> None:
    """Set the decode kernel's fewest keys per split in both regimes (few groups, and half the SMs filled)."""
    import kiln.backends.triton.paged_attention as pa

    monkeypatch.setattr(pa, "DECODE_MIN_SPLIT_KEYS", keys)
    monkeypatch.setattr(pa, "DECODE_WAVE_MIN_SPLIT_KEYS", keys)


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert not out.isnan().any(), "output holds NaN: some rows were never written"
    atol, rtol = TOL[out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


@dataclass
class Batch:
    """A scheduled batch: new tokens of every sequence on one axis, a random paged cache."""

    q: torch.Tensor  # (1, Hq, T, D)
    k: torch.Tensor  # (1, Hkv, T, D)
    v: torch.Tensor
    kv_cache: torch.Tensor  # (2, num_blocks, PAGE, Hkv, D), random: stale data must never be read
    slot_mapping: torch.Tensor  # (T,) int64
    block_tables: torch.Tensor  # (S, max_blocks) int32, random block ids
    seq_lens: torch.Tensor  # (S,) int32
    query_start_loc: torch.Tensor  # (S + 1,) int32
    max_query_len: int


def _batch(
    cached: list[int],
    new: list[int],
    hq: int,
    hkv: int,
    d: int,
    dtype: torch.dtype,
    cache_dtype: torch.dtype | None = None,
    page: int = PAGE,
    seed: int = 0,
) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    lens = [c + n for c, n in zip(cached, new, strict=True)]
    need = [-(-n // page) for n in lens]
    width = max(need) + 1  # one spare entry per row, pointing at a real block full of random data
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.randint(0, num_blocks, (len(lens), width), generator=gen, dtype=torch.int32)
    slots, used = [], 0
    for s, (c, n) in enumerate(zip(cached, new, strict=True)):
        tables[s, : need[s]] = perm[used : used + need[s]]
        used += need[s]
        slots += [int(tables[s, p // page]) * page + p % page for p in range(c, c + n)]
    t = sum(new)
    cache = torch.randn(2, num_blocks, page, hkv, d, generator=gen).to(cache_dtype or dtype)
    starts = torch.tensor([0, *new]).cumsum(0).to(torch.int32)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    return Batch(
        q=rand(1, hq, t, d),
        k=rand(1, hkv, t, d),
        v=rand(1, hkv, t, d),
        kv_cache=cache.to(DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        block_tables=tables.to(DEVICE),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=starts.to(DEVICE),
        max_query_len=max(new),
    )


def _poisoned_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))
