"""The process groups of a :class:`kiln.ParallelConfig`: tensor-parallel and pipeline groups.

Under tensor and pipeline parallelism together, rank ``stage * tp + t`` holds tensor shard
``t`` of pipeline stage ``stage`` (:meth:`ParallelConfig.stage_of`). Its tensor-parallel
collectives run over the ``tp`` ranks of its stage, its pipeline sends and receives over the
``pp`` ranks holding shard ``t``. ``torch.distributed.new_group`` is collective (every rank
creates every group, in the same order), so :func:`create_groups` runs once per world and
config on every rank, from ``kiln.compile``, before the pipeline is built; the pipeline then
looks the groups up with :func:`tp_group_name` and :func:`pp_group`. A group spanning the
whole world is the world group.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from kiln.parallel.config import ParallelConfig

_GROUPS: dict[tuple[int, ...], Any] = {}  # ranks -> process group, of the world group _WORLD[0]
_WORLD: list[Any] = [None]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def create_groups(par: ParallelConfig) -> None:
    """Create (collectively, on every rank) the tensor-parallel and pipeline groups ``par`` needs."""
    if not _initialized() or par.tensor_parallel_size == 1 or par.pipeline_parallel_size == 1:
        return  # one kind of group, the world
    if _WORLD[0] is not dist.group.WORLD:  # a new world: the old groups went with the old one
        _GROUPS.clear()
        _WORLD[0] = dist.group.WORLD
    tp, pp = par.tensor_parallel_size, par.pipeline_parallel_size
    wanted = [par.tp_group_ranks(s * tp) for s in range(pp)] + [par.pp_group_ranks(t) for t in range(tp)]
    for ranks in wanted:  # the same order on every rank
        key = tuple(ranks)
        if key not in _GROUPS:
            _GROUPS[key] = dist.new_group(ranks)


def _group(ranks: list[int]) -> Any:
    if not _initialized() or len(ranks) == dist.get_world_size():
        return dist.group.WORLD if _initialized() else None
    group = _GROUPS.get(tuple(ranks))
    if group is None:
        from kiln.errors import ConfigError

        raise ConfigError(f"no process group over ranks {ranks}: call kiln.parallel.groups.create_groups first")
    return group


def tp_group_name(par: ParallelConfig, rank: int) -> str | None:
    """The name of ``rank``'s tensor-parallel group (None: the world group, the passes' default)."""
    if not _initialized() or par.pipeline_parallel_size == 1:
        return None
    return str(_group(par.tp_group_ranks(rank)).group_name)


def pp_group(par: ParallelConfig, rank: int) -> Any:
    """``rank``'s pipeline process group (its group rank is its stage)."""
    return _group(par.pp_group_ranks(rank))


__all__ = ["create_groups", "pp_group", "tp_group_name"]
