"""Emit collectives into kiln IR as functional collectives (``torch.ops._c10d_functional``).

A functional collective returns a new tensor and is completed by ``wait_tensor``; both are
ordinary ATen-level ops with fake implementations, so a sharded graph keeps shape metadata,
prints, verifies and re-exports like any other (``torch.distributed._functional_collectives``
is the Python face of the same ops). The process group is named by its ``group_name``
(``"0"`` for the default world group of ``torch.distributed.init_process_group``).

The gather and scatter collectives work along dim 0; :class:`Emitter` moves another dim to
the front (permute + contiguous, which copies only when the layout changes: not for the token
axis of a batch-1 (1, T, H) activation) and back.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.fx import GraphModule, Node

from kiln.ir import infer_meta
from kiln.pass_manager import copy_meta

C10D = torch.ops._c10d_functional
aten = torch.ops.aten
#: Meta key on collective nodes a parallel pass created: what they are for ("row", "embedding", "lm_head" ...).
ROLE_KEY = "kiln_parallel"
#: Meta key grouping the nodes of one communication (the collective, its wait, and the layout
#: moves and padding around it): ``strip_collectives`` replaces a unit as a whole.
UNIT_KEY = "kiln_collective_unit"
_UNITS = itertools.count()
ALL_REDUCE = C10D.all_reduce.default
ALL_GATHER = C10D.all_gather_into_tensor.default
REDUCE_SCATTER = C10D.reduce_scatter_tensor.default
WAIT = C10D.wait_tensor.default


def default_group_name() -> str:
    """The name of torch.distributed's world group ("0" before one is initialized)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return str(dist.group.WORLD.group_name)  # type: ignore[union-attr]
    return "0"


class Emitter:
    """Appends nodes after a cursor, each with provenance from ``like`` and inferred shape metadata."""

    def __init__(self, gm: GraphModule, after: Node, like: Node, world: int, group: str) -> None:
        self.gm, self.cursor, self.like, self.world, self.group = gm, after, like, world, group
        self.created: list[Node] = []  # every node emitted, in order
        self._unit: int | None = None

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> Node:
        with self.gm.graph.inserting_after(self.cursor):
            node = self.gm.graph.call_function(target, args, kwargs)
        copy_meta(self.like, node)
        infer_meta(node)
        if self._unit is not None:
            node.meta[UNIT_KEY] = self._unit
        self.cursor = node
        self.created.append(node)
        return node

    @contextmanager
    def unit(self) -> Iterator[None]:
        """Tag the nodes emitted inside as one communication (nested calls join the outer unit)."""
        if self._unit is not None:
            yield
            return
        self._unit = next(_UNITS)
        try:
            yield
        finally:
            self._unit = None

    def all_reduce(self, x: Node, role: str, op: str = "sum") -> Node:
        """``op`` (``sum``, ``max``) over ranks of x: (all_reduce, wait)."""
        with self.unit():
            ar = self(ALL_REDUCE, x, op, self.group)
            ar.meta[ROLE_KEY] = role
            return self(WAIT, ar)

    def _to_front(self, x: Node, dim: int) -> tuple[Node, list[int] | None]:
        rank = x.meta["val"].dim()
        dim %= rank
        if dim == 0:
            return x, None
        perm = [dim, *(i for i in range(rank) if i != dim)]
        moved = self(aten.permute.default, x, perm)
        return self(aten.contiguous.default, moved), perm  # a copy only when the move changed the layout

    def _back(self, x: Node, perm: list[int] | None) -> Node:
        if perm is None:
            return x
        inverse = [perm.index(i) for i in range(len(perm))]
        return self(aten.permute.default, x, inverse)

    def all_gather(self, x: Node, dim: int, role: str) -> Node:
        """The ranks' ``x`` concatenated along ``dim`` in rank order."""
        with self.unit():
            y, perm = self._to_front(x, dim)
            ag = self(ALL_GATHER, y, self.world, self.group)
            ag.meta[ROLE_KEY] = role
            return self._back(self(WAIT, ag), perm)

    def reduce_scatter(self, x: Node, dim: int, role: str) -> Node:
        """Rank r's chunk (along ``dim``) of the sum over ranks of ``x``."""
        with self.unit():
            y, perm = self._to_front(x, dim)
            rs = self(REDUCE_SCATTER, y, "sum", self.world, self.group)
            rs.meta[ROLE_KEY] = role
            return self._back(self(WAIT, rs), perm)


def collective_counts(gm: GraphModule) -> dict[str, int]:
    """How many all_reduce / all_gather / reduce_scatter nodes ``gm`` holds."""
    names = {ALL_REDUCE: "all_reduce", ALL_GATHER: "all_gather", REDUCE_SCATTER: "reduce_scatter"}
    out = dict.fromkeys(names.values(), 0)
    for n in gm.graph.nodes:
        if n.target in names:
            out[names[n.target]] += 1
    return out


__all__ = ["ALL_GATHER", "ALL_REDUCE", "REDUCE_SCATTER", "ROLE_KEY", "UNIT_KEY", "WAIT", "Emitter", "collective_counts",
           "default_group_name"]  # fmt: skip
