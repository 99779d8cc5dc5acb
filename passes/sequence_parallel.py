"""sequence-parallel: split the token axis between tensor-parallel regions (Megatron-style).

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198), section 4.2.2: outside the tensor-parallel regions (norms, residual
adds, dropout) every rank would compute the same values for every token; instead each rank
computes them for its share of the tokens. The all-reduce ending a region becomes a
reduce-scatter along the tokens, and the region's entry gathers the tokens back. The
communicated volume stays that of the all-reduce (a reduce-scatter plus an all-gather);
the per-token work and activation memory between regions shrink by the tensor-parallel size.

Matches: the all-reduces ``shard-tensor-parallel`` inserted (after row-parallel linears and
    vocabulary-parallel embeddings), and, propagating forward in graph order, every value
    computed per token from their results.
Rewrites to:
    all-reduce      -> pad the token axis to ``Tp = ceil(T / w) * w``; ``reduce_scatter_tensor``
                       along it: rank r holds tokens ``[r*Tp/w, (r+1)*Tp/w)`` of the sum;
    per-token ops   stay on the rank's tokens: elementwise ops (broadcasting), reductions over
                    other axes (norms), linears not sharded by tensor parallelism, reshapes that
                    keep the token axis whole (their token size becomes the local one); an
                    operand holding every token (a position embedding) is sliced locally;
    anything else   (a column-parallel linear, the LM head, attention, a graph output, an op
                    without a per-token rule) reads ``all_gather_into_tensor`` along the tokens,
                    with the padding sliced off.
Requires: ``shard-tensor-parallel``; inputs with a token axis (``input_ids``, shape (1, T)).
Establishes: no tensor-parallel all-reduce remains; values between regions hold ``Tp / w``
    tokens; values entering a region hold all T tokens, as before.
Statistics: ``reduce_scatters``, ``all_gathers``, ``token_sliced_nodes``, ``local_slices``.
"""

from __future__ import annotations

import heapq
import operator
from collections import Counter
from typing import Any

import torch
from torch.fx import GraphModule, Node

from kiln.ir import infer_meta
from kiln.parallel.tp_collectives import ALL_REDUCE, ROLE_KEY, WAIT, Emitter, default_group_name
from kiln.parallel.tp_solver import LINEARS, RESHAPES, operand
from kiln.parallel.tp_specs import operand_dims, reshape_groups, static, val
from kiln.pass_manager import Pass, PassResult, RewriteError, copy_meta

aten = torch.ops.aten
_REGION_ENTRIES = {"column", "lm_head"}


class SequenceParallel(Pass):
    """Turn tensor-parallel all-reduces into token reduce-scatters and gather tokens at region entries."""

    name = "sequence-parallel"

    def __init__(self, world_size: int, rank: int, group_name: str | None = None) -> None:
        self.world, self.rank, self.group = world_size, rank, group_name

    def requires(self, gm: GraphModule) -> None:
        if not self._reduces(gm):
            raise RewriteError("no tensor-parallel all-reduce in the graph: run shard-tensor-parallel first")
        if "input_ids" not in {n.name for n in gm.graph.nodes if n.op == "placeholder"}:
            raise RewriteError("sequence-parallel needs an input_ids graph input to find the token axis")

    @staticmethod
    def _reduces(gm: GraphModule) -> list[Node]:
        return [n for n in gm.graph.nodes if n.target == ALL_REDUCE and n.meta.get(ROLE_KEY) in ("row", "embedding")]

    def call(self, gm: GraphModule) -> PassResult:
        self.gm, self.stats = gm, Counter[str]()
        self.local: dict[Node, int] = {}  # token-sliced value -> its token axis
        self.full: dict[Node, Any] = {}  # token-sliced value -> its metadata with every token
        self._gathered: dict[Node, Node] = {}
        self._scattered: dict[tuple[Node, int], Node] = {}
        self._sizes(gm)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        heap: list[tuple[int, str, Node]] = []
        for ar in self._reduces(gm):
            rs = self._reduce_scatter(ar)
            for u in rs.users:
                heapq.heappush(heap, (order.get(u, len(order)), u.name, u))
        decided: set[Node] = set()
        while heap:
            _, _, u = heapq.heappop(heap)
            if u in decided or u in self.local:
                continue
            decided.add(u)
            if self._decide(u):
                for w in u.users:
                    heapq.heappush(heap, (order.get(w, len(order)), w.name, w))
        self.stats["token_sliced_nodes"] = len(self.local)
        return PassResult(gm, True, dict(self.stats))

    def ensures(self, gm: GraphModule) -> None:
        if self._reduces(gm):
            raise RewriteError("a tensor-parallel all-reduce is left")

    # -- sizes ----------------------------------------------------------------------------

    def _sizes(self, gm: GraphModule) -> None:
        """Nodes (or ints) for T, the local token count Tl = ceil(T/w), the padding and this rank's window."""
        ids = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "input_ids")
        last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        size = val(ids).shape[-1]  # type: ignore[union-attr]
        self._cursor = last

        def op(target: Any, *args: Any) -> Any:
            if all(not isinstance(a, (Node, torch.SymInt)) for a in args):
                return target(*args)
            with gm.graph.inserting_after(self._cursor):
                node = gm.graph.call_function(target, args)
            if target == aten.sym_size.int:
                node.meta["val"] = size
            else:
                node.meta["val"] = target(*(a.meta["val"] if isinstance(a, Node) else a for a in args))
            self._cursor = node
            return node

        self.t = size if static(size) is not None else op(aten.sym_size.int, ids, val(ids).dim() - 1)  # type: ignore[union-attr]
        self.tl = op(operator.floordiv, op(operator.add, self.t, self.world - 1), self.world)
        self.pad = op(operator.sub, op(operator.mul, self.tl, self.world), self.t)
        self.lo = op(operator.mul, self.tl, self.rank)
        self.hi = op(operator.add, self.lo, self.tl)
        self.token_size = str(size)

    def _token_dim(self, x: Node) -> int:
        dims = [d for d, s in enumerate(val(x).shape) if str(s) == self.token_size]  # type: ignore[union-attr]
        if len(dims) != 1:
            raise RewriteError(f"cannot tell the token axis of {tuple(val(x).shape)} (T = {self.token_size})", x)  # type: ignore[union-attr]
        return dims[0]

    def _pad(self, emit: Emitter, x: Node, d: int) -> Node:
        """``x`` with zero tokens appended along axis ``d`` up to ``Tp`` (a multiple of the world size)."""
        if self.pad == 0:
            return x
        shape: list[object] = []
        for i, s in enumerate(val(x).shape):  # type: ignore[union-attr]
            if i != d and static(s) is None:
                raise RewriteError(f"cannot pad tokens of {tuple(val(x).shape)}: another axis is symbolic", x)  # type: ignore[union-attr]
            shape.append(self.pad if i == d else int(s))
        return emit(aten.cat.default, [x, emit(aten.new_zeros.default, x, shape)], d)

    # -- rewriting ------------------------------------------------------------------------

    def _emitter(self, after: Node, like: Node) -> Emitter:
        return Emitter(self.gm, after, like, self.world, self.group if self.group is not None else default_group_name())

    def _reduce_scatter(self, ar: Node) -> Node:
        (wait,) = ar.users
        assert wait.target == WAIT
        x = ar.args[0]
        d = self._token_dim(x)  # type: ignore[arg-type]
        emit = self._emitter(wait, ar)
        with emit.unit():
            rs = emit.reduce_scatter(self._pad(emit, x, d), d, "sequence")  # type: ignore[arg-type]
        self.full[rs] = wait.meta["val"]
        wait.replace_all_uses_with(rs)
        self.gm.graph.erase_node(wait)
        self.gm.graph.erase_node(ar)
        self.local[rs] = d
        self.stats["reduce_scatters"] += 1
        return rs

    def _gather(self, n: Node) -> Node:
        """``n`` with every token (all-gather along its token axis, padding sliced off); one per value."""
        if n not in self._gathered:
            d = self.local[n]
            emit = self._emitter(n, n)
            with emit.unit():
                out = emit(aten.slice.Tensor, emit.all_gather(n, d, "sequence"), d, 0, self.t)
            out.meta["val"] = self.full[n]  # exactly the value's shape before the pass
            self._gathered[n] = out
            self.stats["all_gathers"] += 1
        return self._gathered[n]

    def _scatter(self, y: Node, d: int) -> Node:
        """This rank's tokens of a value that holds all of them (no communication)."""
        key = (y, d)
        if key not in self._scattered:
            emit = self._emitter(y, y)
            self._scattered[key] = emit(aten.slice.Tensor, self._pad(emit, y, d), d, self.lo, self.hi)
            self.stats["local_slices"] += 1
        return self._scattered[key]

    def _decide(self, u: Node) -> bool:
        """Keep ``u`` on the rank's tokens (True) or gather its token-sliced operands (False)."""
        plan = self._per_token(u) if u.op == "call_function" else None
        if plan is None:
            for x in [x for x in u.all_input_nodes if x in self.local]:
                u.replace_input_with(x, self._gather(x))
            return False
        out_dim, scatters, arg_fix = plan
        for y, d in scatters:
            u.replace_input_with(y, self._scatter(y, d))
        if arg_fix is not None:
            u.args = arg_fix
        self.full[u] = u.meta["val"]
        infer_meta(u)
        self.local[u] = out_dim
        return True

    def _per_token(self, u: Node) -> tuple[int, list[tuple[Node, int]], tuple[Any, ...] | None] | None:
        """``(token axis of u, operands to slice locally, new args)`` when u acts per token, else None."""
        locals_ = [x for x in u.all_input_nodes if x in self.local]
        if u.target in LINEARS:
            x = u.args[0]
            side = [a for a in (operand(u, "x_scale"), operand(u, "x_zero_point")) if isinstance(a, Node)]
            if u.meta.get(ROLE_KEY) in _REGION_ENTRIES or x not in self.local or any(
                a is not x and a not in side for a in locals_
            ):
                return None
            d = self.local[x]  # type: ignore[index]
            if d == val(x).dim() - 1:  # type: ignore[union-attr]
                return None
            scatters = []  # a per-token activation scale follows its codes onto the rank's tokens
            for a in side:
                if a in self.local:
                    if self.local[a] != d:
                        return None
                elif val(a).dim() == val(x).dim() and str(val(a).shape[d]) == self.token_size:  # type: ignore[union-attr]
                    scatters.append((a, d))
            return d, scatters, None
        if u.target in RESHAPES:
            return self._reshape(u)
        rule = operand_dims(u)
        if rule is None:
            return None
        maps, special = rule
        listed = {x for x, _ in maps}
        if any(x not in listed for x in locals_):
            return None
        n = locals_[0]
        f = dict(maps)[n]
        outs = [e for e in range(val(u).dim()) if f(e) == self.local[n] and e not in special]  # type: ignore[union-attr]
        if len(outs) != 1:
            return None
        e, scatters = outs[0], []
        for y, g in maps:
            dy = g(e)
            if y in self.local:
                if dy != self.local[y]:
                    return None
            elif dy is not None:
                if str(val(y).shape[dy]) != self.token_size:  # type: ignore[union-attr]
                    return None
                scatters.append((y, dy))
        return e, scatters, None

    def _reshape(self, u: Node) -> tuple[int, list[tuple[Node, int]], tuple[Any, ...] | None] | None:
        x = u.args[0]
        if x not in self.local:
            return None
        d = self.local[x]  # type: ignore[index]
        groups = reshape_groups(tuple(self.full[x].shape), tuple(val(u).shape))  # type: ignore[index, union-attr]
        group = next((g for g in groups or [] if d in g[0]), None)
        if group is None or group[0] != [d] or len(group[1]) != 1:
            return None
        e = group[1][0]
        sizes = list(u.args[1])  # type: ignore[arg-type]
        if sizes[e] != -1:
            with self.gm.graph.inserting_before(u):
                local = self.gm.graph.call_function(aten.sym_size.int, (x, d)) if static(self.t) is None else None
            if local is not None:
                copy_meta(u, local)
                local.meta["val"] = val(x).shape[d]  # type: ignore[union-attr]
            sizes[e] = local if local is not None else self.tl
        return e, [], (x, sizes, *u.args[2:])


__all__ = ["SequenceParallel"]
