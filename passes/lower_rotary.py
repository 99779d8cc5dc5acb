"""lower-rotary: the runtime graph's rotary embeddings, spelled op by op, become one ``kiln.rotary`` each.

Llama-family models apply RoPE (Su et al. 2021, "RoFormer") to queries and keys as
``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)`` over the halves of the
head dimension (Hugging Face's ``apply_rotary_pos_emb``, kiln's ``apply_rotary``): five
element-wise kernels per tensor, ten per layer, each a few microseconds in a decode step.
``kiln::rotary``'s CUDA kernel (``kiln.backends.triton.rotary``) does a tensor in one launch.

Matches: ``add(mul(x, C), mul(cat([neg(x2), x1], -1), S))`` (either operand order of the add and
    the products) where ``x1, x2`` are the halves of ``x``'s last dimension, taken by
    ``chunk(x, 2, -1)`` or by two ``slice`` ops; ``x``, ``C`` and ``S`` share a float dtype, ``C``
    and ``S`` broadcast to ``x``'s shape, ``x`` lives on one of ``devices`` (default: CUDA, where the
    kernel exists) and its head dimension is even. Every matched node but the sum
    is used only inside the pattern (``x``, ``C`` and ``S`` may have other users).
Rewrites to: ``kiln.rotary(x, C, S)``; the replaced nodes are erased.
Requires: the runtime's step graph (after ``kv-cache``); canonical forms.
Establishes: no matched pattern remains. The reference computes the same ops, and the kernel rounds
    each of them as torch does, so the rewritten graph's outputs equal the original's exactly.
Statistics: ``rotaries_lowered``, ``nodes_removed``.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from kiln.ir import SLICE_END, is_call, meta_val, slice_args
from kiln.pass_manager import Pass, PassResult, RewriteError, replace_with_call

aten = torch.ops.aten
ROTARY = torch.ops.kiln.rotary.default
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
def _last_dim(dim: object, rank: int) -> bool:
    return dim in (-1, rank - 1)


@dataclass
class _Match:
    out: Node  # the sum
    x: Node
    cos: Node
    sin: Node
    inner: list[Node]  # the pattern's other nodes, output side first, to erase


class LowerRotary(Pass):
    """Rewrite op-by-op rotary embeddings (``rotate_half`` convention) to ``kiln.rotary`` (one CUDA kernel)."""

    name = "lower-rotary"

    def __init__(self, devices: Sequence[str] = ("cuda",)) -> None:
        self.devices = tuple(devices)

    @staticmethod
    def _halves(x1: object, x2: object) -> Node | None:
        """The ``x`` whose first and second halves of the last dim ``x1`` and ``x2`` are, else None."""
        if not (isinstance(x1, Node) and isinstance(x2, Node)):
            return None
        if is_call(x1, operator.getitem) and is_call(x2, operator.getitem):
            ch = x1.args[0]
            if ch is not x2.args[0] or x1.args[1] != 0 or x2.args[1] != 1 or not is_call(ch, aten.chunk.default):
                return None
            x = ch.args[0]  # type: ignore[union-attr]
            dim = ch.args[2] if len(ch.args) > 2 else ch.kwargs.get("dim", 0)  # type: ignore[union-attr]
            xv = meta_val(x)
            if ch.args[1] != 2 or xv is None or not _last_dim(dim, xv.dim()):  # type: ignore[union-attr]
                return None
            return x  # type: ignore[return-value]
        if is_call(x1, aten.slice.Tensor) and is_call(x2, aten.slice.Tensor):
            x = x1.args[0]
            xv = meta_val(x)
            if x is not x2.args[0] or xv is None:
                return None
            d = xv.shape[-1]
            if not isinstance(d, int) or d % 2:
                return None
            s1, s2 = slice_args(x1), slice_args(x2)
            ok1 = _last_dim(s1[0], xv.dim()) and s1[1] == 0 and s1[2] == d // 2 and s1[3] == 1
            ok2 = _last_dim(s2[0], xv.dim()) and s2[1] == d // 2 and s2[2] in (d, SLICE_END) and s2[3] == 1
            return x if ok1 and ok2 else None  # type: ignore[return-value]
        return None

    def _match(self, out: Node) -> _Match | None:
        if not is_call(out, aten.add.Tensor) or len(out.args) != 2 or out.kwargs:
            return None
        for direct, rotated in ((out.args[0], out.args[1]), (out.args[1], out.args[0])):
            if not (is_call(direct, aten.mul.Tensor) and is_call(rotated, aten.mul.Tensor)):
                continue
            assert isinstance(direct, Node) and isinstance(rotated, Node)
            for cat, sin in ((rotated.args[0], rotated.args[1]), (rotated.args[1], rotated.args[0])):
                if not is_call(cat, aten.cat.default) or not isinstance(sin, Node):
                    continue
                assert isinstance(cat, Node)
                parts = cat.args[0]
                if not isinstance(parts, list | tuple) or len(parts) != 2 or not is_call(parts[0], aten.neg.default):
                    continue
                x = self._halves(parts[1], parts[0].args[0])
                if x is None:
                    continue
                xv = meta_val(x)
                if xv is None or not _last_dim(cat.args[1] if len(cat.args) > 1 else 0, xv.dim()):
                    continue
                if direct.args[0] is x and isinstance(direct.args[1], Node):
                    cos = direct.args[1]
                elif direct.args[1] is x and isinstance(direct.args[0], Node):
                    cos = direct.args[0]
                else:
                    continue
                if not self._fits(x, cos, sin):
                    continue
                halves = list(parts[0].args[:1]) + [parts[1]]  # x2, x1
                chunk = [h.args[0] for h in halves if is_call(h, operator.getitem)][:1]
                inner = [direct, rotated, cat, parts[0], *halves, *chunk]
                members = {*inner, out}
                if any(u not in members for n in inner for u in n.users):
                    continue
                return _Match(out, x, cos, sin, inner)
        return None

    def _fits(self, x: Node, cos: Node, sin: Node) -> bool:
        xv, cv, sv = meta_val(x), meta_val(cos), meta_val(sin)
        if xv is None or cv is None or sv is None or xv.dim() == 0:
            return False
        if xv.dtype not in _FLOATS or cv.dtype != xv.dtype or sv.dtype != xv.dtype:
            return False
        if xv.device.type not in self.devices or cv.device != xv.device or sv.device != xv.device:
            return False
        d = xv.shape[-1]
        if not isinstance(d, int) or d % 2:
            return False
        try:
            shape = torch.broadcast_shapes(xv.shape, cv.shape, sv.shape)
        except RuntimeError:
            return False
        return len(shape) == xv.dim() and all(str(a) == str(b) for a, b in zip(shape, xv.shape, strict=True))

    def call(self, gm: GraphModule) -> PassResult:
        stats: Counter[str] = Counter()
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False):  # erased with an earlier match
                continue
            m = self._match(node)
            if m is None:
                continue
            stats["nodes_removed"] += replace_with_call(m.out, ROTARY, (m.x, m.cos, m.sin), self.name, m.inner)
            stats["rotaries_lowered"] += 1
        return PassResult(gm, bool(stats), dict(stats))

    def ensures(self, gm: GraphModule) -> None:
        for n in gm.graph.nodes:
            if self._match(n) is not None:
                raise RewriteError("a rotary embedding was left unlowered", n)


__all__ = ["LowerRotary"]
