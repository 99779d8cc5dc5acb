"""Every rank's shard in one process: for inspection, single-device simulation and benchmarks.

:func:`compile_shards` captures a model once and builds each rank's shard (``CompileConfig(rank=r)``)
without a process group. :func:`run_lockstep` runs the shards side by side, node by node, doing
each collective's arithmetic across the ranks' values in this process (a sum for all-reduce,
a concatenation for all-gather), so a sharded compile can be checked on one device.
:func:`strip_collectives` replaces the collectives with local stand-ins of the right shape, so
a shard's own compute can be timed alone (``benchmarks/parallel_shards.py``).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from kiln.capture import Capture, capture
from kiln.errors import ConfigError
from kiln.parallel.tp_collectives import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, UNIT_KEY, WAIT

aten = torch.ops.aten


def compile_shards(model: torch.nn.Module | Capture, example_inputs: Any = (), example_kwargs: Mapping[str, Any] | None = None,
                   *, config: Any, ranks: Sequence[int] | None = None) -> list[Any]:  # fmt: skip
    """``[CompiledModel of rank r]`` for ``config.parallel``: one capture, one pipeline run per rank.

    ``model`` may be a :class:`kiln.Capture` (from :func:`kiln.capture`) to reuse a capture.
    The shards' collectives need a process group to run; :func:`run_lockstep` runs them without.
    """
    from kiln.compile import CompiledModel, _run_pipeline

    if config.parallel is None:
        raise ConfigError("compile_shards needs CompileConfig(parallel=ParallelConfig(...))")
    captured = model if isinstance(model, Capture) else capture(model, example_inputs, example_kwargs, dynamic=config.dynamic)
    out = []
    for r in range(config.parallel.world_size) if ranks is None else ranks:
        rank_config = dataclasses.replace(config, rank=r)
        gm, report = _run_pipeline(captured.module(), captured, rank_config)
        out.append(CompiledModel(captured, gm, report, rank_config))
    return out


def _collective(target: object, values: list[Any], args: list[tuple[Any, ...]]) -> list[Any]:
    world = len(values)
    if target == ALL_REDUCE:
        stacked = torch.stack(values)
        total = stacked.amax(0) if args[0][1] == "max" else stacked.sum(0)
        return [total.clone() for _ in range(world)]
    if target == ALL_GATHER:
        return [torch.cat(values, 0) for _ in range(world)]
    if target == REDUCE_SCATTER:
        return list(torch.stack(values).sum(0).chunk(world, 0))
    return values  # wait_tensor


def run_lockstep(gms: Sequence[GraphModule], inputs: Sequence[Any], *, per_rank: bool = False) -> list[Any]:
    """Run rank graphs ``gms`` (one per rank, same structure) on flat ``inputs``; each rank's outputs.

    Every rank reads the same ``inputs``, or with ``per_rank`` rank r reads ``inputs[r]`` (e.g. its
    own KV caches, which a paged step graph writes).
    """
    graphs = [list(gm.graph.nodes) for gm in gms]
    if len({len(g) for g in graphs}) != 1:
        raise ConfigError("the shards' graphs differ in structure; run_lockstep needs one compile per rank")
    envs: list[dict[Node, Any]] = [{} for _ in gms]
    rank_inputs = list(inputs) if per_rank else [inputs] * len(gms)
    placeholders = iter(range(len(rank_inputs[0])))
    outputs: list[Any] = []
    for column in zip(*graphs, strict=True):
        first = column[0]
        if first.op == "placeholder":
            i = next(placeholders)
            for env, n, ins in zip(envs, column, rank_inputs, strict=True):
                env[n] = ins[i]
        elif first.op == "get_attr":
            for env, n, gm in zip(envs, column, gms, strict=True):
                obj: Any = gm
                for part in str(n.target).split("."):
                    obj = getattr(obj, part)
                env[n] = obj
        elif first.op == "call_function":
            args = [torch.fx.node.map_arg(n.args, lambda a, e=env: e[a]) for env, n in zip(envs, column, strict=True)]
            kwargs = [torch.fx.node.map_arg(n.kwargs, lambda a, e=env: e[a]) for env, n in zip(envs, column, strict=True)]
            if first.target in (ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, WAIT):
                results = _collective(first.target, [a[0] for a in args], args)
            else:
                results = [n.target(*a, **k) for n, a, k in zip(column, args, kwargs, strict=True)]  # type: ignore[operator]
            for env, n, res in zip(envs, column, results, strict=True):
                env[n] = res
        elif first.op == "output":
            outputs = [torch.fx.node.map_arg(n.args[0], lambda a, e=env: e[a]) for env, n in zip(envs, column, strict=True)]
        else:
            raise ConfigError(f"run_lockstep cannot run {first.op} nodes")
    return outputs


def strip_collectives(gm: GraphModule) -> int:
    """Replace every communication by a local stand-in of its result's shape (to time a shard's compute alone).

    A communication is a collective with its wait and the layout moves and token padding around
    it (nodes tagged with one ``UNIT_KEY``). all-reduce: its input; reduce-scatter: the first
    rows of its input (a view); all-gather: an uninitialized tensor of the gathered shape. The
    graph then computes garbage where values crossed ranks, at the cost of its own compute.
    Returns how many communications were replaced.
    """
    units: dict[int, list[Node]] = {}
    for n in gm.graph.nodes:
        if UNIT_KEY in n.meta:
            units.setdefault(n.meta[UNIT_KEY], []).append(n)
    tokens: Node | None = None
    for nodes in units.values():
        inside = set(nodes)
        kind = next(n.target for n in nodes if n.target in (ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER))
        x = next(a for n in nodes for a in n.all_input_nodes if a not in inside and isinstance(a.meta.get("val"), torch.Tensor))
        (out,) = [n for n in nodes if any(u not in inside for u in n.users)]
        xv, ov = x.meta["val"], out.meta["val"]
        with gm.graph.inserting_before(nodes[0]):
            if kind == ALL_REDUCE:
                local = x
            elif kind == REDUCE_SCATTER:  # the token axis shrinks to ceil(T / w): take the first rows
                d = next(i for i, (a, b) in enumerate(zip(xv.shape, ov.shape, strict=True)) if str(a) != str(b))
                world = next(n.args[2] for n in nodes if n.target == REDUCE_SCATTER)
                size = gm.graph.call_function(aten.sym_size.int, (x, d))
                rows = gm.graph.call_function(operator.floordiv, (gm.graph.call_function(operator.add, (size, world - 1)), world))
                local = gm.graph.call_function(aten.slice.Tensor, (x, d, 0, rows))
            else:
                shape: list[Any] = []
                for s in ov.shape:
                    same = [i for i, t in enumerate(xv.shape) if str(t) == str(s)] if not isinstance(s, int) else []
                    if isinstance(s, int):
                        shape.append(s)
                    elif same:
                        shape.append(gm.graph.call_function(aten.sym_size.int, (x, same[0])))
                    else:  # the full token count
                        if tokens is None:
                            inputs = [p for p in gm.graph.nodes if p.op == "placeholder"]
                            ids = next(p for p in inputs if p.name == "input_ids")
                            with gm.graph.inserting_after(inputs[-1]):
                                tokens = gm.graph.call_function(aten.sym_size.int, (ids, ids.meta["val"].dim() - 1))
                        shape.append(tokens)
                local = gm.graph.call_function(aten.new_empty.default, (x, shape))
        out.replace_all_uses_with(local)
        for n in reversed(nodes):
            if not n.users:
                gm.graph.erase_node(n)
    gm.recompile()
    return len(units)


__all__ = ["compile_shards", "run_lockstep", "strip_collectives"]
