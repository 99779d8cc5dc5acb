"""fuse-rotary-table: the op-by-op cos / sin tables of rotary embeddings become one ``kiln.rotary_table``.

Every step, a Llama-family graph turns its position ids into the rotary tables (Hugging Face's
``LlamaRotaryEmbedding``, kiln's ``RotaryEmbedding``; after canonicalization both read the same):
positions to float, times the inverse frequencies, concatenated with itself, cosine and sine, optionally
scaled, cast to the model's dtype. Seven element-wise kernels of ~1.5-2 us in a decode step, run again by
every tensor-parallel rank; ``kiln::rotary_table``'s CUDA kernel (``kiln.backends.triton.rotary_table``)
is one launch.

Matches: ``cat([f, f], -1)`` whose only users are one ``cos`` and one ``sin``, where
    ``f = mul(to(p, float32), inv)`` (either operand order), ``p`` an integer tensor of last dimension 1
    on one of ``devices`` (default: CUDA, where the kernel exists) and ``inv`` fp32 with leading ones and at
    most ``p``'s rank; then, on both tables alike and each used only by the next, an optional product
    with one Python scalar and an optional cast to a float dtype.
Rewrites to: ``kiln.rotary_table(p, inv, scale, dtype)`` before the ``cat`` and a ``getitem`` for each
    table; the replaced nodes are erased (``f`` and the cast of ``p`` only when nothing else uses them).
Requires: the runtime's step graph (after ``kv-cache``); canonical forms.
Establishes: no matched pattern remains. The reference runs the same ops, so on the CPU the outputs equal
    the original graph's exactly; on the GPU the kernel's cos and sin are libdevice's, as torch's are.
Statistics: ``tables_fused``, ``nodes_removed``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

import kiln.rotary_table  # noqa: F401  (defines kiln::rotary_table)
from kiln.ir import is_call, meta_val
from kiln.pass_manager import Pass, PassResult, RewriteError, replace_with_tuple_call
from kiln.rotary_table import table_problem

aten = torch.ops.aten
ROTARY_TABLE = torch.ops.kiln.rotary_table.default
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class _Match:
    cat: Node
    positions: Node
    inv_freq: Node
    scale: float
    dtype: torch.dtype
    ends: tuple[Node, Node]  # the cos and sin tables' last nodes
    inner: list[Node]  # the pattern's other nodes, output side first, erased where unused


def _only_user(n: Node) -> Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _scale_of(n: Node) -> float | None:
    """The scalar of ``mul(n, s)`` / ``mul(s, n)`` when that is ``n``'s only user, else None."""
    u = _only_user(n)
    if not is_call(u, aten.mul.Tensor) or u.kwargs or len(u.args) != 2:  # type: ignore[union-attr]
        return None
    other = u.args[1] if u.args[0] is n else u.args[0]  # type: ignore[union-attr]
    return float(other) if isinstance(other, (int, float)) and not isinstance(other, bool) else None


def _cast_of(n: Node) -> torch.dtype | None:
    """The float dtype of ``to(n, dtype)`` when that is ``n``'s only user, else None."""
    u = _only_user(n)
    if not is_call(u, aten.to.dtype) or len(u.args) != 2 or u.kwargs:  # type: ignore[union-attr]
        return None
    return u.args[1] if u.args[1] in _FLOATS else None  # type: ignore[union-attr, return-value]


class FuseRotaryTable(Pass):
    """Rewrite the op-by-op rotary cos / sin tables to ``kiln.rotary_table`` (one CUDA kernel)."""

    name = "fuse-rotary-table"

    def __init__(self, devices: Sequence[str] = ("cuda",)) -> None:
        self.devices = tuple(devices)

    def _source(self, f: object) -> tuple[Node, Node, Node] | None:
        """(cast of the positions, positions, inv_freq) of ``f = mul(to(p, float32), inv)``."""
        if not is_call(f, aten.mul.Tensor) or f.kwargs or len(f.args) != 2:  # type: ignore[union-attr]
            return None
        for cast, inv in (f.args, f.args[::-1]):  # type: ignore[union-attr]
            if not is_call(cast, aten.to.dtype) or cast.args[1:] != (torch.float32,) or cast.kwargs:
                continue
            p = cast.args[0]
            pv, iv = meta_val(p), meta_val(inv)  # their product is (..., H): table_problem fixes both shapes
            if pv is None or iv is None or table_problem(pv, iv, torch.float32) is not None:
                continue
            if pv.device.type not in self.devices or iv.device != pv.device:
                continue
            return cast, p, inv  # type: ignore[return-value]
        return None

    def _match(self, cat: Node) -> _Match | None:
        if not is_call(cat, aten.cat.default) or cat.kwargs or len(cat.args) != 2:
            return None
        parts, dim = cat.args
        f = (
            parts[0]
            if isinstance(parts, (list, tuple)) and len(parts) == 2 and parts[0] is parts[1]
            else None
        )
        fv = meta_val(f)
        if fv is None or dim not in (-1, fv.dim() - 1):
            return None
        src = self._source(f)
        users = {u.target: u for u in cat.users}
        if src is None or len(cat.users) != 2 or set(users) != {aten.cos.default, aten.sin.default}:
            return None
        ends = [users[aten.cos.default], users[aten.sin.default]]
        if any(e.kwargs or len(e.args) != 1 for e in ends):
            return None
        inner = []
        scale, scales = 1.0, {_scale_of(e) for e in ends}
        if len(scales) == 1 and None not in scales:
            scale = scales.pop()  # type: ignore[assignment]
            inner += ends
            ends = [_only_user(e) for e in ends]  # type: ignore[misc]
        dtype, casts = torch.float32, {_cast_of(e) for e in ends}
        if len(casts) == 1 and None not in casts:
            dtype = casts.pop()  # type: ignore[assignment]
            inner += ends
            ends = [_only_user(e) for e in ends]  # type: ignore[misc]
        cast, p, inv = src
        inner = inner[::-1] + [cat, f, cast]  # type: ignore[list-item]
        return _Match(cat, p, inv, scale, dtype, (ends[0], ends[1]), inner)

    def call(self, gm: GraphModule) -> PassResult:
        stats: Counter[str] = Counter()
        matches = [m for m in map(self._match, gm.graph.nodes) if m is not None]  # disjoint: one per cat
        for m in matches:
            args = (m.positions, m.inv_freq, m.scale, m.dtype)
            replace_with_tuple_call(m.cat, m.ends, ROTARY_TABLE, args, self.name)
            removed = 2
            for n in m.inner:
                if not n.users:
                    gm.graph.erase_node(n)
                    removed += 1
            stats["tables_fused"] += 1
            stats["nodes_removed"] += removed
        return PassResult(gm, bool(stats), dict(stats))

    def ensures(self, gm: GraphModule) -> None:
        for n in gm.graph.nodes:
            if self._match(n) is not None:
                raise RewriteError("an op-by-op rotary table was left unfused", n)


__all__ = ["FuseRotaryTable"]
