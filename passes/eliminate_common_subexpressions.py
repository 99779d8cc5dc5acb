"""Eliminate common subexpressions: compute each pure value once.

After the classic value-numbering CSE (Cocke, "Global common subexpression elimination",
1970; torch.fx's ``passes/dialect/common/cse_pass.py`` does the same on FX graphs).
``torch.export`` traces Python faithfully, so code that recomputes a value (Hugging Face's
mask and position helpers call ``torch.arange`` several times; ``f(x) + f(x)``) leaves
duplicate nodes that later pattern passes would otherwise see twice.

Matches:
    ``call_function`` nodes with the same target, args and kwargs, visited in graph order.
    Node operands compare by identity (after the replacements already made, so chains of
    duplicates collapse in one sweep); Python values compare by type and value (``1``,
    ``1.0`` and ``True`` differ, so do ``0.0`` and ``-0.0``); lists, tuples and dicts
    recursively; ``torch.dtype``/``device``/``layout``/``memory_format`` by value. Also
    ``get_attr`` nodes of the same target. Never matched: impure nodes (``node.is_impure()``:
    mutable schema, side effects, random ops), random ops of the deny-list below (even when
    called with an explicit generator), ops that return nothing, higher-order ops, and any
    node reading a value that a mutating op in the graph writes (or an alias of it).
Rewrites to:
    the first occurrence; the users of each later duplicate are re-pointed to it and the
    duplicate is erased. The kept node keeps its own metadata and provenance.
Requires:
    a well-formed graph (``kiln.ir.verify``).
Establishes:
    no two pure ``call_function`` nodes have equal (target, args, kwargs), and no two
    ``get_attr`` nodes have the same target. Stats: ``nodes_merged``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import GraphModule, Node

from kiln.pass_manager import Pass, PassResult, RewriteError

#: aten ops that draw random numbers (base names, every overload), merged or folded never.
RANDOM_OPS = frozenset(
    {
        "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm",
        "bernoulli", "dropout", "native_dropout", "feature_dropout", "alpha_dropout",
        "feature_alpha_dropout", "_fused_dropout", "normal", "uniform", "multinomial",
        "poisson", "binomial", "rrelu", "rrelu_with_noise", "_standard_gamma", "exponential",
        "geometric", "cauchy", "log_normal", "random",
    }
)  # fmt: skip


def _base_name(target: torch._ops.OpOverload) -> str:
    return target._schema.name.split("::")[-1].rstrip("_")


def is_pure(node: Node) -> bool:
    """Whether a ``call_function`` node computes a value from its operands alone.

    False for impure nodes (``Node.is_impure``), random ops (the :data:`RANDOM_OPS` deny-list
    and ops tagged ``nondeterministic_seeded``), ops with a mutable schema (aten in-place
    ops, kiln ops declaring ``mutates_args``), ops that return nothing, higher-order ops.
    """
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        return False
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        if schema.is_mutable or len(schema.returns) == 0:
            return False
        if torch.Tag.nondeterministic_seeded in target.tags or _base_name(target) in RANDOM_OPS:
            return False
    return not node.is_impure()


def mutated_aliases(gm: GraphModule) -> set[Node]:
    """Nodes whose value some op in the graph writes, directly or through a view (or a base).

    Empty for a functional graph. Not every captured graph is one: ``ep.module()`` keeps a
    model's in-place buffer updates (``self.count.add_(1)`` stays ``aten.add_``), and kiln's
    cache passes add writes. Aliases are tracked through ops whose schema returns an
    alias of an input (views), in both directions, conservatively.
    """
    written: list[Node] = []
    alias_of: dict[Node, set[Node]] = {}
    for n in gm.graph.nodes:
        target = n.target
        if n.op == "call_function" and target is operator.getitem and isinstance(n.args[0], Node):
            alias_of.setdefault(n, set()).add(n.args[0])  # an element of a multi-output view
            alias_of.setdefault(n.args[0], set()).add(n)
        if n.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        schema = target._schema
        bound = _bind(schema, n)
        for arg in schema.arguments:
            value = bound.get(arg.name)
            nodes = [
                v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, Node)
            ]
            info = arg.alias_info
            if info is not None and info.is_write:
                written.extend(nodes)
                for v in nodes:  # an in-place op returns (an alias of) what it writes
                    alias_of.setdefault(n, set()).add(v)
                    alias_of.setdefault(v, set()).add(n)
            elif info is not None and any(r.alias_info is not None for r in schema.returns):
                for v in nodes:  # a view: n aliases v
                    alias_of.setdefault(n, set()).add(v)
                    alias_of.setdefault(v, set()).add(n)
    out: set[Node] = set()
    stack = list(written)
    while stack:
        v = stack.pop()
        if v not in out:
            out.add(v)
            stack.extend(alias_of.get(v, ()))
    return out


def _bind(schema: Any, node: Node) -> dict[str, Any]:
    bound = {a.name: v for a, v in zip(schema.arguments, node.args, strict=False)}
    bound.update(node.kwargs)
    return bound


class _Unmergeable(Exception):
    """An argument that has no value key (e.g. a tensor literal): the node is left alone."""


def _key(value: Any) -> Any:
    """A hashable key equal for two arguments exactly when they mean the same thing."""
    if isinstance(value, Node):
        return ("node", value)
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return (type(value).__name__, value)
    if isinstance(value, float):
        return ("float", value.hex())  # tells 0.0 from -0.0
    if isinstance(value, complex):
        return ("complex", value.real.hex(), value.imag.hex())
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return (kind, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _key(v)) for k, v in value.items())))
    if isinstance(value, slice):
        return ("slice", _key(value.start), _key(value.stop), _key(value.step))
    if value is Ellipsis:
        return ("ellipsis",)
    raise _Unmergeable(type(value).__name__)


def node_key(node: Node) -> Any:
    """The (target, args, kwargs) key of a node, or None when it must never be merged."""
    try:
        key = (node.target, _key(tuple(node.args)), _key(dict(node.kwargs)))
        hash(key)
    except (_Unmergeable, TypeError):
        return None
    return key


def _merge_key(node: Node, tainted: set[Node]) -> Any:
    """The key under which ``node`` may merge with an equal one, or None."""
    if node.op == "get_attr":
        return ("get_attr", node.target)
    if not is_pure(node) or node in tainted or any(a in tainted for a in node.all_input_nodes):
        return None
    return node_key(node)


class EliminateCommonSubexpressions(Pass):
    """Merge duplicate pure nodes (and duplicate weight reads) into their first occurrence."""

    name = "eliminate-common-subexpressions"

    def call(self, gm: GraphModule) -> PassResult:
        tainted = mutated_aliases(gm)
        first: dict[Any, Node] = {}
        merged = 0
        for n in list(gm.graph.nodes):
            key = _merge_key(n, tainted)  # operands already point at first occurrences
            if key is None:
                continue
            kept = first.setdefault(key, n)
            if kept is not n:
                n.replace_all_uses_with(kept)
                gm.graph.erase_node(n)
                merged += 1
        if merged:
            gm.graph.lint()
        return PassResult(gm, merged > 0, {"nodes_merged": merged})

    def ensures(self, gm: GraphModule) -> None:
        tainted = mutated_aliases(gm)
        seen: dict[Any, Node] = {}
        for n in gm.graph.nodes:
            key = _merge_key(n, tainted)
            if key is None:
                continue
            other = seen.setdefault(key, n)
            if other is not n:
                raise RewriteError(f"%{n.name} still duplicates %{other.name}", node=n)


__all__ = ["RANDOM_OPS", "EliminateCommonSubexpressions", "is_pure", "mutated_aliases", "node_key"]
