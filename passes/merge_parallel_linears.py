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
Requires: canonical forms (``canonicalize``): linears as ``aten.linear`` over ``get_attr`` weights.
    Runs after quantization lowering (only plain float linears merge; a ``kiln.qlinear_*`` stays
    as it is) and after tensor/sequence-parallel sharding (it then merges each rank's shards).
Establishes: no two plain linears with constant weights and matching keys (dtype, device, K,
    bias or not) read the same value; the outputs equal the unmerged graph's (each output column
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

from kiln.ir import PASS_KEY, infer_meta
from kiln.pass_manager import Pass, PassResult, RewriteError, copy_meta

aten = torch.ops.aten
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


def _constant(gm: GraphModule, arg: object) -> torch.Tensor | None:
    """The tensor a ``get_attr`` operand names; None for anything else."""
    if isinstance(arg, Node) and arg.op == "get_attr":
        value = _attr(gm, str(arg.target))
        return value if isinstance(value, torch.Tensor) else None
    return None


def _key(gm: GraphModule, lin: Node) -> tuple | str:
    """The merge key of a linear (linears merge when their keys are equal), or why it cannot merge."""
    if lin.op != "call_function" or lin.target != LINEAR:
        return "not a linear"
    w = _constant(gm, lin.args[1])
    if w is None or w.dim() != 2:
        return "the weight is not a 2-D constant"
    bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    b = _constant(gm, bias)
    if bias is not None and (b is None or b.dim() != 1 or b.dtype != w.dtype):
        return "the bias is not a 1-D constant of the weight's dtype"
    return (w.dtype, w.device, w.shape[1], bias is not None)


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
                if user.op == "call_function" and user.target == LINEAR and user.args[0] is x:
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
        x = first.args[0]
        weights = [lin.args[1] for lin in group]
        biases = [lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias") for lin in group]
        w_vals = [_constant(gm, w) for w in weights]
        sizes = [int(w.shape[0]) for w in w_vals]  # type: ignore[union-attr]
        name = self._name(gm, weights)  # type: ignore[arg-type]
        merged_w = torch.cat(w_vals, 0).contiguous()  # type: ignore[arg-type]  # (sum N_i, K)
        w_node = self._buffer(gm, f"{name}_weight", merged_w, first)
        _share(w_vals, _attr(gm, f"{name}_weight"))  # type: ignore[arg-type]
        stats["bytes_merged"] += merged_w.numel() * merged_w.element_size()
        b_node = None
        if biases[0] is not None:
            b_vals = [_constant(gm, b) for b in biases]
            merged_b = torch.cat(b_vals, 0).contiguous()  # type: ignore[arg-type]
            b_node = self._buffer(gm, f"{name}_bias", merged_b, first)
            _share(b_vals, _attr(gm, f"{name}_bias"))  # type: ignore[arg-type]
            stats["bytes_merged"] += merged_b.numel() * merged_b.element_size()
        with gm.graph.inserting_before(first):
            y = gm.graph.call_function(LINEAR, (x, w_node, b_node))
            pieces = gm.graph.call_function(aten.split_with_sizes.default, (y, sizes, -1))
            outs = [gm.graph.call_function(operator.getitem, (pieces, i)) for i in range(len(group))]
        for new, origin in ((y, first), (pieces, first), *zip(outs, group, strict=True)):
            copy_meta(origin, new)  # each piece keeps its own linear's module path and source line
            new.meta[PASS_KEY] = self.name
            infer_meta(new)
        for lin, out in zip(group, outs, strict=True):
            lin.replace_all_uses_with(out)
            gm.graph.erase_node(lin)
        for const in {n for n in (*weights, *biases) if isinstance(n, Node)}:
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
