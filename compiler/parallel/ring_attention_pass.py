"""context-parallel-attention: run a captured model with its token axis split over a ring.

Every op of a decoder but attention acts per token (kiln's design: the token axis of the
batch-1 capture is a flat list of tokens), so a model runs context-parallel once each
attention sees the whole ring's keys: this pass rewrites ``kiln::attention`` into
``kiln::ring_attention`` (:mod:`kiln.parallel.ring_attention`), and
:class:`ContextParallelRunner` gives each rank its share of the tokens (zigzag by default)
and gathers the outputs.

Matches: every ``kiln::attention(q, k, v, None, causal, scale)`` whose queries and keys share
    the token axis (self-attention over the captured tokens; run fuse-attention first).
Rewrites to: ``kiln::ring_attention(q, k, v, positions, causal, scale, group_name)`` where
    ``positions = position_ids[0]``. A graph without a ``position_ids`` input (Hugging Face
    models compute ``arange(T)`` when given none) gets one, and every integer ``arange`` over
    the token count is rebound to it, as the kv-cache pass does.
Requires: unmasked attention (causal or not); ``position_ids`` holding each token's index in
    the sequence (plus any constant), which the runner guarantees.
Establishes: no ``kiln::attention`` remains; the module takes flat positional inputs in the
    order of ``gm.meta["kiln_context_parallel"].input_names``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.fx import Graph, GraphModule, Node
from torch.fx.graph import CodeGen
from torch.utils import _pytree as pytree

from kiln.errors import ConfigError
from kiln.ir import fake_mode
from kiln.parallel.ring_attention import gather_tokens, resolve_group, ring_attention_op, shard_indices
from kiln.pass_manager import Pass, PassResult, RewriteError, copy_meta
from kiln.passes.kv_cache import _position_sources

ATTENTION = torch.ops.kiln.attention.default
RING = torch.ops.kiln.ring_attention.default
aten = torch.ops.aten
LAYOUT_KEY = "kiln_context_parallel"
assert ring_attention_op is not None  # the import registers kiln::ring_attention


@dataclass(frozen=True)
class ContextParallelLayout:
    """What :class:`ContextParallelRunner` needs to split inputs and gather outputs."""

    input_names: tuple[str, ...]  # the graph's flat inputs, in call order
    input_token_axes: dict[str, int]  # input name -> its token axis
    output_token_axes: tuple[int | None, ...]  # per flat output: its token axis (None: not per token)
    positions_bound: bool  # the pass added position_ids (the runner computes them when not given)
    out_spec: Any  # pytree spec of the model's outputs (None: flat)


def _token_axis(val: Any, token: Any) -> int | None:
    if not isinstance(val, torch.Tensor):
        return None
    axes = [i for i, d in enumerate(val.shape) if isinstance(d, torch.SymInt) and d.node.expr == token]
    return axes[0] if axes else None


class ContextParallelAttention(Pass):
    """Rewrite attention into ring attention over a process group (context parallelism)."""

    name = "context-parallel-attention"

    def __init__(self, group_name: str = "") -> None:
        self.group_name = group_name  # "" = the default process group, resolved when the graph runs

    def requires(self, gm: GraphModule) -> None:
        attn = [n for n in gm.graph.nodes if n.target == ATTENTION]
        if not attn:
            raise RewriteError(
                "no kiln::attention in the graph: run fuse-attention before context-parallel-attention"
            )
        for n in attn:
            mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("mask")
            if mask is not None:
                raise RewriteError(
                    "ring attention supports unmasked (causal or full) attention; this one has a mask operand. "
                    "Capture Hugging Face models without position_ids so their causal mask is proven and removed",
                    n,
                )
            q, k = n.args[0].meta["val"], n.args[1].meta["val"]
            if str(q.shape[2]) != str(k.shape[2]):
                raise RewriteError(
                    f"queries ({q.shape[2]}) and keys ({k.shape[2]}) of different token axes", n
                )
        names = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
        if "input_ids" not in names:
            raise RewriteError(f"context parallelism needs an input_ids graph input, got {sorted(names)}")
        if "position_ids" not in names and not _position_sources(gm):
            raise RewriteError(
                "context parallelism needs a position_ids input or positions computed as arange(T)"
            )

    def call(self, gm: GraphModule) -> PassResult:
        graph, mode = gm.graph, fake_mode(gm)
        placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        ids = placeholders["input_ids"]
        token = ids.meta["val"].shape[1].node.expr
        info = getattr(graph._codegen, "pytree_info", None)
        bound = 0
        if "position_ids" in placeholders:
            pos = placeholders["position_ids"]
        else:
            sources = _position_sources(gm)
            with graph.inserting_after(ids):
                pos = graph.placeholder("position_ids")
            with mode:
                pos.meta["val"] = torch.empty_like(ids.meta["val"], dtype=torch.int64)
            bound = len(sources)
        with graph.inserting_after(pos):
            row = graph.call_function(aten.select.int, (pos, 0, 0))  # (T,)
        with mode:
            row.meta["val"] = pos.meta["val"][0]
        if bound:
            for node in _position_sources(gm):
                node.replace_all_uses_with(row)
                graph.erase_node(node)
        attn = [n for n in graph.nodes if n.target == ATTENTION]
        for n in attn:
            q, k, v = n.args[:3]
            causal = n.args[4] if len(n.args) > 4 else n.kwargs.get("causal", False)
            scale = n.args[5] if len(n.args) > 5 else n.kwargs.get("scale")
            with graph.inserting_before(n):
                ring = graph.call_function(RING, (q, k, v, row, bool(causal), scale, self.group_name))
            copy_meta(n, ring)
            ring.meta["val"] = n.meta["val"]
            n.replace_all_uses_with(ring)
            graph.erase_node(n)
        graph.set_codegen(CodeGen())  # flat positional inputs and outputs
        gm._forward_pre_hooks.clear()
        phs = [n for n in graph.nodes if n.op == "placeholder"]
        out_leaves = pytree.tree_leaves(graph.output_node().args[0])
        gm.meta[LAYOUT_KEY] = ContextParallelLayout(
            input_names=tuple(n.name for n in phs),
            input_token_axes={
                n.name: a for n in phs if (a := _token_axis(n.meta.get("val"), token)) is not None
            },
            output_token_axes=tuple(
                _token_axis(x.meta.get("val"), token) if isinstance(x, Node) else None for x in out_leaves
            ),
            positions_bound=bound > 0,
            out_spec=info.out_spec if info is not None else None,
        )
        return PassResult(gm, True, {"attention_ringed": len(attn), "positions_bound": bound})

    def ensures(self, gm: GraphModule) -> None:
        left = [n for n in gm.graph.nodes if n.target == ATTENTION]
        if left:
            raise RewriteError("kiln::attention left after context-parallel-attention", left[0])


def _standalone(gm: GraphModule) -> GraphModule:
    """A plain, picklable copy of ``gm`` (same weights): the exported graph remembers its tracer,
    which cannot re-trace when unpickled, and its module carries unpicklable hooks."""
    graph = Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return GraphModule(gm, graph)


class ContextParallelRunner:
    """Runs a context-parallel graph: each rank computes its tokens; outputs are gathered on every rank.

    The runner pickles (to hand to spawned ranks); its process group is looked up by name
    (``""``: the default group) when it runs.
    """

    def __init__(self, gm: GraphModule, *, zigzag: bool = True, group_name: str = "") -> None:
        layout = gm.meta.get(LAYOUT_KEY)
        if layout is None:
            raise ConfigError("this graph is not context-parallel: run ContextParallelAttention on it first")
        self.gm, self.layout, self.zigzag, self.group_name = _standalone(gm), layout, zigzag, group_name

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Any]) -> Any:
        """Run on the whole sequence's inputs (by name); returns the full outputs, in the model's structure."""
        group = resolve_group(self.group_name)
        rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
        ids = inputs["input_ids"]
        tokens = int(ids.shape[1])
        if tokens < (2 * world if self.zigzag else world):
            raise ConfigError(f"{tokens} tokens are too few to split over {world} ranks")
        full = dict(inputs)
        if "position_ids" not in full or full["position_ids"] is None:
            full["position_ids"] = torch.arange(tokens, device=ids.device)[None].expand(ids.shape[0], -1)
        idx = shard_indices(tokens, rank, world, zigzag=self.zigzag)
        local = {}
        for name in self.layout.input_names:
            value = full.get(name)
            axis = self.layout.input_token_axes.get(name)
            local[name] = value.index_select(axis, idx.to(value.device)) if axis is not None else value
        outs = self.gm(*[local[n] for n in self.layout.input_names])
        gathered = [
            gather_tokens(o, tokens, axis, group, zigzag=self.zigzag) if axis is not None else o
            for o, axis in zip(outs, self.layout.output_token_axes, strict=True)
        ]
        return (
            gathered
            if self.layout.out_spec is None
            else pytree.tree_unflatten(gathered, self.layout.out_spec)
        )


__all__ = ["LAYOUT_KEY", "ContextParallelAttention", "ContextParallelLayout", "ContextParallelRunner"]
