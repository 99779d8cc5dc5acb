"""The region solver of tensor parallelism: which values each rank holds a slice of.

Megatron-LM (Shoeybi et al. 2019, arXiv:1909.08053) pairs a column-parallel linear (each
rank computes a slice of the outputs) with a row-parallel one (each rank contracts its slice
of the inputs, then an all-reduce sums the partial results). Everything between the two acts
on the slice without communication: elementwise ops, head reshapes, rotary embeddings,
attention over the rank's heads. The solver finds such regions on the graph by propagation,
not by module names:

- a region grows from seeds (an attention's heads, or the input of a candidate row-parallel
  linear) through the op rules of :mod:`kiln.parallel.tp_specs`, backward to operands and
  forward to users, until every edge ends at a column-parallel linear (its input whole), a
  row-parallel linear (its output whole after the all-reduce), a sliced weight, or an
  operand broadcast along the sharded dim;
- a region that reaches anything else (a graph input or output, an op without a rule, a
  reduction over the sharded dim, a conflicting slice) is rejected with the reason, and
  nothing of it is kept.
"""

from __future__ import annotations

import copy
import operator
from collections import deque
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from kiln.parallel.tp_specs import (
    Intervals,
    Shard,
    concat,
    forward_dim,
    operand_dims,
    reshape_map,
    static,
    val,
)
from kiln.quantize.ops import LINEAR_SLOTS, operand, slot_index

aten = torch.ops.aten
kiln_ops = torch.ops.kiln
LINEAR = aten.linear.default
QLINEARS = frozenset(t for t in LINEAR_SLOTS if t != LINEAR)
LINEARS = frozenset(LINEAR_SLOTS)  # every linear the solver places (``lower-qdq``'s ``kiln::qlinear_*`` too)
#: ``kiln::dynamic_scale``: a per-token (or per-tensor) ``max|x| / qmax``; over a sliced input, each rank's
#: value is its slice's maximum, and an all-reduce of the maximum gives every rank the whole input's scale.
DYNAMIC_SCALE = kiln_ops.dynamic_scale.default
ATTENTION = kiln_ops.attention.default
RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}


class Rejected(Exception):
    """A region cannot be sharded; ``reason`` says why, at ``node``."""

    def __init__(self, reason: str, node: Node | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.node = node

    def __str__(self) -> str:
        return self.reason + (f" (at %{self.node.name})" if self.node is not None else "")


@dataclass
class Plan:
    """Every decision so far; the pass rewrites the graph from it."""

    specs: dict[Node, Shard] = field(default_factory=dict)  # values held sliced on every rank
    tuples: dict[Node, dict[int, Shard]] = field(default_factory=dict)  # split/chunk: the spec of each output
    params: dict[Node, Shard] = field(default_factory=dict)  # get_attr weights to slice
    param_users: dict[Node, set[Node]] = field(default_factory=dict)  # get_attr -> the users reading the slice
    column: set[Node] = field(default_factory=set)  # linears computing a slice of their outputs
    row: dict[Node, Shard] = field(default_factory=dict)  # linears contracting a sliced input -> the input's spec
    max_scales: set[Node] = field(default_factory=set)  # dynamic_scale nodes of sliced inputs: all-reduced (max)


def weight_of(lin: Node) -> object:
    return operand(lin, "w")


def weight_specs(lin: Node, s: Shard, column: bool) -> list[tuple[object, Shard | None]]:
    """The spec each weight-side operand of ``lin`` needs (weight, scale, zero point, bias).

    ``column``: ``s`` slices the outputs (N): the weight's rows, a per-channel or group-wise
    scale's rows and the bias follow; a per-tensor scale stays whole. Otherwise ``s`` slices the
    contraction dim (K): the weight's columns follow (packed int4: two codes a byte, in blocks of
    8 codes, so each boundary must fall on a block), a group-wise scale's group columns follow
    (each boundary on a group), and a per-tensor or per-channel scale stays whole: each rank's
    partial sum carries its output channel's scale, and the all-reduce adds them exactly. The
    bias is added after the all-reduce.
    """
    w, b = weight_of(lin), operand(lin, "bias")
    if lin.target == LINEAR:
        return [(w, Shard(0, s.parts)), (b, Shard(0, s.parts))] if column else [(w, Shard(1, s.parts)), (b, None)]
    scale, zero = operand(lin, "w_scale"), operand(lin, "w_zero_point")
    acts = [(operand(lin, "x_scale"), None), (operand(lin, "x_zero_point"), None)]  # the whole input's: see DYNAMIC_SCALE
    grouped = isinstance(scale, Node) and val(scale).dim() == 2  # type: ignore[union-attr]
    if column:
        per_row = None if isinstance(scale, Node) and val(scale).dim() == 0 else Shard(0, s.parts)  # type: ignore[union-attr]
        return [(w, Shard(0, s.parts)), (scale, per_row), (zero, per_row), (b, Shard(0, s.parts)), *acts]
    k = int(val(lin.args[0]).shape[-1])  # type: ignore[union-attr]
    wspec: Shard | None = Shard(1, s.parts)
    if lin.target == kiln_ops.qlinear_w4a16.default:
        if any(a % 8 or (b % 8 and b != k) for p in s.parts for a, b in p):
            raise Rejected(f"packed int4 weights split K in blocks of 8 codes; the ranks' slices {s} do not", lin)
        wspec = Shard(1, tuple(tuple((a // 2, b // 2) for a, b in p) for p in s.parts))
    sspec = None
    group = operand(lin, "group_size")
    if grouped and group != k:  # (N, K // g); one group of all K (per-channel int4) stays whole like (N,)
        group = int(group)  # type: ignore[call-overload]
        sspec = s.descale(group)
        if sspec is None:
            raise Rejected(f"group-wise scales (group size {group}) need each rank's K slice {s} on whole groups", lin)
        sspec = Shard(1, sspec.parts)
    return [(w, wspec), (scale, sspec), (zero, sspec), (b, None), *acts]


def split_dim(n: Node) -> int:
    x = n.args[0]
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    return int(dim) % val(x).dim()  # type: ignore[union-attr]


def split_sizes(n: Node) -> list[int]:
    """The sizes of a split/chunk's outputs along its dim."""
    d = split_dim(n)
    return [int(v.shape[d]) for v in n.meta["val"]]


def gqa(q: Shard, hq: int, hkv: int) -> Shard | str | None:
    """The kv-head spec that serves each rank's query heads (``kiln::attention``: query head h reads h // (Hq/Hkv)).

    Kv heads are split when the ranks' query heads cover whole groups, and replicated
    (several ranks hold the same kv head) when a group spans ranks; otherwise a reason.
    None when every rank needs every kv head (k and v stay whole).
    """
    if hq % hkv:
        return f"{hq} query heads are not a multiple of {hkv} kv heads"
    group = hq // hkv
    parts: list[Intervals] = []
    for ivs in q.parts:
        heads = [h for a, b in ivs for h in range(a, b)]
        kv = sorted({h // group for h in heads})
        if not heads or len(heads) % len(kv):
            return f"a rank's query heads {heads} do not map onto whole kv heads {kv}"
        local = len(heads) // len(kv)
        if any(kv[i // local] != h // group for i, h in enumerate(heads)):
            return f"a rank's query heads {heads} read kv heads {kv} in an order a local GQA cannot express"
        runs: list[tuple[int, int]] = []
        for h in kv:
            runs = [*runs[:-1], (runs[-1][0], h + 1)] if runs and runs[-1][1] == h else [*runs, (h, h + 1)]
        parts.append(tuple(runs))
    if all(p == ((0, hkv),) for p in parts):
        return None  # every rank reads every kv head (a single kv head): k and v stay whole
    return Shard(1, tuple(parts))


class Solver:
    """Grows regions one attempt at a time; an attempt either commits entirely or leaves no trace."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.plan = Plan()
        self._queue: deque[Node] = deque()
        self._pending: set[Node] = set()

    def attempt(self, seeds: dict[Node, Shard] | None = None, rows: dict[Node, Shard] | None = None) -> str | None:
        """Grow a region from ``seeds`` (value -> spec) and ``rows`` (row-parallel linear -> input spec).

        Returns None when the region closed and was committed, else the reason it was rejected.
        """
        saved = copy.copy(self.plan)
        self.plan = Plan(dict(saved.specs), {k: dict(v) for k, v in saved.tuples.items()}, dict(saved.params),
                         {k: set(v) for k, v in saved.param_users.items()}, set(saved.column), dict(saved.row),
                         set(saved.max_scales))  # fmt: skip
        self._queue.clear()
        self._pending.clear()
        try:
            for n, s in (seeds or {}).items():
                self._assign(n, s)
            for lin, s in (rows or {}).items():
                self._row(lin, s)
            while self._queue:
                self._process(self._queue.popleft())
            if self._pending:
                t = next(iter(self._pending))
                raise Rejected("some outputs of a split are used whole, others sliced", t)
        except Rejected as e:
            self.plan = saved
            return str(e)
        return None

    # -- assignment -------------------------------------------------------------------

    def _assign(self, n: Node, s: Shard) -> None:
        old = self.plan.specs.get(n)
        if old is not None:
            if old != s:
                raise Rejected(f"conflicting slices: {old} and {s}", n)
            return
        v = val(n)
        if v is None or s.dim >= v.dim() or static(v.shape[s.dim]) is None:
            raise Rejected(f"cannot slice dim {s.dim} of {tuple(v.shape) if v is not None else 'a non-tensor'}", n)
        if n in self.plan.row:
            raise Rejected("a linear would be both row- and column-parallel", n)
        self.plan.specs[n] = s
        self._queue.append(n)

    def _require(self, x: object, s: Shard | None, user: Node) -> None:
        """Operand ``x`` of ``user`` must have spec ``s`` (None: whole on every rank)."""
        if not isinstance(x, Node):
            return
        if s is None:
            if x in self.plan.specs or x in self.plan.params or x in self.plan.tuples:
                raise Rejected(f"%{user.name} needs %{x.name} whole, but it is sliced", user)
            return
        if x.op == "get_attr":
            old = self.plan.params.get(x)
            if old is not None and old != s:
                raise Rejected(f"weight {x.target} sliced two ways: {old} and {s}", x)
            self.plan.params[x] = s
            self.plan.param_users.setdefault(x, set()).add(user)
            return
        if x.op != "call_function":
            raise Rejected(f"graph input %{x.name} would have to be sliced", x)
        if x.target == operator.getitem:
            self._assign(x, s)
            return
        if x.target in LINEARS and s.dim == val(x).dim() - 1:  # type: ignore[union-attr]
            self.plan.column.add(x)
        self._assign(x, s)

    def _row(self, lin: Node, s: Shard) -> None:
        old = self.plan.row.get(lin)
        if old is not None:
            if old != s:
                raise Rejected(f"conflicting input slices of a row-parallel linear: {old} and {s}", lin)
            return
        if lin in self.plan.specs:
            raise Rejected("a linear would be both row- and column-parallel", lin)
        x = lin.args[0]
        k = static(val(x).shape[-1])  # type: ignore[union-attr]
        if k is None or not s.partitions(k):
            raise Rejected(f"the ranks' slices ({s}) do not partition the contraction dim of size {k}", lin)
        specs = weight_specs(lin, s, column=False)
        self.plan.row[lin] = s
        for arg, spec in specs:
            self._require(arg, spec, lin)
        self._require(x, s, lin)

    # -- propagation ------------------------------------------------------------------

    def _process(self, n: Node) -> None:
        if n not in self.plan.specs:  # a split: hand each output its spec
            for u in list(n.users):
                idx = u.args[1] if u.target == operator.getitem else None
                if idx is None:
                    raise Rejected(f"{u.target} reads a tuple of slices", u)
                if idx in self.plan.tuples[n]:
                    self._assign(u, self.plan.tuples[n][idx])  # type: ignore[index]
            return
        s = self.plan.specs[n]
        for x, xs in self._back(n, s):
            self._require(x, xs, n)
        for u in list(n.users):
            self._forward(n, s, u)

    def _back(self, n: Node, s: Shard) -> list[tuple[object, Shard | None]]:
        """The spec each operand of ``n`` must have for ``n`` to have spec ``s``."""
        t, a = n.target, n.args
        if t in LINEARS:
            if s.dim == val(n).dim() - 1:  # column-parallel  # type: ignore[union-attr]
                return [(a[0], None), *weight_specs(n, s, column=True)]
            return [(a[0], s), *((x, None) for x in a[1:] if isinstance(x, Node))]  # per-token: sliced along another dim
        if t == ATTENTION:
            return self._back_attention(n, s)
        if t == operator.getitem:
            self._tuple_require(a[0], a[1], s)  # type: ignore[arg-type]
            return []
        if t in RESHAPES:
            out = reshape_map(tuple(val(n).shape), tuple(val(a[0]).shape), s)  # type: ignore[union-attr]
            if isinstance(out, str):
                raise Rejected(out, n)
            return [(a[0], out)]
        rule = operand_dims(n)
        if rule is None:
            raise Rejected(f"no sharding rule for {t}", n)
        maps, special = rule
        if s.dim in special:
            raise Rejected(f"{t} reduces, slices or concatenates along the sharded dim {s.dim}", n)
        out = []
        for x, f in maps:
            d = f(s.dim)
            out.append((x, None if d is None else s.at(d)))
        return out

    def _back_attention(self, n: Node, s: Shard) -> list[tuple[object, Shard | None]]:
        q, k, v = n.args[:3]
        mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("mask")
        if s.dim != 1:
            raise Rejected(f"attention sliced along dim {s.dim}, not its heads", n)
        kv = gqa(s, int(val(q).shape[1]), int(val(k).shape[1]))  # type: ignore[union-attr]
        if isinstance(kv, str):
            raise Rejected(kv, n)
        if isinstance(mask, Node) and val(mask).dim() == 4 and static(val(mask).shape[1]) != 1:  # type: ignore[union-attr]
            raise Rejected("a per-head attention mask is not sliced by heads yet", n)
        return [(q, s), (k, kv), (v, kv), (mask, None)]

    def _forward(self, n: Node, s: Shard, u: Node) -> None:
        """User ``u`` of ``n`` (spec ``s``): derive its spec or check it against the one it has."""
        if u.op == "output":
            raise Rejected(f"the sliced value %{n.name} is a graph output", n)
        if u in self.plan.specs:
            expected = [xs for x, xs in self._back(u, self.plan.specs[u]) if x is n]
            if not expected or any(xs != s for xs in expected):
                need = expected[0] if expected else "whole"
                raise Rejected(f"%{u.name} needs %{n.name} as {need}, but it is {s}", u)
            return
        if u.target == DYNAMIC_SCALE and n is u.args[0]:
            per_token = u.args[2] if len(u.args) > 2 else u.kwargs.get("per_token", True)
            if per_token and s.dim != val(n).dim() - 1:  # type: ignore[union-attr]
                raise Rejected(f"a per-token activation scale of a value sliced along dim {s.dim}, not its last", u)
            self.plan.max_scales.add(u)  # whole on every rank after an all-reduce of the maximum
            return
        if u.target in LINEARS:
            x, w = u.args[0], weight_of(u)
            if n is x:
                if s.dim == val(n).dim() - 1:  # type: ignore[union-attr]
                    self._row(u, s)
                else:
                    self._assign(u, s)
            elif n is w and u in self.plan.row and s == Shard(1, self.plan.row[u].parts):
                return
            else:
                raise Rejected(f"a linear's weight or bias %{n.name} is sliced but the linear is not", u)
            return
        if u.target == ATTENTION:
            if n is u.args[0]:
                self._assign(u, s)
                return
            raise Rejected("attention reached through k or v, with its queries whole", u)
        if u.target in SPLITS:
            self._split_forward(u, s)
            return
        if u.target in RESHAPES:
            out = reshape_map(tuple(val(n).shape), tuple(val(u).shape), s)  # type: ignore[union-attr]
            if isinstance(out, str):
                raise Rejected(out, u)
            self._assign(u, out)
            return
        d = forward_dim(u, n, s.dim)
        if isinstance(d, str):
            raise Rejected(d, u)
        self._assign(u, s.at(d))

    # -- splits (fused QKV projections, rotary halves) ----------------------------------

    def _split_forward(self, t: Node, s: Shard) -> None:
        dim, sizes = split_dim(t), split_sizes(t)
        specs, off = {}, 0
        for i, size in enumerate(sizes):
            specs[i] = s if s.dim != dim else s.clip(off, off + size)
            off += size
        cur = self.plan.tuples.setdefault(t, {})
        for i, spec in specs.items():
            if i in cur and cur[i] != spec:
                raise Rejected(f"output {i} of the split is needed as {cur[i]} but the input gives {spec}", t)
            cur[i] = spec
        self._pending.discard(t)
        self._queue.append(t)

    def _tuple_require(self, t: Node, idx: int, s: Shard) -> None:
        if t.target not in SPLITS:
            raise Rejected(f"no sharding rule for outputs of {t.target}", t)
        cur = self.plan.tuples.setdefault(t, {})
        if idx in cur:
            if cur[idx] != s:
                raise Rejected(f"output {idx} of the split sliced two ways", t)
            return
        cur[idx] = s
        dim, sizes = split_dim(t), split_sizes(t)
        if s.dim != dim:
            self._require(t.args[0], s, t)
            return
        used = {u.args[1] for u in t.users}
        if not used <= set(cur):
            self._pending.add(t)  # wait for the other outputs' specs
            return
        self._pending.discard(t)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self._require(t.args[0], concat([(offsets[i], cur.get(i)) for i in range(len(sizes))], dim, self.world), t)


__all__ = ["ATTENTION", "DYNAMIC_SCALE", "LINEAR", "LINEARS", "QLINEARS", "RESHAPES", "SPLITS", "Plan", "Rejected", "Solver",
           "gqa", "operand", "slot_index", "split_dim", "split_sizes", "weight_of", "weight_specs"]
