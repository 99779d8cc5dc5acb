"""Benchmark kiln's paged decode attention (split-K flash-decoding) against bandwidth and a contiguous cache.

One query token per sequence over a block-paged KV cache (random, non-contiguous block
tables), Llama-3-8B heads (Hq 32, Hkv 8, D 128), bf16, context 1k..32k, batch 1..64: the
decode step of issue #6. For each shape it reports:

- kiln time per call and effective bandwidth: bytes of K/V read plus q read and out written,
  over the time; "% copy" against the measured copy bandwidth of the device (a torch copy of
  a 2 GiB tensor, bytes read + written);
- the same attention over a *contiguous* cache (B, Hkv, T, D) with a (B, Hq, 1, D) query:
  torch SDPA flash / cuDNN / efficient, and ``flash_attn.flash_attn_with_kvcache`` when that
  package is installed; "vs best" = best contiguous time / kiln time (> 1: kiln faster).

Timing: every function is captured in a CUDA graph that calls it round-robin over enough
copies of its inputs to exceed twice the L2 cache, then replayed; the per-call time thus
excludes Python and launch overhead and reads K/V from HBM, not L2 (a decode step reads other
layers' weights between attention calls). "eager" is ``triton.testing.do_bench`` of kiln's
Python call (launch overhead included), for reference. Needs CUDA.

    python benchmarks/decode_attention.py                              # the full grid
    python benchmarks/decode_attention.py --contexts 4096 32768 --batches 1 8
    python benchmarks/decode_attention.py --sweep-splits               # tune decode_num_splits
"""

from __future__ import annotations

import argparse
import math
import statistics
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


SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
TARGET_BW, TARGET_VS_CONTIGUOUS, TARGET_MIN_CONTEXT = 0.70, 0.90, 4096  # issue #6


# ----------------------------------------------------------------------------- timing


def time_graph(calls: list[Callable[[], object]], reps: int = 20) -> float:
    """Median ms per call of ``calls`` run round-robin inside one CUDA graph (see the module docstring)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (and autotune) outside the capture
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    rounds = max(1, math.ceil(32 / len(calls)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for f in calls:
                f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / (rounds * len(calls)))
    return statistics.median(times)


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device copy bandwidth in GB/s: bytes read plus bytes written by ``dst.copy_(src)``."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_graph([lambda: dst.copy_(src)])
    return 2 * n / ms * 1e-6


def l2_bytes() -> int:
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))


# ----------------------------------------------------------------------------- one shape


class Shape:
    """A decode batch: ``copies`` independent caches/queries so the timed working set exceeds L2."""

    def __init__(self, args: argparse.Namespace, b: int, ctx: int, copies: int) -> None:
        hq, hkv, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        blocks_per_seq = -(-ctx // bs)
        self.b, self.ctx = b, ctx
        self.caches, self.tables, self.qs, self.outs = [], [], [], []
        for _ in range(copies):
            nb = b * blocks_per_seq
            self.caches.append(torch.randn(2, nb, bs, hkv, d, dtype=dtype, device="cuda"))
            perm = torch.randperm(nb, device="cuda").to(torch.int32)
            self.tables.append(perm.view(b, blocks_per_seq))  # (B, blocks): random, non-contiguous
            self.qs.append(torch.randn(1, hq, b, d, dtype=dtype, device="cuda"))  # (1, Hq, T=B, D)
            self.outs.append(torch.empty(1, hq, b, d, dtype=dtype, device="cuda"))
        self.seq_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        elt = self.caches[0].element_size()
        self.bytes = 2 * b * ctx * hkv * d * elt + 2 * b * hq * d * elt  # K/V read + q read + out written

    def contiguous(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copy ``i`` as SDPA inputs: q (B, Hq, 1, D), K/V (B, Hkv, ctx, D) contiguous."""
        cache, table = self.caches[i], self.tables[i].long()
        k, v = (cache[j][table].flatten(1, 2)[:, : self.ctx].transpose(1, 2).contiguous() for j in (0, 1))
        return self.qs[i][0].transpose(0, 1).unsqueeze(2), k, v


def kiln_calls(shape: Shape, num_splits: int | None) -> list[Callable[[], object]]:
    from kiln.backends.triton.paged_attention import paged_decode_attention

    return [
        lambda i=i: paged_decode_attention(
            shape.qs[i],
            shape.caches[i],
            shape.tables[i],
            shape.seq_lens,
            num_splits=num_splits,
            max_seq_len=shape.ctx,
            out=shape.outs[i],
        )  # fmt: skip
        for i in range(len(shape.caches))
    ]


def baseline_calls(name: str, q: list, k: list, v: list) -> list[Callable[[], object]]:
    """Contiguous-cache attention closures for one baseline; raises if it cannot run this shape."""
    if name == "flash_attn":
        from flash_attn import flash_attn_with_kvcache  # (B, T, H, D) layouts

        qs = [x.transpose(1, 2) for x in q]
        ks, vs = [x.transpose(1, 2) for x in k], [x.transpose(1, 2) for x in v]
        return [lambda i=i: flash_attn_with_kvcache(qs[i], ks[i], vs[i]) for i in range(len(q))]
    backend = SDPA_BACKENDS[name]

    def call(i: int) -> torch.Tensor:
        with sdpa_kernel(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return F.scaled_dot_product_attention(q[i], k[i], v[i], enable_gqa=True)

    call(0)  # raises when the backend declines the shape (e.g. no native GQA)
    return [lambda i=i: call(i) for i in range(len(q))]


def bench_shape(args: argparse.Namespace, b: int, ctx: int, copy_bw: float) -> dict:
    import triton.testing

    from kiln.backends.triton.paged_attention import decode_num_splits, paged_decode_attention_reference

    probe = 2 * b * ctx * args.kv_heads * args.head_dim * 2
    copies = max(1, min(64, math.ceil(2 * l2_bytes() / probe)))
    shape = Shape(args, b, ctx, copies)
    splits = decode_num_splits(
        b, args.kv_heads, ctx, torch.cuda.get_device_properties(0).multi_processor_count
    )
    row: dict = {"B": b, "ctx": ctx, "splits": splits, "copies": copies}
    calls = kiln_calls(shape, None)
    calls[0]()
    torch.cuda.synchronize()
    if b * ctx <= 65536:  # the per-sequence reference is slow: small shapes only
        ref = paged_decode_attention_reference(shape.qs[0], shape.caches[0], shape.tables[0], shape.seq_lens)
        row["err"] = (shape.outs[0].float() - ref.float()).abs().max().item()
    row["kiln"] = time_graph(calls, args.reps)
    row["eager"] = triton.testing.do_bench(calls[0], rep=args.rep_ms)
    row["bw"] = shape.bytes / row["kiln"] * 1e-6
    row["pct_copy"] = row["bw"] / copy_bw
    if args.sweep_splits:
        row["sweep"] = {n: time_graph(kiln_calls(shape, n), args.reps) for n in (1, 2, 4, 8, 16, 32, 64)}
    cont = [shape.contiguous(i) for i in range(copies)]
    q, k, v = ([c[j] for c in cont] for j in range(3))
    kiln_out = shape.outs[0][0].transpose(0, 1).unsqueeze(2)  # (B, Hq, 1, D)
    for name in args.baselines:
        try:
            fn = baseline_calls(name, q, k, v)
            o = fn[0]()
            o = o.transpose(1, 2) if name == "flash_attn" else o
            row[name + "_diff"] = (o.float() - kiln_out.float()).abs().max().item()
            row[name] = time_graph(fn, args.reps)
        except Exception as e:  # backend unavailable for this shape / build: a dash in the table
            row[name] = None
            row[name + "_why"] = type(e).__name__
    del shape, cont, q, k, v
    torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- report


def print_table(rows: list[dict], args: argparse.Namespace, copy_bw: float) -> None:
    cols = ["B", "ctx", "splits", "kiln us", "eager us", "GB/s", "% copy"]
    cols += [f"{n} us" for n in args.baselines] + ["vs best", "max diff", "err vs ref"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [
            str(r["B"]),
            str(r["ctx"]),
            str(r["splits"]),
            f"{1e3 * r['kiln']:.1f}",
            f"{1e3 * r['eager']:.1f}",
        ]
        cells += [f"{r['bw']:.0f}", f"{100 * r['pct_copy']:.0f}%"]
        cells += ["—" if r.get(n) is None else f"{1e3 * r[n]:.1f}" for n in args.baselines]
        best = min((r[n] for n in args.baselines if r.get(n) is not None), default=None)
        r["vs_best"] = None if best is None else best / r["kiln"]
        cells.append("—" if best is None else f"{r['vs_best']:.2f}x")
        diffs = [r[n + "_diff"] for n in args.baselines if n + "_diff" in r]
        cells.append("—" if not diffs else f"{max(diffs):.1e}")
        cells.append("—" if "err" not in r else f"{r['err']:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(
        f"copy bandwidth: {copy_bw:.0f} GB/s. vs best = best contiguous-cache time / kiln time (> 1: kiln faster)."
    )
    if args.sweep_splits:
        print("\nnum_splits sweep (us per call; * = the heuristic's choice):")
        for r in rows:
            best_n = min(r["sweep"], key=r["sweep"].get)
            cells = [f"{n}:{1e3 * t:.1f}{'*' if n == r['splits'] else ''}" for n, t in r["sweep"].items()]
            print(f"  B={r['B']:3d} ctx={r['ctx']:6d}  best {best_n:2d}  " + "  ".join(cells))
    long = [r for r in rows if r["ctx"] >= TARGET_MIN_CONTEXT]
    if long:
        min_bw = min(r["pct_copy"] for r in long)
        vs = [r["vs_best"] for r in long if r["vs_best"] is not None]
        vs_text = (
            f"{'PASS' if min(vs) >= TARGET_VS_CONTIGUOUS else 'FAIL'} (min {min(vs):.2f}x)"
            if vs
            else "no baseline ran"
        )
        print(
            f"\nissue #6 targets at ctx >= {TARGET_MIN_CONTEXT}: bandwidth >= {TARGET_BW:.0%} of copy: "
            f"{'PASS' if min_bw >= TARGET_BW else 'FAIL'} (min {min_bw:.0%}); "
            f">= {TARGET_VS_CONTIGUOUS}x the best contiguous-cache kernel: {vs_text}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument(
        "--baselines", nargs="*", default=["flash", "cudnn", "efficient", "flash_attn"],
        choices=[*SDPA_BACKENDS, "flash_attn"],
    )  # fmt: skip
    p.add_argument("--reps", type=int, default=20, help="graph replays per measurement (median taken)")
    p.add_argument("--rep-ms", type=int, default=50, help="do_bench target time for the eager column, ms")
    p.add_argument("--sweep-splits", action="store_true", help="also time num_splits = 1, 2, 4, ..., 64")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    torch.manual_seed(0)
    print(
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
        f"{args.dtype}  Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} block_size={args.block_size}"
    )
    copy_bw = copy_bandwidth()
    torch.cuda.empty_cache()
    shapes = [(b, c) for b in args.batches for c in args.contexts]
    rows = [bench_shape(args, b, c, copy_bw) for b, c in tqdm(shapes, desc="shapes")]
    print_table(rows, args, copy_bw)
    bad = [(r["B"], r["ctx"]) for r in rows if r.get("err", 0.0) > 5e-2]
    if bad:
        print(f"FAILED correctness on {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
