"""Split-K GEMV: ``y = x Wᵀ + b`` for a few rows of ``x`` and 16-bit float weights, the CUDA kernel of ``kiln::gemv``.

At decode (M = 1..4 rows) a linear streams its weight once and does 2 flops per weight byte:
it is bound by memory bandwidth, and for the small projections of a 1B model (2048x2048,
512x2048) by fixed costs too. cuBLAS runs M = 1 well below bandwidth on such shapes (49% of
the copy bandwidth on 4096x4096 bf16 on an H100, benchmarks/RESULTS.md), so this kernel
streams the weight the way flash-decoding streams a KV cache (Dao et al. 2023,
"Flash-Decoding for long-context inference"): a grid of N tiles x K splits so every SM has
weight bytes in flight; each program reads a ``(BLOCK_N, BLOCK_K)`` tile per step (rows of
W are contiguous along K: 16-byte coalesced loads), multiplies it by the x chunk in fp32 and
keeps the products per lane, reducing over K once at the end (``tl.sum``). With one split
the program adds the bias and writes y; with several, fp32 partials go to a scratch buffer
and a second kernel sums them in a fixed order (deterministic, unlike atomics), adds the
bias and casts.

:func:`gemv` picks, per shape (M bucket, N, K, dtype), the fastest of cuBLAS
(``torch.nn.functional.linear``) and a few tilings, timed once on the GPU by
:class:`kiln.backends.triton.quant_gemm_tune.KernelTuner` (never during CUDA-graph capture:
warm up first), so the kernel runs only where it measured faster. The plain-torch reference
is :func:`kiln.ops.gemv_reference`. ``python -m kiln.backends.triton.gemv`` times both on the
Llama-3.2-1B decode shapes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.backends.triton._utils import (
    arrival_counters,
    check_triton_device,
    interpret_mode,
    next_power_of_2,
    pdl_enabled,
    pdl_release,
    pdl_wait,
)
from kiln.backends.triton.quant_gemm_tune import Candidate, KernelTuner

_INTERPRET = interpret_mode()
TUNER = KernelTuner()
#: The most rows of x the kernel takes (its products are kept per row: registers grow with M).
MAX_M = 4
#: The most rows :func:`gemv` sends to the kernel; more go to cuBLAS. 1 (batch-1 decode) until the
#: kernel is measured at M = 2..4: each new M bucket costs its tuning time at start-up.
DISPATCH_M = 1
FLOATS = (torch.float16, torch.bfloat16)
#: ``KILN_GEMV=triton`` leaves cuBLAS out of the candidates of shapes that a narrow whole-K tile suits: the
#: tuner times each kernel alone, so it cannot see what programmatic dependent launch (``_utils.PDL``) gains
#: the Triton kernel inside a step (an A/B switch until measured there).
TRITON_ONLY = os.environ.get("KILN_GEMV", "").strip().lower() == "triton"
#: The most rows :func:`gemv` offers the tensor-core split-K kernel (:func:`launch_skinny`), timed against cuBLAS
#: per M bucket; 0 sends every shape past :data:`DISPATCH_M` to cuBLAS. Off (0) by default: on an H100 it beat
#: cuBLAS by 4-12% only where K is long and N short (row-parallel down / output projections), took up to 1.5x
#: cuBLAS's time elsewhere, and in a TP-2 batch-64 decode step the tuner took it for the LM head alone (~2% of the
#: step; benchmarks/RESULTS.md, session 16), against tuning time at start-up for every (M bucket, shape).
#: ``KILN_SKINNY_GEMM=128`` turns it on.
_SKINNY_ENV = os.environ.get("KILN_SKINNY_GEMM", "").strip()
if _SKINNY_ENV and not _SKINNY_ENV.isdigit():
    raise ValueError(f"KILN_SKINNY_GEMM must be a number of rows (for example 128) or 0, got {_SKINNY_ENV!r}")
SKINNY_MAX_M = int(_SKINNY_ENV or 0)
#: The most bytes of shared memory a skinny tile's x and W buffers may take (H100: 227 KB a block). Triton
#: allocates num_stages + 1 of them (H100, triton 3.6: 64 x 256 tiles of 64 rows at 3 stages asked 256 KB).
SKINNY_SMEM = 227 * 1024
#: The most rows the skinny kernel takes (its row tile holds every row of x).
SKINNY_ROWS = 128
#: (BLOCK_N, BLOCK_K, num_warps, num_stages) of the skinny kernel's candidates, before the shared-memory check.
#: Unmeasured starting points: memory-bound tiles that keep 2-3 weight tiles in flight per program.
SKINNY_TILES = [(64, 128, 4, 4), (128, 64, 4, 4), (32, 128, 4, 4), (64, 256, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3)]


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized output or scratch buffer (tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _rows_tile(ptr, offs_r, r_mask, stride_r, offs_k, k_mask):
    """The (rows, BLOCK_K) tile of a matrix whose rows are contiguous along K; zeros outside the masks."""
    mask = r_mask[:, None] & k_mask[None, :]
    return tl.load(ptr + offs_r[:, None] * stride_r + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def _mma(acc, x, w, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc + x @ wᵀ`` on the tensor cores (fp32 accumulation)."""
    if UPCAST_DOT:  # the interpreter's tl.dot multiplies bfloat16 bit patterns (triton-lang/triton#11584)
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)


@triton.jit
def _bias_row(b_ptr, offs_n, n_mask):
    """The bias of columns ``offs_n`` as a (1, BLOCK_N) fp32 row."""
    return tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """Program (n, s): rows ``[n*BLOCK_N, +BLOCK_N)`` of W over K range ``[s*K_PER_SPLIT, +K_PER_SPLIT)``.

    With ``USE_PDL`` the first weight tile is requested before the wait for the previous kernel (x is its output).
    """
    pdl_release(USE_PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_lo = pid_k * K_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)  # products per lane, summed over K at the end
    k_start = k_lo
    if USE_PDL:  # the first weight tile (a constant) is requested before the wait for x
        offs_k = k_lo + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = _rows_tile(w_ptr, offs_n, n_mask, stride_wn, offs_k, k_mask)
        pdl_wait(USE_PDL)
        x = _rows_tile(x_ptr, offs_m, m_mask, stride_xm, offs_k, k_mask)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        k_start = k_lo + BLOCK_K
    for k0 in range(k_start, k_lo + K_PER_SPLIT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = _rows_tile(w_ptr, offs_n, n_mask, stride_wn, offs_k, k_mask)  # (BLOCK_N, BLOCK_K)
        x = _rows_tile(x_ptr, offs_m, m_mask, stride_xm, offs_k, k_mask)  # (BLOCK_M, BLOCK_K)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += _bias_row(b_ptr, offs_n, n_mask)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], y, mask=mask)


@triton.jit(do_not_specialize=["split_k"])
def skinny_gemm_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, counters_ptr,
    M, N, K, K_PER_SPLIT, split_k,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,  # split_k > 1 (one compiled variant for every count)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, FUSED: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """Program (n, s): ``y[:, n*BLOCK_N : +BLOCK_N]`` over K range ``[s*K_PER_SPLIT, +K_PER_SPLIT)`` with ``tl.dot``.

    Every row of x (at most BLOCK_M) in one program, so each weight tile is read from memory once; the
    loop is software-pipelined by Triton (the launch's ``num_stages``). With several splits each writes
    fp32 partials; ``FUSED``: the split of a tile that arrives last (its arrival counter, as the quantized
    GEMVs and paged attention merge theirs) sums them in split order, adds the bias, writes y and resets
    the counter, so no combine kernel runs. The sum is the combine kernel's, in the same order.
    """
    pdl_release(USE_PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = k_lo
    if USE_PDL:  # the first weight tile (a constant) is requested before the wait for x, the previous kernel's output
        offs_k = k_lo + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        w = _rows_tile(w_ptr, offs_n, n_mask, stride_wn, offs_k, k_mask)
        pdl_wait(USE_PDL)
        x = _rows_tile(x_ptr, offs_m, m_mask, stride_xm, offs_k, k_mask)
        acc = _mma(acc, x, w, DOT_PRECISION, UPCAST_DOT)
        k_start = k_lo + BLOCK_K
    for k0 in range(k_start, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        x = _rows_tile(x_ptr, offs_m, m_mask, stride_xm, offs_k, k_mask)  # (BLOCK_M, BLOCK_K)
        w = _rows_tile(w_ptr, offs_n, n_mask, stride_wn, offs_k, k_mask)  # (BLOCK_N, BLOCK_K)
        acc = _mma(acc, x, w, DOT_PRECISION, UPCAST_DOT)
    mask = m_mask[:, None] & n_mask[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if not SPLIT:
        if HAS_BIAS:
            acc += _bias_row(b_ptr, offs_n, n_mask)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        parts = part_ptr + offs_m[:, None] * N + offs_n[None, :]  # split 0's partials of this tile
        tl.store(parts + pid_k * M * N, acc, mask=mask)
        if FUSED:
            tl.debug_barrier()  # every thread's partials stored before one thread counts the program in
            arrived = tl.atomic_add(counters_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == split_k - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s0 in range(0, split_k, 4):
                    for j in tl.static_range(4):  # four splits' loads at once: their L2 round trips overlap
                        s = s0 + j  # in split order; past the last split: the last one again, counted as 0
                        part = tl.load(parts + tl.minimum(s, split_k - 1) * M * N, mask=mask, other=0.0,
                                       cache_modifier=".cg")  # fmt: skip
                        total += tl.where(s < split_k, part, 0.0)
                if HAS_BIAS:
                    total += _bias_row(b_ptr, offs_n, n_mask)
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.store(counters_ptr + pid_n, 0)  # ready for the next launch (launches on a stream run in turn)


@triton.jit
def gemv_combine_kernel(
    part_ptr, b_ptr, y_ptr, M, N, stride_ym,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """y[m, n] = sum over splits of the fp32 partials (in split order) + b[n], cast to y's dtype."""
    pdl_release(USE_PDL)
    pdl_wait(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        total += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + (offs // N) * stride_ym + n, total.to(y_ptr.dtype.element_ty), mask=mask)


def launch(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *, block_n: int, block_k: int, split_k: int,
    num_warps: int = 4, num_stages: int = 4,
) -> torch.Tensor:  # fmt: skip
    """Run the kernel with one tiling on ``x`` (M, K) and ``w`` (N, K); returns y (M, N) in x's dtype."""
    check_triton_device("gemv", _INTERPRET, x, w, *([b] if b is not None else []))
    m, k = x.shape
    n = w.shape[0]
    if m > MAX_M or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"gemv takes at most {MAX_M} rows with K contiguous; got x {tuple(x.shape)} strides "
                         f"{x.stride()}, w strides {w.stride()}")  # fmt: skip
    y = new_output((m, n), x.dtype, x.device)
    k_per_split = -(-k // (split_k * block_k)) * block_k  # a whole number of K steps per split
    split_k = -(-k // k_per_split)
    part = new_output((split_k, m, n), torch.float32, x.device) if split_k > 1 else y
    bias = b if b is not None else w  # any pointer: not read
    grid = (triton.cdiv(n, block_n), split_k)
    pdl = pdl_enabled(x.device, _INTERPRET)
    gemv_kernel[grid](
        x, w, bias, y, part, m, n, k, k_per_split, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=b is not None, SPLIT_K=split_k, BLOCK_M=next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k,
        USE_PDL=pdl, num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )  # fmt: skip
    if split_k > 1:
        _combine(part, bias, y, b is not None, split_k, pdl)
    return y


def _combine(part: torch.Tensor, bias: torch.Tensor, y: torch.Tensor, has_bias: bool, split_k: int, pdl: bool) -> None:
    """Sum the ``split_k`` fp32 partials of ``part`` (split, M, N) into ``y`` (+ bias), in split order."""
    m, n = y.shape
    block = 1024 if not _INTERPRET else 64
    gemv_combine_kernel[(triton.cdiv(m * n, block),)](
        part, bias, y, m, n, y.stride(0), HAS_BIAS=has_bias, SPLIT_K=split_k, BLOCK=block, USE_PDL=pdl,
        num_warps=4, launch_pdl=pdl,
    )  # fmt: skip


def skinny_block_m(m: int) -> int:
    """The skinny kernel's row tile for ``m`` rows: a power of two, at least 16 (the MMA's rows)."""
    return max(16, next_power_of_2(m))


def launch_skinny(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *, block_n: int, block_k: int, split_k: int,
    num_warps: int = 4, num_stages: int = 3, fused: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Run :func:`skinny_gemm_kernel` with one tiling on ``x`` (M, K) and ``w`` (N, K); returns y (M, N) in x's
    dtype. M is at most 128 (the row tile holds every row). ``fused``: several splits are summed by the last
    one to arrive (else by :func:`gemv_combine_kernel`)."""
    check_triton_device("skinny_gemm", _INTERPRET, x, w, *([b] if b is not None else []))
    m, k = x.shape
    n = w.shape[0]
    if not 0 < m <= SKINNY_ROWS or x.stride(1) != 1 or w.stride(1) != 1 or w.shape[1] != k:
        raise ValueError(f"skinny_gemm takes 1 to {SKINNY_ROWS} rows of x (M, K) and w (N, K), K contiguous; got x "
                         f"{tuple(x.shape)} strides {x.stride()}, w {tuple(w.shape)} strides {w.stride()}")  # fmt: skip
    y = new_output((m, n), x.dtype, x.device)
    k_per_split = -(-k // (split_k * block_k)) * block_k  # a whole number of K steps per split
    split_k = -(-k // k_per_split)
    part = new_output((split_k, m, n), torch.float32, x.device) if split_k > 1 else y
    bias = b if b is not None else w  # any pointer: not read
    pdl = pdl_enabled(x.device, _INTERPRET)
    fused = fused and split_k > 1
    tiles = triton.cdiv(n, block_n)
    counters = arrival_counters(x.device, tiles) if fused else y  # any pointer when not fused: not read
    skinny_gemm_kernel[(tiles, split_k)](
        x, w, bias, y, part, counters, m, n, k, k_per_split, split_k, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=b is not None, SPLIT=split_k > 1, BLOCK_M=skinny_block_m(m), BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or _INTERPRET else "tf32",
        UPCAST_DOT=_INTERPRET and x.dtype == torch.bfloat16, FUSED=fused, USE_PDL=pdl, num_warps=num_warps,
        num_stages=num_stages, launch_pdl=pdl,
    )  # fmt: skip
    if split_k > 1 and not fused:
        _combine(part, bias, y, b is not None, split_k, pdl)
    return y


def candidates(m: int, n: int, k: int) -> list[Candidate]:
    """cuBLAS first, then narrow whole-K tiles, then tilings whose grid gives the 132 SMs of an H100 one to
    eight programs each.

    Tiles hold at most 8192 weights (64 fp32 products per lane at 4 warps, fewer per row of x).
    """
    if _INTERPRET:  # small tiles, K steps shorter than the test shapes; no timing in the interpreter
        return [Candidate("triton", {"block_n": 8, "block_k": 16, "split_k": 2, "num_warps": 1, "num_stages": 1})]
    out = [Candidate("cublas")]
    budget = 8192 // next_power_of_2(m)
    # narrow, long tiles over the whole K first: the fastest in a CUDA graph of a 1B step's 64 GEMVs on an H100
    # (4 x 1024 with PDL: 0.725 ms against cuBLAS's 0.834 ms, .gpu/pdl_probe.py in benchmarks/RESULTS.md);
    # their grid of N / BLOCK_N programs may run many waves
    for block_n, block_k in ((4, 1024), (8, 1024)):
        if block_n * block_k <= budget and block_k <= k and 132 <= triton.cdiv(n, block_n) <= 132 * 32:
            out.append(Candidate("triton", {"block_n": block_n, "block_k": block_k, "split_k": 1}))
    if TRITON_ONLY and len(out) > 1:
        out = out[1:]
    for block_n, block_k in ((16, 256), (32, 256), (8, 512), (64, 128), (16, 512)):
        if block_n * block_k > budget or block_k > next_power_of_2(k):
            continue
        tiles = triton.cdiv(n, block_n)
        for split_k in (1, 2, 4, 8):
            if split_k * block_k > k or not 132 <= tiles * split_k <= 132 * 8:
                continue
            out.append(Candidate("triton", {"block_n": block_n, "block_k": block_k, "split_k": split_k}))
    if len(out) == 1:  # nothing in the window (very wide N): the fewest programs of the first tiling
        out.append(Candidate("triton", {"block_n": 64, "block_k": 128, "split_k": 1}))
    return out[:5]  # cuBLAS + 4 tilings: each costs a compile and a timing at start-up


def skinny_candidates(m: int, n: int, k: int) -> list[Candidate]:
    """cuBLAS first, then each of :data:`SKINNY_TILES` that fits shared memory for ``m`` rows, split over K
    as :func:`skinny_split` estimates best for the 132 SMs of an H100."""
    if _INTERPRET:  # small tiles, K steps shorter than the test shapes; no timing in the interpreter
        return [Candidate("skinny", {"block_n": 16, "block_k": 16, "split_k": 2, "num_warps": 1, "num_stages": 1,
                                     "fused": True})]  # fmt: skip
    out = [Candidate("cublas")]
    bm = skinny_block_m(m)
    for block_n, block_k, warps, stages in SKINNY_TILES:
        if (stages + 1) * (bm + block_n) * block_k * 2 > SKINNY_SMEM or block_k > next_power_of_2(k):
            continue
        split = skinny_split(triton.cdiv(n, block_n), triton.cdiv(k, block_k), m, k)
        out.append(Candidate("skinny", {"block_n": block_n, "block_k": block_k, "split_k": split,
                                        "num_warps": warps, "num_stages": stages, "fused": True}))  # fmt: skip
    split = next((c for c in out[1:] if c.params["split_k"] > 1), None)
    if split is not None:  # the first split tiling once more with the separate combine kernel (an A/B in the tuner)
        out.append(Candidate("skinny", {**split.params, "fused": False}))
    return out


def skinny_split(tiles: int, k_steps: int, rows: int, k: int, sms: int = 132) -> int:
    """K splits for ``tiles`` output tiles of ``k_steps`` K steps each and ``rows`` rows of x (K = ``k``).

    The split count (at most 16, at least 2 K steps a split) with the least estimated time: the K steps the
    busiest SM runs (its share of the programs times their steps: weight bytes, the kernel's bound),
    each split adding its fp32 partials (``8 * rows`` bytes written and read per output column, against
    ``2 * K`` weight bytes; counted at half, as they mostly stay in the L2). The fewest splits among equals.
    """
    best, best_cost = 1, float("inf")
    for split in range(1, 17):
        if split > 1 and k_steps < 2 * split:
            break
        per_sm = -(-tiles * split // sms)  # programs the busiest SM runs
        partials = 0.5 * split * 8 * rows / (2 * k) if split > 1 else 0.0
        cost = per_sm * -(-k_steps // split) * (1 + partials)
        if cost < best_cost - 1e-9:
            best, best_cost = split, cost
    return best


def run(c: Candidate, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if c.kernel == "cublas":
        return torch.nn.functional.linear(x, w, b)
    if c.kernel == "skinny":
        return launch_skinny(x, w, b, **c.params)
    return launch(x, w, b, **c.params)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``kiln::gemv`` on CUDA: x (..., K) @ weight (N, K)ᵀ + bias, the fastest of cuBLAS and the split-K kernels.

    Up to :data:`DISPATCH_M` rows: cuBLAS or the GEMV; up to :data:`SKINNY_MAX_M` rows: cuBLAS or the
    tensor-core skinny kernel, each timed once per M bucket and shape. More rows, other dtypes and
    non-contiguous operands run on cuBLAS (``torch.nn.functional.linear``), which computes the same function.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # (M, K)
    m = x2.shape[0]
    ours = (x.dtype in FLOATS and weight.dtype == x.dtype and weight.is_contiguous() and x2.stride(1) == 1
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous())))  # fmt: skip
    n = weight.shape[0]
    if ours and 0 < m <= DISPATCH_M:
        kind, cands = "gemv", candidates(m, n, k)
    elif ours and DISPATCH_M < m <= min(SKINNY_MAX_M, SKINNY_ROWS):
        kind, cands = "skinny", skinny_candidates(m, n, k)
    else:
        return torch.nn.functional.linear(x, weight, bias)
    key = (kind, next_power_of_2(m), n, k, x.dtype, bias is not None)
    best = TUNER.choose(key, cands, lambda c: run(c, x2, weight, bias), x.device)
    return run(best, x2, weight, bias).reshape(*lead, n)


def bench(shapes: list[tuple[int, int, int]] | None = None, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Time cuBLAS and every tiling on ``(M, N, K)`` shapes (default: Llama-3.2-1B decode, merged and not)."""
    from kiln.backends.triton.timing import gpu_time_ms
    from kiln.ops import gemv_reference

    shapes = shapes or [(1, 2048, 2048), (1, 512, 2048), (1, 3072, 2048), (1, 8192, 2048), (1, 16384, 2048),
                        (1, 2048, 8192), (1, 128256, 2048), (4, 3072, 2048)]  # fmt: skip
    rows = []
    for m, n, k in shapes:
        # rotate weight copies past the 50 MB L2 so each call streams its weight from DRAM
        copies = max(2, -(-200 * 2**20 // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(copies)]
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = gemv_reference(x, ws[0], None)
        for c in candidates(m, n, k):
            i = [0]

            def call(c: Candidate = c, x: torch.Tensor = x, ws: list = ws, i: list = i) -> torch.Tensor:
                i[0] = (i[0] + 1) % len(ws)
                return run(c, x, ws[i[0]], None)

            try:
                got = run(c, x, ws[0], None)
                err = float((got.float() - ref.float()).norm() / ref.float().norm())
                ms = gpu_time_ms(call, reps=40, flush=False)  # the rotation leaves L2 cold
            except Exception as e:  # noqa: BLE001 - a tiling this device cannot build is reported, not fatal
                rows.append({"shape": (m, n, k), "kernel": repr(c), "error": f"{type(e).__name__}: {str(e)[:80]}"})
                continue
            gbs = (n * k + m * k + m * n) * 2 / (ms * 1e-3) / 1e9
            rows.append({"shape": (m, n, k), "kernel": repr(c), "us": ms * 1e3, "GB/s": gbs, "rel_err": err})
            print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    bench()

__all__ = [
    "DISPATCH_M",
    "MAX_M",
    "SKINNY_MAX_M",
    "SKINNY_ROWS",
    "TUNER",
    "bench",
    "candidates",
    "gemv",
    "launch",
    "launch_skinny",
    "skinny_candidates",
    "skinny_split",
]
