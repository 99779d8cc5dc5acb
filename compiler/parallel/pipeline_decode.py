"""Pipeline-parallel decoding: independent request groups interleaved over a paged KV cache.

A decode step of one sequence needs the token its previous step sampled on the last stage,
so a single request cannot fill a pipeline. Independent request groups can: while group g's
step k runs on stage s, group g + 1's step k runs on stage s - 1 (the ``InterleavedDecode``
schedule). This module drives that for the step graph of ``kiln.compile(model, ...,
CompileConfig(kv_cache=True))`` split by ``split-pipeline-stages``: every rank keeps the block
caches of the layers its stage holds, builds each step's metadata (positions, slots, block
tables) itself, and receives the sampled tokens from the last rank. Greedy (argmax) sampling.

Each sequence owns a fixed range of blocks large enough for its prompt and new tokens: this
is the pipeline's driver, not a serving scheduler (``kiln.runtime`` does admission and paging).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kiln.errors import ConfigError
from kiln.parallel.pipeline import PipelineExecutor, RunStats
from kiln.passes.kv_cache import KVCacheLayout


def _blocks(n_tokens: int, block_size: int) -> int:
    return -(-n_tokens // block_size)


@torch.no_grad()
def generate_interleaved(
    executor: PipelineExecutor,
    layout: KVCacheLayout,
    groups: Sequence[Sequence[Sequence[int]]],
    max_new_tokens: int,
    *,
    block_size: int = 16,
    constants: Mapping[str, Any] | None = None,
) -> tuple[list[list[list[int]]] | None, RunStats]:
    """Greedy-decode ``groups`` (each a list of prompts) for ``max_new_tokens`` tokens, groups interleaved.

    Returns, on the last rank, every sequence's prompt followed by its new tokens, by group;
    None on the other ranks. ``constants`` are the capture's non-tensor inputs (e.g.
    ``use_cache=False`` for Hugging Face models: ``CompiledModel.capture.constants``).
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not layout.gather_logits:
        raise ConfigError(
            "pipeline decoding needs a step graph that gathers logits (PageKVCache(gather_logits=True))"
        )
    if not groups or any(not g or any(len(p) == 0 for p in g) for g in groups):
        raise ConfigError("every group needs at least one non-empty prompt")
    device = executor.device
    # Fixed block ranges: sequence (g, j) owns blocks [first[g][j], first[g][j] + n).
    first: list[list[int]] = []
    total = 0
    for g in groups:
        first.append([])
        for prompt in g:
            first[-1].append(total)
            total += _blocks(len(prompt) + max_new_tokens, block_size)
    wanted = set(executor.stage.user_inputs)
    caches = {
        f"kv_cache_{i}": torch.zeros(2, total, block_size, h, d, dtype=layout.dtype, device=device)
        for i, (h, d) in enumerate(zip(layout.num_kv_heads, layout.head_dim, strict=True))
        if f"kv_cache_{i}" in wanted
    }
    state = {**caches, **dict(constants or {})}

    def step_inputs(g: int, k: int, prev: torch.Tensor | None) -> dict[str, Any]:
        prompts = groups[g]
        ids, pos, slots, tables, lens, starts, last = [], [], [], [], [], [0], []
        width = max(_blocks(len(p) + max_new_tokens, block_size) for p in prompts)
        for j, prompt in enumerate(prompts):
            blocks = list(range(first[g][j], first[g][j] + _blocks(len(prompt) + max_new_tokens, block_size)))
            if k == 0:
                new_pos, new_ids = list(range(len(prompt))), list(prompt)
            else:
                new_pos, new_ids = [len(prompt) + k - 1], [int(prev[j])]  # type: ignore[index]
            ids += new_ids
            pos += new_pos
            slots += [blocks[p // block_size] * block_size + p % block_size for p in new_pos]
            tables.append(blocks + [0] * (width - len(blocks)))
            lens.append(new_pos[-1] + 1)
            starts.append(starts[-1] + len(new_pos))
            last.append(starts[-1] - 1)
        meta = {
            "input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]), "slot_mapping": torch.tensor(slots),
            "block_tables": torch.tensor(tables, dtype=torch.int32), "seq_lens": torch.tensor(lens, dtype=torch.int32),
            "query_start_loc": torch.tensor(starts, dtype=torch.int32), "logits_indices": torch.tensor(last),
        }  # fmt: skip
        return {**{k2: v.to(device) for k2, v in meta.items()}, **state}

    def sample(g: int, k: int, outputs: Any) -> torch.Tensor:
        logits = outputs[0] if isinstance(outputs, (list, tuple)) else getattr(outputs, "logits", outputs)
        return logits[0].argmax(dim=-1)  # (S,)

    tokens, stats = executor.interleave([len(g) for g in groups], max_new_tokens, step_inputs, sample)
    if not executor.last:
        return None, stats
    out = [
        [
            list(prompt) + [int(tokens[(g, k)][j]) for k in range(max_new_tokens)]
            for j, prompt in enumerate(prompts)
        ]
        for g, prompts in enumerate(groups)
    ]
    return out, stats


__all__ = ["generate_interleaved"]
