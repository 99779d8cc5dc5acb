"""canonicalize: one normal form per computation, so each later fusion needs one pattern.

After MLIR's canonicalizer and the onnxscript rewriter's advice: normalize first, then
match. Rules, applied to a fixed point:

Matches / Rewrites to:
    runtime checks      ``_guards_fn`` module calls, ``aten._assert_tensor_metadata``,
                        ``aten._assert_scalar``, ``aten.sym_constrain_range*``   -> removed
    no-op casts         ``aten.to`` / ``aten._to_copy`` / ``aten.type_as`` whose result has the
                        operand's dtype and device                               -> the operand
    arithmetic          ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` (same dtype and shape) -> ``x``
    identities          ``aten.alias``, ``aten.detach``, ``aten.clone``, ``aten.contiguous``,
                        inference dropout ``aten.dropout(x, p, train=False)``, a slice that
                        keeps the whole axis (``x[:, :, None]`` under torch 2.11), ``aten.detach_``
                        of a value nothing else reads (transformers 5.17's mask fill)  -> the operand
    transposes          ``aten.t``, ``aten.transpose.int``                      -> ``aten.permute``;
                        permute of permute -> one permute; identity permute     -> the operand
    views               ``aten.view``, ``aten._unsafe_view``                    -> ``aten.reshape``;
                        reshape of reshape -> one reshape; same-shape reshape   -> the operand
    products            with a constant 2-D weight: ``mm(x, permute(W))``, ``matmul(x, permute(W))``,
                        ``addmm(b, x, permute(W))``                             -> ``aten.linear(x, W[, b])``;
                        ``mm``/``addmm`` with an unpermuted constant weight ``W`` (GPT-2's Conv1D)
                                                                                -> ``aten.linear(x, permute(W), b)``;
                        ``linear(x, W) + b`` with ``b`` a 1-D constant           -> ``aten.linear(x, W, b)``;
                        other ``mm``/``bmm``                                     -> ``aten.matmul``
Requires: a graph with shape metadata on every node.
Establishes: none of the ops on the left remain; every linear map by a constant matrix is
    ``aten.linear``; transposes are ``aten.permute``; views are ``aten.reshape``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import GraphModule, Node

from kiln.ir import infer_meta, meta_val, op_name, slice_args
from kiln.pass_manager import Pass, PassResult, RewriteError, copy_meta

aten = torch.ops.aten

_ASSERTS = {
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range.default,
    aten.sym_constrain_range_for_size.default,
    aten._assert_async.msg,
}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten._to_copy.default, aten.type_as.default}
_IDENTITIES = {aten.alias.default, aten.detach.default, aten.clone.default, aten.contiguous.default, aten.lift_fresh_copy.default}
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_CONSTANT_OPS = {aten.permute.default}


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(str(x) == str(y) for x, y in zip(a.shape, b.shape, strict=True))


def _is_weight(node: object) -> bool:
    """A constant 2-D matrix read from the module (a get_attr)."""
    val = meta_val(node)
    return isinstance(node, Node) and node.op == "get_attr" and val is not None and val.dim() == 2


def _transposed_weight(node: object) -> Node | None:
    """W when ``node`` is ``permute(W, [1, 0])`` of a constant 2-D W."""
    if isinstance(node, Node) and node.target == aten.permute.default and list(node.args[1]) == [1, 0]:
        if _is_weight(node.args[0]):
            return node.args[0]  # type: ignore[return-value]
    return None


class Canonicalize(Pass):
    """Rewrite equivalent spellings of a computation into one normal form."""

    name = "canonicalize"

    def __init__(self, max_iterations: int = 8) -> None:
        self.max_iterations = max_iterations
        self._mutating = False

    def call(self, gm: GraphModule) -> PassResult:
        stats: dict[str, int] = {}
        self._mutating = _has_mutation(gm.graph)
        rules: list[tuple[str, Callable[[GraphModule, Node], Node | None | bool]]] = [
            ("asserts_removed", self._remove_assert),
            ("casts_removed", self._remove_cast),
            ("identities_removed", self._remove_identity),
            ("arithmetic_simplified", self._simplify_arithmetic),
            ("transposes_normalized", self._normalize_transpose),
            ("views_normalized", self._normalize_view),
            ("linears_formed", self._form_linear),
        ]
        for _ in range(self.max_iterations):
            changed = False
            for node in list(gm.graph.nodes):
                if node.graph is not gm.graph or node.op not in ("call_function", "call_module"):
                    continue
                for key, rule in rules:
                    if rule(gm, node):
                        stats[key] = stats.get(key, 0) + 1
                        changed = True
                        break
            if not changed:
                break
        guards = [name for name, _ in gm.named_children() if name == "_guards_fn"]
        for name in guards:
            if not any(n.op == "call_module" and n.target == name for n in gm.graph.nodes):
                delattr(gm, name)
        return PassResult(gm, modified=bool(stats), stats=stats)

    def ensures(self, gm: GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.target in _ASSERTS or node.target in (aten.t.default, aten.transpose.int, aten.view.default):
                raise RewriteError(f"{op_name(node)} survived canonicalization", node)

    # -- rules: each returns a truthy value when it rewrote ``node`` ---------------------

    @staticmethod
    def _replace(node: Node, by: Node) -> bool:
        node.replace_all_uses_with(by)
        node.graph.erase_node(node)
        return True

    def _emit(self, node: Node, target: object, args: tuple, kwargs: dict | None = None, *, same: bool = False) -> Node:
        """Insert ``target(*args)`` before ``node``; ``same``: it computes node's value (reuse its metadata)."""
        with node.graph.inserting_before(node):
            new = node.graph.call_function(target, args, kwargs or {})  # type: ignore[arg-type]
        copy_meta(node, new)
        if same and "val" in node.meta:
            new.meta["val"] = node.meta["val"]
        else:
            infer_meta(new)
        return new

    def _remove_assert(self, gm: GraphModule, node: Node) -> bool:
        if node.op == "call_module" and node.target == "_guards_fn":
            node.graph.erase_node(node)
            return True
        if node.target in _ASSERTS and not node.users:
            node.graph.erase_node(node)
            return True
        return False

    def _remove_cast(self, gm: GraphModule, node: Node) -> bool:
        if node.target not in _CASTS or node.kwargs.get("memory_format") not in (None, torch.preserve_format):
            return False
        src, out = node.args[0], meta_val(node)
        inp = meta_val(src)
        if inp is None or out is None or inp.dtype != out.dtype or inp.device != out.device:
            return False
        return self._replace(node, src)  # type: ignore[arg-type]

    def _remove_identity(self, gm: GraphModule, node: Node) -> bool:
        if node.target == aten.dropout.default:
            p, train = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
            if train and p != 0:
                return False
            return self._replace(node, node.args[0])  # type: ignore[arg-type]
        if node.target == aten.slice.Tensor:
            return self._remove_full_slice(node)
        if node.target in _AUTOGRAD_ONLY and not node.args[0].users.keys() - {node}:  # type: ignore[union-attr]
            return self._replace(node, node.args[0])  # type: ignore[arg-type]  # its operand has no other reader
        if node.target not in _IDENTITIES or self._mutating:
            return False
        return self._replace(node, node.args[0])  # type: ignore[arg-type]

    def _remove_full_slice(self, node: Node) -> bool:
        """``aten.slice(x, dim, 0, end, 1)`` whose result has ``x``'s shape (end past the axis) -> ``x``."""
        _, start, _, step = slice_args(node)
        if self._mutating or start != 0 or step != 1:  # a view an in-place op may write through
            return False
        inp, out = meta_val(node.args[0]), meta_val(node)
        if inp is None or out is None or not _same_shape(inp, out):
            return False
        return self._replace(node, node.args[0])  # type: ignore[arg-type]

    def _simplify_arithmetic(self, gm: GraphModule, node: Node) -> bool:
        """``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` -> ``x`` when type and shape are unchanged."""
        neutral = {aten.add.Tensor: 0, aten.sub.Tensor: 0, aten.mul.Tensor: 1, aten.div.Tensor: 1}
        if node.target not in neutral or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            return False
        x, c = node.args
        if isinstance(c, bool) or not isinstance(c, (int, float)) or c != neutral[node.target]:
            return False
        inp, out = meta_val(x), meta_val(node)
        if inp is None or out is None or inp.dtype != out.dtype or not _same_shape(inp, out):
            return False
        return self._replace(node, x)  # type: ignore[arg-type]

    def _normalize_transpose(self, gm: GraphModule, node: Node) -> bool:
        val = meta_val(node)
        if node.target == aten.t.default and val is not None:
            perm = [1, 0] if val.dim() == 2 else [0]
            return self._replace(node, self._emit(node, aten.permute.default, (node.args[0], perm), same=True))
        if node.target == aten.transpose.int and val is not None:
            a, b = (int(d) % val.dim() for d in node.args[1:3])
            perm = list(range(val.dim()))
            perm[a], perm[b] = perm[b], perm[a]
            return self._replace(node, self._emit(node, aten.permute.default, (node.args[0], perm), same=True))
        if node.target == aten.permute.default:
            perm = [int(d) % max(len(node.args[1]), 1) for d in node.args[1]]
            src = node.args[0]
            if perm == list(range(len(perm))):
                return self._replace(node, src)  # type: ignore[arg-type]
            if isinstance(src, Node) and src.target == aten.permute.default:
                inner = [int(d) % len(perm) for d in src.args[1]]
                return self._replace(node, self._emit(node, aten.permute.default, (src.args[0], [inner[p] for p in perm]), same=True))
            if perm != list(node.args[1]):
                node.args = (src, perm)
                return True
        return False

    def _normalize_view(self, gm: GraphModule, node: Node) -> bool:
        if node.target not in _VIEWS:
            return False
        src = node.args[0]
        inp, out = meta_val(src), meta_val(node)
        if inp is not None and out is not None and _same_shape(inp, out):
            return self._replace(node, src)  # type: ignore[arg-type]
        if isinstance(src, Node) and src.target in _VIEWS:
            return self._replace(node, self._emit(node, aten.reshape.default, (src.args[0], node.args[1]), same=True))
        if node.target != aten.reshape.default:
            return self._replace(node, self._emit(node, aten.reshape.default, (src, node.args[1]), same=True))
        return False

    def _form_linear(self, gm: GraphModule, node: Node) -> bool:
        t = node.target
        if t in (aten.mm.default, aten.matmul.default):
            x, w = node.args[0], node.args[1]
            weight = _transposed_weight(w)
            if weight is not None:
                return self._replace(node, self._emit(node, aten.linear.default, (x, weight), same=True))
            if _is_weight(w) and t == aten.mm.default:
                wt = self._emit(node, aten.permute.default, (w, [1, 0]))
                return self._replace(node, self._emit(node, aten.linear.default, (x, wt), same=True))
            if t == aten.mm.default:
                return self._replace(node, self._emit(node, aten.matmul.default, (x, w), same=True))
        if t == aten.addmm.default and not node.kwargs:
            b, x, w = node.args[:3]
            weight = _transposed_weight(w)
            if weight is None and _is_weight(w):
                weight = self._emit(node, aten.permute.default, (w, [1, 0]))
            if weight is not None and meta_val(b) is not None and meta_val(b).dim() == 1:  # type: ignore[union-attr]
                return self._replace(node, self._emit(node, aten.linear.default, (x, weight, b), same=True))
        if t == aten.bmm.default:
            return self._replace(node, self._emit(node, aten.matmul.default, tuple(node.args), same=True))
        if t == aten.add.Tensor and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
            for lin, bias in (node.args, node.args[::-1]):
                if (
                    isinstance(lin, Node)
                    and lin.target == aten.linear.default
                    and len(lin.args) == 2
                    and len(lin.users) == 1
                    and isinstance(bias, Node)
                    and bias.op == "get_attr"
                    and meta_val(bias) is not None
                    and meta_val(bias).dim() == 1  # type: ignore[union-attr]
                    and meta_val(lin) is not None
                    and meta_val(bias).dtype == meta_val(node).dtype == meta_val(lin).dtype  # type: ignore[union-attr]
                    and str(meta_val(bias).shape[0]) == str(meta_val(lin).shape[-1])  # type: ignore[union-attr]
                ):
                    return self._replace(node, self._emit(node, aten.linear.default, (*lin.args, bias), same=True))
        return False


_AUTOGRAD_ONLY = {aten.detach_.default}  # in-place in name only: they change autograd state, never data


def _has_mutation(graph: torch.fx.Graph) -> bool:
    for n in graph.nodes:
        if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable and n.target not in _AUTOGRAD_ONLY:
            return True
    return False
