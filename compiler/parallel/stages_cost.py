"""The cost model of pipeline partitioning: a roofline per op, or times measured on the device.

Every op of the IR is priced from the shapes in ``node.meta["val"]``: FLOPs (matmuls and
linears ``2 * out * k``, attention ``4 * B * H * Tq * Tk * D``, halved when causal; one per
output element otherwise) and bytes read and written (activations and weights; views move
nothing). A :class:`CostModel` turns them into seconds with a roofline, ``max(flops /
peak_flops, bytes / memory_bandwidth)``, plus a per-op launch overhead for eager execution
(Williams, Waterman & Patterson 2009, "Roofline"). Symbolic sizes are priced at given values
(``tokens`` for the token axis ``T``) or at the capture's example sizes.

:func:`profile_costs` measures instead: it runs the graph once per repeat with every op
synchronized and timed, and returns each op's median seconds; ``analyze(..., measured=)``
then balances stages on what the device really does (profile-guided partitioning).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.utils import _pytree as pytree

from kiln.errors import ConfigError
from kiln.ir import SYMBOLS_KEY, fake_mode, op_name

#: Ops that only reinterpret memory: no FLOPs, no traffic.
_VIEWS = frozenset(
    "aten.view aten.reshape aten.permute aten.transpose.int aten.t aten.unsqueeze aten.squeeze.dim aten.squeeze "
    "aten.expand aten.slice.Tensor aten.select.int aten.alias aten.detach getitem aten.sym_size.int "
    "aten._unsafe_view aten.chunk aten.split.Tensor aten.unbind.int".split()
)
_MATMULS = {"aten.mm", "aten.bmm", "aten.matmul", "aten.addmm", "aten.baddbmm"}
_ATTENTION = {"kiln.attention", "kiln.paged_attention", "kiln.ring_attention"}


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """A roofline: a node takes ``max(flops / peak_flops, bytes / memory_bandwidth)`` seconds.

    Symbolic sizes are priced at ``sizes[name]`` (``tokens`` sets ``T``, the token axis);
    sizes not given take the value of the example the graph was captured with. Defaults
    are one H100 SXM (dense bf16 989 TFLOP/s, HBM3 3.35 TB/s, NVLink 450 GB/s each way).
    """

    tokens: int | None = None  # value of the token axis T when pricing (None: the capture's example length)
    sizes: Mapping[str, int] = field(default_factory=dict)  # other named symbolic sizes, e.g. {"S": 8}
    peak_flops: float = 989e12  # FLOP/s
    memory_bandwidth: float = 3.35e12  # bytes/s
    link_bandwidth: float = 450e9  # bytes/s between neighbouring stages (prices cut traffic in reports)
    launch_overhead: float = 0.0  # seconds each executed op costs on top (eager dispatch: ~5-10 us on a GPU)

    def __post_init__(self) -> None:
        if self.launch_overhead < 0:
            raise ConfigError(f"CostModel.launch_overhead must be >= 0, got {self.launch_overhead!r}")
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 1):
            raise ConfigError(f"CostModel.tokens must be a positive int, got {self.tokens!r}")
        for name in ("peak_flops", "memory_bandwidth", "link_bandwidth"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"CostModel.{name} must be > 0, got {getattr(self, name)!r}")

    def seconds(self, flops: float, nbytes: float) -> float:
        """Roofline time of one executed op, plus its launch overhead."""
        return max(flops / self.peak_flops, nbytes / self.memory_bandwidth) + self.launch_overhead


def decode_cost_model(num_seqs: int = 16, **kwargs: Any) -> CostModel:
    """A paged step graph (``kv_cache=True``) priced as a decode step of ``num_seqs`` sequences.

    Its token count ``T``, sequence count ``S`` and logit rows ``L`` are all ``num_seqs`` (one
    token and one logit per sequence); left to the capture's example, ``L`` would be priced at
    1 and the gathered logits would look like the cheapest cut of the graph.
    """
    return CostModel(tokens=num_seqs, sizes={"S": num_seqs, "L": num_seqs}, **kwargs)


# --------------------------------------------------------------------------------------
# Symbolic sizes
# --------------------------------------------------------------------------------------

SizeExpr = int | sympy.Expr  # a dimension: a number, or an expression in the graph's size symbols


def size_expr(size: Any) -> SizeExpr:
    """A tensor dimension as an int or a sympy expression (``s70``, ``2*s70``)."""
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def evaluate(expr: SizeExpr, bindings: Mapping[sympy.Symbol, int]) -> int:
    """The value of a size under ``bindings``; ConfigError naming an unbound symbol."""
    if isinstance(expr, int):
        return expr
    value = sympy.sympify(expr.xreplace({k: sympy.Integer(v) for k, v in bindings.items()}))
    if value.free_symbols:
        raise ConfigError(
            f"size {expr} depends on {sorted(map(str, value.free_symbols))}, which no input binds"
        )
    return int(value)


def price_hints(gm: GraphModule, cost: CostModel) -> dict[sympy.Symbol, int]:
    """The value the cost model prices every size symbol of ``gm`` at."""
    env = getattr(fake_mode(gm), "shape_env", None)
    table = (getattr(env, "backed_var_to_val", None) or env.var_to_val) if env is not None else {}
    by_name = {str(s): int(v) for s, v in table.items()}
    wanted = {**cost.sizes, **({"T": cost.tokens} if cost.tokens is not None else {})}
    for sym_name, dim_name in gm.meta.get(SYMBOLS_KEY, {}).items():
        if dim_name in wanted:
            by_name[sym_name] = int(wanted[dim_name])
    out: dict[sympy.Symbol, int] = {}
    for node in gm.graph.nodes:
        for v in pytree.tree_leaves(node.meta.get("val")):
            dims = v.shape if isinstance(v, torch.Tensor) else [v] if isinstance(v, torch.SymInt) else []
            for d in dims:
                if isinstance(d, torch.SymInt):
                    for sym in d.node.expr.free_symbols:
                        out[sym] = by_name.get(str(sym), 1)  # unbacked sizes without a value: priced at 1
    return out


@dataclass
class NodeCost:
    """What one node costs under the cost model."""

    flops: float  # floating-point operations
    nbytes: float  # bytes read and written (activations and weights)
    seconds: float  # roofline time


def node_cost(node: Node, hints: Mapping[sympy.Symbol, int], cost: CostModel) -> NodeCost:
    def numel(val: Any) -> int:
        if isinstance(val, torch.Tensor):
            return math.prod(evaluate(size_expr(d), hints) for d in val.shape)
        return 0

    def nbytes(val: Any) -> int:
        return numel(val) * val.element_size() if isinstance(val, torch.Tensor) else 0

    name = op_name(node)
    out = node.meta.get("val")
    if node.op != "call_function":
        return NodeCost(0.0, 0.0, 0.0)
    if name in _VIEWS:
        return NodeCost(0.0, 0.0, cost.launch_overhead)
    ins = [a.meta.get("val") for a in node.all_input_nodes]
    moved = sum(nbytes(v) for v in ins) + sum(nbytes(v) for v in pytree.tree_leaves(out))
    if name == "aten.linear" or name in _MATMULS or "linear" in name:
        k = (
            evaluate(size_expr(ins[0].shape[-1]), hints)
            if isinstance(ins[0], torch.Tensor) and ins[0].dim()
            else 1
        )
        flops = 2.0 * numel(out) * k
    elif name in _ATTENTION:
        q, k = ins[0], ins[1]
        b, h, tq, d = (evaluate(size_expr(s), hints) for s in q.shape)
        tk = evaluate(size_expr(k.shape[2]), hints) if name == "kiln.attention" else tq
        causal = name != "kiln.attention" or bool(
            node.kwargs.get("causal", node.args[4] if len(node.args) > 4 else False)
        )
        flops = 4.0 * b * h * tq * tk * d * (0.5 if causal else 1.0)
    else:
        flops = float(max([numel(out), *(numel(v) for v in ins)]))
    return NodeCost(flops, float(moved), cost.seconds(flops, moved))


class _Timer(Interpreter):
    """Runs a graph op by op, each synchronized and timed."""

    def __init__(self, gm: GraphModule, device: torch.device) -> None:
        super().__init__(gm)
        self.device = device
        self.times: dict[str, list[float]] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run_node(self, n: Node) -> Any:
        if n.op != "call_function":
            return super().run_node(n)
        self._sync()
        start = time.perf_counter()
        out = super().run_node(n)
        self._sync()
        self.times.setdefault(n.name, []).append(time.perf_counter() - start)
        return out


@torch.no_grad()
def profile_costs(gm: GraphModule, inputs: Sequence[Any], *, repeats: int = 3) -> dict[str, float]:
    """Median seconds of every op of ``gm`` on ``inputs`` (flat, in placeholder order), after one warm-up run."""
    if repeats < 1:
        raise ConfigError(f"repeats must be positive, got {repeats}")
    device = next(
        (t.device for t in pytree.tree_leaves(list(inputs)) if isinstance(t, torch.Tensor)),
        torch.device("cpu"),
    )
    timer = _Timer(gm, device)
    for _ in range(repeats + 1):
        timer.run(*inputs)
    return {name: statistics.median(ts[1:]) for name, ts in timer.times.items()}


__all__ = [
    "CostModel",
    "decode_cost_model",
    "NodeCost",
    "SizeExpr",
    "evaluate",
    "node_cost",
    "price_hints",
    "profile_costs",
    "size_expr",
]
