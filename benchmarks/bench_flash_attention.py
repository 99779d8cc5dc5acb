"""Benchmark kiln's Triton flash attention (FlashAttention-2 forward) against torch SDPA backends.

Causal prefill, GQA (32 query heads, 8 KV heads), head dim 128, bfloat16, batch 1..8 and
sequence length 512..8192: Llama-3-8B attention shapes. Each row is checked against the
plain-torch reference before it is timed. Needs CUDA.

    python benchmarks/bench_flash_attention.py                     # default shape grid
    python benchmarks/bench_flash_attention.py --shapes 1x4096 8x1024 --mask both
    python benchmarks/bench_flash_attention.py --sweep             # time explicit tile configs

TFLOP/s counts the two matmuls, 4 * B * Hq * Tq * Tk * D, halved for causal masks (the
convention of the FlashAttention papers). "% peak" is against --peak (default 750 TFLOP/s,
about what a dense bf16 matmul reaches on an H100 SXM). "vs flash" is SDPA-flash time over
kiln time: above 1 means kiln is faster.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety

    def tqdm(it, **_kw):  # type: ignore[no-redef]
        return it


DEFAULT_SHAPES = [
    "1x512",
    "1x1024",
    "1x2048",
    "1x4096",
    "1x8192",
    "2x4096",
    "4x2048",
    "8x512",
    "8x1024",
    "8x2048",
]
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
MATH_MAX_BYTES = 24e9  # the math backend materializes (B, H, T, T) scores; skip beyond this


def attention_flops(b: int, h: int, tq: int, tk: int, d: int, causal: bool) -> float:
    return 4.0 * b * h * tq * tk * d * (0.5 if causal else 1.0)


def check_against_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, causal: bool
) -> float:
    """Max |out - reference|, computed one (batch, KV head) group at a time to bound memory."""
    from kiln.backends.triton.flash_attention import attention_reference

    b, hq = q.shape[:2]
    hkv = k.shape[1]
    g = hq // hkv
    worst = 0.0
    for bi in range(b):
        for kh in range(hkv):
            sl = slice(kh * g, (kh + 1) * g)
            ref = attention_reference(
                q[bi : bi + 1, sl], k[bi : bi + 1, kh : kh + 1], v[bi : bi + 1, kh : kh + 1], causal=causal
            )  # (1, g, T, D)
            worst = max(worst, (out[bi : bi + 1, sl].float() - ref.float()).abs().max().item())
    return worst


def sdpa_fn(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[Callable, str]:
    """A timed closure for one SDPA backend, GQA native if it can, else K/V repeated beforehand."""
    backend = SDPA_BACKENDS[name]

    def native() -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    try:
        with warnings.catch_warnings():  # SDPA warns for each backend that declines GQA
            warnings.simplefilter("ignore")
            native()
        return native, ""
    except RuntimeError:
        pass
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, Hq, T, D), not timed

    def repeated() -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=causal)

    repeated()  # raises if this backend cannot run the shape at all
    return repeated, "*"


def bench_one(args: argparse.Namespace, b: int, t: int, causal: bool) -> dict:
    import functools

    import triton.testing

    from kiln.backends.triton import flash_attention as fa

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    torch.manual_seed(0)
    q = torch.randn(b, hq, t, d, device="cuda", dtype=dtype)  # (B, Hq, T, D)
    k = torch.randn(b, hkv, t, d, device="cuda", dtype=dtype)  # (B, Hkv, T, D)
    v = torch.randn(b, hkv, t, d, device="cuda", dtype=dtype)
    row: dict = {"B": b, "T": t, "causal": causal}

    out = fa.flash_attention(q, k, v, causal=causal)  # autotunes for this shape, outside the timing
    torch.cuda.synchronize()
    best = getattr(fa._attn_fwd, "best_config", None)
    row["config"] = (
        f"{best.kwargs['BLOCK_M']}x{best.kwargs['BLOCK_N']} w{best.num_warps} s{best.num_stages}"
        if best
        else "?"
    )
    if not args.no_check:
        row["err"] = check_against_reference(q, k, v, out, causal)
    flops = attention_flops(b, hq, t, t, d, causal)
    ms = triton.testing.do_bench(functools.partial(fa.flash_attention, q, k, v, causal=causal), rep=args.rep)
    row["kiln"] = ms
    row["tflops"] = flops / ms * 1e-9
    for name in args.sdpa:
        if name == "math" and b * hq * t * t * 4 * 3 > MATH_MAX_BYTES:
            row[name] = None
            continue
        try:
            fn, note = sdpa_fn(name, q, k, v, causal)
            if name == "flash" and not args.no_check:
                row["flash_diff"] = (fn().float() - out.float()).abs().max().item()
            row[name] = triton.testing.do_bench(fn, rep=args.rep)
            row[name + "_note"] = note
        except Exception as e:  # backend unavailable for this shape / build: a dash in the table
            row[name] = None
            row[name + "_note"] = type(e).__name__
        torch.cuda.empty_cache()
    del q, k, v, out
    torch.cuda.empty_cache()
    return row


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    cols = ["B", "T", "mask", "kiln ms", "TFLOP/s", "% peak"]
    cols += [f"{n} ms" for n in args.sdpa] + ["vs flash", "err vs ref", "diff vs flash", "config"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r["B"]), str(r["T"]), "causal" if r["causal"] else "full"]
        cells += [f"{r['kiln']:.3f}", f"{r['tflops']:.0f}", f"{100 * r['tflops'] / args.peak:.0f}%"]
        for n in args.sdpa:
            cells.append("—" if r.get(n) is None else f"{r[n]:.3f}{r.get(n + '_note', '')}")
        cells.append("—" if r.get("flash") is None else f"{r['flash'] / r['kiln']:.2f}x")
        cells.append("—" if "err" not in r else f"{r['err']:.1e}")
        cells.append("—" if "flash_diff" not in r else f"{r['flash_diff']:.1e}")
        cells.append(r["config"])
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print("* = SDPA backend without native GQA: K/V repeated to Hq heads before timing (not counted).")


def _launch_tile(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, tile: tuple) -> None:
    """Run the raw (un-autotuned) kernel with one explicit (BLOCK_M, BLOCK_N, warps, stages) tile."""
    import triton

    from kiln.backends.triton import flash_attention as fa
    from kiln.backends.triton._utils import next_power_of_2

    bm, bn, w, s = tile
    b, hq, t, d = q.shape  # (B, Hq, T, D)
    fa._attn_fwd.fn[(triton.cdiv(t, bm), hq, b)](
        q, k, v, out, q, q,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        t, t, hq // k.shape[1], d**-0.5 * fa._LOG2E, next_power_of_2(t), next_power_of_2(t),
        HEAD_DIM=d, HEAD_DIM_PAD=d, IS_CAUSAL=True, IS_VARLEN=False, DOT_PRECISION="tf32",
        UPCAST_DOT=False, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s,
    )  # fmt: skip


def sweep(args: argparse.Namespace) -> None:
    """Time explicit tiles on two causal shapes, bypassing autotune, to choose the autotune list."""
    import functools

    import triton.testing

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    tiles = [
        (bm, bn, w, s)
        for bm, bn in [(128, 64), (128, 128), (64, 64), (64, 128)]
        for w in (4, 8)
        for s in (2, 3, 4)
    ]
    for b, t in [(1, 8192), (4, 2048)]:
        q = torch.randn(b, hq, t, d, device="cuda", dtype=dtype)  # (B, Hq, T, D)
        k = torch.randn(b, hkv, t, d, device="cuda", dtype=dtype)  # (B, Hkv, T, D)
        v = torch.randn(b, hkv, t, d, device="cuda", dtype=dtype)
        out = torch.empty_like(q)
        flops = attention_flops(b, hq, t, t, d, True)
        results = []
        for tile in tqdm(tiles, desc=f"sweep B={b} T={t}"):
            try:
                ms = triton.testing.do_bench(
                    functools.partial(_launch_tile, q, k, v, out, tile), rep=args.rep
                )
                results.append((flops / ms * 1e-9, tile))
            except Exception as e:  # out of resources and the like: report and go on
                print(f"  tile {tile}: {type(e).__name__}: {str(e)[:120]}")
        for tf, (bm, bn, w, s) in sorted(results, reverse=True):
            print(f"  B={b} T={t} BM={bm:3d} BN={bn:3d} warps={w} stages={s}: {tf:6.0f} TFLOP/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxT pairs (default: %(default)s)")
    p.add_argument("--mask", choices=["causal", "full", "both"], default="causal")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument(
        "--sdpa", nargs="*", default=["flash", "efficient", "cudnn", "math"], choices=list(SDPA_BACKENDS)
    )
    p.add_argument("--rep", type=int, default=100, help="do_bench target time per measurement, ms")
    p.add_argument("--peak", type=float, default=750.0, help="TFLOP/s taken as 100%%")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against the reference")
    p.add_argument("--sweep", action="store_true", help="time explicit tile configs instead")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_flash_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    print(
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
        f"dtype {args.dtype}  Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim}"
    )
    if args.sweep:
        sweep(args)
        return 0
    masks = {"causal": [True], "full": [False], "both": [True, False]}[args.mask]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    rows = [bench_one(args, b, t, c) for c in masks for b, t in tqdm(shapes, desc="shapes")]
    print_table(rows, args)
    bad = [r for r in rows if r.get("err", 0.0) > 5e-2]
    if bad:
        print(f"FAILED correctness on {[(r['B'], r['T']) for r in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
