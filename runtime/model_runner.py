"""The model runner: tensors only.

It owns the compiled step graph (``kiln.compile(..., CompileConfig(kv_cache=True))``) and
the per-layer block caches, turns a list of :class:`SequenceStep` (what the scheduler
decided, in plain Python) into the graph's flat inputs, runs it, and returns one row of
logits per sequence. It never decides anything: scheduling lives in ``kiln.runtime.scheduler``.

The graph runs in its launch-ready form (``kiln.runtime.step_inputs.specialize_attention``:
the host tells attention the longest query, so no step synchronizes inside the graph), its
integer inputs reach the device in one copy, and after :meth:`ModelRunner.enable_cuda_graphs`
steps replay CUDA graphs captured per bucket of batch and token counts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kiln.errors import CapacityError, ConfigError
from kiln.passes.kv_cache import KVCacheLayout, layout_of
from kiln.runtime.cuda_graphs import StepGraphs
from kiln.runtime.step_inputs import (
    MAX_QUERY_LEN,
    DeviceFeed,
    apply_feed,
    as_feed,
    specialize_attention,
    stage,
)

if TYPE_CHECKING:
    import kiln


#: inductor modes the decode step graph may be compiled with (modes that capture CUDA graphs of their own clash
#: with the step graphs').
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
#: compiles a step graph's ``forward`` may collect (decode batch sizes, mixed steps of one and of several sequences)
RECOMPILE_LIMIT = 32


def _compile(gm: torch.fx.GraphModule, mode: str | None, *, dynamic: bool | None) -> Callable[..., object]:
    """``gm`` under ``torch.compile`` (``dynamic=True``: one compile serves every mixed bucket).

    Sizes of 1 are specialized by design (a bucket of one sequence compiles apart from larger
    ones). Duck sizing is off while it runs: without that, a token count that happens to equal
    a cache dimension (16 tokens, head_dim 16) would be traced as equal to it and recompile.
    The decode and mixed compiles of one graph share its ``forward``'s compile cache, so its
    recompile limit is raised from dynamo's 8 while they run (``fullgraph`` has no eager
    fallback past the limit).
    """
    compiled = torch.compile(gm, fullgraph=True, mode=mode, dynamic=dynamic)
    from torch._dynamo import config as dynamo_config
    from torch.fx.experimental import _config as fx_config

    def step(*inputs: object) -> object:
        with fx_config.patch(use_duck_shape=False), dynamo_config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*inputs)

    return step


@dataclass
class SequenceStep:
    """One sequence's share of a step."""

    token_ids: list[int]  # the tokens to compute now, at positions start_position, start_position + 1, ...
    start_position: int  # tokens of this sequence already in the cache (num_computed_tokens)
    block_ids: list[int]  # the sequence's block table: block i holds positions i*block_size ...
    num_logits: int = (
        1  # logits wanted for the last num_logits of token_ids (1 <= num_logits <= len(token_ids))
    )


def cache_bytes_per_block(layout: KVCacheLayout, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (keys and values; an int8 / fp8 cache: codes and scales)."""
    if layout.kv_quant is not None:
        return layout.bytes_per_block(block_size)
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(
        2 * block_size * h * d * elem for h, d in zip(layout.num_kv_heads, layout.head_dim, strict=True)
    )


def _example_call(model: torch.nn.Module, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Example inputs for the step graph's capture.

    Models that compute positions themselves when given none (kiln's and Hugging Face's) are
    captured with ``input_ids`` alone: their masks are then provably causal, and the kv-cache
    pass rebinds the ``arange(T)`` positions to a ``position_ids`` input. Others get both.
    """
    ids = torch.randint(0, vocab, (1, 8), device=device)
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        raise ConfigError(
            f"{type(model).__name__}.forward takes no input_ids; the runtime needs a token-id model"
        )
    pos = params.get("position_ids")
    if pos is not None and pos.default is inspect.Parameter.empty:
        return {"input_ids": ids, "position_ids": torch.arange(8, device=device)[None]}
    return {"input_ids": ids}


def _with_kv_cache_dtype(config: kiln.CompileConfig, kv_cache_dtype: object) -> kiln.CompileConfig:
    """``config`` whose QuantConfig quantizes the KV cache as ``kv_cache_dtype`` says (None: unchanged).

    ``kv_cache_dtype`` may also be a KV-cache-only ``kiln.QuantConfig``, to bring calibration
    data for static fp8 scales.
    """
    import dataclasses

    import kiln
    from kiln.passes.kv_cache import kv_cache_spec

    if isinstance(kv_cache_dtype, kiln.QuantConfig):
        given = kv_cache_dtype
        if given.kv_cache is None or given.weights is not None or given.activations is not None:
            raise ConfigError(
                "kv_cache_dtype takes a QuantConfig that quantizes the KV cache alone "
                "(QuantConfig(weights=None, kv_cache=QuantSpec(...), calibration=...))"
            )
        if config.quant is not None:
            raise ConfigError(
                "give the KV-cache QuantConfig either as kv_cache_dtype or in compile_config, not both"
            )
        return dataclasses.replace(config, quant=given)
    spec = kv_cache_spec(kv_cache_dtype)  # type: ignore[arg-type]
    if spec is None:
        return config
    quant = config.quant
    if quant is not None and quant.kv_cache is not None and quant.kv_cache != spec:
        raise ConfigError(
            f"kv_cache_dtype={kv_cache_dtype!r} conflicts with QuantConfig.kv_cache={quant.kv_cache!r}"
        )
    quant = (
        kiln.QuantConfig(weights=None, kv_cache=spec)
        if quant is None
        else dataclasses.replace(quant, kv_cache=spec)
    )
    return dataclasses.replace(config, quant=quant)


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
        compile_config: kiln.CompileConfig | None = None,
        kv_cache_dtype: str | kiln.QuantSpec | None = None,
    ) -> None:
        """Compile ``model``'s step graph and allocate ``num_blocks`` blocks (or as many as fit ``kv_cache_memory`` bytes).

        ``compile_config`` (with ``kv_cache=True``) replaces the default step-graph compile, e.g.
        to build one rank's tensor-parallel shard (``kiln.parallel.worker``).
        ``kv_cache_dtype`` (``"int8"``, ``"fp8"``, a QuantSpec or a KV-cache-only QuantConfig, see
        ``kiln.passes.kv_cache``) quantizes the cache (``QuantConfig.kv_cache`` of the step graph's compile).
        """
        import kiln

        step_config = compile_config or kiln.CompileConfig(kv_cache=True)
        step_config = _with_kv_cache_dtype(step_config, kv_cache_dtype)
        if not step_config.kv_cache:
            raise ConfigError("the model runner's compile_config needs kv_cache=True")
        if block_size <= 0 or (num_blocks is not None and num_blocks <= 0):
            raise ConfigError(
                f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}"
            )
        if (num_blocks is None) == (kv_cache_memory is None):
            raise ConfigError("give exactly one of num_blocks and kv_cache_memory")
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0)) or 2
        self.compiled = kiln.compile(model, _example_call(model, vocab, self.device), config=step_config)
        self.gm = self.compiled.graph_module
        self.layout = layout_of(self.gm)
        dtype = cache_dtype or self.layout.storage_dtype
        if self.layout.kv_quant is not None and dtype != self.layout.storage_dtype:
            raise ConfigError(
                f"cache_dtype={cache_dtype} conflicts with the quantized cache's {self.layout.storage_dtype}"
            )
        if num_blocks is None:
            num_blocks = self.blocks_for_memory(self.layout, block_size, dtype, int(kv_cache_memory))  # type: ignore[arg-type]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_block = (
            num_blocks  # one more block than the scheduler knows: written by graph padding rows
        )
        self.caches = [
            torch.zeros(2, num_blocks + 1, block_size, h, d, dtype=dtype, device=self.device)
            for h, d in zip(self.layout.num_kv_heads, self.layout.head_dim, strict=True)
        ]
        self.kv_scales = [  # per-token scales of an int8 / fp8 cache, beside the codes
            torch.zeros(2, num_blocks + 1, block_size, h, dtype=torch.float32, device=self.device)
            for h in self.layout.num_kv_heads
        ] if self.layout.per_token_scales else []  # fmt: skip
        self.constants = dict(self.compiled.capture.constants)  # e.g. use_cache=False for HF models
        self.step_gm = specialize_attention(
            self.gm
        )  # the graph the runner calls: max_query_len as last input
        self.input_names = (*self.layout.input_names, MAX_QUERY_LEN)
        self.graphs: StepGraphs | None = None  # static-buffer (CUDA-graph) steps, see enable_cuda_graphs
        #: the last step's input tokens on the device (T,), as it ran them (fed tokens included); valid
        #: until the next step (asynchronous speculation reads the drafts it verified from here)
        self.last_input_ids: torch.Tensor | None = None
        self._last_rows: tuple[torch.Tensor, torch.Tensor] = (torch.empty(0), torch.empty(0))  # positions, rows

    @staticmethod
    def blocks_for_memory(
        model_layout: KVCacheLayout, block_size: int, dtype: torch.dtype, memory_bytes: int
    ) -> int:
        """How many blocks fit in ``memory_bytes``."""
        n = memory_bytes // cache_bytes_per_block(model_layout, block_size, dtype)
        if n < 1:
            raise CapacityError(f"kv_cache_memory={memory_bytes} bytes holds no block of {block_size} tokens")
        return int(n)

    def state_inputs(self) -> dict[str, object]:
        """The inputs that are not step metadata: the block caches and the model's constants."""
        scales = {f"kv_scales_{i}": s for i, s in enumerate(self.kv_scales)}
        return {**{f"kv_cache_{i}": c for i, c in enumerate(self.caches)}, **scales, **self.constants}

    def build_inputs(
        self, steps: list[SequenceStep], feed: DeviceFeed | tuple[torch.Tensor, list[int]] | None = None
    ) -> list[object]:
        """The step graph's flat inputs for ``steps``, in ``input_names`` order (one host-to-device copy).

        ``feed``: see :meth:`execute`.
        """
        bs = self.block_size
        num_tokens = sum(len(s.token_ids) for s in steps)
        num_logits = sum(s.num_logits for s in steps)
        width = max(len(s.block_ids) for s in steps)
        ids = np.empty(num_tokens, dtype=np.int64)
        pos = np.empty(num_tokens, dtype=np.int64)
        slots = np.empty(num_tokens, dtype=np.int64)
        last = np.empty(num_logits, dtype=np.int64)
        tables = np.zeros((len(steps), width), dtype=np.int32)
        lens = np.empty(len(steps), dtype=np.int32)
        starts = np.zeros(len(steps) + 1, dtype=np.int32)
        t = r = 0
        for i, s in enumerate(steps):
            n = len(s.token_ids)
            end = s.start_position + n
            if n == 0 or end > len(s.block_ids) * bs:
                raise CapacityError(
                    f"sequence {i}: {end} tokens do not fit its {len(s.block_ids)} blocks of {bs}"
                )
            if not 1 <= s.num_logits <= n:
                raise ConfigError(
                    f"sequence {i}: num_logits must be in [1, {n}] (its token count), got {s.num_logits}"
                )
            blocks = np.asarray(s.block_ids, dtype=np.int64)
            p = np.arange(s.start_position, end)
            ids[t : t + n] = s.token_ids
            pos[t : t + n] = p
            slots[t : t + n] = blocks[p // bs] * bs + p % bs
            tables[i, : len(blocks)] = blocks
            lens[i] = end
            t += n
            starts[i + 1] = t
            last[r : r + s.num_logits] = np.arange(t - s.num_logits, t)
            r += s.num_logits
        arrays = {
            "input_ids": ids.reshape(1, -1),
            "position_ids": pos.reshape(1, -1),
            "slot_mapping": slots,
            "block_tables": tables,
            "seq_lens": lens,
            "query_start_loc": starts,
            "logits_indices": last,
        }
        feed = as_feed(feed)
        fed = (0, 0)
        if feed is not None:
            tok, seq = np.empty((4, num_tokens), dtype=np.int64), np.empty((2, len(steps)), dtype=np.int64)
            fed = feed.fill(starts, tok, seq)
            arrays["feed_tok"], arrays["feed_seq"] = tok[:, : fed[0]].copy(), seq[:, : fed[1]].copy()
        dev = stage(arrays, self.device)  # fmt: skip
        if fed[0]:  # tokens the last step made on the device
            apply_feed(dev, feed, dev["feed_tok"], dev["feed_seq"], bs)  # type: ignore[arg-type]
        values = {**dev, **self.state_inputs(), MAX_QUERY_LEN: max(len(s.token_ids) for s in steps)}
        return [values[name] for name in self.input_names]

    def enable_cuda_graphs(
        self,
        *,
        max_num_seqs: int,
        max_model_len: int,
        max_num_tokens: int | None = None,
        capture: bool | None = None,
        torch_compile: bool | str = False,
        capture_now: bool = True,
        max_num_logits: int | None = None,
    ) -> StepGraphs:
        """Run steps on static padded buffers, replaying a CUDA graph per bucket (see ``cuda_graphs``).

        Pure-decode steps of up to ``max_num_seqs`` sequences always; with ``max_num_tokens``
        also mixed steps (prefill chunks, prefix hits) of up to that many tokens, asking up
        to ``max_num_logits`` rows of logits (default one per sequence; speculative
        verification asks k + 1 per sequence). Steps that fit no bucket run op by op. ``capture`` (default: on a CUDA device) records the
        graphs, all of them now when ``capture_now``, else each at its first use;
        ``capture=False`` runs the same padded static inputs without a graph.
        ``torch_compile`` first fuses the decode graph's pointwise operations with
        ``torch.compile`` (inductor), and the mixed steps' graph too, compiled once for every
        token count (dynamic shapes); attention stays kiln's kernel. A string is inductor's mode:
        ``"max-autotune-no-cudagraphs"`` also times Triton GEMM templates against cuBLAS per shape
        and fuses epilogues (e.g. the residual add) into the chosen ones (longer start-up).
        """
        if not self.layout.gather_logits:
            raise ConfigError(
                "step graphs need a step graph that gathers logits (PageKVCache(gather_logits=True))"
            )
        capture = self.device.type == "cuda" if capture is None else capture
        if isinstance(torch_compile, str) and torch_compile not in COMPILE_MODES:
            raise ConfigError(
                f"torch_compile mode must be one of {COMPILE_MODES} (the step graphs are CUDA graphs "
                f"already: no inductor mode that captures its own), got {torch_compile!r}"
            )
        mode = torch_compile if isinstance(torch_compile, str) else None
        decode = _compile(self.step_gm, mode, dynamic=None) if torch_compile else self.step_gm
        mixed = self.step_gm
        if torch_compile and max_num_tokens is not None:
            mixed = _compile(self.step_gm, mode, dynamic=True)
        self.graphs = StepGraphs(
            decode, mixed, self.input_names, self.state_inputs(),
            max_num_seqs=max_num_seqs, max_num_tokens=max_num_tokens,
            max_blocks=-(-max_model_len // self.block_size), block_size=self.block_size,
            scratch_block=self.scratch_block, num_blocks=self.num_blocks, device=self.device, capture=capture,
            max_num_logits=max_num_logits,
        )  # fmt: skip
        if capture and capture_now:
            self.graphs.capture_all()
        return self.graphs

    def logits_positions(self, rows: int) -> torch.Tensor:
        """Per logits row of the last :meth:`execute`, the position of the token it predicts (device, int64).

        Read on the device: with a :class:`~kiln.runtime.step_inputs.DeviceFeed` the host does not
        know the positions it rolled back.
        """
        positions, indices = self._last_rows
        return positions.index_select(0, indices[:rows]) + 1

    @torch.no_grad()
    def execute(
        self, steps: list[SequenceStep], feed: DeviceFeed | tuple[torch.Tensor, list[int]] | None = None
    ) -> torch.Tensor:
        """Run one step; the logits of each sequence's last ``num_logits`` tokens, in order: (sum num_logits, V) fp32.

        ``feed = (tokens, sources)`` takes sequence ``i``'s first token from ``tokens[sources[i]]``
        (a device tensor, e.g. the last step's samples) where ``sources[i] >= 0``: the host
        need not know it (asynchronous scheduling); a :class:`~kiln.runtime.step_inputs.DeviceFeed`
        also takes several tokens per sequence and rolls back positions (asynchronous speculation).
        Nothing here waits for the device.
        """
        if not steps:
            raise ConfigError("execute needs at least one sequence")
        if not self.layout.gather_logits:
            raise ConfigError("the step graph must gather logits (PageKVCache(gather_logits=True))")
        key = self.graphs.key_for(steps) if self.graphs is not None else None
        if key is not None:
            logits = self.graphs.run(steps, as_feed(feed), key)  # type: ignore[union-attr]  # (S, V)
            views = self.graphs.buffer.device_views  # type: ignore[union-attr]
            self.last_input_ids = views["input_ids"][0]
            self._last_rows = (views["position_ids"][0], views["logits_indices"])
            return logits.float()
        inputs = self.build_inputs(steps, feed)
        self.last_input_ids = inputs[self.input_names.index("input_ids")][0]  # type: ignore[index]
        self._last_rows = (inputs[self.input_names.index("position_ids")][0],  # type: ignore[index]
                           inputs[self.input_names.index("logits_indices")])  # fmt: skip
        out = self.step_gm(*inputs)
        logits = out[0] if isinstance(out, (list, tuple)) else out
        return logits[0].float()  # (S, V)


__all__ = ["COMPILE_MODES", "ModelRunner", "SequenceStep", "cache_bytes_per_block"]
