"""Pipeline stages: the cost model, the live-value analysis and the per-stage graphs.

Pipeline parallelism (GPipe, Huang et al. 2019, arXiv:1811.06965; PipeDream's 1F1B,
Narayanan et al. 2019) gives each rank a contiguous slice of the model. Here a slice is a
contiguous range of the *work nodes* of kiln's IR in graph (topological) order:

- **user inputs** (placeholders) are given to every stage, as vLLM broadcasts the step's
  metadata to all pipeline ranks; a stage's graph takes only the inputs it reads;
- **replicable nodes** (pure, computed from user inputs and buffers only, or from weights
  only: RoPE tables, masks, ``sym_size``) are recomputed by every stage that needs them
  instead of being sent;
- **work nodes** (everything else) are partitioned; a value defined in one stage and used
  in a later one crosses every cut in between and is sent from stage to stage (relayed).

:func:`analyze` prices every work node with a roofline :class:`CostModel` (FLOPs from the
shapes in ``node.meta["val"]``, bytes of activations and weights read and written) and
measures the bytes live across every possible cut; :func:`build_stages` turns a list of
cuts into one :class:`StageGraph` per stage, a plain ``GraphModule`` whose inputs are the
user inputs it reads followed by the values it receives, and whose outputs are the values
it sends (the last stage: the model's outputs). Shapes of received values are symbolic
(``(1, T, 64)``); :meth:`PipelinePlan.bindings` gives the symbols their values from the
user inputs, so a receiver allocates its buffers without a shape message.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import sympy
import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

from kiln.errors import ConfigError
from kiln.ir import SYMBOLS_KEY, dtype_name, print_ir, to_networkx
from kiln.parallel.stages_cost import (
    CostModel,
    NodeCost,
    SizeExpr,
    evaluate,
    node_cost,
    price_hints,
    size_expr,
)

aten = torch.ops.aten

#: ``node.meta`` key: the pipeline stage a work node belongs to (replicable nodes: absent).
STAGE_KEY = "pipeline_stage"
#: ``GraphModule.meta`` key holding the :class:`PipelinePlan` after split-pipeline-stages.
PLAN_KEY = "kiln_pipeline"

# --------------------------------------------------------------------------------------
# Analysis: classify nodes, price work nodes, measure live bytes across cuts
# --------------------------------------------------------------------------------------


@dataclass
class Analysis:
    """The pipeline view of a graph: which nodes are partitioned, what each costs, what is live where."""

    gm: GraphModule
    cost_model: CostModel
    work: list[Node]  # partitioned nodes, in graph order
    replicable: set[Node]  # recomputed by every stage that needs them
    params: set[str]  # get_attr targets that are parameters (weights), not buffers
    costs: dict[Node, NodeCost]  # every call_function node
    crossing: list[list[Node]]  # crossing[c]: work values defined before work index c and used at or after it
    cut_bytes: list[float]  # bytes of crossing[c] under the cost model's sizes
    valid: list[bool]  # valid[c]: every crossing value is a tensor (a cut may go there)
    graph: nx.DiGraph  # the networkx view the live ranges were read from

    @property
    def prefix_seconds(self) -> list[float]:
        """prefix[i] = cost of work[:i] in seconds."""
        out = [0.0]
        for n in self.work:
            out.append(out[-1] + self.costs[n].seconds)
        return out


def _is_param(gm: GraphModule, target: str) -> bool:
    return target in dict(gm.named_parameters(remove_duplicate=False))


def _depends_on(node: Node, kinds: dict[Node, set[str]]) -> set[str]:
    out: set[str] = set()
    for a in node.all_input_nodes:
        out |= kinds[a]
    return out


def analyze(
    gm: GraphModule, cost_model: CostModel | None = None, *, measured: Mapping[str, float] | None = None
) -> Analysis:
    """Classify, price and measure ``gm`` for pipeline partitioning (see the module docstring).

    ``measured`` (node name -> seconds, from :func:`kiln.parallel.stages_cost.profile_costs`)
    replaces the roofline time of the ops it names.
    """
    cost = cost_model or CostModel()
    hints = price_hints(gm, cost)
    params = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and _is_param(gm, str(n.target))}
    # What each node depends on: "input" (user data), "param" (weights), "work" (a partitioned node).
    kinds: dict[Node, set[str]] = {}
    work: list[Node] = []
    replicable: set[Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            kinds[n] = {"input"}
        elif n.op == "get_attr":
            kinds[n] = {"param"} if str(n.target) in params else set()
        elif n.op == "output":
            continue
        else:
            deps = _depends_on(n, kinds)
            pure = n.op == "call_function" and not n.is_impure()
            if pure and "work" not in deps and not {"input", "param"} <= deps:
                replicable.add(n)
                kinds[n] = deps
            else:
                work.append(n)
                kinds[n] = {"work"}
    g = to_networkx(gm)
    index = {n.name: i for i, n in enumerate(work)}
    output = gm.graph.output_node()
    n_work = len(work)
    live = [0.0] * (n_work + 2)
    bad = [0] * (n_work + 2)
    crossing: list[list[Node]] = [[] for _ in range(n_work + 1)]
    by_name = {n.name: n for n in gm.graph.nodes}
    for i, n in enumerate(work):
        users = list(g.successors(n.name))
        last = max((index.get(u, n_work if u == output.name else -1) for u in users), default=i)
        if last <= i:
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            b = math.prod(evaluate(size_expr(d), hints) for d in val.shape) * val.element_size()
        else:
            b = 0
        live[i + 1] += b
        live[last + 1] -= b
        if not isinstance(val, torch.Tensor):
            bad[i + 1] += 1
            bad[last + 1] -= 1
        for c in range(i + 1, min(last, n_work - 1) + 1):
            crossing[c].append(by_name[n.name])
    cut_bytes, valid, acc, acc_bad = [], [], 0.0, 0
    for c in range(n_work + 1):
        acc += live[c]
        acc_bad += bad[c]
        cut_bytes.append(acc)
        valid.append(acc_bad == 0 and 0 < c < n_work)
    costs = {n: node_cost(n, hints, cost) for n in gm.graph.nodes if n.op == "call_function"}
    for n, c in costs.items():
        if measured is not None and n.name in measured:
            c.seconds = float(measured[n.name])
    return Analysis(gm, cost, work, replicable, params, costs, crossing, cut_bytes, valid, g)


# --------------------------------------------------------------------------------------
# Stage graphs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoundaryValue:
    """A value sent from one stage to the next."""

    name: str  # the defining node's name in the original graph (and the placeholder's name in the receiver)
    shape: tuple[SizeExpr, ...]  # symbolic shape; evaluate with PipelinePlan.bindings
    dtype: torch.dtype

    def concrete_shape(self, bindings: Mapping[sympy.Symbol, int]) -> tuple[int, ...]:
        """The shape for one call, given the size symbols' values."""
        return tuple(evaluate(d, bindings) for d in self.shape)

    def text(self, names: Mapping[str, str] | None = None) -> str:
        """``%add_11: f32[1, T, 32]``, size symbols printed by their dimension names when given."""
        names = names or {}
        dims = [
            re.sub(r"\b[su]\d+\b", lambda m: names.get(m.group(0), m.group(0)), str(d)) for d in self.shape
        ]
        return f"%{self.name}: {dtype_name(self.dtype)}[{', '.join(dims)}]"

    def __str__(self) -> str:
        return self.text()


@dataclass
class StageCost:
    """One stage's price under the cost model."""

    seconds: float  # roofline compute time (work nodes plus the replicated nodes it recomputes)
    flops: float  # floating-point operations
    param_bytes: int  # bytes of the weights it holds
    recv_bytes: float  # bytes it receives per call
    send_bytes: float  # bytes it sends per call
    num_nodes: int  # work nodes it runs


@dataclass
class StageGraph:
    """One pipeline stage: a graph over (user inputs it reads, values it receives) -> (values it sends | outputs)."""

    index: int  # 0 .. num_stages - 1
    gm: GraphModule  # the stage's computation (plain GraphModule, flat positional inputs and outputs)
    user_inputs: tuple[str, ...]  # original input names the stage reads, in its placeholder order
    recv: tuple[BoundaryValue, ...]  # received from stage index - 1, after the user inputs
    send: tuple[BoundaryValue, ...]  # sent to stage index + 1 (the first outputs)
    num_outputs: int  # model outputs returned after the sent values (last stage only)
    cost: StageCost  # its price under the cost model

    def __call__(self, inputs: Mapping[str, Any], received: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """Run the stage: returns (values to send, model outputs)."""
        out = self.gm(*[inputs[n] for n in self.user_inputs], *received)
        out = list(out)
        return out[: len(self.send)], out[len(self.send) :]

    def ir(self) -> str:
        """The stage's IR, headed by what it receives and sends."""
        names = self.gm.meta.get(SYMBOLS_KEY, {})
        head = [f"// stage {self.index}: {self.cost.num_nodes} work nodes, {self.cost.seconds * 1e6:.1f} us"]
        head += [f"// recv from stage {self.index - 1}: {v.text(names)}" for v in self.recv]
        head += [f"// send to stage {self.index + 1}: {v.text(names)}" for v in self.send]
        return "\n".join(head) + "\n" + print_ir(self.gm, title=f"stage{self.index}")


@dataclass
class PipelinePlan:
    """A graph split into stages, with its inputs' names and output structure."""

    stages: list[StageGraph]  # one per pipeline rank
    input_names: tuple[str, ...]  # the original graph's inputs, in order
    input_shapes: dict[str, tuple[SizeExpr, ...]]  # symbolic shapes of tensor inputs (to bind size symbols)
    out_spec: Any  # pytree spec of the model's outputs over the last stage's flat outputs (None: flat)
    cuts: tuple[int, ...]  # work-node indices where stages begin (stage s >= 1 starts at cuts[s - 1])
    cost_model: CostModel  # what priced it

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def bindings(self, inputs: Mapping[str, Any]) -> dict[sympy.Symbol, int]:
        """Values of the size symbols, read from one call's tensor inputs (absent or None inputs skipped)."""
        out: dict[sympy.Symbol, int] = {}
        for name, shape in self.input_shapes.items():
            value = inputs.get(name)
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() != len(shape):
                raise ConfigError(
                    f"input {name!r} has rank {value.dim()}, the graph was captured with rank {len(shape)}"
                )
            for expr, actual in zip(shape, value.shape, strict=True):
                if isinstance(expr, sympy.Symbol):
                    out[expr] = int(actual)
                elif isinstance(expr, int) and expr != actual:
                    raise ConfigError(
                        f"input {name!r} has shape {tuple(value.shape)}; the graph needs size {expr} there"
                    )
        return out

    def for_rank(self, index: int) -> PipelinePlan:
        """This plan with only stage ``index``'s graph kept (the others' weights freed; boundaries kept)."""
        empty = GraphModule(torch.nn.Module(), Graph())
        stages = [s if s.index == index else dataclasses.replace(s, gm=empty) for s in self.stages]
        return dataclasses.replace(self, stages=stages)

    def outputs(self, flat: Sequence[Any]) -> Any:
        """The model's output structure from the last stage's flat outputs."""
        return list(flat) if self.out_spec is None else pytree.tree_unflatten(list(flat), self.out_spec)

    def report(self) -> str:
        """A table of per-stage costs, weights and traffic, with the imbalance."""
        rows = ["stage  nodes  modelled_us      GFLOP  params_MiB  recv_KiB  send_KiB"]
        for s in self.stages:
            c = s.cost
            rows.append(
                f"{s.index:5d}  {c.num_nodes:5d}  {c.seconds * 1e6:11.2f}  {c.flops / 1e9:9.4f}  "
                f"{c.param_bytes / 2**20:10.3f}  {c.recv_bytes / 2**10:8.1f}  {c.send_bytes / 2**10:8.1f}"
            )
        rows.append(
            f"imbalance (max / min - 1): {imbalance([s.cost.seconds for s in self.stages]) * 100:.2f}%"
        )
        return "\n".join(rows)


def calibrated_costs(
    gm: GraphModule,
    plan: PipelinePlan,
    stage_seconds: Sequence[float],
    *,
    cost_model: CostModel | None = None,
    measured: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Op times (node name -> seconds) that make ``plan``'s stages cost what they measured.

    Per-op times (the roofline's, or ``measured`` ones timed op by op) do not add up to a
    stage's time when it runs whole: launch overlap, caches and the clock differ. Each work
    node's time is scaled by its stage's ``stage_seconds[s] / plan.stages[s].cost.seconds``;
    pass the result as ``measured`` to :func:`kiln.passes.split_pipeline_stages.split_pipeline_stages`
    to re-balance on it (a few rounds of measure and re-split converge when the scale of an op
    does not depend on the stage it lands in). ``gm``, ``cost_model`` and ``measured`` must be
    those the plan was split with.
    """
    if len(stage_seconds) != len(plan.stages):
        raise ConfigError(f"need one time per stage ({len(plan.stages)}), got {len(stage_seconds)}")
    if any(not (t > 0 and math.isfinite(t)) for t in stage_seconds):
        raise ConfigError(f"stage times must be positive and finite, got {list(stage_seconds)}")
    an = analyze(gm, cost_model, measured=measured)
    bounds = (0, *plan.cuts, len(an.work))
    if len(bounds) != len(plan.stages) + 1 or any(a >= b for a, b in zip(bounds[:-1], bounds[1:], strict=True)):
        raise ConfigError("the plan's cuts do not fit this graph: pass the graph and costs it was split with")
    out = {n.name: c.seconds for n, c in an.costs.items()}
    for stage, a, b, seconds in zip(plan.stages, bounds[:-1], bounds[1:], stage_seconds, strict=True):
        work = [n.name for n in an.work[a:b] if n.name in out]
        w = sum(out[name] for name in work)
        replicated = stage.cost.seconds - w  # the shared nodes the stage recomputes keep their price
        scale = max(seconds - replicated, 1e-3 * seconds) / w if w > 0 else 1.0
        for name in work:
            out[name] *= scale
    return out


def imbalance(costs: Sequence[float]) -> float:
    """``max / min - 1`` of stage costs (0 is perfectly balanced)."""
    return max(costs) / min(costs) - 1.0 if min(costs) > 0 else math.inf


def _boundary(node: Node) -> BoundaryValue:
    val = node.meta["val"]
    return BoundaryValue(node.name, tuple(size_expr(d) for d in val.shape), val.dtype)


def _closure(roots: Sequence[Node], replicable: set[Node]) -> set[Node]:
    """The replicable nodes, get_attrs and placeholders the roots read (transitively through replicable nodes)."""
    seen: set[Node] = set()
    stack = [a for r in roots for a in r.all_input_nodes]
    while stack:
        n = stack.pop()
        if n in seen or not (n in replicable or n.op in ("get_attr", "placeholder")):
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _copy_stage(
    gm: GraphModule,
    needed: set[Node],
    recv: Sequence[Node],
    send: Sequence[Node],
    out_leaves: Sequence[Any] | None,
) -> tuple[GraphModule, list[str]]:
    """A GraphModule of the ``needed`` nodes: (user inputs read, received values) -> (sent values, outputs)."""
    g = Graph()
    env: dict[Node, Node] = {}
    user_inputs = []
    for ph in gm.graph.nodes:
        if ph.op == "placeholder" and ph in needed:
            env[ph] = g.placeholder(ph.name)
            env[ph].meta = dict(ph.meta)
            user_inputs.append(ph.name)
    for v in recv:
        env[v] = g.placeholder(v.name)
        env[v].meta = dict(v.meta)
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "output") and n in needed and n not in env:
            env[n] = g.node_copy(n, env.__getitem__)
    outs = [map_arg(x, env.__getitem__) for x in out_leaves] if out_leaves is not None else []
    g.output(tuple([env[v] for v in send] + outs))
    stage_gm = GraphModule(gm, g)
    stage_gm.meta[SYMBOLS_KEY] = dict(gm.meta.get(SYMBOLS_KEY, {}))
    return stage_gm, user_inputs


def build_stages(an: Analysis, cuts: Sequence[int]) -> PipelinePlan:
    """One :class:`StageGraph` per stage; stage ``s`` runs ``work[bounds[s]:bounds[s + 1]]``."""
    gm = an.gm
    bounds = [0, *cuts, len(an.work)]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = gm.graph.output_node()
    out_leaves, _ = pytree.tree_flatten(output.args[0])
    info = getattr(gm.graph._codegen, "pytree_info", None)
    weights = dict(gm.named_parameters(remove_duplicate=False))
    stages = []
    for s in range(len(bounds) - 1):
        mine = an.work[bounds[s] : bounds[s + 1]]
        last = s == len(bounds) - 2
        recv = an.crossing[bounds[s]] if s > 0 else []
        send = an.crossing[bounds[s + 1]] if not last else []
        needed = _closure(mine + ([output] if last else []), an.replicable) | set(mine)
        stage_gm, user_inputs = _copy_stage(gm, needed, recv, send, out_leaves if last else None)
        for n in mine:
            n.meta[STAGE_KEY] = s
        held = {str(n.target) for n in needed if n.op == "get_attr" and str(n.target) in an.params}
        computed = [n for n in needed if n.op == "call_function"]
        cost = StageCost(
            seconds=sum(an.costs[n].seconds for n in computed),
            flops=sum(an.costs[n].flops for n in computed),
            param_bytes=sum(t.numel() * t.element_size() for k, t in weights.items() if k in held),
            recv_bytes=an.cut_bytes[bounds[s]] if s > 0 else 0.0,
            send_bytes=an.cut_bytes[bounds[s + 1]] if not last else 0.0,
            num_nodes=len(mine),
        )
        stages.append(
            StageGraph(
                s,
                stage_gm,
                tuple(user_inputs),
                tuple(map(_boundary, recv)),
                tuple(map(_boundary, send)),
                len(out_leaves) if last else 0,
                cost,
            )
        )
    shapes = {
        ph.name: tuple(size_expr(d) for d in ph.meta["val"].shape)
        for ph in placeholders
        if isinstance(ph.meta.get("val"), torch.Tensor)
    }
    return PipelinePlan(
        stages,
        tuple(ph.name for ph in placeholders),
        shapes,
        info.out_spec if info is not None else None,
        tuple(cuts),
        an.cost_model,
    )


__all__ = [
    "PLAN_KEY",
    "STAGE_KEY",
    "Analysis",
    "BoundaryValue",
    "CostModel",
    "NodeCost",
    "PipelinePlan",
    "StageCost",
    "StageGraph",
    "analyze",
    "build_stages",
    "calibrated_costs",
    "evaluate",
    "imbalance",
    "size_expr",
]
