"""Choosing a quantized-GEMM kernel per shape: candidate tiles and a small timing cache.

Triton's ``@autotune`` times the configs of one kernel; here the candidates of a shape span
kernels (the decode GEMV, the tensor-core GEMM, dequantize + cuBLAS), so :class:`KernelTuner`
does the same one level up: the first call of each key (op, M bucket, N, K, group, dtypes)
times every candidate with ``triton.testing.do_bench`` (L2 flushed between calls) and keeps
the fastest; later calls go straight to it. Candidates that do not compile for the device
(too much shared memory) are skipped, as Triton's autotuner skips them.

No timing happens in the interpreter (the first candidate runs, so CPU tests are
deterministic) or while a CUDA graph is being captured (the first candidate runs; warm up
every shape before capturing). ``TUNE = False`` turns timing off everywhere.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kiln.backends.triton._utils import next_power_of_2

#: Time the candidates of each new shape on the GPU (False: always take the first one).
TUNE = True


@dataclass(frozen=True)
class Candidate:
    """One way to run a quantized linear: a kernel name and its launch parameters."""

    kernel: str  # "gemv", "mm", "dequant_matmul", "w8a8"
    params: dict = field(default_factory=dict, hash=False, compare=False)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.kernel}({inner})"


def m_bucket(m: int) -> int:
    """Rows of ``x`` rounded up to a power of two: shapes in one bucket share a tuned kernel."""
    return next_power_of_2(max(1, m))


# (BLOCK_N, storage bytes per row per step, num_warps, num_stages) of the GEMV (M <= 2)
GEMV_TILES = [(16, 256, 4, 3), (32, 128, 4, 4)]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the weight-only tensor-core GEMM. For decode,
# BLOCK_M = 16 (one MMA row tile) and narrow N tiles: N = 4096 makes 128-256 programs for 132 SMs,
# deep pipelines keep enough weight bytes in flight. BLOCK_K shrinks to divide the group size.
WO_MM_DECODE = [(16, 16, 256, 4, 6), (16, 32, 128, 4, 6), (16, 64, 128, 4, 4)]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K): wide N tiles (fewer instructions per
# weight: each x fragment serves more MMAs) made numerous again by splitting K (atomic adds).
WO_MM_DECODE_SPLIT = [(16, 128, 128, 4, 4, 4), (16, 64, 128, 4, 4, 2), (16, 128, 128, 8, 4, 2)]
WO_MM_SMALL = [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 64, 4, 5), (16, 128, 64, 4, 4)]
WO_MM_MEDIUM = [(32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3)]
WO_MM_LARGE = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 256, 64, 8, 3)]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the int8 GEMM
W8A8_SMALL = [
    (16, 32, 256, 4, 4),
    (16, 64, 256, 4, 4),
    (16, 64, 128, 4, 5),
    (16, 128, 128, 4, 4),
    (16, 16, 512, 4, 3),
]
W8A8_MEDIUM = [(32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 128, 4, 3)]
W8A8_LARGE = [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4)]
# Interpreter tiles: small, and K steps shorter than the test shapes so loops run several times.
INTERPRET_GEMV = (8, 16, 1, 1)
INTERPRET_MM = (16, 16, 32, 1, 1)


def gemv_slots(row_bytes: int, group_store: int | None, word: int = 1) -> tuple[int, int, int] | None:
    """``(STEP, SLOT, GPT)`` of the GEMV for a K step of ``row_bytes`` storage columns.

    A slot is ``STEP`` storage columns of one row padded to ``SLOT`` (a power of two) lanes;
    ``GPT`` slots make a K step. With groups (``group_store`` storage columns each) a slot never
    straddles two groups: small groups are one slot each; large ones are cut into power-of-two
    slots dividing them (``None`` when only slots under 16 columns would do, or when a slot
    would split one of the ``word``-byte words int4 codes are packed in).
    """
    if group_store is None:
        return row_bytes, row_bytes, 1
    if group_store % word:
        return None
    if group_store <= row_bytes:
        slot = next_power_of_2(group_store)
        return group_store, slot, max(1, row_bytes // slot)
    p = math.gcd(group_store, row_bytes)  # largest power of two <= row_bytes dividing the group
    if p < 16:
        return None
    return p, p, row_bytes // p


def weight_only_candidates(
    m: int, group_store: int | None, interpret: bool, word: int = 1
) -> list[Candidate]:
    """Candidate kernels of a weight-only linear with ``m`` rows (``group_store``, ``word``: see :func:`gemv_slots`)."""
    out: list[Candidate] = []
    gemv = [INTERPRET_GEMV] if interpret else GEMV_TILES
    if m <= 2:
        for bn, rb, w, s in gemv:
            slots = gemv_slots(rb, group_store, word)
            if slots is not None:
                step, slot, gpt = slots
                out.append(
                    Candidate(
                        "gemv", dict(BLOCK_N=bn, STEP=step, SLOT=slot, GPT=gpt, num_warps=w, num_stages=s)
                    )
                )
    if interpret:
        tiles = [INTERPRET_MM]
    elif m <= 4:
        tiles = WO_MM_DECODE
    elif m <= 16:
        tiles = WO_MM_SMALL
    elif m <= 128:
        tiles = WO_MM_MEDIUM
    else:
        tiles = WO_MM_LARGE
    out += [Candidate("mm", dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s))
            for bm, bn, bk, w, s in tiles]  # fmt: skip
    if m <= 16 and not interpret:
        out += [Candidate("mm", dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s,
                                     SPLIT_K=k)) for bm, bn, bk, w, s, k in WO_MM_DECODE_SPLIT]  # fmt: skip
    if m > 64 and not interpret:
        out.append(Candidate("dequant_matmul", {}))
    return out


def w8a8_candidates(m: int, interpret: bool) -> list[Candidate]:
    """Candidate tiles of the int8 GEMM for ``m`` rows."""
    if interpret:
        tiles = [INTERPRET_MM]
    else:
        tiles = W8A8_SMALL if m <= 16 else W8A8_MEDIUM if m <= 128 else W8A8_LARGE
    return [Candidate("w8a8", dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s))
            for bm, bn, bk, w, s in tiles]  # fmt: skip


def _unbuildable(e: Exception) -> bool:
    """Whether ``e`` says a kernel configuration cannot be built (resources, compiler), not a wrong input."""
    name, msg = type(e).__name__, str(e).lower()
    return (
        name in ("OutOfResources", "CompilationError", "PTXASError")
        or "out of resource" in msg
        or "passmanager::run failed" in msg  # a Triton compiler pass gave up on this tile
    )


class KernelTuner:
    """Per-key choice among candidates, timed once on the GPU (see the module docstring)."""

    def __init__(self) -> None:
        self.best: dict[tuple, Candidate] = {}
        self.timings: dict[tuple, list[tuple[Candidate, float]]] = {}
        self.last: Candidate | None = None  # the candidate of the latest call (benchmarks print it)

    def choose(
        self,
        key: tuple,
        candidates: list[Candidate],
        run: Callable[[Candidate], object],
        device: torch.device,
    ) -> Candidate:
        """The candidate to run for ``key``; times them all the first time the key is seen."""
        got = self.best.get(key)
        if got is None:
            got = self._choose(key, candidates, run, device)
        self.last = got
        return got

    def _choose(
        self,
        key: tuple,
        candidates: list[Candidate],
        run: Callable[[Candidate], object],
        device: torch.device,
    ) -> Candidate:
        if (
            len(candidates) == 1
            or not TUNE
            or device.type != "cuda"
            or torch.cuda.is_current_stream_capturing()
        ):
            return candidates[0]
        import triton.testing

        results: list[tuple[Candidate, float]] = []
        errors: list[str] = []
        for c in candidates:
            try:
                run(c)  # compile outside the timing
                ms = triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=25, return_mode="median")
            except Exception as e:  # a tile this device or Triton cannot build is skipped, loudly
                if not _unbuildable(e):
                    raise
                errors.append(f"{c}: {type(e).__name__}: {str(e)[:200]}")
                warnings.warn(f"quantized GEMM candidate {c} skipped for {key}: {errors[-1]}", stacklevel=2)
                continue
            results.append((c, float(ms)))
        if not results:
            raise RuntimeError(f"no candidate kernel runs for {key}: {errors}")
        results.sort(key=lambda r: r[1])
        self.timings[key] = results
        self.best[key] = results[0][0]
        return results[0][0]


__all__ = [
    "TUNE",
    "Candidate",
    "KernelTuner",
    "gemv_slots",
    "m_bucket",
    "w8a8_candidates",
    "weight_only_candidates",
]
