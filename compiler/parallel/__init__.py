"""Parallel execution: tensor, pipeline, sequence and context parallelism on torch.distributed.

- ``kiln.ParallelConfig`` says how a model is spread over ranks.
- Tensor and sequence parallelism are passes (``kiln.passes.shard_tensor_parallel``,
  ``kiln.passes.sequence_parallel``) that ``kiln.compile(..., parallel=...)`` runs per rank.
- Ranks run under ``torchrun`` (:func:`init_distributed`), as processes :func:`launch` spawns,
  or as the persistent workers of ``kiln.parallel.worker`` (``kiln.compile`` outside
  torch.distributed, ``kiln.LLM(tensor_parallel_size=)``).
- :func:`compile_shards` builds every rank's shard in one process; :func:`run_lockstep` runs
  them there, doing the collectives' arithmetic itself (checks on a single device).
- Pipeline parallelism: :func:`split_pipeline_stages` partitions a graph into a
  :class:`PipelinePlan` of stage graphs (cost model in ``kiln.parallel.stages_cost``);
  :class:`PipelineExecutor` runs one stage per rank under GPipe / 1F1B
  (``kiln.parallel.schedule``) or interleaves decode steps (:func:`generate_interleaved`).
- Context parallelism: ``ContextParallelAttention`` rewrites attention into ring attention
  (``kiln::ring_attention``) and :class:`ContextParallelRunner` splits a long prefill's tokens
  over the ranks (zigzag).
- ``kiln.compile(parallel=ParallelConfig(pipeline_parallel_size=p | context_parallel_size=c))``
  returns this rank's :class:`PipelineCompiledModel` or :class:`ContextParallelCompiledModel`
  (``kiln.parallel.compiled``); tensor and pipeline groups together: ``kiln.parallel.groups``.
  ``kiln.LLM(pipeline_parallel_size=p)`` runs ``kiln.runtime.pipeline_runner`` on each rank.
"""

from typing import Any

from kiln.parallel.config import ParallelConfig

_LAZY = {
    "launch": "kiln.parallel.launch",
    "init_distributed": "kiln.parallel.launch",
    "free_port": "kiln.parallel.launch",
    "compile_shards": "kiln.parallel.tp_shards",
    "run_lockstep": "kiln.parallel.tp_shards",
    "strip_collectives": "kiln.parallel.tp_shards",
    "ParallelCompiledModel": "kiln.parallel.worker",
    "ParallelModelRunner": "kiln.parallel.worker",
    "WorkerGroup": "kiln.parallel.worker",
    "split_pipeline_stages": "kiln.passes.split_pipeline_stages",
    "PipelinePlan": "kiln.parallel.stages",
    "calibrated_costs": "kiln.parallel.stages",
    "CostModel": "kiln.parallel.stages_cost",
    "PipelineExecutor": "kiln.parallel.pipeline",
    "VirtualClock": "kiln.parallel.pipeline",
    "GPipe": "kiln.parallel.schedule",
    "OneFOneB": "kiln.parallel.schedule",
    "InterleavedDecode": "kiln.parallel.schedule",
    "generate_interleaved": "kiln.parallel.pipeline_decode",
    "ContextParallelAttention": "kiln.parallel.ring_attention_pass",
    "ContextParallelRunner": "kiln.parallel.ring_attention_pass",
    "PipelineCompiledModel": "kiln.parallel.compiled",
    "ContextParallelCompiledModel": "kiln.parallel.compiled",
}


def __getattr__(name: str) -> Any:  # imported on first use: torch.distributed and the passes stay out of `import kiln`
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln.parallel' has no attribute {name!r}")


__all__ = ["ParallelConfig", *_LAZY]
