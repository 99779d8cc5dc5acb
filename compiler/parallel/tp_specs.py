"""Shard specs and per-op dimension rules for tensor and sequence parallelism.

A :class:`Shard` says which slices of one axis of a value each rank holds: rank ``r`` holds
the concatenation of the intervals ``parts[r]`` of the full axis. Even splits are one interval
per rank; GQA's replicated kv heads give ranks overlapping intervals; a fused QKV projection
gives each rank three intervals (its q, k and v heads).

:func:`operand_dims` is the op table both parallel passes read: for an FX node, how each
output dimension corresponds to each tensor operand's dimension, for ops that act on every
index of a dimension the same way (elementwise with broadcasting, permutes, unsqueezes,
slices, reductions over other dims ...). Reshapes (which scale intervals) and splits (which
shift them) have their own functions. An op missing from the table stops propagation: the
passes then report it, they never guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.fx import Node

aten = torch.ops.aten

Intervals = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Shard:
    """Axis ``dim`` of a value is split: rank ``r`` holds the intervals ``parts[r]`` (ascending), concatenated."""

    dim: int
    parts: tuple[Intervals, ...]

    @staticmethod
    def even(dim: int, size: int, world: int) -> Shard | None:
        """Contiguous equal chunks of a ``size``-long axis (None when ``world`` does not divide it)."""
        if size % world:
            return None
        n = size // world
        return Shard(dim, tuple(((r * n, (r + 1) * n),) for r in range(world)))

    def local(self, rank: int) -> int:
        """How long the axis is on ``rank``."""
        return sum(b - a for a, b in self.parts[rank])

    def at(self, dim: int) -> Shard:
        return Shard(dim, self.parts)

    def scale(self, k: int) -> Shard:
        return Shard(self.dim, tuple(tuple((a * k, b * k) for a, b in p) for p in self.parts))

    def descale(self, k: int) -> Shard | None:
        if any(a % k or b % k for p in self.parts for a, b in p):
            return None
        return Shard(self.dim, tuple(tuple((a // k, b // k) for a, b in p) for p in self.parts))

    def clip(self, lo: int, hi: int) -> Shard:
        """The part of each rank's intervals inside ``[lo, hi)``, shifted to start at 0 (a split's chunk)."""
        parts = tuple(tuple((max(a, lo) - lo, min(b, hi) - lo) for a, b in p if min(b, hi) > max(a, lo)) for p in self.parts)
        return Shard(self.dim, parts)

    def partitions(self, size: int) -> bool:
        """Whether the ranks' intervals cover ``[0, size)`` exactly once (a sum over ranks is then the full sum)."""
        cover = sorted(iv for p in self.parts for iv in p)
        pos = 0
        for a, b in cover:
            if a != pos:
                return False
            pos = b
        return pos == size

    def __str__(self) -> str:
        return f"dim {self.dim}: " + " | ".join(",".join(f"{a}:{b}" for a, b in p) for p in self.parts)


def concat(chunks: list[tuple[int, Shard | None]], dim: int, world: int) -> Shard:
    """The spec of a tensor split at ``dim`` into chunks (offset, spec of chunk; None: the chunk is unused)."""
    parts: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    for offset, spec in chunks:
        if spec is None:
            continue
        for r in range(world):
            parts[r] += [(a + offset, b + offset) for a, b in spec.parts[r]]
    return Shard(dim, tuple(tuple(p) for p in parts))


# --------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------


def val(x: object) -> torch.Tensor | None:
    v = x.meta.get("val") if isinstance(x, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def static(size: object) -> int | None:
    """``size`` as an int, or None when it is symbolic."""
    return size if isinstance(size, int) else None


def reshape_groups(a: tuple[object, ...], b: tuple[object, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Match the dims of shapes ``a`` and ``b`` (same element count) into groups of equal products.

    Size-1 dims are left out (they hold no data); a symbolic size must meet the same symbol
    alone. None when the reshape mixes a symbolic size with others.
    """
    ia = [d for d, s in enumerate(a) if static(s) != 1]
    ib = [d for d, s in enumerate(b) if static(s) != 1]
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        x, y = a[ia[i]], b[ib[j]]
        if static(x) is None or static(y) is None:
            if static(x) is not None or static(y) is not None or str(x) != str(y):
                return None
            groups.append(([ia[i]], [ib[j]]))
            i, j = i + 1, j + 1
            continue
        ga, gb, pa, pb = [ia[i]], [ib[j]], int(x), int(y)  # type: ignore[call-overload]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(ia) or static(a[ia[i]]) is None:
                    return None
                pa *= int(a[ia[i]])  # type: ignore[call-overload]
                ga.append(ia[i])
                i += 1
            else:
                if j >= len(ib) or static(b[ib[j]]) is None:
                    return None
                pb *= int(b[ib[j]])  # type: ignore[call-overload]
                gb.append(ib[j])
                j += 1
        groups.append((ga, gb))
    return groups if i == len(ia) and j == len(ib) else None


def reshape_map(src: tuple[object, ...], dst: tuple[object, ...], spec: Shard) -> Shard | str:
    """The spec of ``reshape(x, dst)`` where ``x`` (shape ``src``) has ``spec``; a reason when it is not contiguous.

    The sharded dim must be the outermost dim of its group (then each rank's slice is a
    contiguous block of the flattened group); intervals scale by the group's inner sizes.
    """
    groups = reshape_groups(src, dst)
    if groups is None:
        return f"reshape {list(src)} -> {list(dst)} mixes symbolic and static sizes"
    for ga, gb in groups:
        if spec.dim in ga:
            if spec.dim != ga[0]:
                return f"reshape {list(src)} -> {list(dst)} merges the sharded dim {spec.dim} under an outer dim"
            inner_a = math.prod(int(src[d]) for d in ga[1:])  # type: ignore[call-overload]
            inner_b = math.prod(int(dst[d]) for d in gb[1:])  # type: ignore[call-overload]
            out = spec.scale(inner_a).descale(inner_b)
            if out is None:
                return f"reshape {list(src)} -> {list(dst)} splits a rank's slice of dim {spec.dim} across rows"
            return out.at(gb[0])
    return f"reshape {list(src)} -> {list(dst)}: sharded dim {spec.dim} not found"


# --------------------------------------------------------------------------------------
# Per-op dim correspondences
# --------------------------------------------------------------------------------------

#: Ops applied to every element the same way (broadcasting binary ops included).
ELEMENTWISE = {
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode, aten.neg.default,
    aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default, aten.exp.default,
    aten.log.default, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.rsqrt.default, aten.sqrt.default,
    aten.erf.default, aten.sin.default, aten.cos.default, aten.abs.default, aten.reciprocal.default,
    aten.square.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.where.self, aten.where.ScalarSelf,
    aten.where.ScalarOther, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.maximum.default,
    aten.minimum.default, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.log1p.default,
    aten.expm1.default, aten.softplus.default, aten.hardtanh.default, aten.leaky_relu.default, aten.logical_not.default,
    aten.gelu_tanh.default if hasattr(aten, "gelu_tanh") else aten.gelu.default,
}  # fmt: skip
_REDUCE = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
_ALONG = {aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int,
          aten.cumsum.default}  # fmt: skip

DimMap = Callable[[int], "int | None"]  # output dim -> operand dim (None: the operand is broadcast there)


def _aligned(out_rank: int, x: Node, out_shape: tuple[object, ...]) -> DimMap:
    v = val(x)
    rank, shape = (v.dim(), tuple(v.shape)) if v is not None else (0, ())

    def f(d: int) -> int | None:
        e = d - (out_rank - rank)
        if e < 0 or (static(shape[e]) == 1 and static(out_shape[d]) != 1):
            return None
        return e

    return f


def operand_dims(n: Node) -> tuple[list[tuple[Node, DimMap]], set[int]] | None:
    """``([(operand, out dim -> operand dim)], out dims the op treats specially)`` for a dim-renaming op.

    None when ``n`` is not such an op (reshape, split, linear, attention and unknown ops).
    An output dim in the special set cannot be sharded (it is sliced, concatenated, or
    reduced over, or its index matters).
    """
    out = val(n)
    if n.op != "call_function" or out is None:
        return None
    t, a = n.target, n.args
    rank, shape = out.dim(), tuple(out.shape)
    ident: DimMap = lambda d: d  # noqa: E731
    per_element_quantize = t == torch.ops.kiln.quantize.default and not any(
        (a[i] if len(a) > i else n.kwargs.get(k)) is not None for i, k in ((6, "axis"), (7, "group_size"))
    )  # an activation's quantize: its scale (and zero point) broadcast like a binary op's operand
    if t in ELEMENTWISE or per_element_quantize:
        operands = [x for x in (*a, *n.kwargs.values()) if isinstance(x, Node) and val(x) is not None]
        if t == aten.type_as.default:
            operands = operands[:1]
        return [(x, _aligned(rank, x, shape)) for x in operands], set()
    if t == aten.cat.default:
        dim = (a[1] if len(a) > 1 else 0) % rank  # type: ignore[operator]
        return [(y, ident) for y in a[0] if isinstance(y, Node)], {dim}  # type: ignore[union-attr]
    x = a[0] if a else None
    if not isinstance(x, Node) or val(x) is None:
        return None
    n_in = val(x).dim()  # type: ignore[union-attr]
    if t == aten.permute.default:
        perm = [p % n_in for p in a[1]]  # type: ignore[union-attr]
        return [(x, lambda d: perm[d])], set()
    if t == aten.unsqueeze.default:
        p = a[1] % rank  # type: ignore[operator]
        return [(x, lambda d: None if d == p else d if d < p else d - 1)], {p}
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        dims = a[1] if len(a) > 1 else [i for i, s in enumerate(val(x).shape) if static(s) == 1]  # type: ignore[union-attr]
        dims = [dims] if isinstance(dims, int) else list(dims)
        kept = [i for i in range(n_in) if i % n_in not in {d % n_in for d in dims} or static(val(x).shape[i]) != 1]  # type: ignore[union-attr]
        return [(x, lambda d: kept[d])], set()
    if t == aten.slice.Tensor:
        return [(x, ident)], {(a[1] if len(a) > 1 else 0) % n_in}  # type: ignore[operator]
    if t == aten.select.int:
        dim = a[1] % n_in  # type: ignore[operator]
        return [(x, lambda d: d if d < dim else d + 1)], set()
    if t in _REDUCE:
        dims = a[1] if len(a) > 1 else n.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims or range(n_in))  # [] and None: every dim
        reduced = sorted(d % n_in for d in dims)
        keep = bool(a[2] if len(a) > 2 else n.kwargs.get("keepdim", False))
        if keep:
            return [(x, ident)], set(reduced)
        kept = [i for i in range(n_in) if i not in reduced]
        return [(x, lambda d: kept[d])], set()
    if t in _ALONG:
        return [(x, ident)], {a[1] % n_in}  # type: ignore[operator]
    if t == aten.index_select.default:
        return [(x, ident)], {a[1] % n_in}  # type: ignore[operator]
    if t == aten.expand.default:
        return [(x, _aligned(rank, x, shape))], set()
    if t == torch.ops.kiln.dynamic_scale.default and (a[2] if len(a) > 2 else n.kwargs.get("per_token", True)):
        return [(x, ident)], {n_in - 1}  # max |x| over the last dim, kept as size 1: per token
    if t in (aten.native_layer_norm.default, aten.layer_norm.default, aten.rms_norm.default):
        normalized = len(a[1])  # type: ignore[arg-type]
        return [(x, ident)], set(range(rank - normalized, rank))
    return None


def forward_dim(n: Node, operand: Node, dim: int) -> int | str:
    """The output dim of ``n`` that carries ``operand``'s dim ``dim`` (a reason when none does)."""
    rule = operand_dims(n)
    if rule is None:
        return f"no sharding rule for {n.target}"
    maps, special = rule
    rank = val(n).dim()  # type: ignore[union-attr]
    for x, f in maps:
        if x is operand:
            hits = [d for d in range(rank) if f(d) == dim]
            if len(hits) == 1 and hits[0] not in special:
                return hits[0]
            return f"{n.target} reduces, slices or concatenates along the sharded dim {dim}"
    return f"{operand.name} is not a sharded operand of {n.target}"


__all__ = ["ELEMENTWISE", "Intervals", "Shard", "concat", "forward_dim", "operand_dims", "reshape_groups", "reshape_map",
           "static", "val"]  # fmt: skip
