"""``kiln.ParallelConfig``: how a compiled model is spread over ranks."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import ConfigError


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of tensor, pipeline and sequence parallelism.

    The world size a run needs is ``tensor_parallel_size * pipeline_parallel_size *
    context_parallel_size``; sequence parallelism splits the token axis inside each
    tensor-parallel group (Megatron style), context parallelism (ring attention) splits long
    prefills over ``context_parallel_size`` ranks. Under tensor and pipeline parallelism
    together, rank ``stage * tensor_parallel_size + tp_rank`` holds tensor shard ``tp_rank`` of
    pipeline stage ``stage`` (tensor-parallel groups are consecutive ranks, as Megatron-LM
    keeps them inside a node).
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    num_microbatches: int | None = None  # micro-batches the example batch is cut into; None: its largest divisor <= p
    schedule: str = "1f1b"  # "gpipe" | "1f1b"

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"ParallelConfig.{name} must be a positive int, got {v!r}")
        if self.sequence_parallel and self.tensor_parallel_size == 1:
            raise ConfigError("sequence_parallel splits tokens inside a tensor-parallel group: set tensor_parallel_size > 1")
        if self.schedule not in ("gpipe", "1f1b"):
            raise ConfigError(f"ParallelConfig.schedule must be 'gpipe' or '1f1b', got {self.schedule!r}")
        if self.num_microbatches is not None and self.num_microbatches < 1:
            raise ConfigError(f"ParallelConfig.num_microbatches must be positive, got {self.num_microbatches}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size

    def stage_of(self, rank: int) -> int:
        """The pipeline stage ``rank`` runs."""
        return rank // self.tensor_parallel_size

    def tp_rank_of(self, rank: int) -> int:
        """``rank``'s index inside its tensor-parallel group."""
        return rank % self.tensor_parallel_size

    def tp_group_ranks(self, rank: int) -> list[int]:
        """The ranks of ``rank``'s tensor-parallel group (the shards of its pipeline stage)."""
        first = self.stage_of(rank) * self.tensor_parallel_size
        return list(range(first, first + self.tensor_parallel_size))

    def pp_group_ranks(self, rank: int) -> list[int]:
        """The ranks of ``rank``'s pipeline group (one per stage, same tensor shard), in stage order."""
        t = self.tp_rank_of(rank)
        return [s * self.tensor_parallel_size + t for s in range(self.pipeline_parallel_size)]


__all__ = ["ParallelConfig"]
