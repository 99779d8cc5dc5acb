"""The queued-ahead GPU timing that the kernel tuners and the GEMM benchmark use."""

from __future__ import annotations

import time

import pytest
import torch

from kiln.backends.triton import timing

CUDA = torch.cuda.is_available()


def test_autotune_bench_returns_the_quantiles_of_the_reps(monkeypatch: pytest.MonkeyPatch) -> None:
    times = [float(t) for t in torch.randperm(25).tolist()]  # 0..24 in random order
    seen = {}

    def fake(fn, reps, flush=True):
        seen["reps"] = reps
        return list(times)

    monkeypatch.setattr(timing, "gpu_times_ms", fake)
    got = timing.autotune_bench(lambda: None, quantiles=(0.5, 0.2, 0.8))
    assert seen["reps"] == 25
    assert got == [12.0, 5.0, 20.0]


def test_reps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="reps"):
        timing.gpu_times_ms(lambda: None, reps=0)


def test_flush_by_must_be_read_or_write() -> None:
    with pytest.raises(ValueError, match="flush_by"):
        timing.gpu_times_ms(lambda: None, flush_by="evict")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_read_flush_leaves_no_dirty_lines_to_write_back() -> None:
    # copying 32 MB reads 32 MB and writes 32 MB; after a write flush its misses also write back the flush's dirty lines
    a, b = torch.empty(2**25, dtype=torch.int8, device="cuda"), torch.empty(2**25, dtype=torch.int8, device="cuda")
    read = timing.gpu_time_ms(lambda: b.copy_(a), reps=20, flush_by="read")
    write = timing.gpu_time_ms(lambda: b.copy_(a), reps=20, flush_by="write")
    assert read < write


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_short_kernel_is_timed_without_the_launch_gap() -> None:
    import triton.testing

    x = torch.randn(1 << 16, device="cuda")
    y = torch.empty_like(x)

    def small() -> None:  # a kernel of a few microseconds behind 200 us of host work (a slow launcher)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 200e-6:
            pass
        torch.add(x, 1.0, out=y)

    queued = timing.gpu_time_ms(small, reps=50)
    launched = triton.testing.do_bench(small, warmup=5, rep=25, return_mode="median")
    assert launched > 0.15  # do_bench's flush drains the queue: it times the host
    assert 0 < queued < 0.05  # the kernel alone
    # a kernel of known length: torch.cuda._sleep of 1 ms of cycles
    cycles = int(timing._cycles_per_ms(torch.cuda.current_device()))
    slept = timing.gpu_time_ms(lambda: torch.cuda._sleep(cycles), reps=5, flush=False)
    assert slept == pytest.approx(1.0, rel=0.1)
