"""cuBLAS against kiln's tensor-core skinny GEMM (``kiln::gemv`` past one row) on decode-batch and prefix-hit shapes.

``kiln::gemv`` sends a linear of 2..``SKINNY_MAX_M`` rows (a decode batch, a prompt chunk after a cached
prefix) to the faster of cuBLAS and ``skinny_gemm_kernel`` (``kiln.backends.triton.gemv``), timed per M
bucket and shape. This script times every candidate the tuner would, on the projections of the
Llama-3.2-1B step (M = 128: the prefix-cache hit of ``benchmarks/serving.py``) and of Llama-3.1-8B whole and
as a tensor-parallel rank of two (M = 64: ``benchmarks/parallel_shards.py``'s decode batch), each checked
against the plain-torch reference first. Each call streams its weight from DRAM: the calls rotate over
copies of the weight that together exceed the L2 cache, in one CUDA graph (no flush, no host launch time).

    python benchmarks/skinny_gemm.py                 # about a minute on an H100
    python benchmarks/skinny_gemm.py --rows 64 --shapes 4096x3072

The table: per shape and M, cuBLAS's time, the fastest skinny candidate's, their ratio (> 1: the
skinny kernel is faster) and both as a share of the copy bandwidth measured in the same process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_attention  # noqa: E402
from decode_attention import time_calls  # noqa: E402

# (K, N): Llama-3.2-1B's merged Q/K/V, o, merged gate/up, down; Llama-3.1-8B's, then one of its TP-2 ranks'
SHAPES = {
    "1b": [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048)],
    "8b": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
    "8b-tp2": [(4096, 3072), (2048, 4096), (4096, 14336), (7168, 4096)],
}
ROWS = {"1b": (64, 128), "8b": (64,), "8b-tp2": (64,)}


def copy_gbs() -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), GB/s."""
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_calls([lambda: b.copy_(a)], 20)
    return 2 * a.numel() / (ms * 1e-3) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=None, help="M values (default per model: see ROWS)")
    p.add_argument("--shapes", default=None, help="KxN,... (default: the 1B, 8B and 8B TP-2 projections)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("skinny_gemm.py needs a CUDA GPU (the kernels' CPU tests run under TRITON_INTERPRET=1)")
        return 1
    from kiln.backends.triton import gemv as gv
    from kiln.ops import gemv_reference

    decode_attention.CUDA, decode_attention.DEVICE = True, "cuda"  # time_calls: CUDA graphs, not the host loop

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    if args.shapes:
        cases = [("-", tuple(int(v) for v in s.split("x"))) for s in args.shapes.split(",")]
        rows_of = {"-": tuple(args.rows or (16, 64, 128))}
    else:
        cases = [(name, shape) for name, shapes in SHAPES.items() for shape in shapes]
        rows_of = {name: tuple(args.rows) if args.rows else ROWS[name] for name in SHAPES}
    bw = copy_gbs()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw:.0f} GB/s", flush=True)
    table = []
    for name, (k, n) in cases:
        copies = max(2, -(-256 * 2**20 // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(copies)]
        for m in rows_of[name]:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = gemv_reference(x, ws[0], None).float()
            times = {}
            for c in gv.skinny_candidates(m, n, k):
                try:
                    got = gv.run(c, x, ws[0], None).float()
                    err = ((got - ref).abs().max() / ref.abs().max()).item()
                    if err > 2e-2:
                        print(f"  {name} M={m} K={k} N={n} {c}: WRONG, max error {err:.2e}", flush=True)
                        continue
                    times[repr(c)] = time_calls([lambda w=w, c=c, x=x: gv.run(c, x, w, None) for w in ws], 20) * 1e3
                except Exception as e:  # noqa: BLE001 - a tiling this device cannot build is reported, not fatal
                    print(f"  {name} M={m} K={k} N={n} {c}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            cub = times.pop(repr(gv.Candidate("cublas")), float("nan"))
            best = min(times, key=times.get) if times else "-"
            us = times.get(best, float("nan"))
            gb = (n * k + m * k + m * n) * x.element_size() / 1e3  # bytes moved / 1e3: GB/s from us
            print(f"  {name} M={m} K={k} N={n}: cuBLAS {cub:.1f} us, skinny " + ", ".join(
                f"{t:.1f}" for t in sorted(times.values())) + f" (best {best})", flush=True)  # fmt: skip
            table.append((name, m, k, n, cub, us, cub / us, gb / cub / bw, gb / us / bw))
        del ws
    print("\n| model | M | K | N | cuBLAS us | skinny us | cuBLAS / skinny | cuBLAS % copy | skinny % copy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, m, k, n, cub, us, ratio, pc, ps in table:
        print(f"| {name} | {m} | {k} | {n} | {cub:.1f} | {us:.1f} | {ratio:.2f}x | {pc:.0%} | {ps:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
