"""Benchmark kiln's paged decode attention (split-K flash-decoding): bf16, int8 and fp8 caches.

One query token per sequence over a block-paged KV cache (random, non-contiguous block
tables), Llama-3-8B heads (Hq 32, Hkv 8, D 128), context 1k..32k, batch 1..64: the decode
step of issue #6, and the quantized caches of issue #7. For each shape it reports:

- kiln time per call with a bf16 cache and effective bandwidth: bytes of K/V read plus q
  read and out written, over the time; "% copy" against the measured copy bandwidth of the
  device (a torch copy of a 2 GiB tensor, bytes read + written);
- the same attention over a *contiguous* bf16 cache (B, Hkv, T, D) with a (B, Hq, 1, D)
  query: torch SDPA flash / cuDNN / efficient, and ``flash_attn.flash_attn_with_kvcache``
  when that package is installed; "vs best" = best contiguous time / kiln time (> 1: kiln faster);
- kiln over an int8 cache (a scale per token and KV head) and an fp8 e4m3 cache (static
  per-tensor k/v scales): time, effective bandwidth of the bytes they read (codes + scales),
  "% copy", and "vs bf16" = kiln bf16 time / quantized time (ideal: the byte ratio, 1.94x
  for int8 with fp32 scales at D 128, 2x for fp8).

Timing: every function is captured in a CUDA graph that calls it round-robin over enough
copies of its inputs to exceed twice the L2 cache, then replayed; the per-call time thus
excludes Python and launch overhead and reads K/V from HBM, not L2 (a decode step reads other
layers' weights between attention calls). "eager" is ``triton.testing.do_bench`` of kiln's
Python call (launch overhead included), for reference. Every kiln variant is checked against
its plain-torch reference on the shapes where the reference is cheap.

    python benchmarks/decode_attention.py                              # the full grid (H100)
    python benchmarks/decode_attention.py --contexts 4096 32768 --batches 1 8
    python benchmarks/decode_attention.py --sweep-splits               # tune decode_num_splits
    python benchmarks/decode_attention.py --quick                      # CPU: Triton interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
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
    "sdpa": None,  # the default dispatcher (the only one on the CPU)
}
VARIANTS = ("int8", "fp8", "fp8-per-token")  # quantized caches, beside the bf16 one
TARGET_BW, TARGET_VS_CONTIGUOUS, TARGET_MIN_CONTEXT = 0.70, 0.90, 4096  # issue #6
CUDA = False  # set in main


# ----------------------------------------------------------------------------- timing


def time_calls(calls: list[Callable[[], object]], reps: int = 20) -> float:
    """Median ms per call: replays of a CUDA graph of ``calls`` round-robin (GPU), else a host loop.

    ``reps`` replays (fewer, but at least 5, where they would take over 0.3 s).
    """
    if not CUDA:  # --quick: the interpreter; the figure only proves the path runs
        for f in calls:
            f()
        times = []
        for _ in range(max(1, reps // 10)):
            t0 = time.perf_counter()
            for f in calls:
                f()
            times.append((time.perf_counter() - t0) * 1e3 / len(calls))
        return statistics.median(times)
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
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    reps = max(5, min(reps, math.ceil(300 / start.elapsed_time(end))))  # at most ~0.3 s per measurement
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / (rounds * len(calls)))
    return statistics.median(times)


def copy_bandwidth(gib: float) -> float:
    """Device copy bandwidth in GB/s: bytes read plus bytes written by ``dst.copy_(src)``."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_calls([lambda: dst.copy_(src)], reps=20)
    return 2 * n / ms * 1e-6


def l2_bytes() -> int:
    if not CUDA:
        return 0
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))


# ----------------------------------------------------------------------------- one shape


def _random_codes(variant: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random cache codes and scales of a quantized variant, made without a float copy of the cache."""
    if variant == "int8":
        codes = torch.empty(shape, dtype=torch.int8, device=DEVICE).random_(-127, 128)
        return codes, torch.rand(shape[:4], device=DEVICE) * 0.02 + 1e-3  # (2, blocks, page, Hkv) fp32
    # e4m3 bytes: magnitudes 0..0x7D (448 is 0x7E, 0x7F is NaN) with a random sign bit
    mag = torch.empty(shape, dtype=torch.uint8, device=DEVICE).random_(0, 0x7E)
    codes = (mag | (torch.empty_like(mag).random_(0, 2) << 7)).view(torch.float8_e4m3fn)
    del mag
    if variant == "fp8":
        return codes, torch.tensor([0.01, 0.01], device=DEVICE)  # static k/v scales
    return codes, torch.rand(shape[:4], device=DEVICE) * 0.02 + 1e-3


class Shape:
    """A decode batch: ``copies`` independent caches/queries so the timed working set exceeds L2."""

    def __init__(self, args: argparse.Namespace, b: int, ctx: int, copies: int) -> None:
        hq, hkv, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        blocks_per_seq = -(-ctx // bs)
        self.b, self.ctx, self.hq, self.hkv, self.d = b, ctx, hq, hkv, d
        self.cache_shape = (2, b * blocks_per_seq, bs, hkv, d)
        self.caches, self.tables, self.qs, self.outs = [], [], [], []
        for _ in range(copies):
            nb = b * blocks_per_seq
            self.caches.append(torch.randn(self.cache_shape, dtype=self.dtype, device=DEVICE))
            perm = torch.randperm(nb, device=DEVICE).to(torch.int32)
            self.tables.append(perm.view(b, blocks_per_seq))  # (B, blocks): random, non-contiguous
            self.qs.append(torch.randn(1, hq, b, d, dtype=self.dtype, device=DEVICE))  # (1, Hq, T=B, D)
            self.outs.append(torch.empty(1, hq, b, d, dtype=self.dtype, device=DEVICE))
        self.seq_lens = torch.full((b,), ctx, dtype=torch.int32, device=DEVICE)
        elt = self.caches[0].element_size()
        self.qo_bytes = 2 * b * hq * d * elt  # q read + out written
        self.bytes = 2 * b * ctx * hkv * d * elt + self.qo_bytes  # K/V read + q read + out written

    def quantized(self, variant: str) -> tuple[list, list, int]:
        """``copies`` random caches of ``variant``, their scales, and the bytes one call moves."""
        caches, scales = zip(*(_random_codes(variant, self.cache_shape) for _ in self.caches), strict=True)
        per_token = scales[0].dim() > 1
        kv = 2 * self.b * self.ctx * self.hkv * (self.d + (4 if per_token else 0))  # codes (+ fp32 scales)
        return list(caches), list(scales), kv + self.qo_bytes

    def contiguous(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copy ``i`` as SDPA inputs: q (B, Hq, 1, D), K/V (B, Hkv, ctx, D) contiguous."""
        cache, table = self.caches[i], self.tables[i].long()
        k, v = (cache[j][table].flatten(1, 2)[:, : self.ctx].transpose(1, 2).contiguous() for j in (0, 1))
        return self.qs[i][0].transpose(0, 1).unsqueeze(2), k, v


def kiln_calls(
    shape: Shape, num_splits: int | None, caches: list, scales: list | None
) -> list[Callable[[], object]]:
    from kiln.backends.triton.paged_attention import paged_decode_attention

    return [
        lambda i=i: paged_decode_attention(
            shape.qs[i],
            caches[i],
            shape.tables[i],
            shape.seq_lens,
            kv_scales=None if scales is None else scales[i],
            num_splits=num_splits,
            max_seq_len=shape.ctx,
            out=shape.outs[i],
        )  # fmt: skip
        for i in range(len(caches))
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if backend is None:
                return F.scaled_dot_product_attention(q[i], k[i], v[i], enable_gqa=True)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q[i], k[i], v[i], enable_gqa=True)

    call(0)  # raises when the backend declines the shape (e.g. no native GQA)
    return [lambda i=i: call(i) for i in range(len(q))]


def _ref_error(shape: Shape, cache: torch.Tensor, scales: torch.Tensor | None) -> float:
    from kiln.backends.triton.paged_attention import paged_decode_attention_reference

    ref = paged_decode_attention_reference(
        shape.qs[0], cache, shape.tables[0], shape.seq_lens, kv_scales=scales
    )
    return (shape.outs[0].float() - ref.float()).abs().max().item()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def bench_shape(args: argparse.Namespace, b: int, ctx: int, copy_bw: float) -> dict:
    from kiln.backends.triton.paged_attention import decode_num_splits

    probe = 2 * b * ctx * args.kv_heads * args.head_dim * 2
    copies = max(1, min(64, math.ceil(2 * l2_bytes() / probe)))
    shape = Shape(args, b, ctx, copies)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if CUDA else 4
    row: dict = {
        "B": b,
        "ctx": ctx,
        "splits": decode_num_splits(b, args.kv_heads, ctx, sms, args.head_dim),
        "copies": copies,
    }
    check = b * ctx <= args.check_limit  # the per-sequence reference is slow: small shapes only
    calls = kiln_calls(shape, None, shape.caches, None)
    calls[0]()
    _sync()
    if check:
        row["err"] = _ref_error(shape, shape.caches[0], None)
    row["kiln"] = time_calls(calls, args.reps)
    if CUDA:
        import triton.testing

        row["eager"] = triton.testing.do_bench(calls[0], rep=args.rep_ms)
    row["bw"] = shape.bytes / row["kiln"] * 1e-6
    row["pct_copy"] = row["bw"] / copy_bw
    if args.sweep_splits:
        row["sweep"] = {
            n: time_calls(kiln_calls(shape, n, shape.caches, None), args.reps)
            for n in (1, 2, 4, 8, 16, 32, 64)
        }
    for variant in args.variants:  # quantized caches: same queries, tables and lengths
        caches, scales, nbytes = shape.quantized(variant)
        vcalls = kiln_calls(shape, None, caches, scales)
        vcalls[0]()
        _sync()
        if check:
            row[f"{variant}_err"] = _ref_error(shape, caches[0], scales[0])
        t = time_calls(vcalls, args.reps)
        row[variant] = {"ms": t, "bw": nbytes / t * 1e-6, "pct_copy": nbytes / t * 1e-6 / copy_bw,
                        "vs_bf16": row["kiln"] / t}  # fmt: skip
        del caches, scales, vcalls
    calls[0]()  # the baselines compare with the bf16 output
    _sync()
    cont = [shape.contiguous(i) for i in range(copies)]
    q, k, v = ([c[j] for c in cont] for j in range(3))
    kiln_out = shape.outs[0][0].transpose(0, 1).unsqueeze(2)  # (B, Hq, 1, D)
    for name in args.baselines:
        try:
            fn = baseline_calls(name, q, k, v)
            o = fn[0]()
            o = o.transpose(1, 2) if name == "flash_attn" else o
            row[name + "_diff"] = (o.float() - kiln_out.float()).abs().max().item()
            row[name] = time_calls(fn, args.reps)
        except Exception as e:  # backend unavailable for this shape / build: a dash in the table
            row[name] = None
            row[name + "_why"] = type(e).__name__
    del shape, cont, q, k, v
    if CUDA:
        torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def print_table(rows: list[dict], args: argparse.Namespace, copy_bw: float) -> None:
    cols = ["B", "ctx", "splits", "kiln us", "eager us", "GB/s", "% copy"]
    cols += [f"{n} us" for n in args.baselines] + ["vs best", "max diff", "err vs ref"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r["B"]), str(r["ctx"]), str(r["splits"]), f"{1e3 * r['kiln']:.1f}"]
        cells += [
            _fmt(r.get("eager") and 1e3 * r["eager"], ".1f"),
            f"{r['bw']:.0f}",
            f"{100 * r['pct_copy']:.0f}%",
        ]
        cells += [_fmt(r.get(n) and 1e3 * r[n], ".1f") for n in args.baselines]
        best = min((r[n] for n in args.baselines if r.get(n) is not None), default=None)
        r["vs_best"] = None if best is None else best / r["kiln"]
        cells.append(_fmt(r["vs_best"], ".2f") + ("x" if best else ""))
        diffs = [r[n + "_diff"] for n in args.baselines if n + "_diff" in r]
        cells += [_fmt(max(diffs) if diffs else None, ".1e"), _fmt(r.get("err"), ".1e")]
        lines.append("| " + " | ".join(cells) + " |")
    print(f"\n{args.dtype} cache and q:\n" + "\n".join(lines))
    print(
        f"copy bandwidth: {copy_bw:.0f} GB/s. vs best = best contiguous-cache time / kiln time (> 1: kiln faster)."
    )
    if args.variants:
        cols = ["B", "ctx"] + [
            f"{v} {c}" for v in args.variants for c in ("us", "GB/s", "% copy", "vs bf16", "err")
        ]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            cells = [str(r["B"]), str(r["ctx"])]
            for v in args.variants:
                x = r[v]
                cells += [
                    f"{1e3 * x['ms']:.1f}",
                    f"{x['bw']:.0f}",
                    f"{100 * x['pct_copy']:.0f}%",
                    f"{x['vs_bf16']:.2f}x",
                ]
                cells.append(_fmt(r.get(f"{v}_err"), ".1e"))
            lines.append("| " + " | ".join(cells) + " |")
        print(f"\nquantized caches, {args.dtype} q (GB/s: codes + scales read; vs bf16 = kiln's time with the "
              f"{args.dtype} cache / this time):\n" + "\n".join(lines))  # fmt: skip
    if args.sweep_splits:
        print("\nnum_splits sweep, bf16 (us per call; * = the heuristic's choice):")
        for r in rows:
            best_n = min(r["sweep"], key=r["sweep"].get)
            cells = [f"{n}:{1e3 * t:.1f}{'*' if n == r['splits'] else ''}" for n, t in r["sweep"].items()]
            print(f"  B={r['B']:3d} ctx={r['ctx']:6d}  best {best_n:2d}  " + "  ".join(cells))
    long = [r for r in rows if r["ctx"] >= TARGET_MIN_CONTEXT] or rows
    print(f"\nsummary at ctx >= {TARGET_MIN_CONTEXT if long is not rows else 0} ({len(long)} shapes):")
    print("| cache | min % copy | median % copy | min vs bf16 | median vs bf16 | max vs bf16 |")
    print("|---|---|---|---|---|---|")
    pct = [r["pct_copy"] for r in long]
    print(
        f"| {args.dtype} | {100 * min(pct):.0f}% | {100 * statistics.median(pct):.0f}% | 1.00x | 1.00x | 1.00x |"
    )
    for v in args.variants:
        pct, vs = [r[v]["pct_copy"] for r in long], [r[v]["vs_bf16"] for r in long]
        print(f"| {v} | {100 * min(pct):.0f}% | {100 * statistics.median(pct):.0f}% | {min(vs):.2f}x | "
              f"{statistics.median(vs):.2f}x | {max(vs):.2f}x |")  # fmt: skip
    if CUDA and any(r["ctx"] >= TARGET_MIN_CONTEXT for r in rows):
        min_bw = min(r["pct_copy"] for r in long)
        vs = [r["vs_best"] for r in long if r["vs_best"] is not None]
        vs_text = (
            f"{'PASS' if min(vs) >= TARGET_VS_CONTIGUOUS else 'FAIL'} (min {min(vs):.2f}x)"
            if vs
            else "no baseline ran"
        )
        print(
            f"issue #6 targets at ctx >= {TARGET_MIN_CONTEXT}: bandwidth >= {TARGET_BW:.0%} of copy: "
            f"{'PASS' if min_bw >= TARGET_BW else 'FAIL'} (min {min_bw:.0%}); "
            f">= {TARGET_VS_CONTIGUOUS}x the best contiguous-cache kernel: {vs_text}"
        )


def main(argv: list[str] | None = None) -> int:
    global CUDA, DEVICE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="default 1k..32k (quick: 100)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 4 16 64 (quick: 1 3)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 32; quick 4)")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (default 8; quick 2)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim (default 128; quick 32)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="q dtype (default bf16)")
    p.add_argument("--variants", nargs="*", default=["int8", "fp8"], choices=list(VARIANTS),
                   help="quantized caches timed beside bf16 (int8: per-token scales; fp8: static per-tensor)")  # fmt: skip
    p.add_argument("--baselines", nargs="*", default=None, choices=list(SDPA_BACKENDS) + ["flash_attn"],
                   help="contiguous-cache baselines (default flash cudnn efficient flash_attn; quick sdpa)")  # fmt: skip
    p.add_argument(
        "--reps", type=int, default=20, help="graph replays per measurement (median taken; quick: 2 loops)"
    )
    p.add_argument("--rep-ms", type=int, default=50, help="do_bench target time for the eager column, ms")
    p.add_argument(
        "--sweep-splits", action="store_true", help="also time num_splits = 1, 2, 4, ..., 64 (bf16)"
    )
    p.add_argument(
        "--check-limit", type=int, default=65536, help="check against the reference when B*ctx <= this"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU: Triton's interpreter on tiny shapes, proves the script runs",
    )
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "contexts": ([100], [1024, 2048, 4096, 8192, 16384, 32768]), "batches": ([1, 3], [1, 4, 16, 64]),
        "heads": (4, 32), "kv_heads": (2, 8), "head_dim": (32, 128), "dtype": ("bf16", "bf16"),
        "baselines": (["sdpa"], ["flash", "cudnn", "efficient", "flash_attn"]),
    }  # fmt: skip
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    if quick:
        os.environ["TRITON_INTERPRET"] = "1"  # before kiln's kernel modules are imported
        CUDA, DEVICE = False, "cpu"
    elif not torch.cuda.is_available():
        print("decode_attention: needs a CUDA GPU (or --quick for the CPU interpreter)", file=sys.stderr)
        return 2
    else:
        CUDA, DEVICE = True, "cuda"
    import triton

    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if CUDA else "CPU (Triton interpreter)"
    print(
        f"device: {name}  torch {torch.__version__}  triton {triton.__version__}  q {args.dtype}  "
        f"Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} block_size={args.block_size}  "
        f"quantized: {' '.join(args.variants) or 'none'}"
    )
    start = time.perf_counter()
    copy_bw = copy_bandwidth(2.0 if CUDA else 1 / 16)
    if CUDA:
        torch.cuda.empty_cache()
    shapes = [(b, c) for b in args.batches for c in args.contexts]
    rows = [bench_shape(args, b, c, copy_bw) for b, c in tqdm(shapes, desc="shapes")]
    print_table(rows, args, copy_bw)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    limit = 5e-2 if args.dtype != "fp32" else 1e-3
    bad = [
        (r["B"], r["ctx"], k)
        for r in rows
        for k in ["err", *(f"{v}_err" for v in args.variants)]
        if r.get(k, 0.0) > limit
    ]
    if bad:
        print(f"FAILED correctness (max abs error > {limit}) on {bad}", file=sys.stderr)
        return 1
    return 0


DEVICE = "cuda"

if __name__ == "__main__":
    sys.exit(main())
