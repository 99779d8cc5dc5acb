"""Host time to first token with and without prefix caching, the model replaced by a stub (issue #6).

``benchmarks/serving.py`` measures time to first token on a GPU: host work plus the step. This script
measures the host's share alone on any machine, for the prefix-caching workload of ``serving.py``
(a shared document of ``--doc-len`` tokens and ``--question-len`` new tokens per request, one request
at a time): the shipped teacher's engine runs its static step buffers (the CUDA-graph path, uncaptured)
with the model replaced by a stub (``spec_host_overhead.stub_step``). Per request: tokenization,
block hashing and lookup, scheduling, the buffer fill, sampling the first token.

Rows: caching off / on; requests whose document is cached (hit) or new every time (zero hits). The
difference between "on, zero hits" and "off" is what prefix caching costs a request it cannot help.

    python benchmarks/prefix_host_overhead.py
    python benchmarks/prefix_host_overhead.py --lookup   # the lookup alone, remembered block hashes on and off
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import kiln

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from spec_host_overhead import stub_step  # noqa: E402


def measure(caching: bool, args: argparse.Namespace) -> dict[str, float]:
    """Median host TTFT in microseconds of hit and zero-hit requests."""
    llm = kiln.LLM(str(ROOT / "models" / "kiln-teacher"), enable_prefix_caching=caching,
                   max_num_batched_tokens=4096, max_num_seqs=4,
                   max_model_len=args.doc_len + args.question_len + 16, async_scheduling=True)  # fmt: skip
    vocab = llm.model.config.vocab_size
    graphs = llm.runner.enable_cuda_graphs(max_num_seqs=4, max_model_len=llm.max_model_len, max_num_tokens=4096,
                                           capture=False)  # fmt: skip
    graphs.decode_step = graphs.mixed_step = llm.runner.step_gm = stub_step(llm.runner, vocab)
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(0, vocab, (args.doc_len,), generator=g).tolist()
    params = kiln.SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    out = {}
    for mode in ("hit", "zero hits"):
        times = []
        for i in range(args.warmup + args.requests):
            d = doc if mode == "hit" else torch.randint(0, vocab, (args.doc_len,), generator=g).tolist()
            q = torch.randint(0, vocab, (args.question_len,), generator=g).tolist()
            m = llm.generate([d + q], params, use_tqdm=False)[0].metrics
            if i >= args.warmup:
                times.append(m.first_token_time - m.arrival_time)
        out[mode] = statistics.median(times) * 1e6
    return out


def lookup_us(memo_entries: int, args: argparse.Namespace, requests: int = 300) -> float:
    """Least host time of the prefix-cache lookup (``get_computed_blocks``) of a hit, in microseconds, with the
    manager remembering ``memo_entries`` token sequences' block hashes (0: every lookup digests the prompt)."""
    import random

    from kiln.runtime import kv_cache_manager as km
    from kiln.runtime.request import Request

    saved, km.HASH_MEMO_ENTRIES = km.HASH_MEMO_ENTRIES, memo_entries
    try:
        rng = random.Random(0)
        doc = [rng.randrange(128000) for _ in range(args.doc_len)]
        kv = km.KVCacheManager(num_blocks=2 * (args.doc_len + args.question_len) // 16 + 8, block_size=16)
        best = float("inf")
        for i in range(requests + 1):  # the first request computes and caches the document
            question = [rng.randrange(128000) for _ in range(args.question_len)]
            r = Request(request_id=str(i), prompt_token_ids=doc + question)
            t = time.perf_counter()
            blocks, hit = kv.get_computed_blocks(r)
            if i:
                best = min(best, time.perf_counter() - t)
            kv.allocate_slots(r, r.num_tokens - hit, hit, blocks)
            r.num_computed_tokens = r.num_tokens
            kv.cache_blocks(r, r.num_tokens)
            kv.free(r)
        return best * 1e6
    finally:
        km.HASH_MEMO_ENTRIES = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--doc-len", type=int, default=2048)
    p.add_argument("--question-len", type=int, default=128)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--lookup", action="store_true", help="only the lookup of a hit, with and without remembered hashes")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.lookup:
        from kiln.runtime.kv_cache_manager import HASH_MEMO_ENTRIES

        off, on = lookup_us(0, args), lookup_us(HASH_MEMO_ENTRIES, args)
        print(f"prefix-cache lookup of a hit ({args.doc_len} cached + {args.question_len} new tokens), least of 300: "
              f"{off:.0f} us digesting the prompt, {on:.0f} us with remembered hashes ({off / on:.1f}x)")  # fmt: skip
        return
    off, on = measure(False, args), measure(True, args)
    print(f"host time to first token, model stubbed; {args.doc_len}-token document + {args.question_len} new "
          f"tokens; {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"torch {torch.__version__}\n")  # fmt: skip
    print("| prefix caching | hit, us | zero hits, us |")
    print("| --- | --- | --- |")
    print(f"| off | {off['hit']:.0f} | {off['zero hits']:.0f} |")
    print(f"| on | {on['hit']:.0f} | {on['zero hits']:.0f} |")
    print(f"\nzero-hit cost of caching: {on['zero hits'] - off['zero hits']:.0f} us per request")


if __name__ == "__main__":
    main()
