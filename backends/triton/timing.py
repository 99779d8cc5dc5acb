"""GPU time of a short call, without the host's launch time in it.

``triton.testing.do_bench`` records an event, calls the function, records another and
synchronizes nothing in between, but its L2 flush before every call drains the queue: the GPU
then waits for the host to launch the function. A Triton GEMV that runs 5-30 us on the GPU
can take longer than that to launch from Python, so do_bench timed the launch, not the kernel,
and the noise between runs exceeded the difference between candidates (H100, session 13: int4
(4096, 4096) candidates whose weights take ~3 us to read were timed at 20-105 us, and the
quantized-GEMM tuner picked a 2x slower kernel in one run of three; benchmarks/RESULTS.md).

:func:`gpu_time_ms` queues every repetition behind a sleeping kernel first
(``torch.cuda._sleep``), so that by the time the GPU reaches them the host has launched them
all: each rep is *flush L2, event, fn, event*, back to back on the device, and the events
measure the function's GPU time alone, from a cold L2 - as it runs inside a decode step's CUDA
graph, where the next kernel is already queued.

The flush *reads* ``FLUSH_BYTES`` (``FLUSH_BY = "read"``): the L2 is left holding clean lines, as in a
decode step whose previous kernels read other weights. Flushing by *writing* them (``"write"``, the
method until session 15) leaves ~50 MB of dirty lines, which the timed kernel's misses must write back to
DRAM before they can fill: a memory-bound kernel is timed moving up to twice its bytes (a cuBLAS bf16
4096 x 4096 GEMV read 33.6 MB in 22.8 us, 1.5 TB/s). ``benchmarks/l2_state.py`` times both flushes and a
rotation over distinct weights (no flush at all) side by side.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import torch

#: Bytes read (or written) between reps to evict the previous rep's data from the L2 cache (H100: 50 MB).
FLUSH_BYTES = 256 * 2**20
#: How the L2 is flushed between reps: "read" (clean lines left) or "write" (dirty lines; module docstring).
FLUSH_BY = "read"

_CYCLES_PER_MS: dict[int, float] = {}
_FLUSH: dict[int, torch.Tensor] = {}


def _cycles_per_ms(device: int) -> float:
    """Clock cycles ``torch.cuda._sleep`` spins per millisecond on ``device`` (measured once)."""
    got = _CYCLES_PER_MS.get(device)
    if got is None:
        cycles = 2_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)  # the first call loads the kernel
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        got = _CYCLES_PER_MS[device] = cycles / max(start.elapsed_time(end), 1e-3)
    return got


def gpu_times_ms(
    fn: Callable[[], object], reps: int = 25, flush: bool = True, flush_by: str | None = None
) -> list[float]:
    """GPU milliseconds of each of ``reps`` calls of ``fn()`` on the current CUDA device, the L2
    flushed before each (``flush``; by reading or writing ``FLUSH_BYTES``, ``flush_by``, default
    ``FLUSH_BY``), every call queued before the first runs (module docstring).

    ``fn`` is called once first, untimed (compilation, autotuning, lazy allocation).
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    by = FLUSH_BY if flush_by is None else flush_by
    if by not in ("read", "write"):
        raise ValueError(f"flush_by must be 'read' or 'write', got {by!r}")
    device = torch.cuda.current_device()
    buf = _FLUSH.get(device)
    if flush and buf is None:
        buf = _FLUSH[device] = torch.zeros(FLUSH_BYTES // 8, dtype=torch.int64, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]

    def one(i: int) -> None:
        if flush and by == "write":
            buf.zero_()
        elif flush:
            buf.max()  # a reduction over the whole buffer: reads only
        starts[i].record()
        fn()
        ends[i].record()

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    one(0)  # the host's cost of one rep, to size the sleep that hides all of them
    host_ms = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    slept = torch.cuda.Event()
    for margin in (2, 8, 32):
        torch.cuda._sleep(int(_cycles_per_ms(device) * (margin * reps * host_ms + 1.0)))
        slept.record()
        for i in range(reps):
            one(i)
        ahead = not slept.query()  # the GPU still slept when the last rep was queued
        torch.cuda.synchronize()
        if ahead:
            break
    else:  # the times include host gaps: upper bounds, said so
        warnings.warn(f"gpu_time_ms: the host could not queue {reps} calls ahead of the GPU; "
                      "the times include launch gaps", stacklevel=2)  # fmt: skip
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def gpu_time_ms(fn: Callable[[], object], reps: int = 25, flush: bool = True, flush_by: str | None = None) -> float:
    """Median of :func:`gpu_times_ms`."""
    return statistics.median(gpu_times_ms(fn, reps, flush, flush_by))


def autotune_bench(kernel_call: Callable[[], object], quantiles: tuple[float, ...]) -> list[float]:
    """``do_bench`` for ``triton.autotune``: the quantiles of :func:`gpu_times_ms` (25 calls) of a config."""
    times = sorted(gpu_times_ms(kernel_call, reps=25))
    return [times[min(len(times) - 1, int(q * len(times)))] for q in quantiles]


__all__ = ["FLUSH_BY", "FLUSH_BYTES", "autotune_bench", "gpu_time_ms", "gpu_times_ms"]
