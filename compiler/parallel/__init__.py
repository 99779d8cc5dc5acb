"""Parallel execution: tensor, pipeline, sequence and context parallelism on torch.distributed.

- ``kiln.ParallelConfig`` says how a model is spread over ranks.
- Tensor and sequence parallelism are passes (``kiln.passes.shard_tensor_parallel``,
  ``kiln.passes.sequence_parallel``) that ``kiln.compile(..., parallel=...)`` runs per rank.
- Ranks run under ``torchrun`` (:func:`init_distributed`), as processes :func:`launch` spawns,
  or as the persistent workers of ``kiln.parallel.worker`` (``kiln.compile`` outside
  torch.distributed, ``kiln.LLM(tensor_parallel_size=)``).
- :func:`compile_shards` builds every rank's shard in one process; :func:`run_lockstep` runs
  them there, doing the collectives' arithmetic itself (checks on a single device).
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
}


def __getattr__(name: str) -> Any:  # imported on first use: torch.distributed and the passes stay out of `import kiln`
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln.parallel' has no attribute {name!r}")


__all__ = ["ParallelConfig", *_LAZY]
