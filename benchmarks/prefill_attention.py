"""Benchmark kiln's paged prefill attention over a cached prefix: the attention of a prefix-cache hit (issue #6).

One sequence's ``q_len`` new tokens attend causally over ``ctx`` cached keys (their own included,
``ctx - q_len`` before them) in a block-paged cache with a random block table: what a request
runs after a prefix-cache hit (128 new tokens after a 2k-token document) and what each chunk of
a chunked prefill runs. For each shape it reports:

- kiln's time per call at the split heuristic's count (``prefill_num_splits``), TFLOP/s of the
  causal work, and the K/V bytes read over the time;
- torch SDPA on a contiguous cache (B, Hkv, ctx, D) with the lower-right causal mask
  (``causal_lower_right``: the new tokens sit at the end of the keys): flash, cuDNN and
  efficient, natively grouped (``enable_gqa``) where the backend takes it, else over K/V repeated
  to the query heads beforehand (not timed; marked ``*``); "vs best" = best baseline time / kiln
  time (> 1: kiln faster);
- with ``--sweep-splits``: kiln at 1..16 splits, with the splits merged in the kernel (the
  default) and by the combine kernel (``FUSED_COMBINE = False``).

Timing is ``decode_attention.time_calls``: each function replayed in a CUDA graph round-robin
over enough copies of its inputs to exceed twice the L2 cache. Every kiln variant is checked
against ``paged_prefill_attention_reference``.

    python benchmarks/prefill_attention.py                   # H100: 1B and 8B heads, q 128 / 512, ctx 2176 / 8192
    python benchmarks/prefill_attention.py --sweep-splits --head-dims 64
    python benchmarks/prefill_attention.py --quick           # CPU: Triton's interpreter on tiny shapes
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_attention as da  # noqa: E402  (time_calls, l2_bytes: the same timing as the decode benchmark)

BACKENDS = da.SDPA_BACKENDS  # flash, cudnn, efficient, sdpa (the default dispatcher)
SWEEP_SPLITS = (1, 2, 4, 5, 8, 12, 16)


class Shape:
    """``copies`` caches, block tables and queries of one (q_len, ctx, heads, head dim) case."""

    def __init__(self, q_len: int, ctx: int, hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype, copies: int,
                 device: str) -> None:  # fmt: skip
        nb = -(-ctx // bs)
        self.q_len, self.ctx, self.hq, self.hkv, self.d = q_len, ctx, hq, hkv, d
        self.caches = [torch.randn(2, nb, bs, hkv, d, dtype=dtype, device=device) for _ in range(copies)]
        self.tables = [torch.randperm(nb, device=device).to(torch.int32).view(1, nb) for _ in range(copies)]
        self.qs = [torch.randn(1, hq, q_len, d, dtype=dtype, device=device) for _ in range(copies)]
        self.outs = [torch.empty_like(q) for q in self.qs]
        self.seq_lens = torch.tensor([ctx], dtype=torch.int32, device=device)
        self.starts = torch.tensor([0, q_len], dtype=torch.int32, device=device)
        elt = self.caches[0].element_size()
        self.bytes = 2 * ctx * hkv * d * elt + 2 * q_len * hq * d * elt  # K/V read, q read + out written
        # causal work: query i (of q_len, at position ctx - q_len + i) sees ctx - q_len + i + 1 keys; 2 GEMMs
        keys = q_len * (ctx - q_len) + q_len * (q_len + 1) / 2
        self.flops = 4 * hq * d * keys

    def kiln(self, num_splits: int | None) -> list[Callable[[], object]]:
        from kiln.backends.triton.paged_attention import paged_prefill_attention

        return [
            lambda i=i: paged_prefill_attention(
                self.qs[i], self.caches[i], self.tables[i], self.seq_lens, self.starts, self.q_len,
                num_splits=num_splits, out=self.outs[i], max_seq_len=self.ctx,
            )  # fmt: skip
            for i in range(len(self.qs))
        ]

    def error(self) -> float:
        from kiln.backends.triton.paged_attention import paged_prefill_attention_reference

        ref = paged_prefill_attention_reference(self.qs[0], self.caches[0], self.tables[0], self.seq_lens,
                                                self.starts, self.q_len)  # fmt: skip
        return (self.outs[0].float() - ref.float()).abs().max().item()

    def contiguous(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copy ``i`` as SDPA inputs: q (1, Hq, q_len, D), K/V (1, Hkv, ctx, D) contiguous."""
        table = self.tables[i][0].long()
        k, v = (self.caches[i][j][table].flatten(0, 1)[: self.ctx].transpose(0, 1).unsqueeze(0).contiguous()
                for j in (0, 1))  # fmt: skip
        return self.qs[i], k, v


def baseline(shape: Shape, name: str, tolerance: float) -> tuple[list[Callable[[], object]], bool]:
    """SDPA closures of one backend over the contiguous copies, and whether K/V had to be repeated.

    The first call is checked against kiln's reference: the baseline must compute the same attention.
    """
    from torch.nn.attention.bias import causal_lower_right

    from kiln.backends.triton.paged_attention import paged_prefill_attention_reference

    backend = BACKENDS[name]
    qkv = [shape.contiguous(i) for i in range(len(shape.qs))]
    mask = causal_lower_right(shape.q_len, shape.ctx)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    ref = paged_prefill_attention_reference(shape.qs[0], shape.caches[0], shape.tables[0], shape.seq_lens,
                                            shape.starts, shape.q_len).float()  # fmt: skip

    def checked(out: torch.Tensor) -> None:
        err = (out.float() - ref).abs().max().item()
        if err > tolerance:
            raise AssertionError(f"SDPA {name} differs from kiln's reference by {err:.2e}: not the same attention")

    try:
        out = run(*qkv[0], True)
        repeated, inputs = False, qkv
    except (RuntimeError, TypeError, ValueError):  # the backend declines native GQA with this mask: repeat K/V
        group = shape.hq // shape.hkv
        inputs = [(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)) for q, k, v in qkv]
        out = run(*inputs[0], False)  # raises if the backend declines the shape altogether
        repeated = True
    checked(out)
    return [lambda x=x: run(*x, not repeated) for x in inputs], repeated


def _median(t: object) -> float:
    """The autotuner's time of a config: a float or its [median, p20, p80] list (ms)."""
    return float(t[0]) if isinstance(t, (list, tuple)) else float(t)  # type: ignore[index]


def _tile(c: object) -> str:
    kw = c.kwargs  # type: ignore[attr-defined]
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{c.num_warps} s{c.num_stages}"  # type: ignore[attr-defined]


def bench(shape: Shape, args: argparse.Namespace, sms: int) -> dict:
    import kiln.backends.triton.paged_attention as pa

    row: dict = {"q": shape.q_len, "ctx": shape.ctx, "d": shape.d,
                 "splits": pa.prefill_num_splits(shape.q_len, 1, shape.hq, shape.ctx, sms)}  # fmt: skip
    kernel = pa._paged_prefill_kernel
    before = getattr(kernel, "configs_timings", None)
    calls = shape.kiln(None)
    calls[0]()
    timings = getattr(kernel, "configs_timings", None)
    if timings is not None and timings is not before:  # tuned at this shape (a shape of a tuned key reuses its tile)
        row["tiles"] = sorted((_median(t), _tile(c)) for c, t in timings.items())
    row["err"] = shape.error()
    row["kiln"] = da.time_calls(calls, args.reps)
    best, mark = math.inf, ""
    for name in args.baselines:
        try:
            fns, repeated = baseline(shape, name, args.tolerance)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:  # declined; a wrong result raises
            print(f"  {name}: not run at D {shape.d} q {shape.q_len} ctx {shape.ctx} ({type(e).__name__})")
            continue
        t = da.time_calls(fns, args.reps)
        row[name] = (t, repeated)
        if t < best:
            best, mark = t, "*" if repeated else ""
    row["best"] = (best, mark)
    if args.sweep_splits:
        sweep = {}
        fused = pa.FUSED_COMBINE
        try:
            for merge in (True, False):
                pa.FUSED_COMBINE = merge
                for n in SWEEP_SPLITS:
                    fns = shape.kiln(n)
                    fns[0]()
                    if shape.error() > args.tolerance:
                        raise AssertionError(f"kiln at {n} splits (in-kernel merge {merge}) differs from the reference")
                    sweep[(merge, n)] = da.time_calls(fns, args.reps)
        finally:
            pa.FUSED_COMBINE = fused
        row["sweep"] = sweep
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--q-lens", type=int, nargs="+", default=None, help="new tokens (default 128 512; quick 8)")
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="keys incl. the new ones (default 2176 8192)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 32; quick 4)")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads (default 8; quick 2)")
    p.add_argument("--head-dims", type=int, nargs="+", default=None, help="default 64 (1B) 128 (8B); quick 32")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--baselines", nargs="*", default=None, choices=list(BACKENDS),
                   help="default flash cudnn efficient; quick sdpa")  # fmt: skip
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--sweep-splits", action="store_true", help="also time 1..16 splits, merged both ways")
    p.add_argument("--tolerance", type=float, default=None, help="max abs error vs the reference (bf16 5e-2)")
    p.add_argument("--quick", action="store_true", help="CPU: Triton's interpreter on tiny shapes")
    args = p.parse_args(argv)
    defaults = {"q_lens": ([8], [128, 512]), "contexts": ([40], [2176, 8192]), "heads": (4, 32), "kv_heads": (2, 8),
                "head_dims": ([32], [64, 128]), "baselines": (["sdpa"], ["flash", "cudnn", "efficient"])}  # fmt: skip
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if args.quick else full)
    if args.quick:
        os.environ["TRITON_INTERPRET"] = "1"  # before kiln's kernel modules are imported
        da.CUDA, device, dtype = False, "cpu", torch.float32
    elif not torch.cuda.is_available():
        print("prefill_attention: needs a CUDA GPU (or --quick for the CPU interpreter)", file=sys.stderr)
        return 2
    else:
        da.CUDA, device, dtype = True, "cuda", torch.bfloat16
    da.DEVICE = device
    if args.tolerance is None:
        args.tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
    import triton

    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if da.CUDA else 4
    name = torch.cuda.get_device_name() if da.CUDA else "CPU (Triton interpreter)"
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}  {dtype}  "
          f"Hq={args.heads} Hkv={args.kv_heads} block_size={args.block_size}")  # fmt: skip
    start = time.perf_counter()
    rows = []
    for d in args.head_dims:
        for q_len in args.q_lens:
            for ctx in args.contexts:
                if q_len > ctx:
                    continue
                probe = 2 * ctx * args.kv_heads * d * 2
                copies = max(1, min(32, math.ceil(2 * da.l2_bytes() / probe))) if da.CUDA else 1
                shape = Shape(q_len, ctx, args.heads, args.kv_heads, d, args.block_size, dtype, copies, device)
                rows.append((bench(shape, args, sms), shape))
                del shape
    heads = " | ".join(args.baselines)
    print(f"\n| D | q | ctx | splits | kiln us | TFLOP/s | GB/s | {heads} | vs best | max err |")
    print("|" + "---|" * (9 + len(args.baselines)))
    for r, s in rows:
        cells = []
        for b in args.baselines:
            t = r.get(b)
            cells.append("-" if t is None else f"{1e3 * t[0]:.1f}{'*' if t[1] else ''}")
        best, _ = r["best"]
        vs = f"{best / r['kiln']:.2f}x" if math.isfinite(best) else "-"
        print(f"| {r['d']} | {r['q']} | {r['ctx']} | {r['splits']} | {1e3 * r['kiln']:.1f} | "
              f"{s.flops / (r['kiln'] * 1e-3) / 1e12:.1f} | {s.bytes / (r['kiln'] * 1e-3) / 1e9:.0f} | "
              f"{' | '.join(cells)} | {vs} | {r['err']:.1e} |")  # fmt: skip
    if args.sweep_splits:
        print("\nsplit sweep, us per call (merged in the kernel / by the combine kernel; * = the heuristic's count):")
        for r, _ in rows:
            cells = [f"{n}{'*' if n == r['splits'] else ''}: {1e3 * r['sweep'][(True, n)]:.1f} / "
                     f"{1e3 * r['sweep'][(False, n)]:.1f}" for n in SWEEP_SPLITS]  # fmt: skip
            print(f"  D {r['d']} q {r['q']} ctx {r['ctx']}:  " + "  ".join(cells))
    tuned = [r for r, _ in rows if r.get("tiles")]
    if tuned:
        print("\nthe autotuner's tiles where it tuned (BLOCK_M x BLOCK_N, warps, stages; us, fastest first):")
        for r in tuned:
            cells = "  ".join(f"{tile}: {1e3 * ms:.1f}" for ms, tile in r["tiles"])
            print(f"  D {r['d']} q {r['q']} ctx {r['ctx']}:  {cells}")
    print(f"\nwall time {time.perf_counter() - start:.0f} s;  * baseline over K/V repeated to the query heads")
    bad = [(r["d"], r["q"], r["ctx"]) for r, _ in rows if r["err"] > args.tolerance]
    if bad:
        print(f"FAILED correctness (max abs error > {args.tolerance}) on {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
