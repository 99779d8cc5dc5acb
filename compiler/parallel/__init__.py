"""Parallel execution: tensor, pipeline, sequence and context parallelism on torch.distributed."""

from kiln.parallel.config import ParallelConfig

__all__ = ["ParallelConfig"]
