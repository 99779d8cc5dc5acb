"""Quality of kiln's quantized paged KV cache on the shipped teacher: perplexity and greedy agreement.

For each cache format (the model's own dtype, int8 with a scale per token and KV head, fp8
e4m3 with static per-layer k/v scales of 1.0 as vLLM without checkpoint scales, fp8 with
calibrated static scales, fp8 with per-token scales) it reports

- perplexity on the evaluation split, every window prefilled through the paged step graph
  (so each query reads the quantized keys and values of its window, its own included), and
  the increase over the full-precision cache;
- greedy generation with ``kiln.LLM`` from prompts of the evaluation split: the fraction of
  generated tokens equal to the full-precision cache's at the same position, the fraction of
  requests generated identically, and the mean position of the first difference;
- the KV blocks that fit in the same memory.

Runs on the CPU (reference attention): 24 minutes on 2 shared cores with the defaults::

    python benchmarks/kv_cache_quality.py                 # 32k tokens, 16 prompts x 64 tokens
    python benchmarks/kv_cache_quality.py --tokens 4096 --prompts 4
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import kiln
from kiln.eval import resolve_tokens
from kiln.models import load_model
from kiln.quantize import Calibration, PerTensor, QuantConfig, QuantSpec
from kiln.runtime.model_runner import ModelRunner, SequenceStep

ROOT = Path(__file__).resolve().parents[1]


def formats(calibration_tokens: torch.Tensor) -> dict[str, dict]:
    """kiln.LLM keyword arguments of each cache format."""
    calibrated = QuantConfig(
        weights=None, kv_cache=QuantSpec(dtype="fp8_e4m3", granularity=PerTensor()),
        calibration=Calibration(data=calibration_tokens, num_samples=32, seq_len=512, progress=False),
    )  # fmt: skip
    return {
        "auto": {},
        "int8": {"kv_cache_dtype": "int8"},
        "fp8": {"kv_cache_dtype": "fp8"},
        "fp8 calibrated": {"kv_cache_dtype": calibrated},
        "fp8-per-token": {"kv_cache_dtype": "fp8-per-token"},
    }


@torch.no_grad()
def nll(runner: ModelRunner, tokens: torch.Tensor, window: int) -> float:
    """Mean next-token NLL over non-overlapping windows, each prefilled through the paged graph."""
    total, count = 0.0, 0
    starts = range(0, tokens.numel() - window, window)
    for s in tqdm(starts, desc="perplexity", leave=False):
        ids = tokens[s : s + window + 1]
        blocks = list(range(-(-window // runner.block_size)))
        logits = runner.execute([SequenceStep(ids[:-1].tolist(), 0, blocks, num_logits=window)])
        total += torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
        count += window
    return total / count


def greedy(llm: kiln.LLM, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = kiln.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def agreement(got: list[list[int]], want: list[list[int]]) -> tuple[float, float, float]:
    """(token agreement, identical requests, mean first-difference position)."""
    pairs = [(a, b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True)]
    firsts = [
        next((i for i, (a, b) in enumerate(zip(g, w, strict=True)) if a != b), len(w))
        for g, w in zip(got, want, strict=True)
    ]
    same = sum(g == w for g, w in zip(got, want, strict=True)) / len(want)
    return sum(a == b for a, b in pairs) / len(pairs), same, sum(firsts) / len(firsts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "kiln-teacher"))
    p.add_argument("--tokens", type=int, default=32768, help="evaluation tokens scored")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--memory", type=int, default=64 << 20, help="KV-cache bytes of the engines")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = load_model(args.model, dtype=torch.float32).eval()
    evals = resolve_tokens("eval", args.model)
    tokens = evals[: args.tokens + 1]
    calib = resolve_tokens("train", args.model)[: 32 * 512]
    step = evals.numel() // args.prompts
    prompts = [evals[i * step : i * step + args.prompt_len].tolist() for i in range(args.prompts)]
    print(f"model {args.model}  torch {torch.__version__}  {platform.processor() or platform.machine()}  "
          f"{args.tokens} eval tokens (windows of {args.window}), {args.prompts} prompts x {args.new_tokens} greedy tokens")  # fmt: skip
    print("\n| cache | perplexity | increase | greedy tokens equal | requests identical | first difference at | "
          f"blocks in {args.memory >> 20} MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|", flush=True)
    base, want = None, None
    for name, kw in tqdm(formats(calib).items(), desc="formats"):
        llm = kiln.LLM(model, kv_cache_memory=args.memory, block_size=16, enable_prefix_caching=False, **kw)
        out = greedy(llm, prompts, args.new_tokens)
        kv = llm.scheduler.kv_cache_manager
        assert kv.num_free_blocks == kv.num_blocks, "blocks leaked"
        loss = nll(llm.runner, tokens, args.window)  # every block is free again: the windows reuse them
        if base is None:
            base, want = loss, out
        tok, same, first = agreement(out, want)
        ppl, inc = math.exp(loss), 100 * (math.exp(loss - base) - 1)
        tqdm.write(f"| {name} | {ppl:.4f} | {inc:+.3f}% | {100 * tok:.1f}% | {100 * same:.0f}% | {first:.1f} | "
                   f"{llm.runner.num_blocks} |")  # fmt: skip
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
