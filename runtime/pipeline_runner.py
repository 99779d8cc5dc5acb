"""One pipeline rank of ``kiln.LLM(pipeline_parallel_size=p)``: a stage of the step graph and its layers' KV cache.

GPipe's split (Huang et al. 2019, arXiv:1811.06965) applied to the runtime's one step graph:
every rank compiles the paged step graph (``CompileConfig(kv_cache=True)``) and
``split-pipeline-stages`` cuts it with the cost model into the same stages everywhere; the
rank keeps stage ``ParallelConfig.stage_of(rank)`` (:class:`kiln.parallel.compiled.
PipelineCompiledModel`) and allocates the block caches of the layers that stage holds
(``kv_cache_i`` among its inputs) only.

The driver's scheduler decides each step once and sends it to every rank
(:class:`kiln.parallel.worker.ParallelModelRunner`, as under tensor parallelism); each rank
builds the step's metadata itself (positions, slots, block tables: the inherited
:meth:`ModelRunner.build_inputs`), so only activations travel between stages. A step of
several sequences is cut into up to ``p`` micro-batches of whole sequences that flow through
the stages under the configured schedule (1F1B by default): while stage 1 runs the first
sequences' layers, stage 0 runs the next ones'. The last stage returns the logits.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kiln.errors import ConfigError
from kiln.passes.kv_cache import layout_of
from kiln.runtime.model_runner import (
    ModelRunner,
    SequenceStep,
    _example_call,
    _with_kv_cache_dtype,
    cache_bytes_per_block,
)
from kiln.runtime.step_inputs import MAX_QUERY_LEN

if TYPE_CHECKING:
    import kiln


def split_steps(steps: list[SequenceStep], num_microbatches: int) -> list[list[SequenceStep]]:
    """A step's sequences in up to ``num_microbatches`` contiguous, non-empty groups of about equal token counts."""
    m = min(num_microbatches, len(steps))
    total = sum(len(s.token_ids) for s in steps)
    groups: list[list[SequenceStep]] = [[]]
    done = 0
    for i, s in enumerate(steps):
        groups[-1].append(s)
        done += len(s.token_ids)
        left, wanted = len(steps) - i - 1, m - len(groups)  # sequences left, groups still to open
        if wanted > 0 and left >= wanted and (done * m >= total * len(groups) or left == wanted):
            groups.append([])
    return groups


class PipelineStageRunner(ModelRunner):
    """The :class:`ModelRunner` of one pipeline rank: its stage's graph, its layers' caches.

    ``execute`` is called on every rank of the pipeline with the same steps; it returns the
    logits on the last stage and None on the others. ``num_blocks`` is the same on every
    rank (with ``kv_cache_memory``: the fewest any rank's layers fit), so block ids mean
    the same everywhere.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        block_size: int,
        compile_config: kiln.CompileConfig,
        num_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        device: torch.device | str | None = None,
        cache_dtype: torch.dtype | None = None,
        kv_cache_dtype: str | Any = None,
    ) -> None:
        import kiln

        config = _with_kv_cache_dtype(compile_config, kv_cache_dtype)
        par = config.parallel
        if not config.kv_cache or par is None or par.pipeline_parallel_size < 2:
            raise ConfigError("a pipeline stage runner needs CompileConfig(kv_cache=True, parallel=ParallelConfig("
                              "pipeline_parallel_size >= 2))")  # fmt: skip
        if block_size <= 0 or (num_blocks is not None and num_blocks <= 0):
            raise ConfigError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        if (num_blocks is None) == (kv_cache_memory is None):
            raise ConfigError("give exactly one of num_blocks and kv_cache_memory")
        if not dist.is_initialized():
            raise ConfigError("a pipeline stage runner runs in a torch.distributed process group (kiln.parallel.worker)")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0)) or 2
        self.compiled = kiln.compile(model, _example_call(model, vocab, self.device), config=config)
        self.gm = self.compiled.graph_module
        self.layout = layout_of(self.gm)
        self.stage = self.compiled.stage  # this rank's StageGraph
        self.schedule = par.schedule
        self.num_stages = par.pipeline_parallel_size
        wanted = set(self.stage.user_inputs)
        self.layers = [i for i in range(self.layout.num_layers) if f"kv_cache_{i}" in wanted]  # the stage's layers
        dtype = cache_dtype or self.layout.storage_dtype
        if self.layout.kv_quant is not None and dtype != self.layout.storage_dtype:
            raise ConfigError(f"cache_dtype={cache_dtype} conflicts with the quantized cache's {self.layout.storage_dtype}")
        if num_blocks is None:
            mine = dataclasses.replace(
                self.layout, num_layers=len(self.layers), static_kv_scales=None,
                num_kv_heads=tuple(self.layout.num_kv_heads[i] for i in self.layers),
                head_dim=tuple(self.layout.head_dim[i] for i in self.layers),
            )  # fmt: skip
            per_block = max(cache_bytes_per_block(mine, block_size, dtype), 1)  # a stage without layers: any count
            num_blocks = self.blocks_for_memory(mine, block_size, dtype, int(kv_cache_memory)) if self.layers else \
                int(kv_cache_memory) // per_block  # fmt: skip
            on = self.device if dist.get_backend() == "nccl" else torch.device("cpu")  # NCCL reduces CUDA tensors only
            agreed = torch.tensor([num_blocks], dtype=torch.int64, device=on)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # every rank's scheduler block ids must fit every cache
            num_blocks = int(agreed)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        shape = (2, num_blocks + 1, block_size)
        self.stage_caches = {
            i: torch.zeros(*shape, self.layout.num_kv_heads[i], self.layout.head_dim[i], dtype=dtype, device=self.device)
            for i in self.layers
        }  # fmt: skip
        self.stage_scales = {
            i: torch.zeros(*shape, self.layout.num_kv_heads[i], dtype=torch.float32, device=self.device)
            for i in self.layers
        } if self.layout.per_token_scales else {}  # fmt: skip
        self.caches = list(self.stage_caches.values())  # (ModelRunner's name; only this stage's layers)
        self.kv_scales = list(self.stage_scales.values())
        self.constants = dict(self.compiled.capture.constants)
        self.step_gm = self.stage.gm
        self.input_names = (*self.layout.input_names, MAX_QUERY_LEN)
        self.graphs = None

    def state_inputs(self) -> dict[str, object]:
        """The caches of this stage's layers (other layers': None, never read here) and the model's constants."""
        out: dict[str, object] = {f"kv_cache_{i}": self.stage_caches.get(i) for i in range(self.layout.num_layers)}
        if self.layout.per_token_scales:
            out |= {f"kv_scales_{i}": self.stage_scales.get(i) for i in range(self.layout.num_layers)}
        return {**out, **self.constants}

    def enable_cuda_graphs(self, **kwargs: Any) -> Any:
        raise ConfigError("CUDA graphs under pipeline parallelism are not implemented yet: leave cuda_graphs unset")

    @torch.no_grad()
    def execute(self, steps: list[SequenceStep], feed: tuple[torch.Tensor, list[int]] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """Run one step through the pipeline: (sum num_logits, V) fp32 logits on the last stage, None on the others."""
        if not steps:
            raise ConfigError("execute needs at least one sequence")
        if feed is not None:
            raise ConfigError("pipeline stages take every token from the host: asynchronous scheduling is not supported")
        names = self.input_names[:-1]  # the stage graphs take no max_query_len
        groups = split_steps(steps, self.num_stages)
        mbs = [dict(zip(names, self.build_inputs(group)[:-1], strict=True)) for group in groups]
        outs, _ = self.compiled.executor.run(mbs, self.schedule)
        if outs is None:
            return None
        return torch.cat([flat[0][0] for flat in outs], dim=0).float()  # (S, V): each micro-batch's (1, S_i, V)


__all__ = ["PipelineStageRunner", "split_steps"]
