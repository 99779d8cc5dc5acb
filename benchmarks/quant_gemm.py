"""Quantized GEMMs and int4 decode against cuBLAS bf16 (issue #7): one run on an H100.

Three parts, each checked against kiln's plain-torch references before it is timed:

1. **Decode GEMMs**, M = 1 and 16 tokens, (K, N) in {(4096, 4096), (4096, 14336), (14336, 4096)}
   (Llama-3-8B's projections): bf16 ``torch.matmul`` (cuBLAS) against kiln's kernels for
   int4 weights with a scale and zero point per 128 (``w4a16-g128``), int8 weights per
   channel (``w8a16``), int8 x int8 with per-token x per-channel scales (``w8a8``) and fp8
   e4m3 per-token x per-channel (``fp8``, ``torch._scaled_mm``). Weights are random bf16
   N(0, 0.02) quantized on the GPU by round-to-nearest, as ``kiln.compile`` does. Reported:
   GPU time (median, L2 flushed before every call) of the call replayed as a CUDA graph with every
   replay queued ahead (``kiln.backends.triton.timing.gpu_time_ms``: as the runtime's decode graphs
   run it, without the graph's launch latency; ``eager_us``: ``triton.testing.do_bench`` of the call
   from Python, where an op's dispatch and launch cost shows once it exceeds the GPU work), the
   kernel the tuner chose, bandwidth (weight + activation + output bytes over the time) and its share
   of ~3.0 TB/s, and the speed-up over bf16. w8a8 / fp8 times are the GEMM alone; "+q" rows
   add the per-token activation quantization (``kiln::dynamic_scale`` + ``kiln::quantize``).
2. **Prefill GEMMs**, M = 4096 and 8192: fp8 (fast and exact accumulation) and w8a8 against
   bf16, in TFLOP/s and share of ~750 (bf16) / ~1500 (8-bit) TFLOP/s.
3. **Batch-1 decode** of the Llama-3.1-8B-shaped model (preset ``llama-8b``, random bf16
   weights drawn on the GPU): kiln's runtime (``ModelRunner`` with CUDA graphs) with the
   bf16 model and with ``QuantConfig.preset("w4a16-g128")`` (RTN on the GPU; the LM head
   stays bf16, the preset's default). Time per token over ``--steps`` decode steps at a
   ``--context``-token context; the int4 step's logits are checked against the same graph
   run with the reference ``qlinear`` (``torch.fx.Interpreter``), and compared with bf16's.

The last lines summarize the speed-ups against the targets (int4-g128 >= 2.5x and int8 >= 1.6x
at M = 1, fp8 prefill >= 1.4x, int4 decode >= 1.9x).

    python benchmarks/quant_gemm.py                # H100: everything (about 4 minutes)
    python benchmarks/quant_gemm.py --skip-e2e     # the GEMMs only (about 1.5 minutes)
    python benchmarks/quant_gemm.py --show-candidates  # also every tuning candidate's time per shape
    python benchmarks/quant_gemm.py --quick        # CPU: Triton interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_decode_e2e import HBM_TBS, decode_e2e  # noqa: E402  (the end-to-end part, beside this file)

BF16_TFLOPS = 750.0  # dense bf16 tensor-core rate a large cuBLAS GEMM reaches
INT8_TFLOPS = 2 * BF16_TFLOPS  # fp8 / int8 tensor cores: twice the bf16 rate


@dataclass
class Row:
    """One timed variant of one shape."""

    shape: str
    m: int
    variant: str
    kernel: str
    ms: float
    nbytes: int
    flops: int
    peak_tflops: float
    err: float
    base_ms: float | None = None  # the bf16 time of the same shape
    eager_ms: float = 0.0  # called eagerly (ms is a CUDA-graph replay)

    def cells(self) -> list[str]:
        tbs = self.nbytes / self.ms / 1e9
        tflops = self.flops / self.ms / 1e9
        ratio = f"{self.base_ms / self.ms:5.2f}x" if self.base_ms else "    -"
        return [self.shape, str(self.m), self.variant, self.kernel[:44], f"{self.ms * 1e3:9.1f}",
                f"{self.eager_ms * 1e3:8.1f}", f"{tbs:6.2f}",
                f"{100 * tbs / HBM_TBS:5.1f}", f"{tflops:7.1f}", f"{100 * tflops / self.peak_tflops:5.1f}",
                ratio, f"{self.err:.1e}"]  # fmt: skip


HEADER = [
    "(K, N)",
    "M",
    "variant",
    "kernel",
    "time_us",
    "eager_us",
    "TB/s",
    "%BW",
    "TFLOP/s",
    "%peak",
    "vs bf16",
    "max_err",
]


def print_table(rows: list[Row]) -> None:
    table = [HEADER] + [r.cells() for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    for r in table:
        print(
            "  ".join(
                c.rjust(w) if i > 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )


class Bench:
    """Timing, checking and the weights of every variant, on the GPU or (``--quick``) the CPU."""

    def __init__(self, quick: bool) -> None:
        import torch

        self.quick = quick
        self.device = torch.device("cpu" if quick else "cuda")
        self.failures: list[str] = []

    def time_ms(self, fn: Callable[[], object]) -> tuple[float, float]:
        """``(graph_ms, eager_ms)``: ``fn`` replayed as a CUDA graph, its GPU time with every replay
        queued ahead (``gpu_time_ms``: as the decode runtime runs it, the next kernel already
        launched), and called eagerly (``do_bench``: each op's Python and launch cost included once it
        exceeds the GPU's work); median, L2 flushed before every call."""
        import torch

        if self.quick:  # the interpreter: one call, for the code path only
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
            return ms, ms
        import triton.testing

        from kiln.backends.triton.timing import gpu_time_ms

        fn()
        torch.cuda.synchronize()
        eager = float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
        except Exception as e:  # noqa: BLE001 - reported, and the row says which time it shows
            print(f"  (CUDA graph capture failed, eager time shown: {type(e).__name__}: {e})")
            return eager, eager
        return gpu_time_ms(graph.replay, reps=100), eager

    def check(self, name: str, got: object, want: object, tol: float) -> float:
        """Max error of ``got`` relative to max |want|; a failure is recorded (and timing skipped)."""
        g, w = got.float(), want.float()  # type: ignore[attr-defined]
        err = float((g - w).abs().max() / w.abs().max().clamp(min=1e-30))
        if not math.isfinite(err) or err > tol:
            self.failures.append(f"{name}: max error {err:.3g} > {tol}")
            print(f"  CHECK FAILED {name}: max error {err:.3g} > {tol}", flush=True)
        return err


def quantized_weights(w: object, bench: Bench) -> dict[str, tuple]:
    """The weight ``w`` (N, K) bf16 as kiln.compile stores it for each format (RTN, on w's device)."""
    import torch

    from kiln.quantize import PerAxis, PerGroup, QuantSpec
    from kiln.quantize.observers import weight_qparams
    from kiln.quantize.ops import pack_int4, quantize_reference

    def codes(spec: QuantSpec, **kw: int) -> tuple:
        s, z = weight_qparams(w, spec)  # type: ignore[arg-type]
        return quantize_reference(w, s, z, spec.qmin, spec.qmax, spec.storage, **kw), s, z  # type: ignore[arg-type]

    g = 32 if bench.quick else 128
    spec4 = QuantSpec(dtype="int4", granularity=PerGroup(g), symmetric=False)  # the w4a16-g128 preset
    q4, s4, z4 = codes(spec4, group_size=g)
    int4 = (pack_int4(q4.int() - spec4.qmin), s4.float(), (z4.int() - spec4.qmin).to(torch.uint8), g)
    q8, s8, _ = codes(QuantSpec(dtype="int8", granularity=PerAxis(0)), axis=0)
    f8, sf8, _ = codes(QuantSpec(dtype="fp8_e4m3", granularity=PerAxis(0)), axis=0)
    return {"int4": int4, "int8": (q8, s8.float()), "fp8": (f8, sf8.float())}


def weight_bytes(kind: str, n: int, k: int, g: int) -> int:
    return {
        "bf16": 2 * n * k,
        "int4": n * k // 2 + 5 * n * (k // g),
        "int8": n * k + 4 * n,
        "fp8": n * k + 4 * n,
    }[kind]


def gemm_rows(bench: Bench, shapes: list[tuple[int, int]], ms: list[int], prefill: bool) -> list[Row]:
    """Time every variant of every (K, N) x M; correctness first."""
    import torch

    import kiln  # noqa: F401  (registers the CUDA kernels)

    rows: list[Row] = []
    gen = torch.Generator(device=bench.device).manual_seed(0)
    for k, n in shapes:
        w = (torch.randn(n, k, generator=gen, device=bench.device) * 0.02).to(torch.bfloat16)
        q = quantized_weights(w, bench)
        for m in ms:
            x = torch.randn(m, k, generator=gen, device=bench.device).to(torch.bfloat16)
            rows += shape_rows(bench, x, w, q, prefill)
    return rows


def shape_rows(bench: Bench, x: object, w: object, q: dict[str, tuple], prefill: bool) -> list[Row]:
    """bf16 and the quantized variants of ``x @ w.T``: decode (weight-only and 8-bit) or prefill (8-bit)."""
    import torch

    from kiln.backends.triton import quant_gemm as qg
    from kiln.quantize import ops as ref

    ops = torch.ops.kiln
    (w4, s4, z4, g), (w8, s8), (wf8, sf8) = q["int4"], q["int8"], q["fp8"]
    (m, k), n = x.shape, w.shape[0]  # type: ignore[attr-defined]
    shape = f"({k}, {n})"
    xf = x.float()  # type: ignore[attr-defined]
    flops, io = 2 * m * n * k, 2 * m * k + 2 * m * n
    base, base_eager = bench.time_ms(lambda: torch.matmul(x, w.t()))  # type: ignore[attr-defined]
    bf16_err = bench.check(f"{shape} M={m} bf16", torch.matmul(x, w.t()), xf @ w.float().t(), 1.6e-2)  # type: ignore[attr-defined]
    rows = [
        Row(shape, m, "bf16", "cuBLAS", base, weight_bytes("bf16", n, k, g) + io, flops, BF16_TFLOPS, bf16_err,
            eager_ms=base_eager)  # fmt: skip
    ]

    def add(variant: str, fn: Callable[[], object], want: object, kind: str, peak: float) -> None:
        qg.TUNER.last = None
        err = bench.check(f"{shape} M={m} {variant}", fn(), want, 1.6e-2)
        kernel = "torch._scaled_mm" if kind == "fp8" else str(qg.TUNER.last)
        if variant.endswith("+q"):
            kernel = "quantize x, " + kernel
        if any(f.startswith(f"{shape} M={m} {variant}:") for f in bench.failures):
            return
        t, t_eager = bench.time_ms(fn)
        nbytes = weight_bytes("int8" if kind == "w8a8" else kind, n, k, g) + io
        rows.append(Row(shape, m, variant, kernel, t, nbytes, flops, peak, err, base, t_eager))

    if not prefill:
        add(f"int4-g{g}", lambda: ops.qlinear_w4a16(x, w4, s4, z4, g, None),
            ref.qlinear_w4a16_reference(xf, w4, s4, z4, g, None), "int4", BF16_TFLOPS)  # fmt: skip
        add("int8 (w8a16)", lambda: ops.qlinear_w8a16(x, w8, s8, None, None, None),
            ref.qlinear_w8a16_reference(xf, w8, s8, None, None, None), "int8", BF16_TFLOPS)  # fmt: skip
    xs = ops.dynamic_scale(x, 127.0, True)
    xq = ops.quantize(x, xs, None, -128, 127, torch.int8)
    want8 = ref.qlinear_w8a8_reference(xq, xs, None, w8, s8, None, torch.float32)
    add(
        "w8a8",
        lambda: ops.qlinear_w8a8(xq, xs, None, w8, s8, None, torch.bfloat16),
        want8,
        "w8a8",
        INT8_TFLOPS,
    )

    def w8a8_q() -> object:
        s = ops.dynamic_scale(x, 127.0, True)
        return ops.qlinear_w8a8(
            ops.quantize(x, s, None, -128, 127, torch.int8), s, None, w8, s8, None, torch.bfloat16
        )

    add("w8a8 +q", w8a8_q, want8, "w8a8", INT8_TFLOPS)
    if not bench.quick and torch.cuda.get_device_capability() < (8, 9):
        print(f"  fp8 skipped: compute capability {torch.cuda.get_device_capability()} < 8.9")
        return rows
    fs = ops.dynamic_scale(x, 448.0, True)
    fq = ops.quantize(x, fs, None, -448, 448, torch.float8_e4m3fn)
    wantf = ref.qlinear_fp8_reference(fq, fs, wf8, sf8, None, torch.float32)
    for fast in (True, False) if prefill else (True,):
        qg.FP8_FAST_ACCUM = fast
        add("fp8" if fast else "fp8 exact-acc", lambda: ops.qlinear_fp8(fq, fs, wf8, sf8, None, torch.bfloat16),
            wantf, "fp8", INT8_TFLOPS)  # fmt: skip
    qg.FP8_FAST_ACCUM = True

    def fp8_q() -> object:
        s = ops.dynamic_scale(x, 448.0, True)
        fx = ops.quantize(x, s, None, -448, 448, torch.float8_e4m3fn)
        return ops.qlinear_fp8(fx, s, wf8, sf8, None, torch.bfloat16)

    add("fp8 +q", fp8_q, wantf, "fp8", INT8_TFLOPS)
    return rows


# --------------------------------------------------------------------------------------


def print_candidates(tuner: object) -> None:
    """Each tuned shape's candidates, fastest first (``KernelTuner.timings``), then forgotten."""
    for key, results in tuner.timings.items():  # type: ignore[attr-defined]
        print(f"  tuned {key}:")
        for c, ms in results:
            print(f"    {ms * 1e3:8.1f} us  {c}")
    tuner.timings.clear()  # type: ignore[attr-defined]


def summary(rows: list[Row], prefill: list[Row], e2e: list[tuple[str, float]], model: str) -> list[str]:
    def ratios(rs: list[Row], variant: str, m: int | None = None) -> list[float]:
        return [
            r.base_ms / r.ms for r in rs if r.variant == variant and (m is None or r.m == m) and r.base_ms
        ]

    def line(what: str, rs: list[float], target: float) -> str:
        if not rs:
            return f"{what}: not measured"
        geo = math.exp(sum(math.log(r) for r in rs) / len(rs))
        verdict = (
            "MET" if min(rs) >= target else ("MET on the geometric mean" if geo >= target else "NOT MET")
        )
        return f"{what}: {' '.join(f'{r:.2f}x' for r in rs)} (geo-mean {geo:.2f}x; target >= {target}x: {verdict})"

    out = []
    int4 = next((r.variant for r in rows if r.variant.startswith("int4")), "int4-g128")
    out.append(line(f"{int4} vs bf16 at M=1", ratios(rows, int4, 1), 2.5))
    out.append(line("int8 (w8a16) vs bf16 at M=1", ratios(rows, "int8 (w8a16)", 1), 1.6))
    out.append(line("int4 at M=16 (no target)", ratios(rows, int4, 16), 1.0))
    out.append(line("w8a8 at M=1 (no target)", ratios(rows, "w8a8", 1), 1.0))
    out.append(line("fp8 prefill GEMM vs bf16", ratios(prefill, "fp8"), 1.4))
    out.append(line("fp8 prefill incl. activation quantization", ratios(prefill, "fp8 +q"), 1.4))
    for name, ms in e2e[1:]:
        out.append(line(f"{name} decode of {model} vs bf16", [e2e[0][1] / ms], 1.9))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="CPU: Triton interpreter, tiny shapes (a smoke run)"
    )
    parser.add_argument("--skip-e2e", action="store_true", help="the GEMMs only")
    parser.add_argument("--skip-gemms", action="store_true", help="the end-to-end decode only")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--context", type=int, default=None, help="decode context (default 512; quick: 8)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps timed (default 64; quick: 1)")
    parser.add_argument(
        "--lm-head", action="store_true", help="also decode with the LM head quantized (skip=())"
    )
    parser.add_argument(
        "--quant-pdl-variants", action="store_true",
        help="also decode int4 with the quantized GEMVs' other PDL modes (off; released after the K loop / at the start)",
    )
    parser.add_argument(
        "--torch-compile", action="store_true", help="fuse the decode graphs with torch.compile first"
    )
    parser.add_argument(
        "--show-candidates", action="store_true", help="print every tuning candidate's time per shape"
    )
    args = parser.parse_args()
    if args.quick:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    args.context = args.context or (8 if args.quick else 512)
    args.steps = args.steps or (1 if args.quick else 64)
    args.model_name = "llama-tiny" if args.quick else "llama-8b"
    import torch
    import triton

    if not args.quick and not torch.cuda.is_available():
        print("no CUDA device: run with --quick for the CPU smoke run", file=sys.stderr)
        return 2
    import kiln
    from kiln.backends.triton import quant_gemm as qg

    bench = Bench(args.quick)
    if args.quick:  # the kiln ops dispatch to the Triton kernels (interpreted) on the CPU as they do on CUDA
        for name in (
            "qlinear_w8a16",
            "qlinear_w4a16",
            "qlinear_w8a8",
            "qlinear_fp8",
            "dynamic_scale",
            "quantize",
        ):
            torch.library.register_kernel(f"kiln::{name}", "cpu", getattr(qg, name))
    dev = "CPU (Triton interpreter)" if args.quick else torch.cuda.get_device_name()
    print(
        f"device {dev}; torch {torch.__version__}, triton {triton.__version__}, kiln {kiln.__version__}",
        flush=True,
    )
    t_all = time.perf_counter()
    shapes = [(4096, 4096), (4096, 14336), (14336, 4096)]

    def section(title: str, run: Callable[[], list]) -> list:
        """Run one part; an exception is reported (and fails the run) without losing the other parts."""
        print(f"\n== {title} ==", flush=True)
        t0 = time.perf_counter()
        try:
            out = run()
        except Exception:  # noqa: BLE001 - printed in full and counted as a failure
            traceback.print_exc()
            bench.failures.append(f"{title}: raised (traceback above)")
            return []
        print(f"({time.perf_counter() - t0:.0f}s)", flush=True)
        return out

    def gemms(shape_list: list[tuple[int, int]], ms: list[int], prefill: bool) -> list[Row]:
        rows = gemm_rows(bench, shape_list, ms, prefill)
        print_table(rows)
        if args.show_candidates:
            print_candidates(qg.TUNER)
        return rows

    rows: list[Row] = []
    if not args.skip_gemms:
        rows = section("decode GEMMs: bf16 cuBLAS vs quantized (time: median, L2 flushed)",
                       lambda: gemms([(64, 48)] if args.quick else shapes, [1, 16], False))  # fmt: skip
    prefill: list[Row] = []
    if not args.skip_prefill and not args.skip_gemms:
        prefill = section("prefill GEMMs: bf16 cuBLAS vs fp8 (torch._scaled_mm) and w8a8",
                          lambda: gemms([(128, 32)] if args.quick else shapes, [32] if args.quick else [4096, 8192],
                                        True))  # fmt: skip
    e2e: list[tuple[str, float]] = []
    if not args.skip_e2e:
        e2e = section(
            f"batch-1 decode of {args.model_name} through kiln's runtime", lambda: decode_e2e(bench, args)
        )
        if args.show_candidates:
            print_candidates(qg.TUNER)
    print(f"\n== summary ({time.perf_counter() - t_all:.0f}s) ==")
    if args.quick:
        print("(CPU smoke run: the Triton interpreter's timings say nothing about speed)")
    for s in summary(rows, prefill, e2e, args.model_name):
        print(s)
    if bench.failures:
        print(f"\n{len(bench.failures)} correctness check(s) FAILED:\n  " + "\n  ".join(bench.failures))
        return 1
    print("all correctness checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
