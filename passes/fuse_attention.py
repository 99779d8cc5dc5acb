"""fuse-attention: every attention becomes ``kiln::attention``, the operator flash attention implements.

Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness"
(arXiv:2205.14135); grouped-query attention by head counts after Ainslie et al. 2023 (arXiv:2305.13245).
One pattern per spelling of attention, after canonicalize (onnxscript rewriter style: match,
check with a reason, rewrite).

Matches:
    sdpa        ``aten.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal, scale=, enable_gqa=)``
    decomposed  ``matmul(softmax(chain(matmul(q, permute(k)))), v)`` on rank-4 (B, H, T, D) tensors, softmax
                (``_softmax`` / ``softmax.int``) over the last dim, where ``chain`` is, in any order: fp casts
                (``aten.to`` / ``_to_copy``), scalar scales (``* s``, ``/ d``), and one mask: ``+ m``,
                ``where(c, s, fill)``, ``masked_fill(s, m, fill)`` with ``fill`` -inf or <= float16's minimum.
                A q scaled by a scalar (``(q * s) @ kᵀ``) folds into the scale; casts may follow softmax.
    K and V repeated for GQA (``repeat_kv``: unsqueeze/expand/reshape, or ``repeat_interleave`` on dim 1) are
    replaced by the un-repeated tensors.
Rewrites to: ``kiln.attention(q, k, v, mask=..., causal=..., scale=...)`` with
    causal   True for SDPA's ``is_causal`` and for masks proven causal for every T (``_attention_patterns``);
    mask     what is not proven: the conjuncts left after dropping the causal one and those True by
             construction; bool (True = attend) for -inf fills and boolean SDPA masks, additive otherwise
             (with a finite fill the causal part is split off only when nothing else is left, so rows
             masked entirely keep their uniform weights);
    scale    SDPA's (None: 1/sqrt(D)); decomposed: the product of the scalar factors (1.0 when none).
    The replaced nodes, mask construction included, are erased once nothing else uses them.
Not matched (a reason per node in ``self.skipped``): dropout (``dropout_p != 0``, training-mode dropout in
    the chain), softmax over another dim, a softmax not fed by ``q @ kᵀ`` or not followed by ``@ v``,
    fill values that would not zero the weight, ``is_causal`` with Tq != Tk (torch aligns top-left).
Requires: canonical forms (``canonicalize``): transposes are ``aten.permute``, products ``aten.matmul``.
Establishes: every matched attention is one ``kiln.attention`` whose K/V are not repeated.
Statistics: ``attention_fused`` (``sdpa_fused`` + ``decomposed_fused``), ``causal_masks_proven``,
    ``masks_kept``, ``masks_dropped``, ``kv_repeats_stripped``, ``nodes_removed``, ``skipped``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from kiln.ir import infer_meta, op_name
from kiln.pass_manager import Pass, PassResult, RewriteError, copy_meta
from kiln.passes import _attention_patterns as pat

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_SOFTMAX = {aten._softmax.default, aten.softmax.int}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}
_SCALES = {aten.mul.Tensor: 1, aten.mul.Scalar: 1, aten.div.Tensor: -1, aten.div.Scalar: -1}
_WHERES = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf}
_FILLS = {aten.masked_fill.Scalar, aten.masked_fill.Tensor}
_val = pat.meta_val


def _rank(x: object) -> int:
    val = _val(x)
    return -1 if val is None else val.dim()


@dataclass
class _Match:
    """One attention: where it ends, its operands, and its mask before analysis."""

    out: Node  # the node computing the attention's value (SDPA or ``probs @ v``)
    q: Node  # (B, Hq, Tq, D)
    k: Node  # (B, Hk, Tk, D), or the tensor K is a permute of (``k_perm``)
    v: Node  # (B, Hk, Tk, Dv)
    scale: float | None
    causal: bool  # SDPA's is_causal
    mask: tuple[Any, ...] | None  # ("fill", attend_root, negated, fill) or ("additive", m, factor)
    k_perm: list[int] | None = None  # K is permute(k, k_perm) (None: k itself)
    stripped: bool = False  # k and v were repeated for GQA; they are the un-repeated tensors now


class FuseAttention(Pass):
    """Rewrite SDPA calls and decomposed softmax(q kᵀ) v into ``kiln.attention``."""

    name = "fuse-attention"

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []  # (node name, why it was not fused)

    def requires(self, gm: GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.target in (aten.transpose.int, aten.bmm.default, aten.view.default):
                raise RewriteError(f"{op_name(node)} is not canonical: run canonicalize before fuse-attention", node)

    def call(self, gm: GraphModule) -> PassResult:
        self.skipped = []
        stats: Counter[str] = Counter(dict.fromkeys(("attention_fused", "causal_masks_proven", "masks_kept"), 0))
        analyzer = pat.MaskAnalyzer(gm)
        erased: set[Node] = set()
        for node in list(gm.graph.nodes):
            if node in erased or node.op != "call_function" or (node.target != _SDPA and node.target not in _SOFTMAX):
                continue
            match = self._match_sdpa(node) if node.target == _SDPA else self._match_decomposed(node, analyzer)
            if isinstance(match, str):
                self.skipped.append((node.name, match))
                stats["skipped"] += 1
                continue
            self._rewrite(gm, match, analyzer, stats, erased)
            stats["sdpa_fused" if node.target == _SDPA else "decomposed_fused"] += 1
            stats["attention_fused"] += 1
        return PassResult(gm, modified=stats["attention_fused"] > 0, stats=dict(stats))

    def ensures(self, gm: GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.target == torch.ops.kiln.attention.default and any(pat.strip_repeat_kv(x) for x in node.args[1:3]):
                raise RewriteError("kiln.attention reads repeated K/V; GQA must be expressed by head counts", node)

    # -- matching: each returns a _Match or the reason it does not apply ------------------

    @staticmethod
    def _match_sdpa(node: Node) -> _Match | str:
        q, k, v = node.args[:3]
        mask, dropout = pat.arg(node, 3, "attn_mask"), pat.arg(node, 4, "dropout_p", 0.0)
        causal, scale = bool(pat.arg(node, 5, "is_causal", False)), node.kwargs.get("scale")
        if dropout != 0:
            return f"dropout_p={dropout}: attention with dropout is not fused"
        if not all(isinstance(x, Node) and _rank(x) == 4 for x in (q, k, v)):
            return "q, k, v are not rank-4 (B, H, T, D) tensors"
        if causal and str(_val(q).shape[-2]) != str(_val(k).shape[-2]):  # type: ignore[union-attr]
            return "is_causal with Tq != Tk: SDPA aligns the mask top-left, kiln::attention to the end"
        form = None
        if isinstance(mask, Node):
            is_bool = _val(mask).dtype == torch.bool  # type: ignore[union-attr]
            form = ("fill", mask, False, -math.inf) if is_bool else ("additive", mask, 1.0)
        return _operands(_Match(node, q, k, v, scale, causal, form))  # type: ignore[arg-type]

    def _match_decomposed(self, softmax: Node, an: pat.MaskAnalyzer) -> _Match | str:
        x = softmax.args[0]
        if _rank(x) != 4:
            return "softmax input is not rank 4 (B, H, Tq, Tk)"
        if softmax.args[1] % 4 != 3:
            return f"softmax over dim {softmax.args[1]}, not the key axis"
        probs = softmax
        while len(probs.users) == 1 and next(iter(probs.users)).target in _CASTS:
            probs = next(iter(probs.users))
        out = next((u for u in probs.users if u.target == aten.matmul.default and u.args[0] is probs), None)
        if any(u.target in (aten.dropout.default, aten.native_dropout.default) for u in probs.users):
            return "training-mode dropout on the attention weights"
        if out is None or len(probs.users) != 1:
            return "the softmax is not (only) multiplied by V"
        scale, factor, mask = 1.0, 1.0, None  # factor: scales applied after the mask
        while True:
            if not isinstance(x, Node) or x.op != "call_function":
                return "the softmax input is not computed from q @ kᵀ"
            if x.target == aten.matmul.default:
                break
            s = self._scalar(an, x)
            if x.target in _CASTS and _val(x).dtype.is_floating_point:  # type: ignore[union-attr]
                x = x.args[0]
            elif s is not None:
                scale, factor = scale * s, factor * (s if mask is None else 1.0)
                x = x.args[0]
            elif mask is None and (found := self._mask_op(an, x)) is not None:
                if isinstance(found, str):
                    return found
                x, mask = found[0], found[1:]
            else:
                return f"{op_name(x)} between q @ kᵀ and the softmax"
        q, kt = x.args[:2]
        if mask is not None and mask[0] == "additive":
            mask = ("additive", mask[1], factor)
        elif mask is not None:
            mask = (*mask[:3], mask[3] * factor)
            if not pat.is_masking(mask[3]):
                return f"the masking fill scaled by {factor} no longer masks"
        if isinstance(q, Node) and (s := self._scalar(an, q)) is not None and len(q.users) == 1:
            q, scale = q.args[0], scale * s  # a pre-scaled q
        v = out.args[1]
        if not all(isinstance(t, Node) and _rank(t) == 4 for t in (q, kt, v)):
            return "q, kᵀ, v are not rank-4 tensors"
        k, perm = kt, [0, 1, 3, 2]  # K from Kᵀ: undo the permute that made it, or add one
        if kt.target == aten.permute.default:  # type: ignore[union-attr]
            k, perm = kt.args[0], list(kt.args[1])  # type: ignore[union-attr]
            perm[-2:] = perm[-1], perm[-2]
        return _operands(_Match(out, q, k, v, scale, False, mask, None if perm == [0, 1, 2, 3] else perm))  # type: ignore[arg-type]

    @staticmethod
    def _scalar(an: pat.MaskAnalyzer, x: Node) -> float | None:
        """s when ``x`` is ``y * s`` or ``y / (1/s)`` for a positive scalar s (shape unchanged)."""
        if x.target not in _SCALES or len(x.args) != 2 or str(_val(x).shape) != str(getattr(_val(x.args[0]), "shape", None)):  # type: ignore[union-attr]
            return None
        s = an.value(x.args[1])
        if not isinstance(s, pat.Lin) or s.coeffs or not 0 < s.const < math.inf:
            return None
        return float(s.const) ** _SCALES[x.target]

    @staticmethod
    def _mask_op(an: pat.MaskAnalyzer, x: Node) -> tuple[Any, ...] | str | None:
        """(scores, kind, ...) when ``x`` applies a mask to scores; a reason when the fill does not mask."""
        a = x.args
        if x.target == aten.add.Tensor and not x.kwargs and _val(x) is not None:
            for s, m in ((a[0], a[1]), (a[1], a[0])):
                if isinstance(s, Node) and isinstance(m, Node) and str(_val(s).shape) == str(_val(x).shape):  # type: ignore[union-attr]
                    if _val(m).dtype.is_floating_point and _rank(m) <= 4 and _reaches_matmul(s):  # type: ignore[union-attr]
                        return s, "additive", m, 1.0
            return None
        if x.target in _WHERES or x.target in _FILLS:
            cond, pairs = (a[0], ((a[1], a[2], False), (a[2], a[1], True))) if x.target in _WHERES else (a[1], ((a[0], a[2], True),))
            for s, fill, negated in pairs:
                f = an.value(fill)
                if isinstance(s, Node) and _reaches_matmul(s) and isinstance(cond, Node):
                    if not isinstance(f, pat.Lin) or f.coeffs or not pat.is_masking(f.const):
                        return f"masking fill {f} is not -inf or <= float16's minimum"
                    return s, "fill", cond, negated, float(f.const)
        return None

    # -- rewriting --------------------------------------------------------------------

    def _rewrite(self, gm: GraphModule, m: _Match, an: pat.MaskAnalyzer, stats: Counter[str], erased: set[Node]) -> None:
        def emit(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Node:
            with gm.graph.inserting_before(m.out):
                node = gm.graph.call_function(target, args, kwargs or {})
            infer_meta(copy_meta(m.out, node))
            return node

        k = m.k
        if m.k_perm is not None:  # K = permute(k): reuse one that exists
            same = [u for u in m.k.users if u.target == aten.permute.default and list(u.args[1]) == m.k_perm]
            k = next((u for u in same if _precedes(u, m.out)), None) or emit(aten.permute.default, (m.k, m.k_perm))
        stats["kv_repeats_stripped"] += m.stripped
        causal, mask = self._mask(m, an, emit, stats, _val(m.q).shape[-2], _val(k).shape[-2])  # type: ignore[union-attr]
        stats["masks_kept"] += mask is not None
        att = emit(torch.ops.kiln.attention.default, (m.q, k, m.v), {"mask": mask, "causal": causal, "scale": m.scale})
        m.out.replace_all_uses_with(att)
        stats["nodes_removed"] += _erase_dead(gm.graph, m.out, erased)

    @staticmethod
    def _mask(m: _Match, an: pat.MaskAnalyzer, emit: Any, stats: Counter[str], tq: object, tk: object) -> tuple[bool, Node | None]:
        """``(causal, mask operand)``: the causal conjunct proven and split off, True conjuncts dropped."""
        if m.mask is None:
            return m.causal, None
        additive, factor = None, 1.0  # an additive mask as written (kept whole when nothing is proven)
        if m.mask[0] == "additive":
            _, additive, factor = m.mask
            found = pat.additive_form(an, additive)
            if found is None or not pat.is_masking(found[2] * factor):
                return m.causal, _scaled(emit, additive, factor)
            root, negated, fill = found[0], found[1], found[2] * factor
        else:
            _, root, negated, fill = m.mask
        split = pat.split_mask(an, root, negated, tq, tk)
        # split off the causal conjunct only where that is exact: with a finite fill, a row the
        # rest masks entirely is uniform over all keys, so the rest stays whole there
        proven = split.causal and (not split.kept or fill == -math.inf)
        stats["causal_masks_proven"] += proven
        stats["masks_dropped"] += split.all_true
        if not proven and not split.all_true and additive is not None:
            return m.causal, _scaled(emit, additive, factor)
        kept = split.kept if proven or split.all_true else [(root, negated)]
        if not kept:
            return m.causal or proven, None
        parts = [emit(aten.logical_not.default, (n,)) if neg else n for n, neg in kept]
        mask = parts[0]
        for part in parts[1:]:
            mask = emit(aten.logical_and.default, (mask, part))
        if fill != -math.inf:  # a finite fill stays additive (rows masked entirely stay uniform)
            mask = emit(aten.where.Scalar, (mask, 0.0, fill))
        return m.causal or proven, mask


def _operands(m: _Match) -> _Match | str:
    """Take un-repeated K/V and check the operands make a valid ``kiln.attention``."""
    rk, rv = pat.strip_repeat_kv(m.k) if m.k_perm is None else None, pat.strip_repeat_kv(m.v)
    if rk and rv and rk[1] == rv[1]:
        (m.k, _), (m.v, _), m.stripped = rk, rv, True
    q, k, v, out = _val(m.q), _val(m.k), _val(m.v), _val(m.out)
    if q is None or k is None or v is None or out is None:
        return "q, k, v need shape metadata"
    bk, hk, _, d = (k.shape[i] for i in m.k_perm or range(4))  # K's (B, H, T, D)
    if not (q.dtype == k.dtype == v.dtype == out.dtype):
        return f"q, k, v and the output differ in dtype ({q.dtype}, {k.dtype}, {v.dtype}, {out.dtype})"
    if str(hk) != str(v.shape[1]) or str(d) != str(q.shape[3]) or not str(q.shape[0]) == str(bk) == str(v.shape[0]):
        return "k and v differ in heads, or q and k in head dim, or q and v in batch"
    if isinstance(hk, int) and isinstance(q.shape[1], int) and q.shape[1] % hk:
        return f"query heads {q.shape[1]} are not a multiple of kv heads {hk}"
    return m


def _scaled(emit: Any, mask: Node, factor: float) -> Node:
    """An additive mask times the scales applied after it."""
    return mask if factor == 1.0 else emit(aten.mul.Tensor, (mask, factor))


def _precedes(a: Node, b: Node) -> bool:
    while a.op != "root" and a is not b:
        a = a.next
    return a is b


def _reaches_matmul(x: Node) -> bool:
    """Whether ``x`` is ``q @ kᵀ`` seen through casts and scalar scales (which side of a mask op is the scores)."""
    while x.op == "call_function" and (x.target in _CASTS or x.target in _SCALES) and isinstance(x.args[0], Node):
        x = x.args[0]
    return x.target == aten.matmul.default and _rank(x) == 4


def _erase_dead(g: torch.fx.Graph, start: Node, erased: set[Node]) -> int:
    """Erase ``start`` and, transitively, the operands it leaves without users."""
    work, removed = [start], 0
    while work:
        n = work.pop()
        if n in erased or n.users or n.op in ("placeholder", "output") or (n is not start and n.is_impure()):
            continue
        work.extend(n.all_input_nodes)
        g.erase_node(n)
        erased.add(n)
        removed += 1
    return removed


__all__ = ["FuseAttention"]
