"""Host time per speculative step, the model replaced by a stub (what a GPU step cannot hide in lockstep).

A speculative step runs in lockstep: the host must see the verified tokens before it drafts and
schedules the next step, so its Python work adds to the GPU's time instead of overlapping it
(``benchmarks/speculative.py`` measures the sum on a GPU). This script measures that host work
alone on any machine: the shipped teacher's engine (and, for ``draft_model``, the shipped
drafter's runner) runs its static step buffers (the CUDA-graph path, uncaptured) with the
model replaced by a stub whose logits depend only on the input token, so drafts are both
accepted and rejected. Per step: scheduling, buffer fill, verification, the drafter, n-gram
lookup, detokenization.

    python benchmarks/spec_host_overhead.py                  # ngram, ngram-async, draft_model; batch 1 and 16
    python benchmarks/spec_host_overhead.py --methods ngram --batch-sizes 16 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

import kiln
from kiln.runtime.speculative import SpeculativeConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from speculative import eval_prompts, grounded_prompts  # noqa: E402


def stub_step(runner, vocab: int):  # noqa: ANN001, ANN201
    """A step function with the graph's inputs: logits (1, rows, V) chosen by each row's input token."""
    names = list(runner.input_names)
    rows_at, ids_at = names.index("logits_indices"), names.index("input_ids")
    table = torch.randn(64, vocab, generator=torch.Generator().manual_seed(0))

    def step(*inputs):  # noqa: ANN002, ANN202
        rows = inputs[ids_at][0].index_select(0, inputs[rows_at]) % 64
        return (table.index_select(0, rows)[None],)

    return step


_DEVICE_TIME = [0.0]  # seconds spent in work a GPU does (asynchronous speculation's kernels), not the host


def _on_device(fn):  # noqa: ANN001, ANN202
    """``fn`` timed into _DEVICE_TIME: on the CPU its reference runs in Python, on a GPU it is one kernel launch."""

    def run(*a, **k):  # noqa: ANN002, ANN003, ANN202
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            _DEVICE_TIME[0] += time.perf_counter() - t

    return run


def measure(method: str, batch: int, args: argparse.Namespace) -> tuple[float, int]:
    asynchronous = method == "ngram-async"
    method = "ngram" if asynchronous else method
    spec = SpeculativeConfig(method=method, num_speculative_tokens=args.k, adaptive=False, disable_by_batch_size=None,
                             draft_model=str(ROOT / "models" / "kiln-drafter") if method == "draft_model" else None)
    llm = kiln.LLM(str(ROOT / "models" / "kiln-teacher"), enable_prefix_caching=False, max_num_batched_tokens=1024,
                   max_num_seqs=16, speculative=spec, async_scheduling=asynchronous)
    vocab = llm.model.config.vocab_size
    runners = [llm.runner] + ([llm.drafter.runner] if method == "draft_model" else [])
    for runner, rows in zip(runners, [16 * (args.k + 1), None][: len(runners)], strict=True):
        graphs = runner.enable_cuda_graphs(max_num_seqs=16, max_model_len=llm.max_model_len, max_num_tokens=1024,
                                           max_num_logits=rows, capture=False)
        graphs.decode_step = graphs.mixed_step = runner.step_gm = stub_step(runner, vocab)
    prompts = grounded_prompts(llm.tokenizer, batch, 400) if method == "ngram" else eval_prompts(llm.tokenizer, batch)
    params = kiln.SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    steps0 = llm.stats["steps"]
    _DEVICE_TIME[0] = 0.0
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    start = time.perf_counter()
    for _ in range(args.repeats):
        llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start - _DEVICE_TIME[0]
    if prof:
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(args.profile_sort).print_stats(30)
        print(out.getvalue())
    steps = int(llm.stats["steps"] - steps0)
    return elapsed / steps, steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="ngram,ngram-async,draft_model",
                   help="ngram, ngram-async (drafts on the device; their reference's time excluded), draft_model")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="print a cProfile of the timed runs")
    p.add_argument("--profile-sort", default="cumulative", help="pstats sort key (cumulative, tottime, ...)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import kiln.runtime.cuda_graphs as cg
    import kiln.runtime.spec_async as sa

    # asynchronous speculation's device side (verification, lookup, feed) is not host time: excluded
    sa.spec_advance, sa.greedy_argmax, cg.apply_feed = (_on_device(f) for f in (sa.spec_advance, sa.greedy_argmax,
                                                                               cg.apply_feed))  # fmt: skip
    rows = []
    for method in args.methods.split(","):
        for b in (int(x) for x in args.batch_sizes.split(",")):
            per_step, steps = measure(method, b, args)
            rows.append((method, b, per_step, steps))
            print(f"{method} batch {b}: {per_step * 1e6:.0f} us of host time per step ({steps} steps)", flush=True)
    print(f"\n| method | batch | host us per step | steps | (torch {torch.__version__}, k = {args.k}) |")
    print("| --- | --- | --- | --- | --- |")
    for method, b, per_step, steps in rows:
        print(f"| {method} | {b} | {per_step * 1e6:.0f} | {steps} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
