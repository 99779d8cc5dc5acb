"""fuse-rotary-pairs: a layer's two ``kiln.rotary`` calls (queries, keys) on one table become one ``kiln.rotary_pair``.

After ``lower-rotary`` every attention layer rotates its queries and its keys by the same cos / sin
table: two launches of a ~1.4 us kernel per layer in a decode step. ``kiln::rotary_pair``'s CUDA
kernel (``kiln.backends.triton.rotary``) rotates both in one launch, its programs split between the
two tensors (as vLLM's ``rotary_embedding`` takes queries and keys together).

Matches: two ``kiln.rotary(x, cos, sin)`` and ``kiln.rotary(y, cos, sin)`` with the same ``cos`` and
    ``sin`` (one node, or the same views of one node), consecutive among the rotaries on that table, where x and y share the last dimension
    and nothing uses the first one's result before the second one (so y does not depend on it).
Rewrites to: ``kiln.rotary_pair(x, y, cos, sin)`` (the first one's tables) at the second one's place, and a ``getitem`` for each
    result; both rotaries are erased.
Requires: ``lower-rotary``.
Establishes: no matched pair remains. The reference is two ``kiln.rotary`` references: outputs equal
    the unfused graph's exactly.
Statistics: ``pairs_fused``.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
from torch.fx import GraphModule, Node

from kiln.ir import is_call, meta_val
from kiln.pass_manager import Pass, PassResult, RewriteError, replace_with_tuple_call

ROTARY = torch.ops.kiln.rotary.default
ROTARY_PAIR = torch.ops.kiln.rotary_pair.default
aten = torch.ops.aten
#: Views whose repeats on one input name the same table (graphs not yet through common-subexpression elimination).
_VIEWS = (aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten.expand.default)


def _table_key(n: Node) -> object:
    """``n``, or for a view of a table the view's op, arguments and the key of what it views."""
    if n.op == "call_function" and n.target in _VIEWS and not n.kwargs and isinstance(n.args[0], Node):
        rest = tuple(str(a) for a in n.args[1:])
        return (n.target, _table_key(n.args[0]), rest)
    return n


def _pairs(gm: GraphModule) -> list[tuple[Node, Node]]:
    """Fusable (first, second) rotaries, in graph order."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_table: dict[tuple[object, object], list[Node]] = defaultdict(list)
    for n in gm.graph.nodes:
        if is_call(n, ROTARY) and len(n.args) == 3 and not n.kwargs and all(isinstance(a, Node) for a in n.args):
            by_table[(_table_key(n.args[1]), _table_key(n.args[2]))].append(n)  # type: ignore[arg-type]
    out = []
    for rotaries in by_table.values():
        i = 0
        while i + 1 < len(rotaries):
            a, b = rotaries[i], rotaries[i + 1]
            va, vb = meta_val(a.args[0]), meta_val(b.args[0])
            ok = (va is not None and vb is not None and va.dim() > 0 and vb.dim() > 0
                  and str(va.shape[-1]) == str(vb.shape[-1]) and va.dtype == vb.dtype
                  and all(order[u] > order[b] for u in a.users))  # fmt: skip
            if ok:
                out.append((a, b))
                i += 2
            else:
                i += 1
    return sorted(out, key=lambda p: order[p[0]])


class FuseRotaryPairs(Pass):
    """Rewrite pairs of ``kiln.rotary`` on one table to ``kiln.rotary_pair`` (one CUDA launch)."""

    name = "fuse-rotary-pairs"

    def call(self, gm: GraphModule) -> PassResult:
        stats: Counter[str] = Counter()
        for first, second in _pairs(gm):
            x, cos, sin = first.args
            y = second.args[0]
            replace_with_tuple_call(second, (first, second), ROTARY_PAIR, (x, y, cos, sin), self.name)
            stats["pairs_fused"] += 1
        return PassResult(gm, bool(stats), dict(stats))

    def ensures(self, gm: GraphModule) -> None:
        left = _pairs(gm)
        if left:
            raise RewriteError("two rotaries on one table were left unpaired", left[0][1])


__all__ = ["FuseRotaryPairs"]
