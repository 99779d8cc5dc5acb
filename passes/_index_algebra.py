"""Symbolic index algebra for proving attention masks causal (used by ``_attention_patterns``).

Values are functions of index coordinates ``i_d`` (``d < 0``, counted from the right):
``Lin`` (integer affine forms), predicates (``Cmp``, ``BoolOp``, ``True``/``False``) and
``Sel`` (``a if pred else b``). See ``_attention_patterns`` for how mask subgraphs are read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Lin:
    """``sum(c * i_d for d, c in coeffs) + const``: an affine function of index coordinates."""

    coeffs: tuple[tuple[int, int], ...] = ()  # sorted (dim < 0, nonzero int coefficient)
    const: float = 0  # an int when the value is integral

    @staticmethod
    def of(coeffs: dict[int, int], const: float) -> Lin:
        if isinstance(const, float) and math.isfinite(const) and const.is_integer():
            const = int(const)
        return Lin(tuple(sorted((d, c) for d, c in coeffs.items() if c)), const)

    def plus(self, other: Lin) -> Lin | None:
        coeffs = dict(self.coeffs)
        for d, c in other.coeffs:
            coeffs[d] = coeffs.get(d, 0) + c
        const = self.const + other.const
        return None if isinstance(const, float) and math.isnan(const) else Lin.of(coeffs, const)

    def times(self, k: float) -> Lin | None:
        if self.coeffs and not float(k).is_integer():
            return None
        const = self.const * k
        return None if isinstance(const, float) and math.isnan(const) else Lin.of({d: int(c * k) for d, c in self.coeffs}, const)


@dataclass(frozen=True)
class Cmp:
    """``lin <= 0`` (``op == "le"``) or ``lin == 0`` (``op == "eq"``), over integers."""

    lin: Lin
    op: str


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and", "or", "not"
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Sel:
    """``a if pred else b``, elementwise."""

    pred: Any
    a: Any
    b: Any


Pred = bool | Cmp | BoolOp
Val = Lin | Sel | bool | Cmp | BoolOp


def is_pred(v: object) -> bool:
    return isinstance(v, (bool, Cmp, BoolOp))


def cmp(lin: Lin, op: str) -> Pred | None:
    """``lin <= 0`` or ``lin == 0``, decided where coordinates (all >= 0) settle it, else normalized."""
    if not lin.coeffs:
        return lin.const <= 0 if op == "le" else lin.const == 0
    if not isinstance(lin.const, int):
        return None  # a non-integral offset: the integer normalizations below would be wrong
    cs = [c for _, c in lin.coeffs]
    g = math.gcd(*cs)
    if op == "le":
        if max(cs) <= 0 and lin.const <= 0:
            return True
        if min(cs) >= 0 and lin.const > 0:
            return False
        # sum(c x) + k <= 0  <=>  sum(c/g x) <= floor(-k / g)  over integers
        return Cmp(Lin(tuple((d, c // g) for d, c in lin.coeffs), -(-lin.const // g)), op)
    if lin.const % g:
        return False
    sign = -1 if cs[0] < 0 else 1
    return Cmp(Lin(tuple((d, sign * c // g) for d, c in lin.coeffs), sign * lin.const // g), op)


def not_(p: Pred | None) -> Pred | None:
    if p is None or isinstance(p, bool):
        return None if p is None else not p
    if isinstance(p, Cmp) and p.op == "le":  # not (x <= 0)  <=>  -x + 1 <= 0 over integers
        return cmp(p.lin.times(-1).plus(Lin(const=1)), "le")  # type: ignore[union-attr]
    if isinstance(p, BoolOp) and p.op == "not":
        return p.args[0]
    return BoolOp("not", (p,))


def and_(a: Pred | None, b: Pred | None, op: str = "and") -> Pred | None:
    absorbing = op == "or"  # True absorbs "or", False absorbs "and"
    if a is absorbing or b is absorbing:
        return absorbing
    if a is None or b is None:
        return None
    if a is (not absorbing) or a == b:
        return b
    if b is (not absorbing):
        return a
    return BoolOp(op, (a, b))


def sel(p: Pred | None, a: Val | None, b: Val | None) -> Val | None:
    if isinstance(p, bool):
        return a if p else b
    if p is None or a is None or b is None:
        return None
    return a if a == b else Sel(p, a, b)


def num(v: Val | None) -> Val | None:
    """The value as a number (bools read as 0/1)."""
    if isinstance(v, bool):
        return Lin(const=int(v))
    return sel(v, Lin(const=1), Lin(const=0)) if is_pred(v) else v


def compare(a: Val | None, b: Val | None, op: str) -> Pred | None:
    """``a op b`` for op in le, lt, ge, gt, eq, ne."""
    a, b = num(a), num(b)
    if isinstance(a, Sel):
        return and_(and_(a.pred, compare(a.a, b, op)), and_(not_(a.pred), compare(a.b, b, op)), "or")
    if isinstance(b, Sel):
        return and_(and_(b.pred, compare(a, b.a, op)), and_(not_(b.pred), compare(a, b.b, op)), "or")
    if not isinstance(a, Lin) or not isinstance(b, Lin):
        return None
    d = a.plus(b.times(-1))  # type: ignore[arg-type]
    if d is None:
        return None
    if op == "ne":
        return not_(cmp(d, "eq"))
    if op in ("lt", "gt"):  # d < 0  <=>  d + 1 <= 0 over integers
        d = d if op == "lt" else d.times(-1)
        if d is None or not d.coeffs:
            return None if d is None else d.const < 0
        return cmp(d.plus(Lin(const=1)), "le") if isinstance(d.const, int) else None  # type: ignore[arg-type]
    return cmp(d.times(-1) if op == "ge" else d, "eq" if op == "eq" else "le")  # type: ignore[arg-type]


def as_pred(v: Val | None) -> Pred | None:
    return v if v is None or is_pred(v) else compare(v, Lin(), "ne")


def arith(a: Val | None, b: Val | None, op: str) -> Val | None:
    """``a + b`` or ``a * b`` (one side constant)."""
    a, b = num(a), num(b)
    if isinstance(a, Sel):
        return sel(a.pred, arith(a.a, b, op), arith(a.b, b, op))
    if isinstance(b, Sel):
        return sel(b.pred, arith(a, b.a, op), arith(a, b.b, op))
    if not isinstance(a, Lin) or not isinstance(b, Lin):
        return None
    if op == "add":
        return a.plus(b)
    if a.coeffs and b.coeffs:
        return None
    return a.times(b.const) if not b.coeffs else b.times(a.const)


def subst(v: Val | None, f: Callable[[int], Lin | None]) -> Val | None:
    """Replace every coordinate ``i_d`` by ``f(d)`` (a Lin in the new coordinates)."""
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, Lin):
        out: Lin | None = Lin(const=v.const)
        for d, c in v.coeffs:
            term = f(d)
            out = None if term is None or out is None else out.plus(term.times(c))  # type: ignore[arg-type]
        return out
    if isinstance(v, Cmp):
        lin = subst(v.lin, f)
        return None if lin is None else cmp(lin, v.op)  # type: ignore[arg-type]
    if isinstance(v, BoolOp):
        args = [subst(a, f) for a in v.args]
        return not_(args[0]) if v.op == "not" else and_(args[0], args[1], v.op)
    return sel(subst(v.pred, f), subst(v.a, f), subst(v.b, f))


def coord(d: int) -> Lin:
    return Lin(((d, 1),), 0)


def rename(v: Val | None, mapping: dict[int, int]) -> Val | None:
    """Move coordinate dims: ``mapping`` from old dim to new dim (both negative)."""
    return subst(v, lambda d: coord(mapping[d]) if d in mapping else None)


def causal_pred(tq: object, tk: object) -> Pred | None:
    """``i_k - i_q <= Tk - Tq`` over dims (-2, -1): queries aligned to the end of the keys."""
    if str(tq) == str(tk):
        offset = 0
    elif isinstance(tq, int) and isinstance(tk, int):
        offset = tk - tq
    else:
        return None
    return cmp(Lin(((-2, -1), (-1, 1)), -offset), "le")
