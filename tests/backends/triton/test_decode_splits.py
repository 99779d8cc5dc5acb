"""How many of a decode launch's splits a sequence uses (``decode_split_slack``): the floor once the groups fill half
the SMs, the ceiling with few; and the outputs in both regimes. Interpreter on the CPU, the kernel on CUDA."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

from paged_testing import _assert_close, _batch, _min_split_keys, _poisoned_like  # noqa: E402

import kiln.backends.triton.paged_attention as pa  # noqa: E402
from kiln.backends.triton.paged_attention import paged_decode_attention, paged_decode_attention_reference  # noqa: E402


@pytest.mark.parametrize("sms", [4, 64])  # 8 groups: filling half the SMs (floor), or few (ceiling)
@pytest.mark.parametrize("min_keys", [8, 16, 256])
def test_decode_uses_the_splits_a_context_fills(min_keys: int, sms: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Combined in the kernel, a sequence takes (length + decode_split_slack) // DECODE_MIN_SPLIT_KEYS of the
    # launch's splits (a CUDA graph sizes num_splits for the cache's capacity); one split writes the output itself.
    # Lengths just past a multiple of min_keys (17, 40 with 8 and 16) split differently in the two regimes.
    import kiln.backends.triton.paged_attention as pa

    monkeypatch.setattr(pa, "_num_sms", lambda _device: sms)
    monkeypatch.setattr(pa, "DECODE_FUSED_COMBINE", True)
    _min_split_keys(monkeypatch, min_keys)
    b = _batch([0, 16, 39, 70], [1, 1, 1, 1], 4, 2, 16, torch.float32, seed=min_keys)  # 1, 17, 40, 71 keys
    args = (b.q, b.kv_cache, b.block_tables, b.seq_lens)
    for splits in (1, 3, 8):
        out = paged_decode_attention(*args, num_splits=splits, out=_poisoned_like(b.q))
        _assert_close(out, paged_decode_attention_reference(*args))


def test_decode_split_slack() -> None:
    # few groups: as many splits as keep each within min_keys; groups filling half the SMs: splits of >= min_keys
    from kiln.backends.triton.paged_attention import decode_split_slack

    assert decode_split_slack(1, 8, 132, 128) == 127
    assert decode_split_slack(64, 4, 132, 1024) == 0
    assert (1025 + decode_split_slack(64, 4, 132, 1024)) // 1024 == 1  # the TP-2 shard: one split, not 576 + 449
    assert (272 + decode_split_slack(1, 8, 132, 128)) // 128 == 3


class _LseSpy:
    """Stands in for the decode kernel: fills the launch's log-sum-exp buffer with NaN, launches the real kernel, and
    keeps the buffer: a split that ran writes its entry, a sequence merged into one split writes none."""

    def __init__(self, kernel: object) -> None:
        self.kernel = kernel
        self.lse: list[torch.Tensor] = []

    def __getitem__(self, grid: tuple):  # type: ignore[no-untyped-def]
        launch = self.kernel[grid]  # type: ignore[index]

        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            lse = args[6]
            if kwargs.get("WRITE_LSE"):
                lse.fill_(float("nan"))
                self.lse.append(lse)
            return launch(*args, **kwargs)

        return run


@pytest.mark.parametrize(("sms", "want"), [(4, [2, 3, 1, 5]), (64, [3, 3, 2, 5])])
def test_decode_sequences_use_the_floor_or_the_ceiling_of_their_splits(sms, want, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # 17, 24, 9, 40 keys, 8 keys a split, 8 launched: the floor (8 groups fill 4 SMs) 2, 3, 1, 5 splits; the
    # ceiling (64 SMs) 3, 3, 2, 5
    spy = _LseSpy(pa._paged_decode_kernel)
    monkeypatch.setattr(pa, "_paged_decode_kernel", spy)
    monkeypatch.setattr(pa, "_num_sms", lambda _device: sms)
    monkeypatch.setattr(pa, "DECODE_FUSED_COMBINE", True)
    _min_split_keys(monkeypatch, 8)
    b = _batch([16, 23, 8, 39], [1, 1, 1, 1], 4, 2, 16, torch.float32, seed=sms)
    args = (b.q, b.kv_cache, b.block_tables, b.seq_lens)
    out = paged_decode_attention(*args, num_splits=8, out=_poisoned_like(b.q))
    _assert_close(out, paged_decode_attention_reference(*args))
    (lse,) = spy.lse  # (T, Hq, splits): one token per sequence
    used = [max(1, int((~lse[s, 0].isnan()).sum())) for s in range(4)]
    assert used == want
