"""split-pipeline-stages: partition the graph into p pipeline stages with a cost model.

Pipeline parallelism (GPipe, Huang et al. 2019, arXiv:1811.06965) gives each of p ranks a
contiguous slice of the model. kiln finds the slices on the IR, for any captured model:
the *work nodes* (see :mod:`kiln.parallel.stages`) in topological order are cut into p
contiguous ranges by dynamic programming over prefix costs:

1. candidate cuts are the points where every live value is a tensor and few bytes are
   live: at most ``max_cut_factor`` times the fewest live bytes of any cut (in a
   transformer: the residual stream between sub-layers);
2. the smallest achievable bottleneck ``B*`` (the costliest stage, roofline seconds of
   FLOPs and bytes) over those cuts, by DP over (stages used, cut position);
3. among partitions whose every stage costs at most ``(1 + balance_tolerance) * B*``,
   the one sending the fewest bytes across its cuts, by a second DP.

Matches: any graph with at least ``num_stages`` work nodes and enough candidate cuts.
Rewrites to: nothing in the graph itself; every work node gets ``meta["pipeline_stage"]``
    and ``gm.meta["kiln_pipeline"]`` holds a :class:`kiln.parallel.stages.PipelinePlan`:
    one printable ``GraphModule`` per stage whose inputs are the user inputs it reads
    followed by the values received from the previous stage, and whose outputs are the
    values sent to the next (the last stage: the model's outputs), with a cost report.
Requires: shape metadata on every node (``meta["val"]``), as captured.
Establishes: the stage assignment is contiguous in graph order and every edge of the
    networkx view goes from a stage to itself or a later one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import networkx as nx
import numpy as np
from torch.fx import GraphModule

from kiln.errors import ConfigError
from kiln.parallel.stages import (
    PLAN_KEY,
    STAGE_KEY,
    Analysis,
    CostModel,
    PipelinePlan,
    analyze,
    build_stages,
    imbalance,
)
from kiln.pass_manager import Pass, PassResult, RewriteError


def candidate_cuts(an: Analysis, max_cut_factor: float) -> list[int]:
    """Work indices where a stage may begin: valid cuts with few live bytes."""
    valid = [c for c in range(1, len(an.work)) if an.valid[c]]
    if not valid:
        return []
    floor = min(an.cut_bytes[c] for c in valid)
    return [c for c in valid if an.cut_bytes[c] <= max_cut_factor * floor * (1 + 1e-9)]


def partition(
    an: Analysis, num_stages: int, *, balance_tolerance: float = 0.02, max_cut_factor: float = 2.0
) -> list[int]:
    """The cuts (work indices where stages 1 .. p-1 begin): balanced first, then least traffic."""
    if num_stages == 1:
        return []
    cands = candidate_cuts(an, max_cut_factor)
    if len(cands) < num_stages - 1:
        raise ConfigError(
            f"cannot split into {num_stages} pipeline stages: only {len(cands)} cut points carry few live values "
            f"(max_cut_factor={max_cut_factor}); use fewer stages or a larger max_cut_factor"
        )
    pos = np.array([0, *cands, len(an.work)])
    prefix = np.array(an.prefix_seconds)[pos]  # (C,)
    cross = np.array([0.0, *(an.cut_bytes[c] for c in cands), 0.0])  # bytes sent at each position
    n = len(pos)
    seg = prefix[None, :] - prefix[:, None]  # seg[i, j]: cost of a stage from pos[i] to pos[j]
    seg[np.tril_indices(n)] = np.inf  # a stage is never empty
    # DP 1: f[j] = least bottleneck covering work[:pos[j]] with k stages.
    f = np.full(n, np.inf)
    f[0] = 0.0
    for _ in range(num_stages):
        f = np.min(np.maximum(f[:, None], seg), axis=0)
    best = f[-1]
    if not np.isfinite(best):
        raise ConfigError(f"cannot split {len(an.work)} work nodes into {num_stages} non-empty stages")
    # DP 2: least cut traffic with every stage within (1 + tolerance) of the bottleneck.
    allowed = seg <= best * (1 + balance_tolerance) + 1e-18
    g = np.full(n, np.inf)
    g[0] = 0.0
    back = []
    for _ in range(num_stages):
        total = np.where(allowed, g[:, None] + cross[None, :], np.inf)  # (from i, to j)
        back.append(np.argmin(total, axis=0))
        g = np.min(total, axis=0)
    cuts, j = [], n - 1
    for k in range(num_stages - 1, 0, -1):
        j = int(back[k][j])
        cuts.append(int(pos[j]))
    return sorted(cuts)


def split_pipeline_stages(
    gm: GraphModule,
    num_stages: int,
    *,
    cost_model: CostModel | None = None,
    balance_tolerance: float = 0.02,
    max_cut_factor: float = 2.0,
    measured: Mapping[str, float] | None = None,
) -> PipelinePlan:
    """Partition ``gm`` into ``num_stages`` stages (see the module docstring); returns the plan.

    ``measured`` (op name -> seconds, from ``kiln.parallel.stages_cost.profile_costs``)
    balances on measured times instead of the cost model's roofline. To balance on what whole
    stages take when they run, re-split on ``kiln.parallel.calibrated_costs(gm, plan, stage_seconds)``.
    """
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ConfigError(f"num_stages must be a positive int, got {num_stages!r}")
    an = analyze(gm, cost_model, measured=measured)
    cuts = partition(an, num_stages, balance_tolerance=balance_tolerance, max_cut_factor=max_cut_factor)
    return build_stages(an, cuts)


def plan_of(gm: GraphModule) -> PipelinePlan:
    """The :class:`PipelinePlan` split-pipeline-stages recorded on ``gm``."""
    plan = gm.meta.get(PLAN_KEY)
    if plan is None:
        raise ConfigError("this graph has no pipeline plan: run SplitPipelineStages(num_stages) on it first")
    return plan


class SplitPipelineStages(Pass):
    """Partition the graph into balanced pipeline stages with little traffic between them."""

    name = "split-pipeline-stages"

    def __init__(
        self,
        num_stages: int,
        *,
        cost_model: CostModel | None = None,
        balance_tolerance: float = 0.02,
        max_cut_factor: float = 2.0,
    ) -> None:
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ConfigError(f"num_stages must be a positive int, got {num_stages!r}")
        if balance_tolerance < 0 or max_cut_factor < 1:
            raise ConfigError("balance_tolerance must be >= 0 and max_cut_factor >= 1")
        self.num_stages = num_stages
        self.cost_model = cost_model
        self.balance_tolerance = balance_tolerance
        self.max_cut_factor = max_cut_factor

    def requires(self, gm: GraphModule) -> None:
        for n in gm.graph.nodes:
            if n.op == "call_function" and "val" not in n.meta and n.users:
                raise RewriteError(
                    "split-pipeline-stages needs shape metadata (meta['val']) on every value", n
                )

    def call(self, gm: GraphModule) -> PassResult:
        plan = split_pipeline_stages(
            gm,
            self.num_stages,
            cost_model=self.cost_model,
            balance_tolerance=self.balance_tolerance,
            max_cut_factor=self.max_cut_factor,
        )
        gm.meta[PLAN_KEY] = plan
        costs = [s.cost.seconds for s in plan.stages]
        stats = {
            "stages": plan.num_stages,
            "cut_bytes": int(sum(s.cost.send_bytes for s in plan.stages)),
            "imbalance_permille": round(imbalance(costs) * 1000) if min(costs) > 0 else -1,
        }
        return PassResult(gm, False, stats)  # the graph is unchanged; nodes are annotated, the plan recorded

    def ensures(self, gm: GraphModule) -> None:
        plan = plan_of(gm)
        stage_of = {n.name: n.meta[STAGE_KEY] for n in gm.graph.nodes if STAGE_KEY in n.meta}
        order = [stage_of[n.name] for n in gm.graph.nodes if n.name in stage_of]
        if order != sorted(order) or sorted(set(order)) != list(range(plan.num_stages)):
            raise RewriteError(f"stage assignment is not contiguous over {plan.num_stages} stages")
        quotient = nx.DiGraph()
        quotient.add_nodes_from(range(plan.num_stages))
        for u, v in _view(gm).edges:
            if u in stage_of and v in stage_of and stage_of[u] != stage_of[v]:
                quotient.add_edge(stage_of[u], stage_of[v])
        if not nx.is_directed_acyclic_graph(quotient) or any(a > b for a, b in quotient.edges):
            raise RewriteError(f"stage graph has a backward edge: {sorted(quotient.edges)}")


def _view(gm: GraphModule) -> nx.DiGraph:
    from kiln.ir import to_networkx

    return to_networkx(gm)


def stage_costs(plan: PipelinePlan) -> Sequence[float]:
    """Modelled seconds of each stage."""
    return [s.cost.seconds for s in plan.stages]


__all__ = [
    "SplitPipelineStages",
    "candidate_cuts",
    "partition",
    "plan_of",
    "split_pipeline_stages",
    "stage_costs",
]
