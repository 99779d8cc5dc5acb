"""Fold constants: evaluate at compile time what depends only on weights and literals.

Classic constant folding (as in TVM's ``FoldConstant`` and Inductor's
``constant_folding``): a value computed from weights, buffers and Python constants alone
is the same on every call, so it is computed once with real tensors and stored as a new
buffer. In captured LMs this covers weight preprocessing (``cos(freq) * 2``, a cast of a
buffer, index grids built from ``torch.arange(1)``).

Matches:
    the *maximal* constant nodes: a ``call_function`` node is constant when it is pure (no
    random, mutating or side-effecting op, see ``is_pure``), every operand is a tensor
    ``get_attr`` (a real tensor, not meta or fake) or another constant node, and its value
    has no symbolic (SymInt) size; it is folded when a non-constant node or the output
    consumes it and it passes the policy below. Constant nodes that only feed folded ones
    become dead. ``aten._assert_tensor_metadata`` checks on a constant are decided now: a
    check that holds does not keep its operand alive, one that fails is kept.
Policy (what is deliberately not folded; such a node stays and its constant operands are
considered in turn):
    * free layout ops of a single weight: a node whose constant computation is only view and
      layout ops (``t``, ``permute``, ``transpose``, ``view``, ``reshape``, ``expand``,
      ``unsqueeze``, ``squeeze``, ``alias``, ``detach``, ``slice``, ``select`` ...) and
      conversions that keep dtype and device, of exactly one ``get_attr``: they cost nothing
      at run time, and later passes (quantization, sharding) match on the weight itself;
    * growth: a value of more than ``max_growth`` (2) times the bytes of the weights it
      reads (``expand``/``repeat`` of a small buffer), unless it is at most ``small_bytes``;
    * non-tensor values (SymInts, tuples of a multi-output op: their ``getitem`` elements
      are folded instead).
Rewrites to:
    ``get_attr`` of a new buffer ``_folded_<node name>`` registered on the GraphModule
    (persistent), holding the value computed with torch in graph order (intermediates
    freed after their last use; never computed in place; a result aliasing a weight or
    a larger storage is cloned). Its ``meta["val"]`` comes from ``kiln.ir.infer_meta`` and
    its provenance from the folded node. Dead constant nodes are erased, and a weight
    attribute that no node reads any more is deleted from the GraphModule (never from the
    caller's model: ``ep.module()`` builds its own submodules, the tensors are untouched).
Requires:
    a well-formed graph with ``meta["val"]`` on every node (``kiln.ir.verify``).
Establishes:
    no node is left that this policy would fold. Stats: ``nodes_folded`` (constant
    ``call_function`` nodes removed from the graph), ``constants_created`` (new buffers).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from kiln.ir import fake_mode, infer_meta
from kiln.pass_manager import Pass, PassResult, RewriteError, copy_meta
from kiln.passes.eliminate_common_subexpressions import is_pure, mutated_aliases

aten = torch.ops.aten

#: Ops that only re-describe their input's memory: kept on a single weight (see Policy).
LAYOUT_OPS = frozenset(
    {
        aten.t.default, aten.permute.default, aten.transpose.int, aten.view.default,
        aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
        aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
        aten.alias.default, aten.detach.default, aten.slice.Tensor, aten.select.int,
        aten.contiguous.default, aten.clone.default, aten.unflatten.int, aten.flatten.using_ints,
        aten.as_strided.default, aten.narrow.default, aten.split.Tensor, aten.split_with_sizes.default,
        aten.unbind.int, aten.chunk.default, aten.lift_fresh_copy.default,
    }
)  # fmt: skip

#: Conversions that are free (and treated as layout ops) when they keep dtype and device.
_CONVERSIONS = frozenset(
    {aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.to.other, aten._to_copy.default}
)
_ASSERT_META = aten._assert_tensor_metadata.default


def _attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _static_tensor(val: Any) -> bool:
    return isinstance(val, torch.Tensor) and all(isinstance(s, int) for s in val.shape)


def _nbytes(val: torch.Tensor) -> int:
    return val.numel() * val.element_size()


def _is_layout(node: Node) -> bool:
    if node.target in LAYOUT_OPS or node.target is operator.getitem:
        return True
    if node.target in _CONVERSIONS:
        src, out = node.args[0].meta.get("val"), node.meta.get("val")  # type: ignore[union-attr]
        return (
            isinstance(src, torch.Tensor)
            and isinstance(out, torch.Tensor)
            and (src.dtype, src.device) == (out.dtype, out.device)
        )
    return False


def _assert_holds(node: Node) -> bool:
    """Whether an ``aten._assert_tensor_metadata`` on a constant is statically true."""
    val = node.args[0].meta.get("val")  # type: ignore[union-attr]
    if not isinstance(val, torch.Tensor) or node.args[1:]:
        return False
    want = dict(node.kwargs)
    checks = {"dtype": val.dtype, "device": val.device, "layout": val.layout}
    for name, have in checks.items():
        if want.pop(name, None) not in (None, have):
            return False
    return not any(v is not None for v in want.values())  # sizes/strides checks: keep them


class _Plan:
    """Which nodes are constant, which get folded, and the cone of constants each reads."""

    def __init__(self, gm: GraphModule, max_growth: float, small_bytes: int) -> None:
        self.const: set[Node] = set()  # get_attr leaves and constant call_function nodes
        self.fold: list[Node] = []  # maximal constant nodes to fold, in graph order
        self.kept: set[Node] = set()  # constant nodes deliberately left to run at run time
        written = mutated_aliases(gm)  # buffers the graph updates in place are not constants
        for n in gm.graph.nodes:
            if n in written:
                continue
            if n.op == "get_attr":
                value = _attr(gm, str(n.target))
                if isinstance(value, torch.Tensor) and not is_fake(value) and value.device.type != "meta":
                    self.const.add(n)
            elif (
                n.op == "call_function"
                and is_pure(n)
                and all(a in self.const for a in n.all_input_nodes)
                and (_static_tensor(n.meta.get("val")) or isinstance(n.meta.get("val"), (tuple, list)))
            ):
                self.const.add(n)
        for n in reversed(gm.graph.nodes):
            if n.op != "call_function" or n not in self.const:
                continue
            if not any(self._runs(u) for u in n.users):
                continue  # absorbed into a folded value, or dead
            if self._foldable(n, max_growth, small_bytes):
                self.fold.append(n)
            else:
                self.kept.add(n)
        self.fold.reverse()

    def _runs(self, user: Node) -> bool:
        """Whether ``user`` is computed at run time (so its operands must exist then)."""
        if user.target is _ASSERT_META and _assert_holds(user):
            return False
        return user not in self.const or user in self.kept

    def cone(self, node: Node) -> list[Node]:
        """``node`` and the constant nodes it reads, transitively."""
        seen, stack = {node}, [node]
        while stack:
            for a in stack.pop().all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    stack.append(a)
        return list(seen)

    def wanted(self) -> set[Node]:
        """Every node a folded value is computed from (the folded nodes included)."""
        return {m for n in self.fold for m in self.cone(n)}

    def _foldable(self, node: Node, max_growth: float, small_bytes: int) -> bool:
        val = node.meta.get("val")
        if not _static_tensor(val) or val.device.type == "meta":
            return False
        cone = self.cone(node)
        weights = [n for n in cone if n.op == "get_attr"]
        ops = [n for n in cone if n.op == "call_function"]
        if len(weights) == 1 and all(_is_layout(n) for n in ops):
            return False
        read = sum(_nbytes(w.meta["val"]) for w in weights if isinstance(w.meta.get("val"), torch.Tensor))
        return _nbytes(val) <= max(max_growth * read, small_bytes)


class FoldConstants(Pass):
    """Replace computations on weights and literals by buffers holding their values.

    Args:
        max_growth: fold only values at most this many times the bytes of the weights read.
        small_bytes: values at most this large are folded whatever their growth.
    """

    name = "fold-constants"

    def __init__(self, *, max_growth: float = 2.0, small_bytes: int = 4096) -> None:
        self.max_growth = max_growth
        self.small_bytes = small_bytes

    def call(self, gm: GraphModule) -> PassResult:
        plan = _Plan(gm, self.max_growth, self.small_bytes)
        wanted = plan.wanted()
        values = self._evaluate(gm, plan.fold, wanted)
        graph, mode = gm.graph, fake_mode(gm) or FakeTensorMode()
        for n in plan.fold:
            name = self._fresh_name(gm, f"_folded_{n.name}")
            gm.register_buffer(name, values[n], persistent=True)
            with graph.inserting_before(n):
                folded = graph.get_attr(name)
            infer_meta(folded, mode)
            copy_meta(n, folded)
            n.replace_all_uses_with(folded)
        computed = {n for n in plan.const if n.op == "call_function"}
        n_folded, dead_attrs = self._erase_dead(gm, wanted | computed)
        still_read = {str(m.target) for m in graph.nodes if m.op == "get_attr"}
        for target in dead_attrs - still_read:  # the GraphModule's own submodules, not the model's
            owner, _, leaf = target.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, leaf)
        modified = bool(plan.fold or n_folded)
        if modified:
            graph.lint()
        return PassResult(gm, modified, {"nodes_folded": n_folded, "constants_created": len(plan.fold)})

    def ensures(self, gm: GraphModule) -> None:
        left = _Plan(gm, self.max_growth, self.small_bytes).fold
        if left:
            raise RewriteError(f"constant %{left[0].name} was left unfolded", node=left[0])

    @staticmethod
    def _evaluate(gm: GraphModule, fold: list[Node], wanted: set[Node]) -> dict[Node, torch.Tensor]:
        """Run the constant subgraph with real tensors, in graph order, freeing as it goes."""
        uses = {m: sum(u in wanted for u in m.users) for m in wanted}
        folded = set(fold)
        env: dict[Node, Any] = {}
        out: dict[Node, torch.Tensor] = {}
        leaves = []
        with torch.no_grad():
            for n in gm.graph.nodes:
                if n not in wanted:
                    continue
                if n.op == "get_attr":
                    env[n] = _attr(gm, str(n.target))
                    leaves.append(env[n])
                    continue
                args = map_arg(n.args, env.__getitem__)
                kwargs = map_arg(n.kwargs, env.__getitem__)
                try:
                    env[n] = n.target(*args, **kwargs)  # type: ignore[operator]
                except Exception as e:
                    raise RewriteError(f"could not evaluate constant %{n.name}: {e}", node=n) from e
                for a in n.all_input_nodes:
                    uses[a] -= 1
                    if uses[a] == 0 and a not in folded:
                        del env[a]
                if n in folded:
                    out[n] = _owned(env[n], leaves)
                    if uses[n] == 0:
                        del env[n]
        return out

    @staticmethod
    def _fresh_name(gm: GraphModule, base: str) -> str:
        name, i = base, 1
        while hasattr(gm, name):
            name, i = f"{base}_{i}", i + 1
        return name

    @staticmethod
    def _erase_dead(gm: GraphModule, candidates: set[Node]) -> tuple[int, set[str]]:
        """Erase the constant nodes nobody reads any more (and their settled checks).

        ``candidates`` are the folded cones and every constant ``call_function`` node; a
        weight read is erased only when it fed a folded value (other unread weights stay).
        """
        erased, dead_attrs = 0, set()
        for n in reversed(list(gm.graph.nodes)):
            if n not in candidates:
                continue
            checks = [u for u in n.users if u.target is _ASSERT_META and _assert_holds(u)]
            if len(checks) != len(n.users):
                continue
            for u in checks:
                gm.graph.erase_node(u)
            gm.graph.erase_node(n)
            if n.op == "get_attr":
                dead_attrs.add(str(n.target))
            else:
                erased += 1
        return erased, dead_attrs


def _owned(value: torch.Tensor, leaves: list[Any]) -> torch.Tensor:
    """``value`` as a tensor owning exactly its own storage (never a view of a weight)."""
    storage = value.untyped_storage()
    shares = any(
        isinstance(w, torch.Tensor) and w.untyped_storage().data_ptr() == storage.data_ptr() for w in leaves
    )
    if shares or storage.nbytes() > _nbytes(value):
        value = value.clone()
    return value.detach()


__all__ = ["LAYOUT_OPS", "FoldConstants"]
