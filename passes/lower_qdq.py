"""lower-qdq: fold weight Q/DQ + linear into a ``kiln::qlinear_*`` op holding packed integer weights.

Matches: ``aten.linear(x, kiln.dequantize(kiln.quantize(W, scale, zp, ...)), b)`` where ``W``,
    ``scale`` and ``zp`` are constants (``get_attr``), as ``insert-qdq`` leaves them.
Rewrites to (the weight codes are computed once, here, and stored; ``W`` is dropped):

    ============================== ========================= =========================================
    weight codes                   input x                   becomes
    ============================== ========================= =========================================
    int8                           float                     ``kiln.qlinear_w8a16(x, w_i8, s, zp, g, b)``
    int4 (range fits 4 bits)       float                     ``kiln.qlinear_w4a16(x, w_u8 (N, K/2), s (N, K/g), zp_u8, g, b)``
    int8, symmetric, per channel   ``kiln.dequantize`` of    ``kiln.qlinear_w8a8(x_q, x_s, x_zp, w_i8, s, b, dtype)``
                                   int8 codes (per token /
                                   per tensor)
    fp8 e4m3, per channel/tensor   ``kiln.dequantize`` of    ``kiln.qlinear_fp8(x_q, x_s, w_f8, s, b, dtype)``
                                   e4m3 codes, or float       (``x_s = None`` for a float x)
    anything else                  any                       ``kiln.dequantize(w_codes, ...)`` + ``aten.linear``
    ============================== ========================= =========================================

    Packed int4 stores unsigned codes ``u = q - qmin`` two per byte along K (8 codes per 32-bit
    word, see ``kiln.quantize.ops.pack_int4``) with unsigned zero points ``zp - qmin`` (``None``: 8).
Requires: ``insert-qdq`` has run (the Q/DQ form); constants are real tensors.
Establishes: no ``kiln.quantize`` of a constant remains; every lowered linear reads integer (or
    e4m3) codes; the float weights only they read are deleted from the module, so the graph's
    memory shrinks (``stats``: ``bytes_before`` / ``bytes_after`` of the lowered weights).
    Outputs equal the Q/DQ graph's (each qlinear's reference is dequantize + linear).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from kiln.ir import PASS_KEY, infer_meta
from kiln.pass_manager import Pass, PassResult, RewriteError
from kiln.quantize.ops import pack_int4, quantize_reference

aten = torch.ops.aten
kiln_ops = torch.ops.kiln
QUANT_META = "kiln_quant"


def _attr(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def _const(gm: GraphModule, arg: object) -> torch.Tensor | None:
    if arg is None:
        return None
    if isinstance(arg, Node) and arg.op == "get_attr":
        return _attr(gm, str(arg.target))
    raise ValueError("not a constant")


def _delete_attr(gm: GraphModule, target: str) -> None:
    *path, leaf = target.split(".")
    owner: object = gm
    for part in path:
        owner = getattr(owner, part)
    delattr(owner, leaf)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class LowerQDQ(Pass):
    """Fold constant-weight Q/DQ + linear into kiln::qlinear_* with stored codes."""

    name = "lower-qdq"

    def _weight_qdq(self, gm: GraphModule, node: Node) -> tuple[Node, Node] | None:
        """``(dequantize, quantize)`` nodes when ``node`` is a linear over a constant weight's Q/DQ."""
        if node.op != "call_function" or node.target != aten.linear.default:
            return None
        dq = node.args[1]
        if not (isinstance(dq, Node) and dq.target == kiln_ops.dequantize.default):
            return None
        q = dq.args[0]
        if not (isinstance(q, Node) and q.target == kiln_ops.quantize.default):
            return None
        if not all(a is None or (isinstance(a, Node) and a.op == "get_attr") for a in q.args[:3]):
            return None
        return dq, q

    def _buffer(self, gm: GraphModule, before: Node, name: str, value: torch.Tensor | None) -> Node | None:
        if value is None:
            return None
        base = "_qlinear_" + name.replace(".", "_")
        attr, i = base, 1
        while hasattr(gm, attr):
            attr, i = f"{base}_{i}", i + 1
        gm.register_buffer(attr, value.contiguous())
        with gm.graph.inserting_before(before):
            node = gm.graph.get_attr(attr)
        node.meta[PASS_KEY] = self.name
        infer_meta(node)
        return node

    def _emit(self, gm: GraphModule, linear: Node, target: object, args: tuple) -> Node:
        with gm.graph.inserting_before(linear):
            new = gm.graph.call_function(target, args)  # type: ignore[arg-type]
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node"):
            if key in linear.meta:
                new.meta[key] = linear.meta[key]
        new.meta[PASS_KEY] = self.name
        infer_meta(new)
        return new

    def _lower(self, gm: GraphModule, linear: Node, dq: Node, q: Node, stats: dict[str, int]) -> None:
        w, scale, zp = (_const(gm, a) for a in q.args[:3])
        qmin, qmax, dtype = q.args[3:6]
        axis, group = q.kwargs.get("axis"), q.kwargs.get("group_size")
        codes = quantize_reference(w, scale, zp, qmin, qmax, dtype, axis, group)  # type: ignore[arg-type]
        out_dtype = linear.meta["val"].dtype
        x, bias = linear.args[0], (linear.args[2] if len(linear.args) > 2 else None)
        path = next(iter(reversed(linear.meta.get("nn_module_stack", {}).values())), (linear.name,))[0]
        x_dq = x if isinstance(x, Node) and x.target == kiln_ops.dequantize.default else None
        if x_dq is not None and (x_dq.kwargs.get("axis") is not None or x_dq.kwargs.get("group_size") is not None):
            x_dq = None
        x_codes = x_dq.args[0].meta["val"].dtype if x_dq is not None else None  # type: ignore[union-attr]
        is_fp8 = dtype == torch.float8_e4m3fn
        is_int4 = dtype == torch.int8 and qmax - qmin <= 15  # type: ignore[operator]
        per_channel = group is None and (scale.dim() == 0 or axis == 0)  # type: ignore[union-attr]
        at = linear
        new: Node | None = None
        after = 0
        if x_dq is None and x_codes is None and is_int4:
            n, k = codes.shape
            s2, z = scale, zp
            g = group or k
            if group is None:  # per tensor / per channel: one group of K per row
                s2 = scale.reshape(-1, 1).expand(n, 1)  # type: ignore[union-attr]
                z = zp.reshape(-1, 1).expand(n, 1) if zp is not None else None
            packed = pack_int4(codes.int() - qmin)  # type: ignore[operator]
            zu = (z.int() - qmin).to(torch.uint8) if z is not None else None  # type: ignore[operator]
            if zu is None and qmin != -8:
                zu = torch.full(s2.shape, -qmin, dtype=torch.uint8)  # type: ignore[union-attr, operator]
            args = [self._buffer(gm, at, f"{path}.w_packed", packed), self._buffer(gm, at, f"{path}.w_scale", s2.float()),  # type: ignore[union-attr]
                    self._buffer(gm, at, f"{path}.w_zero_point", zu)]
            new = self._emit(gm, linear, kiln_ops.qlinear_w4a16.default, (x, *args, g, bias))
            after = _nbytes(packed, s2, zu)
        elif x_dq is None and not is_fp8:
            args = [self._buffer(gm, at, f"{path}.w_int8", codes), self._buffer(gm, at, f"{path}.w_scale", scale.float()),  # type: ignore[union-attr]
                    self._buffer(gm, at, f"{path}.w_zero_point", zp)]
            new = self._emit(gm, linear, kiln_ops.qlinear_w8a16.default, (x, *args, group, bias))
            after = _nbytes(codes, scale, zp)
        elif is_fp8 and per_channel and (x_dq is None or x_codes == torch.float8_e4m3fn):
            wq, ws = self._buffer(gm, at, f"{path}.w_fp8", codes), self._buffer(gm, at, f"{path}.w_scale", scale.float())  # type: ignore[union-attr]
            xq, xs = (x, None) if x_dq is None else (x_dq.args[0], x_dq.args[1])
            new = self._emit(gm, linear, kiln_ops.qlinear_fp8.default, (xq, xs, wq, ws, bias, out_dtype))
            after = _nbytes(codes, scale)
        elif x_codes == torch.int8 and not is_int4 and not is_fp8 and per_channel and zp is None:
            wq, ws = self._buffer(gm, at, f"{path}.w_int8", codes), self._buffer(gm, at, f"{path}.w_scale", scale.float())  # type: ignore[union-attr]
            xq, xs, xzp = x_dq.args[:3]  # type: ignore[union-attr]
            new = self._emit(gm, linear, kiln_ops.qlinear_w8a8.default, (xq, xs, xzp, wq, ws, bias, out_dtype))
            after = _nbytes(codes, scale)
        if new is None:  # no qlinear variant: keep dequantize + linear, but store the codes
            cq = self._buffer(gm, q, f"{path}.w_codes", codes)
            q.replace_all_uses_with(cq)  # type: ignore[arg-type]
            after, key = _nbytes(codes, scale, zp), "dequantize_kept"
        else:
            linear.replace_all_uses_with(new)
            key = new.target._opname  # type: ignore[union-attr]  (e.g. "qlinear_w4a16")
        before = w.numel() * out_dtype.itemsize  # type: ignore[union-attr]
        stats[key] = stats.get(key, 0) + 1
        stats["bytes_before"] += before
        stats["bytes_after"] += after
        record = gm.meta.get(QUANT_META, {}).get(path)
        if record is not None:
            record.update(op=key if new is not None else "dequantize+linear", bytes_fp=before, bytes_q=after)

    def call(self, gm: GraphModule) -> PassResult:
        stats = {"bytes_before": 0, "bytes_after": 0}
        touched: list[Node] = []
        for node in list(gm.graph.nodes):
            match = self._weight_qdq(gm, node)
            if match is None:
                continue
            dq, q = match
            self._lower(gm, node, dq, q, stats)
            touched += [node, dq, q, *(a for a in q.args[:3] if isinstance(a, Node)), node.args[0]]  # type: ignore[list-item]
        if not touched:
            return PassResult(gm, modified=False, stats={})
        self._erase_dead(gm, touched)
        return PassResult(gm, modified=True, stats=stats)

    def _erase_dead(self, gm: GraphModule, nodes: list[Node]) -> None:
        """Erase the rewritten nodes left without users (and their dead Q/DQ inputs), then their weights."""
        work, dropped = list(nodes), set()
        while work:
            n = work.pop()
            if n.graph is not gm.graph or n.users or n.op in ("placeholder", "output") or n in dropped:
                continue
            if n.op == "call_function" and n.target not in (aten.linear.default, kiln_ops.quantize.default,
                                                            kiln_ops.dequantize.default, kiln_ops.dynamic_scale.default):
                continue
            work += [a for a in n.all_input_nodes]
            if n.op == "get_attr":
                dropped.add(str(n.target))
            gm.graph.erase_node(n)
        read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        for target in sorted(dropped - read):
            _delete_attr(gm, target)

    def ensures(self, gm: GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.target == kiln_ops.quantize.default and node.args[0].op == "get_attr" and node.users:
                for user in node.users:
                    if user.target == kiln_ops.dequantize.default and any(u.target == aten.linear.default for u in user.users):
                        raise RewriteError("a constant weight's quantize survived lowering", node)


__all__ = ["LowerQDQ"]
