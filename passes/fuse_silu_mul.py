"""fuse-silu-mul: the gated MLP's ``mul(silu(gate), up)`` becomes one ``kiln.silu_mul``.

Llama-family MLPs compute ``down(silu(gate(x)) * up(x))`` (SwiGLU, Shazeer 2020). Between the
projections the captured graph runs two element-wise kernels, once per layer in every step;
``kiln::silu_mul``'s CUDA kernel (``kiln.backends.triton.silu_mul``, vLLM's ``silu_and_mul``) runs one.

Matches: ``mul(silu(g), u)`` or ``mul(u, silu(g))`` where ``g`` and ``u`` share a shape and a float
    dtype (no broadcasting), lie on one of ``devices`` (default: CUDA, where the kernel exists), and
    the silu is used only by the product.
Rewrites to: ``kiln.silu_mul(g, u)``; the silu and the product are erased.
Requires: the runtime's step graph (after ``kv-cache``); canonical forms.
Establishes: no matched pattern remains. The reference runs the same two ops, so on the CPU the
    outputs equal the original graph's exactly; the kernel's exp may differ from torch's in the last bit.
Statistics: ``products_fused``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch.fx import GraphModule, Node

from kiln.ir import is_call, meta_val
from kiln.pass_manager import Pass, PassResult, RewriteError, replace_with_call

aten = torch.ops.aten
SILU_MUL = torch.ops.kiln.silu_mul.default
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class FuseSiluMul(Pass):
    """Rewrite ``silu(gate) * up`` to ``kiln.silu_mul`` (one CUDA kernel)."""

    name = "fuse-silu-mul"

    def __init__(self, devices: Sequence[str] = ("cuda",)) -> None:
        self.devices = tuple(devices)

    def _match(self, node: Node) -> tuple[Node, Node, Node] | None:
        """(silu node, gate, up) of a fusable product."""
        if not is_call(node, aten.mul.Tensor) or len(node.args) != 2 or node.kwargs:
            return None
        for act, up in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            if not is_call(act, aten.silu.default):
                continue
            gate = act.args[0]
            if not isinstance(gate, Node) or not isinstance(up, Node) or set(act.users) != {node} or act.kwargs:
                continue
            g, u, out = meta_val(gate), meta_val(up), meta_val(node)
            if g is None or u is None or out is None or g.dtype not in _FLOATS or u.dtype != g.dtype:
                continue
            if g.device.type not in self.devices or u.device != g.device:
                continue
            if [str(d) for d in g.shape] != [str(d) for d in u.shape] or out.dtype != g.dtype:
                continue
            return act, gate, up
        return None

    def call(self, gm: GraphModule) -> PassResult:
        stats: Counter[str] = Counter()
        for node in list(gm.graph.nodes):
            m = self._match(node)
            if m is None:
                continue
            act, gate, up = m
            replace_with_call(node, SILU_MUL, (gate, up), self.name, [act])
            stats["products_fused"] += 1
        return PassResult(gm, bool(stats), dict(stats))

    def ensures(self, gm: GraphModule) -> None:
        for n in gm.graph.nodes:
            if self._match(n) is not None:
                raise RewriteError("a silu(gate) * up product was left unfused", n)


__all__ = ["FuseSiluMul"]
