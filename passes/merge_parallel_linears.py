"""merge-parallel-linears: horizontal fusion of the linears that read one input (Q/K/V, gate/up).

The fused-QKV / fused gate-up projection of Megatron-LM and vLLM (``QKVParallelLinear``,
``MergedColumnParallelLinear``), found by pattern on the graph instead of by module names.
At decode (M = 1 token per sequence) a linear is a weight-streaming GEMV whose time is mostly
fixed cost for the small projections of a 1B model (2048x2048 q, 512x2048 k / v): one GEMV
over the concatenated weight launches one kernel instead of three and streams one larger,
contiguous weight.

Matches: two or more ``aten.linear(x, W_i, b_i)`` that read the same value ``x``, whose weights
    ``W_i`` are 2-D constants (``get_attr``) of one dtype, device and input width K, and whose
    biases are all constants (1-D, the weights' dtype) or all absent.
Rewrites to: ``y = aten.linear(x, W, b)`` over ``W = cat(W_1 .. W_n)`` (rows, stored once as a new
    buffer ``<common prefix>merged_<names>``) and ``b = cat(b_1 .. b_n)``, then
    ``aten.split_with_sizes(y, [N_1 .. N_n], -1)``; each old linear's users read its piece
    (``getitem``). The original weights are deleted from the module when nothing else reads them,
    and the tensors they were (the model's own parameters) become views of their rows of ``W``
    (and ``b``): the values do not change, and the weights are not held twice in memory.
    Quantized linears (``kiln.qlinear_*`` from ``lower-qdq``) of one kind merge the same way: their
    codes, per-row scales and zero points are concatenated along N (same group size, activation
    codes and scale; a per-tensor weight scale keeps its linear apart).
Requires: canonical forms (``canonicalize``): linears as ``aten.linear`` over ``get_attr`` weights.
    Runs after quantization lowering and after tensor/sequence-parallel sharding (it then merges
    each rank's shards).
Establishes: no two linears with constant weights and matching keys (kind, dtype, device, K,
    bias or not, scale layout) read the same value; the outputs equal the unmerged graph's (each output column
    is the same dot product over K; GEMM kernels may still round differently at other N).
Statistics: ``groups_merged``, ``linears_merged``, ``weights_deleted``, ``bytes_merged`` (bytes of
    the concatenated weights and biases).
"""

from __future__ import annotations

import operator
import os
from collections import Counter, defaultdict

import torch
from torch.fx import GraphModule, Node

from kiln.ir import PASS_KEY, constant_tensor, infer_meta
from kiln.pass_manager import Pass, PassResult, RewriteError, copy_meta
from kiln.quantize.ops import LINEAR_SLOTS, operand, slot_index

aten = torch.ops.aten
kiln_ops = torch.ops.kiln
LINEAR = aten.linear.default
_NOT_CANONICAL = (aten.addmm.default, aten.t.default, aten.mm.default)


def _attr(gm: torch.nn.Module, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _share(originals: list[torch.Tensor], merged: torch.Tensor) -> None:
    """Point each original tensor at its rows of ``merged`` (equal values), so one copy stays in memory."""
    at, done = 0, set()
    for t in originals:
        rows = merged[at : at + t.shape[0]]
        at += t.shape[0]
        if id(t) not in done:  # a weight used twice in the group takes its first rows
            done.add(id(t))
            t.data = rows


def _delete_attr(gm: GraphModule, target: str) -> None:
    *path, leaf = target.split(".")
    owner: object = gm
    for part in path:
        owner = getattr(owner, part)
    delattr(owner, leaf)


#: per-output-row operands of a linear, concatenated along N when linears merge
_ROW_SLOTS = ("w", "w_scale", "w_zero_point", "bias")


def _key(gm: GraphModule, lin: Node) -> tuple | str:
    """The merge key of a linear (linears merge when their keys are equal), or why it cannot merge.

    A quantized linear (``kiln::qlinear_*``) merges with its kind only, with the same group size,
    output dtype and activation codes / scale nodes, when its weight scales (and zero points) have
    one row per output (per channel or per group): a per-tensor scale differs between linears.
    """
    if lin.op != "call_function" or lin.target not in LINEAR_SLOTS:
        return "not a linear"
    w = constant_tensor(gm, operand(lin, "w"))
    if w is None or w.dim() != 2:
        return "the weight is not a 2-D constant"
    bias = operand(lin, "bias")
    b = constant_tensor(gm, bias)
    if bias is not None and (b is None or b.dim() != 1):
        return "the bias is not a 1-D constant"
    if lin.target == LINEAR:
        if b is not None and b.dtype != w.dtype:
            return "the bias is not of the weight's dtype"
        return (LINEAR, w.dtype, w.device, w.shape[1], bias is not None)
    rows = []
    for slot in ("w_scale", "w_zero_point"):
        t = operand(lin, slot)
        if t is None:
            rows.append(None)
            continue
        v = constant_tensor(gm, t)
        if v is None or v.dim() == 0 or v.shape[0] != w.shape[0]:
            return f"its {slot} is not a constant with a row per output"
        rows.append((v.dtype, tuple(v.shape[1:])))
    shared = tuple(operand(lin, s) for s in ("x_scale", "x_zero_point", "group_size"))  # the same nodes / ints
    out_dtype = lin.args[-1] if lin.target in (kiln_ops.qlinear_w8a8.default, kiln_ops.qlinear_fp8.default) else None
    return (lin.target, w.dtype, w.device, w.shape[1], bias is not None, *rows, shared, out_dtype)


class MergeParallelLinears(Pass):
    """Merge linears that read the same input into one linear over concatenated weights + a split."""

    name = "merge-parallel-linears"

    def __init__(self, *, min_group: int = 2) -> None:
        if min_group < 2:
            raise ValueError(f"min_group must be >= 2, got {min_group}")
        self.min_group = min_group

    def requires(self, gm: GraphModule) -> None:
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target in _NOT_CANONICAL:
                raise RewriteError(f"{n.target} is not canonical: run canonicalize before {self.name}", n)

    def _groups(self, gm: GraphModule) -> list[list[Node]]:
        """Groups of mergeable linears, each in graph order, in the order of their input."""
        groups: list[list[Node]] = []
        for x in gm.graph.nodes:
            by_key: dict[tuple, list[Node]] = defaultdict(list)
            for user in x.users:  # insertion order: deterministic
                if user.op == "call_function" and user.target in LINEAR_SLOTS and user.args[0] is x:
                    key = _key(gm, user)
                    if isinstance(key, tuple):
                        by_key[key].append(user)
            order = {n: i for i, n in enumerate(gm.graph.nodes)} if by_key else {}
            for members in by_key.values():
                if len(members) >= self.min_group:
                    groups.append(sorted(members, key=order.__getitem__))
        return groups

    def _name(self, gm: GraphModule, weights: list[Node]) -> str:
        """``<common prefix>merged_<distinct parts>``: ``model_layers_0_self_attn_merged_q_proj_k_proj_v_proj``."""
        parts = [str(w.target).replace(".", "_").removesuffix("_weight") for w in weights]
        prefix = os.path.commonprefix(parts)
        prefix = prefix[: prefix.rfind("_") + 1]  # whole words only
        base = f"{prefix}merged_" + "_".join(p[len(prefix):] for p in parts)
        name, i = base, 1
        while hasattr(gm, name) or hasattr(gm, name + "_weight"):
            name, i = f"{base}_{i}", i + 1
        return name

    def _buffer(self, gm: GraphModule, name: str, value: torch.Tensor, before: Node) -> Node:
        gm.register_buffer(name, value.detach())  # a constant: no autograd history (graphs pickle to ranks)
        with gm.graph.inserting_before(before):
            node = gm.graph.get_attr(name)
        node.meta[PASS_KEY] = self.name
        infer_meta(node)
        return node

    def _merge(self, gm: GraphModule, group: list[Node], stats: Counter[str]) -> None:
        first = group[0]
        weights = [operand(lin, "w") for lin in group]
        sizes = [int(constant_tensor(gm, w).shape[0]) for w in weights]  # type: ignore[union-attr]
        name = self._name(gm, weights)  # type: ignore[arg-type]
        args = list(first.args)
        consts: list[object] = []
        for slot in _ROW_SLOTS:  # each per-row operand: concatenated rows, stored once
            nodes = [operand(lin, slot) for lin in group]
            i = slot_index(first, slot)
            if i is None or nodes[0] is None:
                continue
            vals = [constant_tensor(gm, n) for n in nodes]
            merged = torch.cat(vals, 0).contiguous()  # type: ignore[arg-type]  # (sum N_i, ...)
            suffix = {"w": "weight", "bias": "bias"}.get(slot, slot)
            node = self._buffer(gm, f"{name}_{suffix}", merged, first)
            _share(vals, _attr(gm, f"{name}_{suffix}"))  # type: ignore[arg-type]
            stats["bytes_merged"] += merged.numel() * merged.element_size()
            args += [None] * (i + 1 - len(args))
            args[i] = node
            consts += nodes
        with gm.graph.inserting_before(first):
            y = gm.graph.call_function(first.target, tuple(args))
            pieces = gm.graph.call_function(aten.split_with_sizes.default, (y, sizes, -1))
            outs = [gm.graph.call_function(operator.getitem, (pieces, i)) for i in range(len(group))]
        for new, origin in ((y, first), (pieces, first), *zip(outs, group, strict=True)):
            copy_meta(origin, new)  # each piece keeps its own linear's module path and source line
            new.meta[PASS_KEY] = self.name
            infer_meta(new)
        for lin, out in zip(group, outs, strict=True):
            lin.replace_all_uses_with(out)
            gm.graph.erase_node(lin)
        for const in {n for n in consts if isinstance(n, Node)}:
            if not const.users:
                target = str(const.target)
                gm.graph.erase_node(const)
                if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
                    _delete_attr(gm, target)
                    stats["weights_deleted"] += 1
        stats["groups_merged"] += 1
        stats["linears_merged"] += len(group)

    def call(self, gm: GraphModule) -> PassResult:
        stats: Counter[str] = Counter()
        for group in self._groups(gm):
            self._merge(gm, group, stats)
        return PassResult(gm, bool(stats), dict(stats))

    def ensures(self, gm: GraphModule) -> None:
        left = self._groups(gm)
        if left:
            raise RewriteError(f"{len(left)} groups of parallel linears were left unmerged", left[0][0])


__all__ = ["MergeParallelLinears"]
