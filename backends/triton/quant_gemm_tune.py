"""Choosing a quantized-GEMM kernel per shape: candidate tiles and a small timing cache.

Triton's ``@autotune`` times the configs of one kernel; here the candidates of a shape span
kernels (the decode GEMV, the tensor-core GEMM, dequantize + cuBLAS), so :class:`KernelTuner`
does the same one level up: the first call of each key (op, M bucket, N, K, group, dtypes)
times every candidate's GPU time (:func:`~kiln.backends.triton.timing.gpu_time_ms`: L2 flushed
before each call, every call queued ahead so that host launch time stays out) and keeps
the fastest; later calls go straight to it. Candidates that do not compile for the device
(too much shared memory) are skipped, as Triton's autotuner skips them.

No timing happens in the interpreter (the first candidate runs, so CPU tests are
deterministic) or while a CUDA graph is being captured (the first candidate runs; warm up
every shape before capturing). ``TUNE = False`` turns timing off everywhere.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kiln.backends.triton._utils import next_power_of_2
from kiln.backends.triton.timing import gpu_time_ms

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


# Decode (M <= 16): the split-K kernels of ``quant_splitk_kernels``. A K step is BLOCK_KW 32-bit words
# (8 int4 or 4 int8 codes each) of BLOCK_N rows; K is split so that a launch makes up to WAVES
# programs per SM (K splits x output tiles), enough weight bytes in flight, one wave.
# (BLOCK_N, BLOCK_KW, num_warps, WAVES, PRMT, DEPTH, XPRE, STAGES) of the GEMV (a row of x per program,
# CUDA-core FMAs; PRMT: int4 / int8 codes decoded with inline PTX, about 30% fewer instructions; DEPTH: K
# steps in flight ahead of the one computed, in registers; XPRE: the next step's x loaded with this step's
# weights; STAGES, with DEPTH 0: Triton's pipeliner keeps STAGES - 1 steps in flight by cp.async). Measured on an
# H100 (benchmarks/RESULTS.md): 128 x 16 words suits int4 with groups of 128, 32-64 x 32 words int8 per
# channel. WAVES caps the programs per SM; the launcher also caps them at what the compiled kernel's
# registers let one SM hold.
GEMV_TILES = [
    (128, 16, 4, 4, True, 1, False, 1),
    (128, 16, 4, 2, True, 1, False, 1),
    (64, 32, 4, 4, True, 1, False, 1),
    (32, 32, 4, 4, True, 1, False, 1),
    (32, 32, 4, 2, True, 1, False, 1),
    (32, 32, 4, 8, True, 1, False, 1),
    (64, 16, 4, 4, True, 2, False, 1),
    (64, 32, 4, 4, True, 2, False, 1),
    (128, 16, 4, 4, False, 1, False, 1),
    # from the wider H100 sweep (.gpu-style gemv_sweep, 2026-12-07): int8 per channel prefers 64-word K
    # steps (3-8% over 32), int4 on the largest shapes 8 warps
    (32, 64, 4, 4, True, 1, False, 1),
    (16, 64, 4, 4, True, 1, False, 1),
    (128, 16, 8, 4, True, 1, False, 1),
    (256, 16, 8, 4, True, 1, False, 1),
    # session 14's options, timed by benchmarks/quant_gemv_sweep.py on an H100 (session 15): XPRE (x of the
    # next K step in flight with the weights) is the fastest candidate on both 8B-sized shapes (26.3 / 27.1 us
    # against 26.9 / 27.6 without it, 4096 x 4096 tied at 12.2). STEP_SCALES (group scales loaded per word,
    # no per-step barriers; an option of the kernel until then) was 2-3x slower on every shape (23-71 us) and
    # is gone; 8-row tiles are not in the top ten
    (128, 16, 4, 4, True, 1, True, 1),
    # session 15, not yet timed on a GPU: the K loop software-pipelined by Triton (cp.async into shared memory,
    # 2-3 steps in flight without holding them in registers; benchmarks/gemv_sass.py --depth 0 --stages 3:
    # 519 instructions a step, 2 barriers, against 503 and 4)
    (128, 16, 4, 4, True, 0, False, 3),
    (128, 16, 4, 4, True, 0, False, 4),
    (32, 64, 4, 4, True, 0, False, 3),
]
#: ``KILN_INT4_PACKED=1``: the int4 GEMV's tuner also times these tiles (the fields of :data:`GEMV_TILES`) in the
#: packed form (``PACKED``: each 32-bit word's eight products summed in bf16x2 arithmetic, ~20 instructions a word
#: against ~31; bf16 x only). Off by default: it rounds inside each word's sum to bf16, where the other tiles sum
#: exactly in fp32, and it has not been timed on a GPU.
_PACKED_ENV = os.environ.get("KILN_INT4_PACKED", "").strip().lower()
if _PACKED_ENV not in ("", "0", "1", "false", "true", "off", "on", "no", "yes"):
    raise ValueError(f"KILN_INT4_PACKED must be 0 or 1, got {_PACKED_ENV!r}")
INT4_PACKED = _PACKED_ENV in ("1", "true", "on", "yes")
#: The fewest instructions a code in offline SASS (benchmarks/RESULTS.md, session 17): 128 x 16 words at 4 warps,
#: 3.29-3.50 (128 registers: 4 programs an SM); the 8-warp and 32-word tiles took 4.05-4.51.
GEMV_PACKED_TILES = [
    (128, 16, 4, 4, True, 1, False, 1),
    (128, 16, 4, 4, True, 1, True, 1),
    (128, 16, 4, 4, True, 0, False, 3),
    (128, 16, 4, 4, True, 0, False, 4),
]
# (BLOCK_N, BLOCK_KW, num_warps, WAVES) of the tl.dot form (16 rows of x per program)
DOT_TILES = [(64, 16, 4, 4), (32, 16, 4, 4), (64, 16, 8, 4), (64, 32, 4, 4), (64, 16, 4, 2), (32, 16, 4, 2)]
DOT_FOR_GEMV = 1  # tl.dot candidates tried where the GEMV is (a few rows)
GEMV_MAX_M = 4  # the GEMV re-decodes the weights for every row: a candidate up to this many rows
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the weight-only tensor-core GEMM (M > 16)
WO_MM_MEDIUM = [(32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3)]
WO_MM_LARGE = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 256, 64, 8, 3)]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the int8 GEMM
W8A8_SMALL = [(16, 16, 512, 4, 3), (16, 32, 256, 4, 4), (16, 64, 128, 4, 5)]
W8A8_MEDIUM = [(32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 128, 4, 3)]
W8A8_LARGE = [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4)]
# Interpreter tiles: small, with K steps and splits shorter than the test shapes so loops run several times.
INTERPRET_GEMV = dict(BLOCK_N=8, BLOCK_KW=2, num_warps=1, SPLIT=2)
INTERPRET_DOT = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_KW=4, num_warps=1, SPLIT=2)
INTERPRET_MM = (16, 16, 32, 1, 1)
DECODE_M = 16  # rows of x up to which the split-K kernels run


def decode_candidates(
    m: int, k_words: int, interpret: bool, gemv: bool = True, dot: bool = True, packed: bool = False
) -> list[Candidate]:
    """The split-K candidates for ``m`` rows (``m <= DECODE_M``) and K of ``k_words`` 32-bit words.

    The GEMV for a few rows, ``tl.dot`` forms (whole K steps only: ``k_words % BLOCK_KW == 0``); ``packed`` (int4
    weights, bf16 x) adds :data:`GEMV_PACKED_TILES` when :data:`INT4_PACKED` is on.
    """
    out: list[Candidate] = []
    if interpret:
        if gemv and m <= GEMV_MAX_M:
            out.append(Candidate("gemv", dict(INTERPRET_GEMV)))
        if dot and k_words % INTERPRET_DOT["BLOCK_KW"] == 0:
            out.append(Candidate("dot", dict(INTERPRET_DOT)))
        return out
    few = gemv and m <= GEMV_MAX_M
    if few:
        out += [Candidate("gemv", dict(BLOCK_N=bn, BLOCK_KW=bkw, num_warps=w, WAVES=wv, PRMT=asm, DEPTH=d, XPRE=xpre,
                                       STAGES=st))
                for bn, bkw, w, wv, asm, d, xpre, st in GEMV_TILES]  # fmt: skip
        if INT4_PACKED and packed:
            out += [Candidate("gemv", dict(BLOCK_N=bn, BLOCK_KW=bkw, num_warps=w, WAVES=wv, PRMT=asm, DEPTH=d,
                                           XPRE=xpre, STAGES=st, PACKED=True))
                    for bn, bkw, w, wv, asm, d, xpre, st in GEMV_PACKED_TILES]  # fmt: skip
    if dot:
        out += [Candidate("dot", dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_KW=bkw, num_warps=w, WAVES=wv))
                for bn, bkw, w, wv in (DOT_TILES[:DOT_FOR_GEMV] if few else DOT_TILES) if k_words % bkw == 0]  # fmt: skip
    return out


def weight_only_candidates(
    m: int, k_words: int | None, interpret: bool, dot: bool = True, packed: bool = False
) -> list[Candidate]:
    """Candidate kernels of a weight-only linear with ``m`` rows (``k_words``: K in 32-bit words, None if
    the weights do not suit the split-K kernels; ``dot``: the tl.dot split-K form takes them; ``packed``: see
    :func:`decode_candidates`)."""
    cands = (decode_candidates(m, k_words, interpret, dot=dot, packed=packed)
             if m <= DECODE_M and k_words is not None else [])  # fmt: skip
    if cands:
        return cands
    if interpret:
        tiles = [INTERPRET_MM]
    elif m <= 128:
        tiles = WO_MM_MEDIUM
    else:
        tiles = WO_MM_LARGE
    out = [Candidate("mm", dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s))
           for bm, bn, bk, w, s in tiles]  # fmt: skip
    if m > 64 and not interpret:
        out.append(Candidate("dequant_matmul", {}))
    return out


def w8a8_candidates(m: int, interpret: bool, k_words: int | None = None) -> list[Candidate]:
    """Candidate kernels of the int8 x int8 linear for ``m`` rows: split-K decode kernels, then the int8 GEMM."""
    out = decode_candidates(m, k_words, interpret) if m <= DECODE_M and k_words is not None else []
    if interpret:
        tiles = [INTERPRET_MM]
    else:
        tiles = W8A8_SMALL if m <= 16 else W8A8_MEDIUM if m <= 128 else W8A8_LARGE
    return out + [Candidate("w8a8", dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s))
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
        results: list[tuple[Candidate, float]] = []
        errors: list[str] = []
        for c in candidates:
            try:
                with torch.cuda.device(device):  # gpu_time_ms's first, untimed call compiles
                    ms = gpu_time_ms(lambda c=c: run(c), reps=25)
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
    "decode_candidates",
    "m_bucket",
    "w8a8_candidates",
    "weight_only_candidates",
]
