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

``--speculative`` measures speculative decoding on the ONNX path instead (issue #8): the
shipped teacher (``models/kiln-teacher``) exported as a KV-cache decoder and driven by
``OrtGenerator``, with prompt lookup on input-grounded prompts (eval-split Python code
repeated in the prompt) and with the shipped drafter (``models/kiln-drafter``, its own
exported decoder) on eval-split prompts, greedy, batch 1. Per workload: ms per generated
token without and with speculation (alternating prompt by prompt), the speedup, alpha =
accepted / (accepted + rejections), accepted / drafted, tokens per verification step, the
measured draft cost c (one drafter decode step over one teacher decode step in ONNX Runtime),
Leviathan et al.'s ideal speedup and the fraction of it reached, and how many outputs were
token-identical to the non-speculative ones (all must be).

    .venv/bin/python benchmarks/onnx_cpu.py --speculative [--quick] [--k 4] [--threads 1]

``--quant`` exports the shipped teacher quantized with each preset (issue #7): the lowered graph
(MatMulNBits for int4, MatMulInteger for W8A8, DequantizeLinear for int8/fp8 weights) next to
the fp32 artifact, and reports per preset the artifact size, the ONNX Runtime ops the
quantized linears became, the max relative error of ONNX Runtime's logits against kiln's own
quantized reference, perplexity on eval-split windows from both, and the median ONNX Runtime
prefill time.

    .venv/bin/python benchmarks/onnx_cpu.py --quant [--quick] [--threads 1]
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
    ap.add_argument("--speculative", action="store_true", help="speculative decoding with the shipped models instead")
    ap.add_argument("--k", type=int, default=4, help="--speculative: draft tokens per step")
    ap.add_argument("--prompts", type=int, default=12, help="--speculative: prompts per workload")
    ap.add_argument("--max-tokens", type=int, default=96, help="--speculative: tokens generated per prompt")
    ap.add_argument("--quick", action="store_true", help="--speculative / --quant: a short run")
    ap.add_argument("--quant", action="store_true", help="quantized exports of the shipped teacher instead")
    args = ap.parse_args(argv)
    if args.speculative:
        return speculative_main(args)
    if args.quant:
        return quant_main(args)

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


def speculative_main(args: argparse.Namespace) -> int:
    """``--speculative``: OrtGenerator with prompt lookup and the shipped drafter vs plain decoding."""
    import onnxruntime as ort
    import transformers

    import kiln
    from kiln.backends.onnx import OrtGenerator, export_onnx
    from kiln.models import load_model
    from kiln.runtime.speculative import SpeculativeConfig, expected_speedup

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/speculative.py: the GPU figures' prompts
    from speculative import eval_prompts, grounded_prompts

    if args.quick:
        args.prompts, args.max_tokens = 3, 32
    root = Path(__file__).resolve().parents[1]
    teacher_dir, drafter_dir = root / "models" / "kiln-teacher", root / "models" / "kiln-drafter"
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="kiln-onnx-spec-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    paths = {}
    for name, folder in (("teacher", teacher_dir), ("drafter", drafter_dir)):
        model = load_model(str(folder), dtype=torch.float32).eval()
        compiled = kiln.compile(model, (torch.randint(0, model.config.vocab_size, (1, 8)),))
        paths[name] = export_onnx(compiled, out_dir / f"kiln-{name}-kv.onnx", kv_cache=True).path
    export_s = time.perf_counter() - t0
    target = OrtGenerator(paths["teacher"], threads=args.threads)
    drafter = OrtGenerator(paths["drafter"], threads=args.threads)
    tok = transformers.AutoTokenizer.from_pretrained(str(teacher_dir))
    room = 512 - args.max_tokens - args.k - 1  # the teacher's context is 512 positions
    workloads = {
        "ngram": (grounded_prompts(tok, args.prompts, room), SpeculativeConfig(
            method="ngram", num_speculative_tokens=args.k, adaptive=False)),
        "draft": (eval_prompts(tok, args.prompts), SpeculativeConfig(
            method="draft_model", draft_model=drafter, num_speculative_tokens=args.k, adaptive=False)),
    }

    def step_ms(gen: OrtGenerator, position: int = 96, repeat: int = 31) -> float:
        _, past = gen.step(np.full((1, position), 5, np.int64), gen.empty_cache(1))
        times = []
        for i in range(repeat + 3):
            start = time.perf_counter()
            gen.step(np.array([[7]], np.int64), past)
            if i >= 3:
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    c = step_ms(drafter) / step_ms(target)
    rows = []
    for name, (prompts, config) in workloads.items():
        base_s = spec_s = 0.0
        tokens = identical = 0
        totals = dict.fromkeys(("spec_steps", "draft_tokens", "accepted_tokens", "spec_rejections", "target_calls"), 0.0)
        target.generate(torch.tensor([prompts[0]]), 8)  # warm-up, untimed
        target.generate(torch.tensor([prompts[0]]), 8, speculative=config)
        for prompt in tqdm(prompts, desc=name, leave=False, file=sys.stderr):
            ids = torch.tensor([prompt])
            start = time.perf_counter()
            plain = target.generate(ids, args.max_tokens)
            base_s += time.perf_counter() - start
            start = time.perf_counter()
            spec = target.generate(ids, args.max_tokens, speculative=config)
            spec_s += time.perf_counter() - start
            identical += bool(torch.equal(plain, spec))
            tokens += args.max_tokens
            for key in totals:
                totals[key] += target.stats[key]
        alpha = totals["accepted_tokens"] / max(totals["accepted_tokens"] + totals["spec_rejections"], 1)
        cost = c if name == "draft" else 0.0
        ideal = expected_speedup(alpha, args.k, cost) if alpha < 1 else (args.k + 1) / (args.k * cost + 1)
        speedup = base_s / spec_s
        rows.append((name, len(prompts), tokens, 1e3 * base_s / tokens, 1e3 * spec_s / tokens, speedup, alpha,
                     totals["accepted_tokens"] / max(totals["draft_tokens"], 1),
                     (totals["accepted_tokens"] + totals["spec_steps"]) / max(totals["spec_steps"], 1),
                     cost, ideal, speedup / ideal, identical))

    print("# Speculative decoding on ONNX Runtime (CPU): kiln-teacher with prompt lookup and with kiln-drafter")
    print()
    print(f"- command: `{' '.join([os.path.relpath(sys.executable), *sys.argv])}`")
    print(f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores; {args.threads} ONNX Runtime thread(s); greedy, batch 1, "
          f"k = {args.k} (fixed), {args.max_tokens} tokens per prompt; load average at the end "
          f"{os.getloadavg()[0]:.1f}")
    print(f"- torch {torch.__version__}, onnxruntime {ort.__version__}, kiln {kiln.__version__}, "
          f"Python {platform.python_version()}; compile + export (validated) of both models {export_s:.1f} s")
    print()
    print("| workload | prompts | tokens | ms/token plain | ms/token spec | speedup | alpha | accepted/drafted | "
          "tokens/verify step | c | ideal | of ideal | identical |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f}x | {r[6]:.3f} | {r[7]:.3f} | "
              f"{r[8]:.2f} | {r[9]:.3f} | {r[10]:.2f}x | {r[11]:.2f} | {r[12]}/{r[1]} |")
    print()
    print("c = median ONNX Runtime decode step (position 96) of the drafter over the teacher's; 0 for prompt lookup.")
    return 0 if all(r[12] == r[1] for r in rows) else 1


def perturbed_error(compiled: object, rows: torch.Tensor) -> float:
    """Max relative change of the compiled model's logits when its norm weights are scaled by 1 + 1e-7 noise.

    How far last-bit float differences move a graph: for one that quantizes activations at run time
    they flip values sitting on a code boundary to the neighbouring code.
    """
    gm = compiled.graph_module  # type: ignore[attr-defined]
    saved = [(t, t.clone()) for name, t in [*gm.named_parameters(), *gm.named_buffers()]
             if t.is_floating_point() and t.dim() == 1 and "norm" in name]

    def logits() -> list[torch.Tensor]:
        outs = [compiled(r[None]) for r in rows]  # type: ignore[operator]
        return [o.logits if hasattr(o, "logits") else o for o in outs]

    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        base = logits()
        for t, _ in saved:
            t.mul_(1 + 1e-7 * torch.randn(t.shape, generator=noise))
        moved = logits()
        for t, v in saved:
            t.copy_(v)
    return max(float((m - b).abs().max() / b.abs().max()) for m, b in zip(moved, base, strict=True))


def quant_main(args: argparse.Namespace) -> int:
    """``--quant``: the shipped teacher per quantization preset, ONNX Runtime against kiln's quantized reference."""
    import dataclasses

    import onnxruntime as ort
    import transformers

    import kiln
    from kiln.backends.onnx import export_onnx
    from kiln.backends.onnx.validate import op_counts, ort_session
    from kiln.eval import resolve_tokens
    from kiln.models import load_model
    from kiln.quantize import QuantConfig
    from kiln.quantize.calibrate import calibration_tokens

    windows, seq_len = (4, 128) if args.quick else (16, 256)
    root = Path(__file__).resolve().parents[1]
    teacher_dir = root / "models" / "kiln-teacher"
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="kiln-onnx-quant-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    model = load_model(str(teacher_dir), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(teacher_dir))
    stream = resolve_tokens("eval", tok)
    start = stream.numel() // 3
    batch = stream[start : start + windows * (seq_len + 1)].reshape(windows, seq_len + 1)
    calib = calibration_tokens(teacher_dir, 64 * 256, split="train")
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    rows = []
    for preset in tqdm(["fp32", "w8a16", "w4a16-g128", "w8a8", "fp8"], desc="presets", file=sys.stderr):
        quant = None
        if preset != "fp32":
            quant = QuantConfig.preset(preset)
            if quant.needs_calibration:
                quant = quant.with_calibration(calib, num_samples=64, seq_len=256)
            quant = dataclasses.replace(quant, calibration=dataclasses.replace(quant.calibration, progress=False))
        compiled = kiln.compile(model, (ids,), config=kiln.CompileConfig(quant=quant))
        t0 = time.perf_counter()
        report = export_onnx(compiled, out_dir / f"teacher-{preset}.onnx")
        export_s = time.perf_counter() - t0
        session = ort_session(report.path, threads=args.threads)
        nll_ort = nll_kiln = 0.0
        worst = 0.0
        for row in batch:
            x, y = row[None, :-1], row[1:]
            with torch.no_grad():
                want = compiled(x)
            want = want.logits if hasattr(want, "logits") else want
            (got,) = session.run(None, {"input_ids": x.numpy()})
            worst = max(worst, float(np.abs(got - want.numpy()).max() / want.abs().max()))
            nll_ort += float(torch.nn.functional.cross_entropy(torch.from_numpy(got[0]), y))
            nll_kiln += float(torch.nn.functional.cross_entropy(want[0].float(), y))
        sensitivity = perturbed_error(compiled, batch[:4, :-1])
        feed = {"input_ids": batch[:1, :-1].numpy()}
        times = []
        for i in range(3 + (5 if args.quick else 20)):
            t1 = time.perf_counter()
            session.run(None, feed)
            if i >= 3:
                times.append((time.perf_counter() - t1) * 1e3)
        ops = op_counts(report.path)
        shown = {k: v for k, v in ops.items() if k in ("com.microsoft.MatMulNBits", "MatMulInteger", "DequantizeLinear",
                                                       "QuantizeLinear", "MatMul")}
        rows.append((preset, (report.model_bytes + report.data_bytes) / 2**20, shown, report.max_rel_error, worst,
                     float(np.exp(nll_kiln / windows)), float(np.exp(nll_ort / windows)), statistics.median(times),
                     export_s, sensitivity))

    print("# Quantized ONNX exports of kiln-teacher: ONNX Runtime against kiln's quantized reference (CPU)")
    print()
    print(f"- command: `{' '.join([os.path.relpath(sys.executable), *sys.argv])}`")
    print(f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores; {args.threads} thread(s); load average at the end "
          f"{os.getloadavg()[0]:.1f}")
    print(f"- torch {torch.__version__}, onnxruntime {ort.__version__}, kiln {kiln.__version__}, "
          f"Python {platform.python_version()}; opset 23; calibration (w8a8 SmoothQuant): 64 x 256 train-split tokens")
    print(f"- perplexity: {windows} eval-split windows of {seq_len} tokens; prefill time: one {seq_len}-token window")
    print()
    print("| preset | artifact MiB | quantized linears became | export check max rel err | max rel err (eval windows) "
          "| kiln vs kiln, 1e-7 perturbed | ppl kiln | ppl ONNX Runtime | prefill ms (median) | export s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ops = ", ".join(f"{k.removeprefix('com.microsoft.')} {v}" for k, v in r[2].items())
        print(f"| {r[0]} | {r[1]:.1f} | {ops} | {r[3]:.1e} | {r[4]:.1e} | {r[9]:.1e} | {r[5]:.3f} | {r[6]:.3f} | "
              f"{r[7]:.1f} | {r[8]:.0f} |")
    print()
    print("The lm_head stays in float (the presets skip it); max rel err = max |ORT - kiln| / max |kiln| of the logits.")
    print("`kiln vs kiln, 1e-7 perturbed`: the same measure between kiln's reference and itself with its norm weights")
    print("scaled by 1 + 1e-7 noise: what last-bit float differences alone do (run-time activation codes flip).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
