"""ONNX Runtime vs torch eager on the CPU, for the same compiled graph (issue #3).

One kiln ``llama-small`` (99.5M parameters, 8 layers, GQA 12/4) is compiled once; both
sides then run what the pipeline produced:

- prefill: 128 prompt tokens, no cache. torch runs the ``CompiledModel`` (its graph module on
  the eager backend); ONNX Runtime runs ``export_onnx(compiled, ...)``.
- decode: one token on a 512-token cache. torch runs the contiguous-cache rewrite of the
  compiled graph (``kiln.backends.onnx.prepare.prepare_graph(compiled, kv_cache=True)``); ONNX Runtime runs
  ``export_onnx(compiled, ..., kv_cache=True)``, the artifact of that same graph. A torch
  decode without a cache (recomputing all 513 positions) is shown for scale.

Both sides use the same number of threads (``--threads``, default: every core torch sees; on a
machine other jobs share, ``--threads 1`` avoids OpenMP's oversubscription stalls in torch),
fp32, batch 1; ONNX Runtime loads with ORT_ENABLE_ALL. Torch and ONNX Runtime runs alternate
(``--repeat`` timed pairs after ``--warmup`` untimed ones), so both see the same machine load;
the table gives the median, the minimum and the 90th percentile. Outputs are compared before
timing.

    .venv/bin/python benchmarks/onnx_cpu.py                       # llama-small, 128 / 512
    .venv/bin/python benchmarks/onnx_cpu.py --preset llama-tiny --repeat 50
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety

    def tqdm(it, **_kw):  # type: ignore[no-redef]
        return it


def timed_pair(
    first: Callable[[], object], second: Callable[[], object], warmup: int, repeat: int, label: str
) -> tuple[list[float], list[float]]:
    """Milliseconds of ``first`` and ``second``, interleaved run by run so both see the same machine load."""
    for _ in range(warmup):
        first()
        second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in tqdm(range(repeat), desc=label, leave=False, file=sys.stderr):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    return times


def stats(times: list[float]) -> tuple[float, float, float]:
    """(median, min, p90) of a list of timings."""
    ordered = sorted(times)
    return statistics.median(ordered), ordered[0], ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-small")
    ap.add_argument("--prefill", type=int, default=128, help="prompt tokens of the prefill row")
    ap.add_argument("--cache", type=int, default=512, help="cached tokens of the decode row")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out-dir", help="where the artifacts go (default: a temporary folder)")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    import kiln
    from kiln.backends.onnx import export_onnx
    from kiln.backends.onnx.prepare import prepare_graph
    from kiln.models import from_preset

    torch.set_num_threads(args.threads)
    model = from_preset(args.preset)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    compiled = kiln.compile(model, (torch.randint(0, vocab, (1, 8), generator=gen),))
    compile_s = time.perf_counter() - t0
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="kiln-onnx-bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prefill_report = export_onnx(compiled, out_dir / f"{args.preset}.onnx")
    decode_report = export_onnx(compiled, out_dir / f"{args.preset}-kv.onnx", kv_cache=True)
    export_s = time.perf_counter() - t0

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not steal torch's cores
    prefill_sess = ort.InferenceSession(str(prefill_report.path), so, providers=["CPUExecutionProvider"])
    decode_sess = ort.InferenceSession(str(decode_report.path), so, providers=["CPUExecutionProvider"])

    # -- the inputs: a prompt, and a cache made by prefilling `cache` tokens in torch
    prompt = torch.randint(0, vocab, (1, args.prefill), generator=gen)
    history = torch.randint(0, vocab, (1, args.cache + 1), generator=gen)
    kv_gm, layout = prepare_graph(compiled, kv_cache=True)
    assert layout is not None
    empty = [torch.zeros(1, h, 0, d) for h, d in zip(layout.heads, layout.head_dims, strict=True) for _ in (0, 1)]
    with torch.no_grad():
        out = kv_gm(history[:, : args.cache], *empty)
        past = list(out[1:])
    token = history[:, args.cache :]
    decode_feed = {"input_ids": token.numpy(), **{n: p.numpy() for n, p in zip(layout.input_names(), past, strict=True)}}

    # -- agreement before timing
    with torch.no_grad():
        want_prefill = compiled(prompt)
        want_decode = kv_gm(token, *past)[0]
        recompute = compiled(history)[:, -1:]
    got_prefill = prefill_sess.run(None, {"input_ids": prompt.numpy()})[0]
    got_decode = decode_sess.run(None, decode_feed)[0]
    err_prefill = float(np.abs(got_prefill - want_prefill.numpy()).max())
    err_decode = float(np.abs(got_decode - want_decode.numpy()).max())
    err_cache = float((want_decode - recompute).abs().max())

    with torch.no_grad():
        torch_prefill, ort_prefill = timed_pair(
            lambda: compiled(prompt), lambda: prefill_sess.run(None, {"input_ids": prompt.numpy()}),
            args.warmup, args.repeat, "prefill",
        )
        torch_decode, ort_decode = timed_pair(
            lambda: kv_gm(token, *past), lambda: decode_sess.run(None, decode_feed), args.warmup, args.repeat, "decode"
        )
        recompute_times, _ = timed_pair(lambda: compiled(history), lambda: None, 1, max(args.repeat // 5, 3), "recompute")
    prefill_shape, decode_shape = f"{args.prefill} tokens", f"1 token, {args.cache} cached"
    rows = [
        ("prefill", prefill_shape, "torch eager (compiled model)", stats(torch_prefill)),
        ("prefill", prefill_shape, "ONNX Runtime", stats(ort_prefill)),
        ("decode", decode_shape, "torch eager (KV-cache graph)", stats(torch_decode)),
        ("decode", decode_shape, "ONNX Runtime", stats(ort_decode)),
        ("decode", f"no cache: {args.cache + 1} tokens", "torch eager (compiled model, recompute)", stats(recompute_times)),
    ]

    print(f"# ONNX Runtime vs torch eager on the CPU: kiln {args.preset} ({n_params / 1e6:.1f}M parameters, fp32, batch 1)")
    print()
    print(f"- command: `{' '.join([os.path.relpath(sys.executable), *sys.argv])}`")
    print(f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores; {args.threads} thread(s) each for torch and ONNX Runtime")
    print(f"- torch {torch.__version__}, onnxruntime {ort.__version__}, kiln {kiln.__version__}, Python {platform.python_version()}")
    print(f"- compile {compile_s:.1f} s; both exports (with validation) {export_s:.1f} s; "
          f"artifacts {(prefill_report.model_bytes + prefill_report.data_bytes) / 2**20:.0f} MiB each")
    print(f"- ORT fused ops per layer (prefill artifact): "
          f"{', '.join(f'{k} {v:g}' for k, v in prefill_report.ort_fused_ops_per_layer.items()) or 'none'}")
    print(f"- max |ORT - torch|: prefill {err_prefill:.2e}, decode {err_decode:.2e}; "
          f"cached decode vs recompute {err_cache:.2e}")
    print()
    print("| step | shape | runtime | median ms | min ms | p90 ms | vs torch (median) | vs torch (min) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    base = {"prefill": rows[0][3], "decode": rows[2][3]}
    for step, shape, runtime, (med, low, p90) in rows:
        ref = base[step]
        print(f"| {step} | {shape} | {runtime} | {med:.2f} | {low:.2f} | {p90:.2f} | {ref[0] / med:.2f}x | {ref[1] / low:.2f}x |")
    print()
    print("`vs torch` = torch eager time / this time (above 1: faster than torch eager). Torch and ONNX Runtime")
    print("runs alternate, so both see the same machine load; `min` is the least disturbed run.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
