"""Every split-K GEMV tile on the decode shapes (issue #7): int4-g128 and int8 per channel at M = 1, on a GPU.

``benchmarks/quant_gemm.py`` reports the kernel the tuner picks from its short list (``GEMV_TILES`` in
``kiln.backends.triton.quant_gemm_tune``); this script times a wider grid of GEMV candidates (tile, waves,
K steps in flight, ``XPRE``, warps) on Llama-3-8B's projection shapes, each checked against
the plain-torch reference first (relative error <= 2e-2 of the largest output), each timed as the tuner
times it (``gpu_time_ms``: GPU time from a cold L2, every call queued ahead), beside cuBLAS's bf16 GEMV.
It prints the ten fastest per shape and the best with each option on and off: what to put in the list.

    python benchmarks/quant_gemv_sweep.py --int4-only --shapes 4096x4096 --tiles 128x16,64x16   # about a minute
    python benchmarks/quant_gemv_sweep.py     # the default grid: ~130 compiled variants, several minutes

Compiling dominates (each variant ~1-3 s, shared by the shapes); run a larger grid in parts (``--tiles``).
"""

from __future__ import annotations

import argparse
import itertools
import sys


def candidates(tiles: list[tuple[int, int]], waves: tuple[int, ...], packed: tuple[bool, ...] = (False,)) -> list:
    """GEMV candidates: every tile x waves x ``XPRE`` x steps in flight (1 or 2 in registers, or 2 / 3 by
    Triton's cp.async pipeliner: ``DEPTH`` 0 with ``STAGES`` 3 / 4) x ``packed`` (int4 words summed in bf16x2),
    8 warps too on the larger tiles."""
    from kiln.backends.triton.quant_gemm_tune import Candidate

    out = []
    for (bn, bkw), wv, (depth, stages), xpre, pk in itertools.product(
        tiles, waves, ((1, 1), (2, 1), (0, 3), (0, 4)), (False, True), packed
    ):
        for warps in (4, 8) if bn * bkw >= 2048 else (4,):
            out.append(Candidate("gemv", dict(BLOCK_N=bn, BLOCK_KW=bkw, num_warps=warps, WAVES=wv, PRMT=True,
                                              DEPTH=depth, XPRE=xpre, STAGES=stages, PACKED=pk)))  # fmt: skip
    return out


def bf16_us(x, n: int) -> float:  # type: ignore[no-untyped-def]
    """cuBLAS's bf16 GEMV of ``x`` by a random (n, K) weight, GPU microseconds."""
    import torch

    from kiln.backends.triton.timing import gpu_time_ms

    wb = torch.randn(n, x.shape[1], device="cuda", dtype=torch.bfloat16)
    return gpu_time_ms(lambda: x @ wb.t(), reps=50) * 1e3


def int4_case(k: int, n: int, tiles: list[tuple[int, int]], packed: tuple[bool, ...] = (False,)) -> None:
    import torch

    from kiln.backends.triton import quant_gemm as qg
    from kiln.quantize import ops as ref

    g = 128
    w = ref.pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda"))
    s = torch.rand(n, k // g, device="cuda") * 0.05 + 0.01
    z = torch.randint(0, 16, (n, k // g), dtype=torch.uint8, device="cuda")
    sweep("int4-g128", k, n, lambda x, c: qg.qlinear_w4a16(x, w, s, z, g, None, candidate=c),
          lambda x: ref.qlinear_w4a16_reference(x.float(), w, s, z, g, None), candidates(tiles, (2, 4), packed))  # fmt: skip


def int8_case(k: int, n: int, tiles: list[tuple[int, int]]) -> None:
    import torch

    from kiln.backends.triton import quant_gemm as qg
    from kiln.quantize import ops as ref

    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    s = torch.rand(n, device="cuda") * 0.01 + 1e-3
    sweep("int8 per channel", k, n, lambda x, c: qg.qlinear_w8a16(x, w, s, None, None, None, candidate=c),
          lambda x: ref.qlinear_w8a16_reference(x.float(), w, s, None, None, None), candidates(tiles, (4, 8)))  # fmt: skip


def sweep(label: str, k: int, n: int, run, reference, cands: list) -> None:  # type: ignore[no-untyped-def]
    import torch

    from kiln.backends.triton.timing import gpu_time_ms

    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    base = bf16_us(x, n)
    want = reference(x)
    scale = want.abs().max().item()
    from kiln.backends.triton.quant_gemm_tune import _unbuildable

    res = []
    for c in cands:
        try:
            err = (run(x, c).float() - want).abs().max().item() / scale
        except Exception as e:  # noqa: BLE001 - a tile this device cannot build is skipped, as the tuner does
            if not _unbuildable(e):
                raise
            print(f"  skipped {c}: {type(e).__name__}")
            continue
        if err > 2e-2:
            print(f"  WRONG {c}: relative error {err:.2e}")
            continue
        res.append((gpu_time_ms(lambda c=c: run(x, c), reps=30) * 1e3, c, err))
    if not res:
        print(f"\n{label} ({k} x {n}): no candidate ran correctly")
        return
    res.sort(key=lambda r: r[0])
    print(f"\n{label} ({k} x {n}), M = 1: cuBLAS bf16 {base:.1f} us; best GEMV {res[0][0]:.1f} us = "
          f"{base / res[0][0]:.2f}x ({len(res)} candidates)", flush=True)  # fmt: skip
    print("| us | vs bf16 | BLOCK_N | BLOCK_KW | warps | waves | depth | stages | XPRE | PACKED | rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for t, c, err in res[:10]:
        p = c.params
        print(f"| {t:.1f} | {base / t:.2f}x | {p['BLOCK_N']} | {p['BLOCK_KW']} | {p['num_warps']} | {p['WAVES']} | "
              f"{p['DEPTH']} | {p['STAGES']} | {p['XPRE']} | {p.get('PACKED', False)} | {err:.1e} |")  # fmt: skip
    for key in ("XPRE", "DEPTH", "PACKED"):
        for flag in sorted({r[1].params.get(key, False) for r in res}):
            sel = [r for r in res if r[1].params.get(key, False) == flag]
            if sel:
                print(f"best with {key}={flag}: {sel[0][0]:.1f} us ({sel[0][1]})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--int4-only", action="store_true")
    p.add_argument("--packed", action="store_true", help="int4: every candidate also in the packed (bf16x2) form")
    p.add_argument(
        "--shapes", default="4096x4096,4096x14336,14336x4096", help="KxN,... (int8: the first two)"
    )
    p.add_argument(
        "--tiles",
        default="8x64,16x64,32x32,64x16,64x32,128x16",
        help="int4 BLOCK_NxBLOCK_KW tiles (each tile: 16-64 compiled variants, ~1-3 s each)",
    )
    args = p.parse_args()
    import torch
    import triton

    if not torch.cuda.is_available():
        print("this sweep times GPU kernels: it needs a CUDA device", file=sys.stderr)
        return 2
    print(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")
    torch.manual_seed(0)
    shapes = [tuple(int(v) for v in kn.split("x")) for kn in args.shapes.split(",")]
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
    for k, n in shapes:  # the compiled variants are shared by the shapes: the first shape pays the compiles
        int4_case(k, n, tiles, (False, True) if args.packed else (False,))
    if not args.int4_only:
        for k, n in shapes[:2]:
            int8_case(k, n, [(16, 64), (32, 32), (32, 64)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
