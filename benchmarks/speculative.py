"""Speculative decoding with kiln's shipped models (issue #8's figures).

Two workloads, each decoded without and then with speculation (greedy unless ``--temperature``),
at batch 1 and 16:

- ``ngram``: prompt lookup on input-grounded prompts. Each prompt is a chunk of Python source
  from the held-out eval split followed by its first lines again, so the continuation is
  code that is already in the prompt (the shape of editing or continuing a file).
- ``draft``: the shipped drafter (``models/kiln-drafter``) drafting for the shipped teacher
  (``models/kiln-teacher``) on eval-split prompts (64-token windows of held-out documents).

For each: time per generated token without and with speculation and their ratio (the
speedup), the per-token acceptance ``alpha`` = accepted / (accepted + rejections) (drafts
after the first rejection are never judged), the acceptance rate accepted / drafted, tokens
per verification step, the measured draft cost ratio ``c`` (one draft-model decode step over
one target decode step at the same batch; 0 for prompt lookup), and Leviathan et al.'s
ideal speedup ``(1 - alpha^(k+1)) / ((1 - alpha)(k c + 1))`` with the speedup's fraction of
it. k is fixed (``adaptive=False``) unless ``--adaptive``; speculation stays on at batch 16
(``disable_by_batch_size=None``); prefix caching is off so both runs compute the same work.

    python benchmarks/speculative.py                        # on a GPU
    python benchmarks/speculative.py --device cpu --quick   # a few prompts on the CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import kiln
from kiln.data.corpus import read_eval_split
from kiln.runtime.model_runner import SequenceStep
from kiln.runtime.speculative import SpeculativeConfig, expected_speedup

ROOT = Path(__file__).resolve().parents[1]


def grounded_prompts(tokenizer, n: int, max_prompt_tokens: int, lines: int = 16) -> list[list[int]]:
    """Eval-split Python chunks of ``lines`` lines, then the chunk again cut after a third of its tokens.

    The cut is made on the tokens of the whole text, so the prompt ends at a token boundary
    the model has seen (a prompt ending in a bare newline would not).
    """
    out = []
    for doc in read_eval_split():
        if not doc.path.endswith(".py"):
            continue
        text = doc.text.splitlines()
        start = len(text) // 3  # past the module docstring and imports, into code
        chunk = "\n".join(text[start : start + lines])
        if sum(1 for ln in text[start : start + lines] if ln.strip()) < lines // 2:
            continue
        size = len(tokenizer.encode(chunk))
        full = tokenizer.encode(chunk + "\n\n" + chunk)
        ids = full[: len(full) - size + size // 3]
        if 96 <= len(ids) <= max_prompt_tokens:
            out.append(ids)
        if len(out) == n:
            break
    return out


def eval_prompts(tokenizer, n: int, length: int = 64) -> list[list[int]]:
    """``length``-token windows of held-out documents, one per document, from a third of the way in."""
    out = []
    for doc in read_eval_split():
        ids = tokenizer.encode(doc.text)
        if len(ids) >= 3 * length:
            start = len(ids) // 3
            out.append(ids[start : start + length])
        if len(out) == n:
            break
    return out


def timed_generate(llm: kiln.LLM, prompts, params) -> tuple[float, int]:
    if llm.runner.device.type == "cuda":
        torch.cuda.synchronize(llm.runner.device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    if llm.runner.device.type == "cuda":
        torch.cuda.synchronize(llm.runner.device)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


def step_time(runner, batch: int, position: int, repeat: int = 21) -> float:
    """Median seconds of one decode step of ``batch`` sequences at ``position`` (overwrites blocks 0..: call it
    only while no request is running, and without prefix caching)."""
    per = position // runner.block_size + 1
    steps = [SequenceStep([7], position, list(range(i * per, (i + 1) * per))) for i in range(batch)]
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(repeat + 3):
        sync()
        start = time.perf_counter()
        runner.execute(steps)
        sync()
        if i >= 3:  # warm-up calls are not counted
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(ROOT / "models" / "kiln-teacher"))
    parser.add_argument("--drafter", default=str(ROOT / "models" / "kiln-drafter"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per step (num_speculative_tokens)")
    parser.add_argument("--adaptive", action="store_true", help="let the policy adapt k per request")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per run at batch 1 (batch B runs max(B, this))")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: exact speculative sampling")
    parser.add_argument("--workloads", default="ngram,ngram-lockstep,draft",
                        help="ngram (asynchronous on a GPU), ngram-lockstep, draft")
    parser.add_argument("--quick", action="store_true", help="4 prompts per run, 48 tokens each")
    parser.add_argument("--torch-compile", action="store_true",
                        help="inductor-fused step graphs for the baseline and the speculative engines (GPU)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.max_tokens = 4, 48
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    params = kiln.SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=True)
    common = dict(device=dev, dtype=dtype, enable_prefix_caching=False, max_num_batched_tokens=4096,
                  torch_compile=args.torch_compile)
    base = kiln.LLM(args.teacher, **common)
    tok = base.tokenizer
    room = base.max_model_len - args.max_tokens
    need = max(max(batches), args.prompts)
    ngram = SpeculativeConfig(method="ngram", num_speculative_tokens=args.k, adaptive=args.adaptive,
                              disable_by_batch_size=None)  # fmt: skip
    workloads = {  # name: (prompts, config, other kiln.LLM arguments)
        "ngram": (grounded_prompts(tok, need, room), ngram, {}),  # asynchronous on a GPU (drafts on the device)
        "ngram-lockstep": (grounded_prompts(tok, need, room), ngram, {"async_scheduling": False}),
        "draft": (eval_prompts(tok, need), SpeculativeConfig(
            method="draft_model", draft_model=args.drafter, num_speculative_tokens=args.k, adaptive=args.adaptive,
            disable_by_batch_size=None), {}),
    }
    print(f"teacher {args.teacher}, drafter {args.drafter}; {dev} {dtype}; k={args.k} T={args.temperature} "
          f"{'adaptive' if args.adaptive else 'fixed'}; {args.max_tokens} tokens per prompt; "
          f"{'inductor-fused step graphs; ' if args.torch_compile else ''}torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.processor() or platform.machine()}",
          flush=True)
    rows = []
    for name in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        prompts, spec, extra = workloads[name]
        llm = kiln.LLM(args.teacher, speculative=spec, **common, **extra)
        for b in batches:
            batch_prompts = prompts[: max(b, args.prompts)]
            base.scheduler.config = _with_max_seqs(base.scheduler.config, b)
            llm.scheduler.config = _with_max_seqs(llm.scheduler.config, b)
            # An untimed pass over the same prompts first: Triton compiles kernels for the
            # shapes and context lengths it meets, and that must not land in either timing.
            timed_generate(base, batch_prompts, params)
            timed_generate(llm, batch_prompts, params)
            t_base, n_base = timed_generate(base, batch_prompts, params)
            before = dict(llm.stats)
            t_spec, n_spec = timed_generate(llm, batch_prompts, params)
            d = {key: llm.stats[key] - before[key] for key in ("spec_steps", "draft_tokens", "accepted_tokens",
                                                               "spec_rejections", "steps")}
            alpha = d["accepted_tokens"] / max(d["accepted_tokens"] + d["spec_rejections"], 1)
            mean_k = d["draft_tokens"] / max(d["spec_steps"], 1)
            if name == "draft":
                c = step_time(llm.drafter.runner, b, 96) / step_time(llm.runner, b, 96)
            else:
                c = 0.0
            ideal = expected_speedup(alpha, args.k, c) if alpha < 1 else (args.k + 1) / (args.k * c + 1)
            speedup = (t_base / n_base) / (t_spec / n_spec)
            row = {
                "workload": name, "batch": b, "prompts": len(batch_prompts), "tokens": n_spec,
                "ms_per_token_base": 1e3 * t_base / n_base, "ms_per_token_spec": 1e3 * t_spec / n_spec,
                "speedup": speedup, "alpha": alpha, "acceptance_rate": d["accepted_tokens"] / max(d["draft_tokens"], 1),
                "tokens_per_verify_step": (d["accepted_tokens"] + d["spec_steps"]) / max(d["spec_steps"], 1),
                "tokens_per_step": n_spec / max(d["steps"], 1), "verify_steps": d["spec_steps"], "steps": d["steps"],
                "mean_k": mean_k, "c": c, "ideal_speedup": ideal, "fraction_of_ideal": speedup / ideal,
            }
            rows.append(row)
            print(f"{name:14s} batch {b:3d}: {row['ms_per_token_base']:.2f} -> {row['ms_per_token_spec']:.2f} ms/token "
                  f"(speedup {speedup:.2f}x), alpha {alpha:.3f}, accepted/drafted {row['acceptance_rate']:.3f}, "
                  f"{row['tokens_per_verify_step']:.2f} tokens/verify step ({d['spec_steps']} of {d['steps']} steps verify; "
                  f"{row['tokens_per_step']:.2f} tokens/step), mean k {mean_k:.2f}, c {c:.3f}, "
                  f"ideal {ideal:.2f}x ({speedup / ideal:.2f} of it)", flush=True)
    print()
    print("| workload | batch | ms/token base | ms/token spec | speedup | alpha | accepted/drafted | "
          "tokens/verify step | tokens/step | c | ideal | of ideal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['workload']} | {r['batch']} | {r['ms_per_token_base']:.2f} | {r['ms_per_token_spec']:.2f} | "
              f"{r['speedup']:.2f}x | {r['alpha']:.3f} | {r['acceptance_rate']:.3f} | "
              f"{r['tokens_per_verify_step']:.2f} | {r['tokens_per_step']:.2f} | {r['c']:.3f} | {r['ideal_speedup']:.2f}x | "
              f"{r['fraction_of_ideal']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _with_max_seqs(config, n: int):
    import dataclasses

    return dataclasses.replace(config, max_num_seqs=n)


if __name__ == "__main__":
    sys.exit(main())
