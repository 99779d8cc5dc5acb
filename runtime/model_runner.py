"""The model runner: tensors only.

It owns the compiled step graph (``kiln.compile(..., CompileConfig(kv_cache=True))``) and
the per-layer block caches, turns a list of :class:`SequenceStep` (what the scheduler
decided, in plain Python) into the graph's flat inputs, runs it, and returns one row of
logits per sequence. It never decides anything: scheduling lives in ``kiln.runtime.scheduler``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from kiln.errors import CapacityError, ConfigError
from kiln.passes.kv_cache import KVCacheLayout, layout_of


@dataclass
class SequenceStep:
    """One sequence's share of a step."""

    token_ids: list[int]  # the tokens to compute now, at positions start_position, start_position + 1, ...
    start_position: int  # tokens of this sequence already in the cache (num_computed_tokens)
    block_ids: list[int]  # the sequence's block table: block i holds positions i*block_size ...
    num_logits: int = 1  # logits wanted for the last num_logits of token_ids (1 <= num_logits <= len(token_ids))


def cache_bytes_per_block(layout: KVCacheLayout, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (keys and values)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(2 * block_size * h * d * elem for h, d in zip(layout.num_kv_heads, layout.head_dim, strict=True))


def _example_call(model: torch.nn.Module, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Example inputs for the step graph's capture.

    Models that compute positions themselves when given none (kiln's and Hugging Face's) are
    captured with ``input_ids`` alone: their masks are then provably causal, and the kv-cache
    pass rebinds the ``arange(T)`` positions to a ``position_ids`` input. Others get both.
    """
    ids = torch.randint(0, vocab, (1, 8), device=device)
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        raise ConfigError(f"{type(model).__name__}.forward takes no input_ids; the runtime needs a token-id model")
    pos = params.get("position_ids")
    if pos is not None and pos.default is inspect.Parameter.empty:
        return {"input_ids": ids, "position_ids": torch.arange(8, device=device)[None]}
    return {"input_ids": ids}


class ModelRunner:
    """Runs the paged step graph of a model over its block caches."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        block_size: int,
        num_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        device: torch.device | str | None = None,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        """Compile ``model``'s step graph and allocate ``num_blocks`` blocks (or as many as fit ``kv_cache_memory`` bytes)."""
        import kiln

        if block_size <= 0 or (num_blocks is not None and num_blocks <= 0):
            raise ConfigError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        if (num_blocks is None) == (kv_cache_memory is None):
            raise ConfigError("give exactly one of num_blocks and kv_cache_memory")
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0)) or 2
        self.compiled = kiln.compile(model, _example_call(model, vocab, self.device), config=kiln.CompileConfig(kv_cache=True))
        self.gm = self.compiled.graph_module
        self.layout = layout_of(self.gm)
        dtype = cache_dtype or self.layout.dtype
        if num_blocks is None:
            num_blocks = self.blocks_for_memory(self.layout, block_size, dtype, int(kv_cache_memory))  # type: ignore[arg-type]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.caches = [
            torch.zeros(2, num_blocks, block_size, h, d, dtype=dtype, device=self.device)
            for h, d in zip(self.layout.num_kv_heads, self.layout.head_dim, strict=True)
        ]
        self.constants = dict(self.compiled.capture.constants)  # e.g. use_cache=False for HF models

    @staticmethod
    def blocks_for_memory(model_layout: KVCacheLayout, block_size: int, dtype: torch.dtype, memory_bytes: int) -> int:
        """How many blocks fit in ``memory_bytes``."""
        n = memory_bytes // cache_bytes_per_block(model_layout, block_size, dtype)
        if n < 1:
            raise CapacityError(f"kv_cache_memory={memory_bytes} bytes holds no block of {block_size} tokens")
        return int(n)

    def build_inputs(self, steps: list[SequenceStep]) -> list[object]:
        """The graph's flat inputs for ``steps``, in ``layout.input_names`` order."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        starts = [0]
        lens: list[int] = []
        last: list[int] = []
        width = max(len(s.block_ids) for s in steps)
        tables = torch.zeros(len(steps), width, dtype=torch.int32)
        for i, s in enumerate(steps):
            n = len(s.token_ids)
            end = s.start_position + n
            if n == 0 or end > len(s.block_ids) * bs:
                raise CapacityError(f"sequence {i}: {end} tokens do not fit its {len(s.block_ids)} blocks of {bs}")
            if not 1 <= s.num_logits <= n:
                raise ConfigError(f"sequence {i}: num_logits must be in [1, {n}] (its token count), got {s.num_logits}")
            ids += s.token_ids
            pos += range(s.start_position, end)
            slots += [s.block_ids[p // bs] * bs + p % bs for p in range(s.start_position, end)]
            tables[i, : len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
            lens.append(end)
            starts.append(starts[-1] + n)
            last += range(starts[-1] - s.num_logits, starts[-1])
        dev = self.device
        values: dict[str, object] = {
            "input_ids": torch.tensor([ids], dtype=torch.long, device=dev),
            "position_ids": torch.tensor([pos], dtype=torch.long, device=dev),
            "slot_mapping": torch.tensor(slots, dtype=torch.long, device=dev),
            "block_tables": tables.to(dev),
            "seq_lens": torch.tensor(lens, dtype=torch.int32, device=dev),
            "query_start_loc": torch.tensor(starts, dtype=torch.int32, device=dev),
            "logits_indices": torch.tensor(last, dtype=torch.long, device=dev),
            **{f"kv_cache_{i}": c for i, c in enumerate(self.caches)},
            **self.constants,
        }
        return [values[name] for name in self.layout.input_names]

    @torch.no_grad()
    def execute(self, steps: list[SequenceStep]) -> torch.Tensor:
        """Run one step; the logits of each sequence's last ``num_logits`` tokens, in order: (sum num_logits, V) fp32."""
        if not steps:
            raise ConfigError("execute needs at least one sequence")
        out = self.gm(*self.build_inputs(steps))
        logits = out[0] if isinstance(out, (list, tuple)) else out
        if not self.layout.gather_logits:
            raise ConfigError("the step graph must gather logits (PageKVCache(gather_logits=True))")
        return logits[0].float()  # (S, V)


__all__ = ["ModelRunner", "SequenceStep", "cache_bytes_per_block"]
