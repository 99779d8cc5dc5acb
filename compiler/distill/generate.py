"""Data distillation: the teacher writes training text with kiln's engine, filtered for quality.

Prompts are windows of the training stream. The teacher continues each with ``kiln.LLM``
(continuous batching over a paged KV cache) ``samples_per_prompt`` times with different seeds.
Prompts go in chunks of ``max_num_seqs``, each chunk in rounds: the first round computes the
prompts' KV, later rounds find the prompts' full blocks in the prefix cache and compute only
the new tokens. (One round over every prompt, then the next, would cycle through more blocks
than the cache holds, and LRU eviction would drop each prompt's blocks before their reuse.) Continuations are then filtered
(sequence-level knowledge distillation, Kim and Rush, EMNLP 2016; filtering generated data by
the teacher's likelihood and by duplication as in e.g. Gunasekar et al., "Textbooks Are All You
Need", 2023, and Lee et al., "Deduplicating Training Data Makes Language Models Better", ACL 2022):

1. length: continuations that stop (EOS) before ``min_new_tokens``;
2. duplicates: exact repeats of an earlier continuation;
3. repetition: degenerate loops, fewer distinct 4-grams than ``min_distinct_4grams`` of them;
4. teacher log-probability: a mean log-prob per token below ``min_mean_logprob``, then all but
   the ``keep_fraction`` most likely.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from kiln.distill.config import DataDistillation
from kiln.errors import ConfigError


@dataclass
class GeneratedData:
    """Teacher-written sequences that passed the filters."""

    sequences: Tensor  # (N, L) int64: prompt then continuation, zero-padded after an early EOS
    trained: Tensor  # (N, L) bool: tokens the student learns to predict (the continuation; + prompt if asked)
    mean_logprob: Tensor  # (N,) the teacher's mean log-probability per continuation token
    stats: dict[str, Any] = field(default_factory=dict)  # counts per filter, tokens, prefix-cache savings, time

    def save(self, path: str | Path) -> Path:
        """Write to a safetensors file (stats in its metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"sequences": self.sequences.contiguous(), "trained": self.trained.to(torch.uint8).contiguous(),
                   "mean_logprob": self.mean_logprob.contiguous()}, str(path),
                  metadata={"format": "kiln-distill-data-v1", "stats": json.dumps(self.stats)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> GeneratedData:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "kiln-distill-data-v1":
                raise ConfigError(f"{path} is not kiln distillation data (format {meta.get('format')!r})")
            return cls(f.get_tensor("sequences"), f.get_tensor("trained").bool(), f.get_tensor("mean_logprob"),
                       json.loads(meta.get("stats", "{}")))


def distinct_ngram_ratio(ids: list[int], n: int = 4) -> float:
    """Distinct n-grams over n-grams of ``ids`` (1.0 when shorter than n)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def _mean_logprob(token_ids: list[int], logprobs: list[dict[int, Any]] | None) -> float:
    if not logprobs or not token_ids:
        return -math.inf
    return sum(lp[t].logprob for t, lp in zip(token_ids, logprobs, strict=False)) / len(token_ids)


@torch.no_grad()
def generate_data(
    teacher: nn.Module, prompts: Tensor, *, length: int, config: DataDistillation, seed: int,
    device: torch.device | str | None = None, eos_token_id: int | None = None, progress: bool = True,
) -> GeneratedData:
    """The teacher's filtered continuations of ``prompts`` (P, prompt_tokens), ``length`` tokens in all."""
    from kiln.runtime.engine import LLM
    from kiln.runtime.request import SamplingParams

    num, plen = prompts.shape
    new = length - plen
    if new < 1:
        raise ConfigError(f"prompts of {plen} tokens leave no room in sequences of {length}")
    start = time.perf_counter()
    blocks_per_seq = -(-length // 16)
    num_blocks = 2 * config.max_num_seqs * (blocks_per_seq + 1)  # a chunk running, and the previous one's cache
    with torch.random.fork_rng():
        llm = LLM(teacher, num_blocks=num_blocks, block_size=16, max_num_seqs=config.max_num_seqs,
                  max_num_batched_tokens=max(2048, config.max_num_seqs * 8), enable_prefix_caching=True,
                  device=device)
    prompt_lists = prompts.tolist()
    outs: list[tuple[int, list[int], float]] = []  # (prompt row, continuation, mean logprob)
    scheduled_before = llm.stats["scheduled_tokens"]
    chunk = config.max_num_seqs
    bar = tqdm(total=num * config.samples_per_prompt, desc="teacher generates", unit="seq", disable=not progress)
    for first in range(0, num, chunk):  # a chunk's later rounds reuse its prompts' blocks before they can be evicted
        rows = range(first, min(first + chunk, num))
        for round_ in range(config.samples_per_prompt):
            params = [SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=new, logprobs=0,
                                     seed=(seed * 1_000_003 + round_ * 100_003 + i) % (2**31),
                                     ignore_eos=eos_token_id is None)
                      for i in rows]
            results = llm.generate([prompt_lists[i] for i in rows], params, use_tqdm=False)
            for i, r in zip(rows, results, strict=True):
                ids = list(r.outputs[0].token_ids)[:new]
                outs.append((i, ids, _mean_logprob(ids, r.outputs[0].logprobs)))
            bar.update(len(rows))
    bar.close()
    outs.sort(key=lambda o: o[0])  # prompt order, then round: independent of the chunking
    generated = sum(len(ids) for _, ids, _ in outs)
    computed_prompt = llm.stats["scheduled_tokens"] - scheduled_before - (generated - len(outs))
    stats: dict[str, Any] = {"generated": len(outs), "generated_tokens": generated,
                             "prompt_tokens": num * plen * config.samples_per_prompt,
                             "prompt_tokens_from_prefix_cache": int(num * plen * config.samples_per_prompt
                                                                    - computed_prompt)}
    del llm

    kept: list[tuple[int, list[int], float]] = []
    seen: set[tuple[int, ...]] = set()
    drops = {"dropped_short": 0, "dropped_duplicate": 0, "dropped_repetitive": 0, "dropped_logprob": 0}
    for row, ids, lp in outs:
        if len(ids) < config.min_new_tokens:
            drops["dropped_short"] += 1
        elif config.dedup and tuple(ids) in seen:
            drops["dropped_duplicate"] += 1
        elif distinct_ngram_ratio(ids) < config.min_distinct_4grams:
            drops["dropped_repetitive"] += 1
        elif config.min_mean_logprob is not None and lp < config.min_mean_logprob:
            drops["dropped_logprob"] += 1
        else:
            kept.append((row, ids, lp))
        seen.add(tuple(ids))
    if config.keep_fraction < 1 and kept:
        n_keep = max(1, math.ceil(config.keep_fraction * len(kept)))
        best = sorted(range(len(kept)), key=lambda j: -kept[j][2])[:n_keep]
        drops["dropped_logprob"] += len(kept) - n_keep
        kept = [kept[j] for j in sorted(best)]
    if not kept:
        raise ConfigError(f"every generated continuation was filtered out ({drops}); relax the filters")

    sequences = torch.zeros(len(kept), length, dtype=torch.long)
    trained = torch.zeros(len(kept), length, dtype=torch.bool)
    for j, (row, ids, _) in enumerate(kept):
        sequences[j, :plen] = prompts[row].cpu()
        sequences[j, plen : plen + len(ids)] = torch.tensor(ids, dtype=torch.long)
        trained[j, plen : plen + len(ids)] = True
        if config.train_on_prompt:
            trained[j, 1:plen] = True
    mean_lp = torch.tensor([lp for _, _, lp in kept], dtype=torch.float32)
    stats.update(drops, kept=len(kept), kept_tokens=int(trained[:, plen:].sum()),
                 mean_logprob_kept=float(mean_lp.mean()), seconds=round(time.perf_counter() - start, 2))
    return GeneratedData(sequences, trained, mean_lp, stats)


__all__ = ["GeneratedData", "distinct_ngram_ratio", "generate_data"]
