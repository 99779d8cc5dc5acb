"""fuse-add-rms-norm: a residual add and the ``kiln.rms_norm`` that reads it become one ``kiln.add_rms_norm``.

In a pre-norm transformer every sub-layer's output is added to the residual stream, and the next
sub-layer's RMSNorm reads that sum: ``h = h + f(x); x = norm(h)``. After ``lower-rms-norm`` the
norm is one kernel but the add is another, twice per layer. ``kiln::add_rms_norm`` (vLLM's
``fused_add_rms_norm``) does both in one kernel per row: it reads the two addends once, writes the
sum (which the next residual add reads) and the normalized row.

Matches: ``kiln.rms_norm(add(a, b), W, eps, upcast)`` with ``add`` an ``aten.add.Tensor`` of two
    tensors of one shape and dtype (no broadcasting, no ``alpha``). The sum may have other users.
Rewrites to: ``s = kiln.add_rms_norm(a, b, W, eps, upcast)``; the norm's users read ``s[0]``, the
    add's other users ``s[1]``; the add and the norm are erased.
Requires: ``lower-rms-norm`` ran (the step graph of the runtime, on the devices it lowered).
Establishes: no ``kiln.rms_norm`` reads a fusable add. The reference computes the same add and norm,
    and the kernel rounds the sum as torch does, so outputs equal the unfused graph's on the CPU.
Statistics: ``adds_fused``.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule, Node

from kiln.ir import is_call, meta_val
from kiln.pass_manager import Pass, PassResult, RewriteError, replace_with_tuple_call

aten = torch.ops.aten
RMS_NORM = torch.ops.kiln.rms_norm.default
ADD_RMS_NORM = torch.ops.kiln.add_rms_norm.default


def _fusable_add(norm: Node) -> Node | None:
    """The add a ``kiln.rms_norm`` node normalizes, when it can join the norm's kernel."""
    if not is_call(norm, RMS_NORM):
        return None
    add = norm.args[0]
    if not is_call(add, aten.add.Tensor):
        return None
    assert isinstance(add, Node)
    if add.kwargs or len(add.args) != 2 or not all(isinstance(a, Node) for a in add.args):
        return None
    a, b = (meta_val(n) for n in add.args)
    out = meta_val(add)
    if a is None or b is None or out is None or a.dtype != b.dtype or a.dtype != out.dtype:
        return None
    if [str(d) for d in a.shape] != [str(d) for d in b.shape] or [str(d) for d in a.shape] != [str(d) for d in out.shape]:
        return None
    return add


class FuseAddRMSNorm(Pass):
    """Fold the residual add that feeds each ``kiln.rms_norm`` into it (``kiln.add_rms_norm``)."""

    name = "fuse-add-rms-norm"

    def call(self, gm: GraphModule) -> PassResult:
        stats: Counter[str] = Counter()
        graph = gm.graph
        for norm in list(graph.nodes):
            add = _fusable_add(norm)
            if add is None:
                continue
            x, eps, upcast = norm.args[1], norm.args[2], norm.args[3]
            # the norm is erased before the add it reads
            args = (add.args[0], add.args[1], x, eps, upcast)
            replace_with_tuple_call(add, (norm, add), ADD_RMS_NORM, args, self.name)
            stats["adds_fused"] += 1
        return PassResult(gm, bool(stats), dict(stats))

    def ensures(self, gm: GraphModule) -> None:
        for n in gm.graph.nodes:
            if _fusable_add(n) is not None:
                raise RewriteError("a kiln.rms_norm still reads a fusable residual add", n)


__all__ = ["FuseAddRMSNorm"]
