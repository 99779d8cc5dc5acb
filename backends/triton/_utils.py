"""Small helpers shared by kiln's Triton kernels: interpreter detection and device checks."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

_TRUE = {"1", "true", "yes", "on", "y"}


def interpret_mode() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a ``@triton.jit`` decorator runs, i.e. when a kernel
    module is imported, so a kernel module should call this once at import time, next to
    its decorators, and keep the answer.
    """
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def check_triton_device(kernel: str, interpreted: bool, *tensors: torch.Tensor) -> None:
    """Raise if ``tensors`` are not all on one device that the kernel can run on.

    CUDA tensors always can (compiled, or interpreted with host copies); CPU tensors only
    when the kernel module was imported with ``TRITON_INTERPRET=1`` (``interpreted``).
    Anything else is refused with a message saying what to do.
    """
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(f"{kernel}: all tensors must be on one device, got {names}")
    (device,) = devices
    if device.type == "cuda" or (device.type == "cpu" and interpreted):
        return
    raise RuntimeError(
        f"{kernel}: tensors are on {device}, but the Triton kernel needs CUDA tensors, or CPU "
        "tensors with TRITON_INTERPRET=1 set before the kernel module is imported"
    )


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_COUNTERS: dict[tuple[str, int], torch.Tensor] = {}
#: Outgrown counter buffers, kept alive: CUDA graphs captured while they were current still read them,
#: and freeing one would let a later capture reuse its memory under those graphs.
_RETIRED: list[torch.Tensor] = []


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters, one buffer per (device, stream), of the split-K kernels that
    combine in their last-arriving split (the quantized GEMVs, paged attention).

    Every launch leaves the counters it used at zero (the last split of a tile resets its own),
    so launches queued on one stream share a buffer; another stream gets its own. A buffer made
    while a CUDA graph is captured is zeroed by the graph (the capture records the memset).
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


@triton.jit
def round_to(v, dt: tl.constexpr):
    """fp32 ``v`` rounded to ``dt`` (to nearest, ties to even), as fp32: what torch's 16-bit ops store.

    bf16 by its bits, because the interpreter's bf16 cast truncates where the GPU's rounds; this is
    the GPU's rounding everywhere, so interpreted tests can compare kernels with torch exactly.
    """
    if dt == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    elif dt == tl.float32:
        return v
    else:
        return v.to(dt).to(tl.float32)


# ------------------------------------------------------------ programmatic dependent launch
#: Launch the step graph's kernels with programmatic dependent launch (PDL, Hopper and later): each
#: kernel lets the next one start as soon as all its own programs run (``griddepcontrol.launch_dependents``),
#: and the next one reads its constant operands (a GEMV's weight tiles) before it waits for the first one's
#: results (``griddepcontrol.wait``). In a CUDA graph of hundreds of short kernels this hides each launch's
#: ramp behind the previous kernel's tail: on an H100 the 1B decode step goes from 1.329 to 1.283 ms
#: (1.381 -> 1.341 in a second pair), and a chain of 64 GEMVs from 0.807 to 0.725 ms (benchmarks/RESULTS.md).
#: On by default; ``KILN_PDL=0`` turns it off. Set before the kernels are first launched (and before CUDA
#: graphs are captured). Only weights are read before the wait:
#: the bf16 GEMV's (``kiln::gemv``, whose weight ``lower-decode-linears`` takes from the graph's constants)
#: and the quantized GEMVs' packed codes and scales; a weight that an earlier kernel computes must not reach
#: them with PDL on.
PDL = os.environ.get("KILN_PDL", "1").strip().lower() in _TRUE
#: PDL for the quantized GEMVs as well (``quant_gemm``; ``KILN_QUANT_PDL=0`` turns it off). With the next
#: kernel released after their K loop, the int4 llama-8b decode step took 3.176 ms on an H100 against 3.455
#: without PDL and 3.254 released at their start (benchmarks/RESULTS.md, session 12; CUDA tests pass with it).
QUANT_PDL = os.environ.get("KILN_QUANT_PDL", "1").strip().lower() in _TRUE


def pdl_enabled(device: torch.device, interpreted: bool) -> bool:
    """Whether kernels on ``device`` launch with PDL: :data:`PDL`, compiled (not interpreted), sm_90 or later."""
    return PDL and not interpreted and device.type == "cuda" and _major(device.index) >= 9


@functools.cache
def _major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


@triton.jit
def pdl_release(USE_PDL: tl.constexpr):
    """Let the next kernel on the stream launch now (it waits in :func:`pdl_wait` for this one's results)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait until the previous kernel on the stream has finished and its writes are visible.

    Everything after this may read what earlier kernels wrote and write what they read; only
    constant operands (weights) may be loaded before it.
    """
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
