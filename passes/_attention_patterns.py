"""Mask and K/V analysis for ``fuse-attention``: prove masks causal, strip repeated K/V.

A mask is claimed causal only with a proof for every token count. The proof is symbolic:
each value of the mask's construction subgraph is read as a function of its own index
coordinates ``i_d`` (``d < 0``, counted from the right, so broadcasting aligns for free):

- ``Lin``: ``sum(c_d * i_d) + const`` with integer ``c_d`` (``arange``, positions, constants);
- a predicate: ``True``/``False``, ``Cmp`` (``lin <= 0`` or ``lin == 0`` over integers),
  or ``BoolOp`` (``and``/``or``/``not``);
- ``Sel``: ``a if pred else b`` (``where``, ``masked_fill``, ``triu``/``tril``, bool -> number).

Coordinates of size-1 dims are replaced by 0 after every op, so an expression only names
dims that vary. Index arithmetic is trusted only in integer dtypes (floats round). ``arange``, ``unsqueeze``/``squeeze``/``permute``/``expand``/``reshape``
(of unit dims), ``slice``/``select``/``index`` (indices proven in range), ``+ - *``,
comparisons, logic, casts, ``full``-style constants, ``where``/``masked_fill``,
``triu``/``tril``, ``cumsum`` of a constant and ``diff`` of an affine sequence are
interpreted; anything else (a user input, a data-dependent value) is unknown, and unknown
never proves anything. Constant tensors are lifted only when a concrete check shows they
are exactly a band pattern (``j - i <= k`` or ``j - i >= k``) or an ``arange``.

A mask is causal when its attend-predicate is exactly ``i_k - i_q <= Tk - Tq`` over dims
(-2, -1) of sizes (Tq, Tk): HF transformers' ``kv_idx <= q_idx`` (with the packed-sequence
term ``cumsum(diff(arange) != 1)`` equal on both sides, hence ``True``), ``~triu(ones, 1)``,
``tril(ones) != 0``, a lifted ``tril`` buffer sliced from 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from kiln.ir import meta_val
from kiln.passes._index_algebra import (  # noqa: F401  (re-exported for fuse-attention)
    BoolOp,
    Cmp,
    Lin,
    Pred,
    Sel,
    Val,
    and_,
    arith,
    as_pred,
    causal_pred,
    cmp,
    compare,
    coord,
    is_pred,
    not_,
    num,
    rename,
    sel,
    subst,
)

aten = torch.ops.aten

#: Fill values whose softmax weight is exactly 0 in fp32 (-inf, or at most float16's minimum).
NEG_LIMIT = float(torch.finfo(torch.float16).min)



# --------------------------------------------------------------------------------------
# The interpreter
# --------------------------------------------------------------------------------------


def _same(a: object, b: object) -> bool:
    return str(a) == str(b)


def _same_shape(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """An operand by position or keyword."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _unit_dims(shape: tuple[Any, ...]) -> list[int]:
    return [d for d in range(len(shape)) if isinstance(shape[d], int) and shape[d] == 1]


def lift_constant(t: torch.Tensor) -> Val | None:
    """A constant as a symbolic value, when a concrete check proves its pattern."""
    t = t.detach()
    if t.device.type == "meta" or t.numel() > 1 << 26:
        return None
    if t.numel() == 1:
        x = t.item()
        return bool(x) if t.dtype == torch.bool else Lin.of({}, x)
    body = t.reshape([s for s in t.shape if s != 1])  # the dims that vary
    if body.dim() == 1 and not t.dtype.is_floating_point and t.dtype != torch.bool:
        step = int(body[1] - body[0])
        if torch.equal(body, body[0] + step * torch.arange(body.numel(), dtype=body.dtype)):
            return Lin.of({-1: step}, int(body[0])) if t.shape[-1] == body.numel() else None
    if body.dim() != 2 or body.shape != t.shape[-2:] or torch.isnan(body.float()).any():
        return None
    values = torch.unique(body)
    if values.numel() == 1:
        return lift_constant(values[:1])
    if values.numel() != 2:
        return None
    rows, cols = body.shape
    diag = torch.arange(cols)[None, :] - torch.arange(rows)[:, None]  # j - i
    hit = body == values[0]
    hi, lo = int(diag[hit].max()), int(diag[hit].min())
    if torch.equal(hit, diag <= hi):
        p = cmp(Lin(((-2, -1), (-1, 1)), -hi), "le")  # j - i <= hi
    elif torch.equal(hit, diag >= lo):
        p = cmp(Lin(((-2, 1), (-1, -1)), lo), "le")  # j - i >= lo
    else:
        return None
    if t.dtype == torch.bool:
        return p if bool(values[0]) else not_(p)
    return sel(p, Lin.of({}, values[0].item()), Lin.of({}, values[1].item()))


_ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}
_SOURCES = _ARANGES | {
    aten.ones.default, aten.new_ones.default, aten.ones_like.default, aten.zeros.default, aten.new_zeros.default,
    aten.zeros_like.default, aten.full.default, aten.new_full.default, aten.full_like.default, aten.scalar_tensor.default,
}
_LOGIC = {aten.logical_and.default: "and", aten.bitwise_and.Tensor: "and", aten.__and__.Tensor: "and",
          aten.logical_or.default: "or", aten.bitwise_or.Tensor: "or", aten.__or__.Tensor: "or"}
_WHERE = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar}
_COMPARE = {getattr(aten, c).Tensor: c for c in ("le", "lt", "ge", "gt", "eq", "ne")}
_COMPARE |= {getattr(aten, c).Scalar: c for c in ("le", "lt", "ge", "gt", "eq", "ne")}
#: The ops the interpreter reads; any other op makes its value unknown.
_INTERPRETED = _SOURCES | set(_LOGIC) | _WHERE | set(_COMPARE) | {
    aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default, aten.lift_fresh_copy.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default,
    aten.reshape.default, aten.view.default, aten.permute.default, aten.numpy_T.default, aten.slice.Tensor, aten.select.int, aten.index.Tensor,
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor,
    aten.mul.Tensor, aten.mul.Scalar, aten.neg.default, aten.logical_not.default, aten.bitwise_not.default,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default, aten.masked_fill.Scalar,
    aten.masked_fill.Tensor, aten.triu.default, aten.tril.default, aten.cumsum.default, aten.diff.default,
}  # fmt: skip


class MaskAnalyzer:
    """Symbolic values of mask-construction nodes (memoized; ``None`` = unknown)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.memo: dict[Node, Val | None] = {}
        self.depth = 0  # nesting of value() calls

    def value(self, x: object) -> Val | None:
        if isinstance(x, bool):
            return x
        if isinstance(x, (int, float)):
            return Lin.of({}, x)
        if not isinstance(x, Node):
            return None
        if x not in self.memo:
            if self.depth > 200:  # a chain this deep is not mask construction: unknown, not memoized
                return None
            self.depth += 1
            try:
                v = self._eval(x)
            finally:
                self.depth -= 1
            out = meta_val(x)
            if v is not None and out is not None:
                shape = tuple(out.shape)
                unit = {d - len(shape) for d in _unit_dims(shape)}
                v = subst(v, lambda d: Lin() if d in unit else coord(d) if d >= -len(shape) else None)
                if out.dtype == torch.bool:
                    v = as_pred(v)
                elif out.dtype.is_floating_point and _varies(v):
                    v = None  # float arithmetic on indices rounds (arange + 1e20): only integers are exact
            self.memo[x] = v
        return self.memo[x]

    def _eval(self, n: Node) -> Val | None:  # noqa: C901 - one dispatch table, read top to bottom
        out = meta_val(n)
        if n.op == "get_attr":
            obj: Any = self.gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part, None)
            return lift_constant(obj) if isinstance(obj, torch.Tensor) else None
        if n.op != "call_function" or out is None or n.target not in _INTERPRETED:
            return None
        t, a = n.target, n.args
        rank = out.dim()
        src = meta_val(a[0]) if a else None
        v0 = self.value(a[0]) if a else None
        if v0 is None and t not in _LOGIC and t not in _SOURCES and t not in _WHERE:
            return None  # everything below needs its first operand
        if t in (aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default, aten.lift_fresh_copy.default):
            return v0
        if t in _ARANGES:
            start, step = (0, 1) if t == aten.arange.default else (a[0], arg(n, 2, "step", 1))
            if type(start) is int and type(step) is int:
                return Lin.of({-1: step}, start)
            return None
        if t in (aten.ones.default, aten.new_ones.default, aten.ones_like.default):
            return True if out.dtype == torch.bool else Lin(const=1)
        if t in (aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default):
            return False if out.dtype == torch.bool else Lin(const=0)
        if t in (aten.full.default, aten.new_full.default, aten.full_like.default, aten.scalar_tensor.default):
            fill = a[0] if t == aten.scalar_tensor.default else a[1] if t != aten.new_full.default else a[2]
            return self.value(fill)
        if src is None:
            return None
        n_in = src.dim()
        if t == aten.unsqueeze.default:
            p = a[1] % rank
            return rename(v0, {e: (e if n_in + e >= p else e - 1) for e in range(-n_in, 0)})
        if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.reshape.default,
                 aten.view.default):
            keep_in = [d for d in range(n_in) if d not in _unit_dims(tuple(src.shape))]
            keep_out = [d for d in range(rank) if d not in _unit_dims(tuple(out.shape))]
            if t == aten.expand.default:
                return v0  # broadcasting: new and unit dims are not named by v0
            if not _same_shape([src.shape[i] for i in keep_in], [out.shape[o] for o in keep_out]):
                return None
            return rename(v0, {i - n_in: o - rank for i, o in zip(keep_in, keep_out, strict=True)})
        if t in (aten.permute.default, aten.numpy_T.default):
            perm = a[1] if t == aten.permute.default else range(n_in - 1, -1, -1)
            return rename(v0, {p % n_in - n_in: j - rank for j, p in enumerate(perm)})
        if t == aten.slice.Tensor:
            dim, start, step = arg(n, 1, "dim", 0) % n_in - n_in, arg(n, 2, "start", None) or 0, arg(n, 4, "step", 1)
            if type(start) is not int or start < 0 or type(step) is not int or step < 1:
                return None
            return subst(v0, lambda d: Lin(((d, step),), start) if d == dim else coord(d))
        if t == aten.select.int:
            dim, idx = a[1] % n_in - n_in, a[2]
            if type(idx) is not int or idx < 0:
                return None
            return subst(v0, lambda d: Lin(const=idx) if d == dim else coord(d if d > dim else d + 1))
        if t == aten.index.Tensor:
            return self._index(n, v0, src)
        if t in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor):
            if arg(n, 2, "alpha", 1) != 1:
                return None
            b = self.value(a[1])
            if t in (aten.sub.Tensor, aten.sub.Scalar):
                b = arith(b, Lin(const=-1), "mul")
            elif t in (aten.rsub.Scalar, aten.rsub.Tensor):
                v0, b = b, arith(v0, Lin(const=-1), "mul")
            return arith(v0, b, "add")
        if t in (aten.mul.Tensor, aten.mul.Scalar):
            b = self.value(a[1])
            return and_(as_pred(v0), as_pred(b)) if out.dtype == torch.bool else arith(v0, b, "mul")
        if t == aten.neg.default:
            return arith(v0, Lin(const=-1), "mul")
        if t in _COMPARE:
            return compare(v0, self.value(a[1]), _COMPARE[t])
        if t == aten.logical_not.default or (t == aten.bitwise_not.default and src.dtype == torch.bool):
            return not_(as_pred(v0))
        if t in _LOGIC and src.dtype == torch.bool and (meta_val(a[1]) is None or meta_val(a[1]).dtype == torch.bool):  # type: ignore[union-attr]
            return and_(as_pred(v0), as_pred(self.value(a[1])), _LOGIC[t])
        if t in (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default):
            if out.dtype == torch.bool:
                return as_pred(v0)
            return num(v0) if out.dtype.is_floating_point or _integral(v0) else None
        if t in _WHERE:
            return self._where(self.value(a[0]), self.value(a[1]), self.value(a[2]), out.dtype)
        if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            return self._where(self.value(a[1]), self.value(a[2]), v0, out.dtype)
        if t in (aten.triu.default, aten.tril.default):
            k = arg(n, 1, "diagonal", 0)
            if type(k) is not int:
                return None
            band = Lin(((-2, 1), (-1, -1)), k) if t == aten.triu.default else Lin(((-2, -1), (-1, 1)), -k)
            return self._where(cmp(band, "le"), v0, Lin(), out.dtype)
        if t == aten.cumsum.default:
            c = num(v0)
            if isinstance(c, Lin) and not c.coeffs and isinstance(c.const, int):
                return Lin.of({a[1] % n_in - n_in: c.const}, c.const)
            return None
        if t == aten.diff.default:
            return self._diff(n, num(v0), src)
        return None

    @staticmethod
    def _where(c: Val | None, x: Val | None, y: Val | None, dtype: torch.dtype) -> Val | None:
        c = as_pred(c)
        if dtype == torch.bool:
            return and_(and_(c, as_pred(x)), and_(not_(c), as_pred(y)), "or")
        return sel(c, num(x), num(y))

    def _index(self, n: Node, v0: Val | None, src: torch.Tensor) -> Val | None:
        indices, out = n.args[1], meta_val(n)
        m, n_in = len(indices), src.dim()
        if out is None or any(i is None or meta_val(i) is None or meta_val(i).dtype in (torch.bool, torch.uint8) for i in indices):  # type: ignore[union-attr]
            return None
        trailing = n_in - m
        terms: dict[int, Lin] = {}
        for k, idx in enumerate(indices):
            iv, ishape = self.value(idx), tuple(meta_val(idx).shape)  # type: ignore[union-attr]
            if not isinstance(iv, Lin) or not _in_range(iv, ishape, src.shape[k]):
                return None
            shifted = subst(iv, lambda d: coord(d - trailing))
            if shifted is None:
                return None
            terms[k - n_in] = shifted  # type: ignore[assignment]
        return subst(v0, lambda d: terms.get(d, coord(d) if d >= -trailing else None))

    def _diff(self, n: Node, v0: Val | None, src: torch.Tensor) -> Val | None:
        order, dim = arg(n, 1, "n", 1), arg(n, 2, "dim", -1) % src.dim() - src.dim()
        prepend, append = arg(n, 3, "prepend"), arg(n, 4, "append")
        if order != 1 or append is not None or not isinstance(v0, Lin):
            return None
        step = dict(v0.coeffs).get(dim, 0)
        if prepend is not None:
            p, pval = self.value(prepend), meta_val(prepend)
            first = subst(v0, lambda d: Lin() if d == dim else coord(d))
            if pval is None or pval.shape[dim] != 1 or first is None or arith(first, arith(p, Lin(const=-1), "mul"), "add") != Lin.of({}, step):
                return None
        return Lin.of({}, step)


def _varies(v: Val | None) -> bool:
    """Whether a numeric value depends on coordinates other than through predicates."""
    if isinstance(v, Lin):
        return bool(v.coeffs)
    return isinstance(v, Sel) and (_varies(v.a) or _varies(v.b))


def _integral(v: Val | None) -> bool:
    if isinstance(v, Lin):
        return isinstance(v.const, int)
    if isinstance(v, Sel):
        return _integral(v.a) and _integral(v.b)
    return v is not None


def _is_bool(x: object) -> bool:
    val = meta_val(x)
    return val is not None and val.dtype == torch.bool


def _in_range(iv: Lin, shape: tuple[Any, ...], size: object) -> bool:
    """Whether index values ``iv`` over coordinates of ``shape`` lie in ``[0, size)`` (no wrap-around)."""
    if not iv.coeffs:
        return isinstance(iv.const, int) and iv.const >= 0 and (iv.const == 0 or (isinstance(size, int) and iv.const < size))
    if len(iv.coeffs) == 1 and iv.coeffs[0][1] == 1 and iv.const == 0:
        d = iv.coeffs[0][0]
        return -d <= len(shape) and _same(shape[d], size)
    return False


# --------------------------------------------------------------------------------------
# Masks: split a boolean mask into its causal part and the rest
# --------------------------------------------------------------------------------------

_ANDS = {aten.logical_and.default, aten.bitwise_and.Tensor, aten.__and__.Tensor}
_ORS = {aten.logical_or.default, aten.bitwise_or.Tensor, aten.__or__.Tensor}
_NOTS = {aten.logical_not.default, aten.bitwise_not.default}


@dataclass
class MaskSplit:
    """A boolean attend-mask ``attend = root`` (or ``~root``) as ``causal AND kept leaves``."""

    causal: bool  # the mask contains the causal predicate as a conjunct
    kept: list[tuple[Node, bool]]  # leaves to keep as the mask operand: (node, negated)
    all_true: bool  # every conjunct is True: the mask is a no-op


def split_mask(an: MaskAnalyzer, root: Node, negated: bool, tq: object, tk: object) -> MaskSplit:
    """Conjuncts of the attend-predicate ``root`` (``not root`` when ``negated``), classified.

    A conjunct is dropped when it is True for every index, marks the mask causal when it is
    exactly :func:`causal_pred` over dims of sizes (Tq, Tk), and is kept otherwise.
    """
    leaves: list[tuple[Node, bool]] = []

    def walk(x: Node, neg: bool) -> None:
        if x.op == "call_function" and x.target == aten.expand.default and _is_bool(x):
            walk(x.args[0], neg)  # type: ignore[arg-type]
        elif x.op == "call_function" and x.target in (_ORS if neg else _ANDS) and all(_is_bool(y) for y in x.args[:2]):
            walk(x.args[0], neg)  # type: ignore[arg-type]
            walk(x.args[1], neg)  # type: ignore[arg-type]
        elif x.op == "call_function" and x.target in _NOTS and _is_bool(x.args[0]):
            walk(x.args[0], not neg)  # type: ignore[arg-type]
        else:
            leaves.append((x, neg))

    walk(root, negated)
    causal = causal_pred(tq, tk)
    split = MaskSplit(causal=False, kept=[], all_true=True)
    implied: list[tuple[Node, bool]] = []  # j - i <= c with c >= Tk - Tq: true wherever causal is
    for leaf, neg in leaves:
        p = as_pred(an.value(leaf))
        p = not_(p) if neg else p
        val = meta_val(leaf)
        if p is True:
            continue
        split.all_true = False
        on_scores = val is not None and val.dim() >= 2 and _same(val.shape[-2], tq) and _same(val.shape[-1], tk)
        if causal is not None and p == causal and on_scores:
            split.causal = True
        elif isinstance(causal, Cmp) and isinstance(p, Cmp) and p.op == "le" and p.lin.coeffs == causal.lin.coeffs and p.lin.const <= causal.lin.const and on_scores:
            implied.append((leaf, neg))
        else:
            split.kept.append((leaf, neg))
    if not split.causal:
        split.kept += implied
    return split


def additive_form(an: MaskAnalyzer, mask: Node) -> tuple[Node, bool, float] | None:
    """``(root, negated, fill)`` when additive ``mask`` is ``where(attend, 0, fill)`` with a masking fill."""
    t, a = mask.target, mask.args
    if t in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar):
        c, x, y = a[0], an.value(a[1]), an.value(a[2])
    elif t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        c, x, y = a[1], an.value(a[2]), an.value(a[0])  # masked_fill(y, c, x) = where(c, x, y)
    else:
        return None
    if not isinstance(c, Node):
        return None
    for negated, zero, fill in ((False, x, y), (True, y, x)):  # attend where c (or where ~c)
        if zero == Lin() and isinstance(fill, Lin) and not fill.coeffs and is_masking(fill.const):
            return c, negated, float(fill.const)
    return None


def is_masking(fill: float) -> bool:
    """Whether adding (or filling with) ``fill`` gives a softmax weight of exactly 0."""
    return fill == -math.inf or fill <= NEG_LIMIT


# --------------------------------------------------------------------------------------
# Grouped-query attention: repeated K/V
# --------------------------------------------------------------------------------------


def strip_repeat_kv(x: Node) -> tuple[Node, int] | None:
    """``(base, n_rep)`` when ``x`` (B, H*n, T, D) repeats each head of ``base`` (B, H, T, D) n times in place.

    Recognizes ``repeat_kv`` (``reshape(expand(unsqueeze(base, 2)))``, HF's) and
    ``repeat_interleave(base, n, dim=1)``; both map query head ``h`` to kv head ``h // n``.
    """
    out = meta_val(x)
    if out is None or out.dim() != 4 or x.op != "call_function":
        return None
    if x.target == aten.repeat_interleave.self_int and type(x.args[1]) is int and arg(x, 2, "dim") in (1, -3):
        base, n = x.args[0], x.args[1]
        bv = meta_val(base)
        if bv is None or bv.dim() != 4 or not _same(out.shape[1], bv.shape[1] * n):
            return None
        return base, n  # type: ignore[return-value]
    if x.target != aten.reshape.default or not isinstance(x.args[0], Node) or x.args[0].target != aten.expand.default:
        return None
    expand = x.args[0]
    unsq = expand.args[0]
    if not isinstance(unsq, Node) or unsq.target not in (aten.unsqueeze.default, aten.reshape.default):
        return None
    base = unsq.args[0]
    ev, uv, bv = meta_val(expand), meta_val(unsq), meta_val(base)
    if ev is None or uv is None or bv is None or bv.dim() != 4 or uv.dim() != 5 or not _same(uv.shape[2], 1):
        return None
    b, h, t, d = bv.shape
    if not _same_shape(uv.shape, (b, h, 1, t, d)):
        return None
    n = ev.shape[2]
    if type(n) is not int or not _same_shape(ev.shape, (b, h, n, t, d)):
        return None
    if not _same_shape(out.shape, (b, h * n, t, d)):
        return None
    return base, n  # type: ignore[return-value]


__all__ = ["MaskAnalyzer", "MaskSplit", "additive_form", "arg", "causal_pred", "is_masking", "meta_val", "split_mask", "strip_repeat_kv"]
