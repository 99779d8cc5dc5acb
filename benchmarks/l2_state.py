"""What the L2 holds when a decode GEMV starts, and what that does to its measured time (issues #6, #7, #10).

A benchmark that flushes the L2 between calls decides the state the timed kernel starts from. Zeroing a
large buffer (the tuners' and ``quant_gemm.py``'s method until session 15) leaves the L2 full of *dirty*
lines: every miss of the timed kernel first writes one back, so a GEMV that reads N bytes moves up to 2N.
Inside a decode step the kernel before a GEMV read other weights, so the L2 holds *clean* lines. This script
times the same kernels three ways, side by side in one process:

- ``write``: ``gpu_time_ms(..., flush_by="write")``, 256 MB zeroed before each call (the old method);
- ``read``: ``gpu_time_ms(..., flush_by="read")``, 256 MB read by a reduction before each call (the new default);
- ``rotate``: a CUDA graph of calls over distinct weight copies (>= 256 MB in all, each call's weight cold in
  the L2, no flush at all), its replay's GPU time over the number of calls: a decode step's situation.

For cuBLAS bf16 and kiln's int4-g128 and int8 GEMVs at M = 1 on Llama-3-8B's projection shapes, it prints the
time under each method and the quantized/bf16 ratio under each (the tuner picks its kernel once, under the
default flush; all three methods time that kernel).

    python benchmarks/l2_state.py                   # H100: three shapes (about a minute)
    python benchmarks/l2_state.py --shapes 4096x4096
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROTATE_BYTES = 256 * 2**20  # weight bytes a rotation cycles through (5x the H100's 50 MB L2)


def rotate_ms(calls: list[Callable[[], object]]) -> float:
    """GPU ms per call of a CUDA graph that runs ``calls`` once each (distinct weights: nothing to flush)."""
    import torch

    from kiln.backends.triton.timing import gpu_time_ms

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    return gpu_time_ms(graph.replay, reps=20, flush=False) / len(calls)


def shape_lines(k: int, n: int, gen: object) -> list[str]:
    """The table's rows for one (K, N): bf16, int4-g128 and int8 under the three methods."""
    import torch
    from quant_gemm import quantized_weights, weight_bytes

    from kiln.backends.triton.timing import gpu_time_ms

    ops = torch.ops.kiln
    x = torch.randn(1, k, generator=gen, device="cuda").to(torch.bfloat16)

    def weight() -> torch.Tensor:
        return (torch.randn(n, k, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)

    ws = [weight() for _ in range(max(2, -(-ROTATE_BYTES // (2 * n * k))))]
    # as many quantized copies as int4 codes take ROTATE_BYTES (int8's are twice that)
    qs = [
        quantized_weights(weight(), SimpleNamespace(quick=False))
        for _ in range(max(2, -(-ROTATE_BYTES // (n * k // 2))))
    ]
    variants = {
        "bf16": ("bf16", [lambda w=w: torch.matmul(x, w.t()) for w in ws]),
        "int4-g128": ("int4", [lambda q=q: ops.qlinear_w4a16(x, *q["int4"], None) for q in qs]),
        "int8 (w8a16)": (
            "int8",
            [lambda q=q: ops.qlinear_w8a16(x, *q["int8"], None, None, None) for q in qs],
        ),
    }
    lines, base = [], {}
    for variant, (kind, fns) in variants.items():
        # the first (untimed) call of gpu_time_ms is where the tuner picks its kernel (default flush); every
        # method then times that one
        times = {
            "write": gpu_time_ms(fns[0], reps=50, flush_by="write") * 1e3,
            "read": gpu_time_ms(fns[0], reps=50, flush_by="read") * 1e3,
            "rotate": rotate_ms(fns) * 1e3,
        }
        nbytes = weight_bytes(kind, n, k, 128) + 2 * (k + n)
        base = base or times
        ratios = " | ".join(f"{base[m] / times[m]:.2f}x" for m in ("write", "read", "rotate"))
        lines.append(f"| ({k}, {n}) | {variant} | {nbytes / 1e6:.1f} | {times['write']:.1f} | {times['read']:.1f} | "
                     f"{times['rotate']:.1f} | {nbytes / times['rotate'] / 1e6:.2f} | {ratios} |")  # fmt: skip
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="K x N, comma separated")
    args = p.parse_args()
    import torch
    import triton

    import kiln  # noqa: F401  (registers the CUDA kernels)

    if not torch.cuda.is_available():
        print("l2_state.py needs a CUDA GPU")
        return 1
    print(f"# l2_state: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"Python {platform.python_version()}")  # fmt: skip
    print(
        "| (K, N), M = 1 | variant | MB | write us | read us | rotate us | rotate TB/s | vs bf16: write | read | rotate |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for line in shape_lines(k, n, gen):
            print(line, flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
