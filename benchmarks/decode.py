"""Batch-1 decode speed of kiln's runtime against the memory roofline and transformers (issue #6).

For Llama-3.2-1B- and Llama-3.1-8B-shaped models (kiln presets ``llama-1b`` / ``llama-8b``,
random bf16 weights drawn directly on the GPU) one greedy request of a ``--prompt-len``
token prompt decodes ``--new-tokens`` tokens through:

- kiln ``LLM`` (asynchronous scheduling) op by op (``enforce_eager``), with CUDA graphs for
  the decode steps, and with CUDA graphs over the decode graph fused by ``torch.compile``
  (inductor);
- transformers ``LlamaForCausalLM`` (same shapes, the very same weight tensors) ``generate``
  eager (dynamic cache), and ``generate`` with a static cache, which transformers compiles
  with ``torch.compile(mode="reduce-overhead")`` for the decode steps.

Time per output token is measured the same way for every system: the wall time of a
``generate`` of N tokens minus that of N/2 tokens, over N/2 (each the median of
``--repeats`` runs after a warm-up run of N), so prefill and per-call setup cancel out.

The roofline: each decoded token must read every weight the step uses (the LM head in
full, one row of an untied embedding) and the KV cache of its context (here the mean
context of the timed tokens), at the device's copy bandwidth, measured in the same run with
a large device-to-device copy (bytes read + bytes written over the time).

Correctness is checked first, against an fp32 reference (transformers on an fp32 copy of the
same weights): kiln's bf16 logits after the prompt must be about as close to it as transformers'
own bf16 logits (within 1.25x their error, plus a small floor), and each graphed kiln variant's
decode-step logits about as close as kiln's op-by-op step; greedy tokens are compared for
information (bf16 near-ties flip them).

    python benchmarks/decode.py                 # H100: both models, all systems (~5 min)
    python benchmarks/decode.py --models llama-1b --skip hf-compile
    python benchmarks/decode.py --quick         # CPU smoke run on llama-tiny (fp32)
    python benchmarks/decode.py --models llama-1b --skip kiln-eager kiln-graphs hf-eager hf-compile \
        --profile 8 --disable merge-parallel-linears lower-decode-linears   # ablation + kernel table
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import kiln
from kiln.models import from_preset
from kiln.runtime.model_runner import COMPILE_MODES, SequenceStep

TARGET_ROOFLINE, TARGET_VS_COMPILE = 0.70, 1.0  # issue #6
SYSTEMS = ("kiln-eager", "kiln-graphs", "kiln-compile", "hf-eager", "hf-compile")
LABELS = {
    "kiln-eager": "kiln, op by op",
    "kiln-graphs": "kiln, CUDA graphs",
    "kiln-compile": "kiln, CUDA graphs + inductor",
    "hf-eager": "transformers generate, eager",
    "hf-compile": "transformers generate, static cache + torch.compile",
}


@dataclass
class Result:
    """One system's decode speed on one model."""

    system: str
    ms_per_token: float | None = None
    tokens: list[int] = field(default_factory=list)  # greedy tokens of the long run
    error: str | None = None
    note: str = ""


def gemv_choices() -> str:
    """The bf16 GEMV tuner's pick per (rows, N, K), with its time against the runner-up (timed cold, apart)."""
    from kiln.backends.triton.gemv import TUNER

    picks = []
    for key, timings in TUNER.timings.items():
        (best, t0), (_, t1) = timings[0], timings[1] if len(timings) > 1 else timings[0]
        picks.append(f"{key[2]}x{key[3]} m{key[1]}: {best} {t0 * 1e3:.1f} us (next {t1 * 1e3:.1f})")  # (op, m, n, k, ..)
    return "gemv picks: " + ("; ".join(picks) or "none timed")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, gib: float) -> float:
    """Device copy bandwidth in GB/s: bytes read plus bytes written by ``dst.copy_(src)`` (median of 10)."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n / statistics.median(times[2:]) / 1e9


def bytes_per_token(model: torch.nn.Module, context: float) -> tuple[float, float]:
    """(weight bytes, KV bytes) one decode step reads at ``context`` cached tokens."""
    cfg = model.config
    seen, weights = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            weights += p.numel() * p.element_size()
    emb = model.model.embed_tokens.weight
    if model.lm_head.weight is not emb:  # an untied embedding is read one row per token
        weights -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * emb.element_size() * context
    return float(weights), float(kv)


def disable_passes(names: list[str]) -> None:
    """Build kiln.LLM's step graphs without the passes ``names`` (ablations): its runner compiles with them off."""
    from kiln.runtime import engine
    from kiln.runtime.model_runner import ModelRunner

    class Runner(ModelRunner):
        def __init__(self, *a: object, **kw: object) -> None:
            if kw.get("compile_config") is None:  # the engine passes compile_config=None by default
                kw["compile_config"] = kiln.CompileConfig(kv_cache=True, disable=tuple(names))
            super().__init__(*a, **kw)  # type: ignore[arg-type]

    engine.ModelRunner = Runner  # type: ignore[misc]


def profile_steps(fn: Callable[[int], list[int]], steps: int, device: torch.device) -> str:
    """A kernel table of ``steps`` decode tokens (a run of 2*steps minus its prefill half, per token):
    kernel name, launches per token, microseconds per token, share of the GPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"  # the CPU (smoke runs) profiles operators instead of kernels

    def kernels(n: int) -> dict[str, tuple[int, float]]:
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            fn(n)
            sync(device)
        out: dict[str, tuple[int, float]] = {}
        kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
        for e in prof.events():
            if e.device_type == kind:
                c, us = out.get(e.name, (0, 0.0))
                out[e.name] = (c + 1, us + (e.device_time if cuda else e.self_cpu_time_total))
        return out

    fn(2 * steps)
    long, short = kernels(2 * steps), kernels(steps)  # the difference is `steps` decode tokens
    rows = []
    for name, (c, us) in long.items():
        c0, us0 = short.get(name, (0, 0.0))
        if c > c0:
            rows.append((name, (c - c0) / steps, (us - us0) / steps))
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    lines = [
        f"GPU kernel time per decode token: {total:.1f} us in {sum(r[1] for r in rows):.0f} launches",
        "| kernel | launches/token | us/token | share |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {n[:90]} | {c:.1f} | {us:.1f} | {us / total:.1%} |" for n, c, us in rows[:30]]
    return "\n".join(lines)


def hf_twin(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with ``model``'s config, sharing its weight tensors (no copy)."""
    import transformers

    cfg = transformers.LlamaConfig(**model.config.to_dict())
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False, assign=True)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(
            f"weights do not map onto transformers' Llama: missing {missing}, unexpected {unexpected}"
        )
    if cfg.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    device = model.model.embed_tokens.weight.device
    with torch.device("cpu"):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg).to(device)  # its buffers were on meta
    return hf.eval()


def timed(
    fn: Callable[[int], list[int]], n: int, repeats: int, device: torch.device
) -> tuple[float, list[int]]:
    """Median seconds of ``fn(n)`` over ``repeats`` runs, and its tokens."""
    times, tokens = [], []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        tokens = fn(n)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), tokens


def measure(fn: Callable[[int], list[int]], args: argparse.Namespace, device: torch.device) -> Result:
    """ms per output token: (t(N) - t(N/2)) / (N/2), after one warm-up run of N.

    The warm-up is the longest run: transformers sizes its static cache to the longest
    request so far, and a longer one would recompile inside the timed runs.
    """
    n, half = args.new_tokens, args.new_tokens // 2
    fn(n)  # warm-up: compilation, graph recording, autotuning
    t_long, tokens = timed(fn, n, args.repeats, device)
    t_short, _ = timed(fn, half, args.repeats, device)
    if len(tokens) != n:
        raise RuntimeError(f"generated {len(tokens)} tokens, expected {n}")
    return Result(system="", ms_per_token=(t_long - t_short) / (n - half) * 1e3, tokens=tokens)


def run_model(
    name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, bw: float
) -> dict:
    """Every system on preset ``name``; returns the model's report."""
    import transformers

    t_start = time.perf_counter()
    model = from_preset(name, dtype=dtype, device=device, seed=0)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_len,), generator=gen).tolist()
    weights, _ = bytes_per_token(model, 0)
    mean_ctx = args.prompt_len + 0.75 * args.new_tokens  # the timed tokens are the second half
    _, kv = bytes_per_token(model, mean_ctx)
    report = {"model": name, "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
              "weight_bytes": weights, "kv_bytes": kv, "roofline_ms": (weights + kv) / (bw * 1e9) * 1e3,
              "results": {}, "checks": [], "profiles": {}}  # fmt: skip
    hf = hf_twin(model)
    max_len = args.prompt_len + args.new_tokens + 16
    llm = kiln.LLM(model, max_num_seqs=1, max_model_len=max_len, enable_prefix_caching=False,
                   kv_cache_memory=args.kv_cache_mib * 2**20, enforce_eager=True, async_scheduling=True)  # fmt: skip

    # correctness against an fp32 reference of the same weights: after the prompt, and after one more token
    with torch.no_grad():
        ids = torch.tensor([prompt + [prompt[0]]], device=device)
        ref32 = hf if dtype == torch.float32 else copy.deepcopy(hf).float()
        ref = ref32(ids).logits[0, -2:].float()  # (2, V): the prefill's last position, then the decode step
        del ref32
        if device.type == "cuda":
            torch.cuda.empty_cache()
        blocks = list(range(-(-args.prompt_len // llm.runner.block_size)))
        got = llm.runner.execute([SequenceStep(prompt, 0, blocks)])[0]
        hf_low = hf(ids[:, :-1]).logits[0, -1].float()
    floor = 1e-5 if dtype == torch.float32 else 5e-3  # rounding differences any two kernels show

    def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).norm() / y.norm())

    def close_enough(label: str, err: float, baseline: float, baseline_name: str) -> None:
        report["checks"].append(
            (
                f"{label}: relative error to fp32 {err:.2e}, {baseline_name} {baseline:.2e} "
                f"(allowed {1.25 * baseline + floor:.2e})",
                err <= 1.25 * baseline + floor,
            )
        )

    close_enough(
        f"prefill logits ({dtype}), same argmax as fp32: {bool(got.argmax() == ref[0].argmax())}",
        rel_err(got, ref[0]),
        rel_err(hf_low, ref[0]),
        "transformers",
    )

    def kiln_fn(n: int) -> list[int]:
        params = kiln.SamplingParams(temperature=0, ignore_eos=True, max_tokens=n)
        return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids

    def hf_fn(static: bool) -> Callable[[int], list[int]]:
        ids = torch.tensor([prompt], device=device)
        kw: dict = {"cache_implementation": "static"} if static else {"disable_compile": True}
        if static and device.type != "cuda":  # transformers compiles only on accelerators unless told
            cc = transformers.CompileConfig()
            cc._compile_all_devices = True
            kw["compile_config"] = cc

        def fn(n: int) -> list[int]:
            with torch.no_grad():
                out = hf.generate(
                    ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, **kw
                )
            return out[0, len(prompt) :].tolist()

        return fn

    def check_decode_step(system: str) -> None:
        """One decode step on the system's graphs and op by op, from the same cache, against fp32."""
        runner = llm.runner
        blocks = list(range(-(-(args.prompt_len + 1) // runner.block_size)))
        runner.execute([SequenceStep(prompt, 0, blocks)])
        saved = [c.clone() for c in runner.caches]
        step = [SequenceStep([prompt[0]], args.prompt_len, blocks)]
        got = runner.execute(step)[0]
        for c, s in zip(runner.caches, saved, strict=True):
            c.copy_(s)
        graphs, runner.graphs = runner.graphs, None
        want = runner.execute(step)[0]
        runner.graphs = graphs
        close_enough(f"{system} decode-step logits", rel_err(got, ref[1]), rel_err(want, ref[1]), "op by op")

    def setup(system: str) -> Callable[[int], list[int]]:
        runner = llm.runner
        if system == "kiln-eager":
            runner.graphs = None
        elif system == "kiln-graphs":
            runner.enable_cuda_graphs(
                max_num_seqs=1, max_model_len=llm.max_model_len, capture=device.type == "cuda"
            )
        elif system == "kiln-compile":
            runner.enable_cuda_graphs(max_num_seqs=1, max_model_len=llm.max_model_len, capture=device.type == "cuda",
                                      torch_compile=args.compile_mode or True)  # fmt: skip
        else:
            return hf_fn(static=system == "hf-compile")
        return kiln_fn

    for system in tqdm([s for s in SYSTEMS if s not in args.skip], desc=name, unit="system"):
        t0 = time.perf_counter()
        try:
            fn = setup(system)
            if system in ("kiln-graphs", "kiln-compile"):
                check_decode_step(system)
            r = measure(fn, args, device)
            if system == "hf-compile" and getattr(hf, "_compiled_call", None) is None:
                raise RuntimeError("transformers did not compile its forward: the baseline would be eager")
        except Exception as e:  # a failing system is reported in the table, not hidden
            traceback.print_exc()
            r = Result(system=system, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        r.system = system
        r.note = f"{time.perf_counter() - t0:.0f} s"
        if args.profile and system.startswith("kiln") and r.error is None:
            report["profiles"][system] = profile_steps(fn, args.profile, device)
            tqdm.write(report["profiles"][system])
        report["results"][system] = r
        tqdm.write(f"  {name} {system}: " + (f"{r.ms_per_token:.3f} ms/token" if r.error is None else r.error)
                   + f" ({r.note})")  # fmt: skip
        if system == "kiln-graphs" and device.type == "cuda":
            tqdm.write("  " + gemv_choices())
    ref = report["results"].get("kiln-eager")
    for system in ("kiln-graphs", "kiln-compile"):
        r = report["results"].get(system)
        if ref is not None and ref.error is None and r is not None and r.error is None:
            same = next(
                (i for i, (a, b) in enumerate(zip(ref.tokens, r.tokens, strict=True)) if a != b), None
            )
            # random weights give near-uniform logits: a bf16 rounding difference may flip a near-tie
            report["checks"].append((f"{system} greedy tokens vs kiln op by op: "
                                     + ("identical" if same is None else f"first differ at token {same} (informative)"),
                                     True))  # fmt: skip
    hf_eager = report["results"].get("hf-eager")
    if ref is not None and ref.error is None and hf_eager is not None and hf_eager.error is None:
        same = next(
            (i for i, (a, b) in enumerate(zip(ref.tokens, hf_eager.tokens, strict=True)) if a != b), None
        )
        report["checks"].append(("kiln greedy tokens vs transformers eager: "
                                 + ("identical" if same is None else f"first differ at token {same} (informative)"),
                                 True))  # fmt: skip
    report["seconds"] = time.perf_counter() - t_start
    return report


def release_memory(device: torch.device) -> None:
    """Free the last model's graphs, compiled code and cached blocks before the next one."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_report(reports: list[dict], bw: float, args: argparse.Namespace, device: torch.device) -> bool:
    """The table; returns whether every check passed and no system failed."""
    ok = True
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n## Batch-1 decode, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, greedy "
          f"({dev}, torch {torch.__version__}, copy bandwidth {bw:.0f} GB/s)")  # fmt: skip
    for rep in reports:
        print(f"\n### {rep['model']}: {rep['params'] / 1e9:.2f}B parameters, "
              f"{rep['weight_bytes'] / 1e9:.2f} GB weights + {rep['kv_bytes'] / 1e6:.1f} MB KV per token "
              f"-> roofline {rep['roofline_ms']:.3f} ms/token ({1e3 / rep['roofline_ms']:.0f} tokens/s); "
              f"{rep['seconds']:.0f} s")  # fmt: skip
        res = rep["results"]
        base = {
            k: res[k].ms_per_token for k in ("hf-eager", "hf-compile") if k in res and res[k].error is None
        }
        print("\n| system | tokens/s | ms/token | % roofline | vs HF eager | vs HF compile |")
        print("| --- | --- | --- | --- | --- | --- |")
        for system, r in res.items():
            if r.error is not None:
                print(f"| {LABELS[system]} | FAILED: {r.error} | | | | |")
                ok = False
                continue
            ms = r.ms_per_token
            cells = [f"{1e3 / ms:.0f}", f"{ms:.3f}", f"{100 * rep['roofline_ms'] / ms:.0f}%"]
            cells += [f"{base[k] / ms:.2f}x" if k in base else "-" for k in ("hf-eager", "hf-compile")]
            print(f"| {LABELS[system]} | " + " | ".join(cells) + " |")
        for system, table in rep["profiles"].items():
            print(f"\n{LABELS[system]}, profiled ({args.profile} decode tokens):\n{table}")
        for text, passed in rep["checks"]:
            print(f"- check: {text}: {'ok' if passed else 'FAILED'}")
            ok &= passed
        best = min(
            (r.ms_per_token for s, r in res.items() if s.startswith("kiln") and r.error is None), default=None
        )
        if best is not None:
            frac = rep["roofline_ms"] / best
            line = f"- best kiln: {frac:.0%} of roofline (target >= {TARGET_ROOFLINE:.0%}: " \
                   f"{'met' if frac >= TARGET_ROOFLINE else 'NOT met'})"  # fmt: skip
            if "hf-compile" in base:
                ratio = base["hf-compile"] / best
                line += f"; {ratio:.2f}x transformers + torch.compile (target >= {TARGET_VS_COMPILE:.1f}x: " \
                        f"{'met' if ratio >= TARGET_VS_COMPILE else 'NOT met'})"  # fmt: skip
            print(line)
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["llama-1b", "llama-8b"])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kv-cache-mib", type=int, default=256)
    p.add_argument("--skip", nargs="*", default=[], choices=SYSTEMS)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: llama-tiny, fp32, short prompt")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing each kiln system, print its GPU kernels per decode token over N tokens",
    )
    p.add_argument(
        "--compile-mode",
        default=None,
        choices=COMPILE_MODES,
        help="inductor mode of kiln-compile's step graph (default: torch.compile's default)",
    )
    p.add_argument(
        "--disable",
        nargs="*",
        default=[],
        metavar="PASS",
        help="build kiln's step graph without these passes (ablation, e.g. merge-parallel-linears)",
    )
    args = p.parse_args(argv)
    if args.disable:
        disable_passes(args.disable)
        print(f"step graph built without: {', '.join(args.disable)}")
    if args.quick:
        args.models, args.prompt_len, args.new_tokens, args.repeats = ["llama-tiny"], 16, 16, 1
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (use --quick for a CPU smoke run)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    if args.new_tokens < 4 or args.new_tokens % 2:
        p.error("--new-tokens must be an even number >= 4")
    torch.manual_seed(0)
    bw = copy_bandwidth(device, 0.25 if args.quick else 2.0)
    print(f"copy bandwidth: {bw:.0f} GB/s")
    reports = []
    for name in args.models:
        reports.append(run_model(name, args, device, dtype, bw))
        release_memory(device)
    return 0 if print_report(reports, bw, args, device) else 1


if __name__ == "__main__":
    sys.exit(main())
