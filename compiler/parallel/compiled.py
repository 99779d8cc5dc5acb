"""What ``kiln.compile`` returns on a rank under pipeline or context parallelism.

- :class:`PipelineCompiledModel` (``ParallelConfig(pipeline_parallel_size=p)``): every rank
  compiles the whole graph, ``split-pipeline-stages`` cuts it with the cost model (the same
  cuts on every rank), and the rank keeps stage ``ParallelConfig.stage_of(rank)``. A call,
  made on every rank with the same inputs, splits the batch into micro-batches of the
  captured batch size, runs them through the stages under ``ParallelConfig.schedule``
  (GPipe or 1F1B, :class:`kiln.parallel.pipeline.PipelineExecutor`), and the last stage
  broadcasts the model's outputs to its pipeline group: **every rank returns the model's
  outputs** (the shapes are known from the plan and the inputs, so only tensors travel).
- :class:`ContextParallelCompiledModel` (``ParallelConfig(context_parallel_size=c)``): the
  graph's attention is ring attention (``context-parallel-attention``); a call splits the
  token axis over the ranks (zigzag) and gathers the outputs on every rank
  (:class:`kiln.parallel.ring_attention_pass.ContextParallelRunner`).

Tensor and pipeline parallelism combine: rank ``stage * tp + t`` holds shard ``t`` of its
stage, sharded over its stage's group, pipelined over the ranks holding shard ``t``
(``kiln.parallel.groups``). Context parallelism runs alone (ConfigError otherwise).

Micro-batches: ``kiln.compile`` captures the model with the example batch cut to ``B / m``
rows (``m``: ``ParallelConfig.num_microbatches``, by default the largest divisor of the
example batch ``B`` up to ``p``). A call with batch ``B'`` then runs ``B' / (B / m)``
micro-batches; inputs whose first axis holds the batch are split along it, others (a
``position_ids`` of batch 1, constants) go to every micro-batch whole. A batch-1 model runs
one micro-batch per call: the stages take turns (use ``kiln.LLM(pipeline_parallel_size=)``
to keep them busy with independent requests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from kiln.capture import Capture
from kiln.compile import CompileConfig, CompiledModel
from kiln.errors import ConfigError
from kiln.parallel.stages import PipelinePlan, size_expr
from kiln.parallel.stages_cost import SizeExpr, evaluate
from kiln.pass_manager import PipelineReport


def batch_input(inputs: Mapping[str, Any]) -> str | None:
    """The input whose first axis is the batch: ``input_ids`` when given, else the first tensor of rank >= 1."""
    if isinstance(inputs.get("input_ids"), torch.Tensor):
        return "input_ids"
    return next((k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() >= 1), None)


def microbatch_example(
    example_inputs: Any, example_kwargs: Mapping[str, Any] | None, num_stages: int, num_microbatches: int | None
) -> tuple[Any, Mapping[str, Any] | None, int]:
    """The example inputs cut to one micro-batch's rows, and the number of micro-batches ``m``.

    Tensors whose first axis has the example batch size are cut (the batch is read from
    ``input_ids`` or the first tensor). ``num_microbatches=None`` takes the largest divisor of
    the batch up to ``num_stages``.
    """
    named = dict(example_kwargs or {})
    if isinstance(example_inputs, Mapping):
        named = {**example_inputs, **named}
    leaves = [x for x in pytree.tree_leaves((example_inputs, example_kwargs)) if isinstance(x, torch.Tensor)]
    key = batch_input(named)
    first = named[key] if key is not None else next((x for x in leaves if x.dim() >= 1), None)
    if first is None:
        if num_microbatches not in (None, 1):
            raise ConfigError("micro-batches split the batch axis, and no example input has one")
        return example_inputs, example_kwargs, 1
    batch = int(first.shape[0])
    if num_microbatches is None:
        m = max(d for d in range(1, min(num_stages, batch) + 1) if batch % d == 0)
    elif batch % num_microbatches:
        raise ConfigError(
            f"ParallelConfig.num_microbatches={num_microbatches} does not divide the example batch of {batch}: "
            "capture with a batch that the micro-batches split evenly"
        )
    else:
        m = num_microbatches
    rows = batch // m

    def cut(x: Any) -> Any:
        return x[:rows] if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == batch else x

    kwargs = pytree.tree_map(cut, dict(example_kwargs)) if example_kwargs else example_kwargs
    return pytree.tree_map(cut, example_inputs), kwargs, m


def _device_of(gm: GraphModule) -> torch.device:
    return next((p.device for p in gm.parameters()), torch.device("cpu"))


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One flat output of the model: a tensor (symbolic shape) or a constant."""

    shape: tuple[SizeExpr, ...] | None  # None: a constant
    dtype: torch.dtype | None
    value: Any = None  # the constant


def _output_leaves(gm: GraphModule) -> list[_Leaf]:
    leaves, _ = pytree.tree_flatten(gm.graph.output_node().args[0])
    out = []
    for x in leaves:
        if not isinstance(x, Node):
            out.append(_Leaf(None, None, x))
            continue
        val = x.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ConfigError(
                f"pipeline outputs are broadcast as tensors; output {x.name} is a {type(val).__name__}"
            )
        out.append(_Leaf(tuple(size_expr(d) for d in val.shape), val.dtype))
    return out


class PipelineCompiledModel(CompiledModel):
    """This rank's pipeline stage of a compiled model; called on every rank alike (see the module docstring).

    ``graph_module`` is the whole rewritten graph (every work node annotated with its stage),
    ``stage`` this rank's :class:`kiln.parallel.stages.StageGraph`, ``plan`` the partition
    (``plan.report()``: per-stage costs), ``ir`` this stage's IR.
    """

    def __init__(self, captured: Capture, gm: GraphModule, report: PipelineReport, config: CompileConfig) -> None:
        from kiln.parallel.groups import pp_group
        from kiln.parallel.pipeline import PipelineExecutor
        from kiln.passes.split_pipeline_stages import plan_of

        super().__init__(captured, gm, report, config)
        par, rank = config.parallel, int(config.rank or 0)
        assert par is not None
        full: PipelinePlan = plan_of(gm)
        self.stage_index = par.stage_of(rank)
        self.plan = full.for_rank(self.stage_index)
        self.stage = self.plan.stages[self.stage_index]
        self.device = _device_of(gm)
        self._leaves = _output_leaves(gm)
        self._group = pp_group(par, rank)
        self._src = dist.get_global_rank(self._group, full.num_stages - 1)
        self._wire = torch.device("cpu") if dist.get_backend(self._group) == "gloo" else self.device
        # the executor returns the last stage's flat outputs; __call__ restores the model's structure
        self.executor = PipelineExecutor(dataclasses.replace(self.plan, out_spec=None), group=self._group,
                                         device=self.device)  # fmt: skip
        key = batch_input(captured.inputs)
        self._batch_key = key
        self.microbatch_size = int(captured.inputs[key].shape[0]) if key is not None else None

    # -- calling ------------------------------------------------------------------------

    def split(self, inputs: Mapping[str, Any]) -> list[dict[str, Any]]:
        """``inputs`` as micro-batches of the captured batch size (see the module docstring)."""
        b, key = self.microbatch_size, self._batch_key
        if b is None or key is None or not isinstance(inputs.get(key), torch.Tensor):
            return [dict(inputs)]
        batch = int(inputs[key].shape[0])
        if batch % b:
            raise ConfigError(f"a batch of {batch} does not split into micro-batches of the captured {b} rows")
        n = batch // b
        mbs = [dict(inputs) for _ in range(n)]
        for name, value in inputs.items():
            example = self.capture.inputs.get(name)
            if (n > 1 and isinstance(value, torch.Tensor) and isinstance(example, torch.Tensor) and example.dim() >= 1
                    and example.shape[0] == b and value.dim() >= 1 and value.shape[0] == batch):  # fmt: skip
                for i, piece in enumerate(value.split(b)):
                    mbs[i][name] = piece
        return mbs

    def _broadcast(self, outs: list[list[Any]] | None, mbs: list[dict[str, Any]]) -> list[list[Any]]:
        """Every micro-batch's flat outputs on every rank of the pipeline group (from the last stage)."""
        result = []
        for i, mb in enumerate(mbs):
            bindings = self.plan.bindings(mb)
            row = []
            for j, leaf in enumerate(self._leaves):
                if leaf.shape is None:
                    row.append(leaf.value)
                    continue
                if outs is not None:
                    t = outs[i][j].detach().to(self._wire).contiguous()
                else:
                    t = torch.empty([evaluate(d, bindings) for d in leaf.shape], dtype=leaf.dtype, device=self._wire)
                dist.broadcast(t, src=self._src, group=self._group)
                row.append(t.to(self.device))
            result.append(row)
        return result

    def _concat(self, rows: list[list[Any]]) -> list[Any]:
        if len(rows) == 1:
            return rows[0]
        out = []
        for j, leaf in enumerate(self._leaves):
            if leaf.shape is None:
                out.append(leaf.value)
            elif leaf.shape and leaf.shape[0] == self.microbatch_size:
                out.append(torch.cat([r[j] for r in rows], dim=0))
            else:
                raise ConfigError(
                    f"output {j} has no batch axis to join micro-batches along; call with a batch of "
                    f"{self.microbatch_size} (the captured micro-batch)"
                )
        return out

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.config.kv_cache:  # the step graph: flat inputs in layout.input_names order, one micro-batch
            if kwargs:
                raise ConfigError("a kv_cache graph takes positional inputs in layout.input_names order")
            mbs = [dict(zip(self.plan.input_names, args, strict=True))]
        else:
            mbs = self.split(self._inputs(args, kwargs))
        outs, _ = self.executor.run(mbs, self.config.parallel.schedule)  # type: ignore[union-attr]
        return self.plan.outputs(self._concat(self._broadcast(outs, mbs)))

    # -- inspection ---------------------------------------------------------------------

    @property
    def ir(self) -> str:
        """This rank's stage: what it receives and sends, then its IR."""
        return self.stage.ir()

    def write_stage(self, directory: str | Path) -> Path:
        """Write ``stage{s}.txt`` (the partition report and this stage's IR) into ``directory``."""
        path = Path(directory) / f"stage{self.stage_index}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.plan.report() + "\n\n" + self.stage.ir() + "\n")
        return path

    def dump(self, directory: Any) -> Path:
        out = super().dump(directory)
        self.write_stage(out)
        return out


class ContextParallelCompiledModel(CompiledModel):
    """A model whose attention is ring attention; a call splits the tokens over the ranks (see the module docstring)."""

    def __init__(self, captured: Capture, gm: GraphModule, report: PipelineReport, config: CompileConfig) -> None:
        from kiln.parallel.ring_attention_pass import ContextParallelRunner

        super().__init__(captured, gm, report, config)
        self.runner = ContextParallelRunner(gm)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.runner(self._inputs(args, kwargs))


__all__ = ["ContextParallelCompiledModel", "PipelineCompiledModel", "batch_input", "microbatch_example"]
