"""kiln's quantization operators: ``kiln::quantize``, ``kiln::dequantize``, ``kiln::dynamic_scale``
and the ``kiln::qlinear_*`` variants, each with one plain-torch reference.

Semantics follow ONNX ``QuantizeLinear`` / ``DequantizeLinear`` (opset 21: ``axis`` and
``block_size``): ``q = saturate(round_half_even(x / scale) + zero_point)``,
``x' = (q - zero_point) * scale``; float8 codes are ``saturate(x / scale)`` cast to e4m3.
Scale shapes are those of :mod:`kiln.quantize.config` (``()``, ``(x.shape[axis],)``,
``(..., K // group_size)``, or anything broadcasting to ``x`` such as a per-token ``(..., 1)``).

The ``qlinear`` variants are what the lowering pass (``lower-qdq``) folds Q/DQ + linear into,
each the contract of a kernel (Triton kernels register for CUDA later and must match):

============== ================================ ========================================
op             weight                            activation
============== ================================ ========================================
qlinear_w8a16  int8 (N, K), scale (), (N,),      the model's float dtype
               (N, K//g)
qlinear_w4a16  uint8 (N, K//2): two unsigned      the model's float dtype
               int4 codes per byte along K
               (see :func:`pack_int4`),
               scale/zero (N, K//g)
qlinear_w8a8   int8 (N, K), scale () or (N,)      int8 codes with per-token (..., 1) or
                                                  per-tensor () scale
qlinear_fp8    e4m3 (N, K), scale () or (N,)      e4m3 codes + scale, or float (weight-only)
============== ================================ ========================================

Each reference is literally ``linear(dequantize(x), dequantize(w), bias)``: the lowered graph
computes what the Q/DQ graph computes (tests check both ways).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Node

from kiln.ir import meta_val
from kiln.ops import invariant

# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


def _as(x: Tensor, scale: Tensor, axis: int | None, group_size: int | None) -> tuple[Tensor, Tensor]:
    """``x`` and ``scale`` reshaped so they broadcast: per axis, per group, or as given."""
    if axis is not None:
        axis = axis % x.dim()
        shape = [1] * x.dim()
        shape[axis] = -1
        return x, scale.reshape(shape)
    if group_size is not None:
        k = x.shape[-1]
        xg = x.reshape(*x.shape[:-1], k // group_size, group_size)  # (..., K/g, g)
        return xg, scale.unsqueeze(-1)  # (..., K/g, 1)
    return x, scale


def quantize_reference(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, dtype: torch.dtype,
    axis: int | None = None, group_size: int | None = None,
) -> Tensor:
    """The plain-torch reference of ``kiln::quantize`` (fp32 math)."""
    xs, s = _as(x.float(), scale.float(), axis, group_size)
    if dtype.is_floating_point:
        q = (xs / s).clamp(qmin, qmax).to(dtype)
    else:
        q = torch.round(xs / s)
        if zero_point is not None:
            q = q + _as(x, zero_point.float(), axis, group_size)[1]
        q = q.clamp(qmin, qmax).to(dtype)
    return q.reshape(x.shape)


def dequantize_reference(
    q: Tensor, scale: Tensor, zero_point: Tensor | None = None, axis: int | None = None,
    group_size: int | None = None, out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The plain-torch reference of ``kiln::dequantize`` (fp32 math, result in ``out_dtype``)."""
    qs, s = _as(q.float(), scale.float(), axis, group_size)
    if zero_point is not None:
        qs = qs - _as(q, zero_point.float(), axis, group_size)[1]
    return (qs * s).reshape(q.shape).to(out_dtype)


def _int4_blocks(k: int) -> tuple[int, int]:
    """``(K of the whole 8-code words, codes in the last partial block)`` for ``k`` codes."""
    return k - k % 8, k % 8


def pack_int4(u: Tensor) -> Tensor:
    """Unsigned 4-bit codes ``u`` (..., K) in [0, 15], K even -> bytes (..., K // 2).

    K is cut into blocks of 8 codes, one little-endian 32-bit word each: byte ``i`` of block ``j``
    holds code ``8j + i`` in its low nibble and code ``8j + 4 + i`` in its high nibble (a last
    block of ``L < 8`` codes: byte ``i`` holds codes ``i`` and ``L/2 + i``). With this order one
    ``and`` of a word gives codes ``8j .. 8j+3`` and one shift-and gives ``8j+4 .. 8j+7``, each
    already next to its K neighbour, which is what the GPU kernels dequantize two at a time.
    ONNX MatMulNBits stores ``(2i, 2i+1)`` per byte instead: repack through :func:`unpack_int4`.
    """
    u = u.to(torch.uint8)
    k = u.shape[-1]
    if k % 2:
        raise ValueError(f"int4 codes pack two per byte: K must be even, got {k}")
    full, tail = _int4_blocks(k)
    blocks = u[..., :full].reshape(*u.shape[:-1], full // 8, 2, 4)  # (..., words, lo/hi, byte)
    parts = [((blocks[..., 0, :] & 0xF) | (blocks[..., 1, :] << 4)).flatten(-2)]
    if tail:
        t = u[..., full:].reshape(*u.shape[:-1], 2, tail // 2)
        parts.append((t[..., 0, :] & 0xF) | (t[..., 1, :] << 4))
    return torch.cat(parts, dim=-1)


def unpack_int4(p: Tensor) -> Tensor:
    """Bytes (..., K // 2) -> unsigned 4-bit codes (..., K) as uint8 (inverse of :func:`pack_int4`)."""
    full, tail = _int4_blocks(2 * p.shape[-1])
    words = p[..., : full // 2].reshape(*p.shape[:-1], full // 8, 4)
    parts = [torch.stack((words & 0xF, words >> 4), dim=-2).flatten(-3)]  # (..., words, lo/hi, byte)
    if tail:
        t = p[..., full // 2 :]
        parts.append(torch.cat((t & 0xF, t >> 4), dim=-1))
    return torch.cat(parts, dim=-1)


def _weight_axis(w_scale: Tensor, group_size: int | None) -> int | None:
    return 0 if group_size is None and w_scale.dim() == 1 else None


# --------------------------------------------------------------------------------------
# kiln::quantize / kiln::dequantize / kiln::dynamic_scale
# --------------------------------------------------------------------------------------


@torch.library.custom_op("kiln::quantize", mutates_args=())
def quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, dtype: torch.dtype,
    axis: int | None = None, group_size: int | None = None,
) -> Tensor:
    """Codes of ``x``: ``clamp(round(x / scale) + zero_point, qmin, qmax)`` in ``dtype`` (int8 or e4m3).

    ``axis``: ``scale`` is 1-D along that axis. ``group_size``: ``scale`` is (..., K // g)
    over groups of the last axis. Neither: ``scale`` broadcasts to ``x`` (``()``, ``(..., 1)``).
    """
    return quantize_reference(x, scale, zero_point, qmin, qmax, dtype, axis, group_size)


@quantize.register_fake
def _quantize_fake(x, scale, zero_point, qmin, qmax, dtype, axis=None, group_size=None):
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("kiln::dequantize", mutates_args=())
def dequantize(
    q: Tensor, scale: Tensor, zero_point: Tensor | None = None, axis: int | None = None,
    group_size: int | None = None, out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(q - zero_point) * scale`` in ``out_dtype``; ``axis`` / ``group_size`` as in ``kiln::quantize``."""
    return dequantize_reference(q, scale, zero_point, axis, group_size, out_dtype)


@dequantize.register_fake
def _dequantize_fake(q, scale, zero_point=None, axis=None, group_size=None, out_dtype=torch.float32):
    return q.new_empty(q.shape, dtype=out_dtype)


def dynamic_scale_reference(x: Tensor, qmax: float, per_token: bool = True) -> Tensor:
    """The plain-torch reference of ``kiln::dynamic_scale``: ``max|x| / qmax`` (fp32, never 0)."""
    a = x.detach().float().abs()
    amax = a.amax(dim=-1, keepdim=True) if per_token else a.amax()  # (..., 1) or ()
    return amax.clamp(min=1e-8) / qmax


@torch.library.custom_op("kiln::dynamic_scale", mutates_args=())
def dynamic_scale(x: Tensor, qmax: float, per_token: bool = True) -> Tensor:
    """Symmetric run-time scale of ``x``: per token (..., 1) or per tensor (), as float32."""
    return dynamic_scale_reference(x, qmax, per_token)


@dynamic_scale.register_fake
def _dynamic_scale_fake(x, qmax, per_token=True):
    shape = (*x.shape[:-1], 1) if per_token else ()
    return x.new_empty(shape, dtype=torch.float32)


def _check_scale(x: Tensor, scale: Tensor, axis: int | None, group_size: int | None, what: str) -> str | None:
    if axis is not None:
        if scale.dim() != 1 or str(scale.shape[0]) != str(x.shape[axis]):
            return f"{what} per axis {axis} needs a scale of shape ({x.shape[axis]},), got {tuple(scale.shape)}"
        return None
    if group_size is not None:
        k = x.shape[-1]
        if isinstance(k, int) and k % group_size:
            return f"group size {group_size} does not divide the last dimension {k}"
        want = (*x.shape[:-1], k // group_size)
        if scale.dim() != len(want) or any(str(a) != str(b) for a, b in zip(scale.shape, want, strict=True)):
            return f"{what} per group of {group_size} needs a scale of shape {tuple(want)}, got {tuple(scale.shape)}"
        return None
    if scale.dim() > x.dim():
        return f"{what} scale {tuple(scale.shape)} does not broadcast to {tuple(x.shape)}"
    return None


@invariant(torch.ops.kiln.quantize.default)
def _quantize_invariant(node: Node) -> str | None:
    x, scale, zp = (meta_val(a) for a in node.args[:3])
    qmin, qmax, dtype = node.args[3:6]
    axis, group = node.kwargs.get("axis"), node.kwargs.get("group_size")
    if x is None or scale is None:
        return "x and scale need shape metadata"
    if not x.dtype.is_floating_point:
        return f"quantize takes a float tensor, got {x.dtype}"
    if qmin >= qmax:  # type: ignore[operator]
        return f"empty code range [{qmin}, {qmax}]"
    if dtype == torch.int8 and not (-128 <= qmin and qmax <= 127):  # type: ignore[operator]
        return f"code range [{qmin}, {qmax}] does not fit int8"
    if zp is not None and (zp.dtype.is_floating_point or tuple(zp.shape) != tuple(scale.shape)):
        return f"zero point must be an integer tensor shaped like the scale {tuple(scale.shape)}"
    return _check_scale(x, scale, axis, group, "quantize")  # type: ignore[arg-type]


@invariant(torch.ops.kiln.dequantize.default)
def _dequantize_invariant(node: Node) -> str | None:
    q, scale = meta_val(node.args[0]), meta_val(node.args[1])
    axis, group = node.kwargs.get("axis"), node.kwargs.get("group_size")
    if q is None or scale is None:
        return "q and scale need shape metadata"
    if not (q.dtype in (torch.int8, torch.uint8, torch.int32) or q.dtype == torch.float8_e4m3fn):
        return f"dequantize takes int8/uint8/int32/e4m3 codes, got {q.dtype}"
    return _check_scale(q, scale, axis, group, "dequantize")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# kiln::qlinear_* — Q/DQ + linear folded: the contracts of the quantized GEMM kernels.
# --------------------------------------------------------------------------------------


def qlinear_w8a16_reference(
    x: Tensor, w: Tensor, w_scale: Tensor, w_zero_point: Tensor | None, group_size: int | None, bias: Tensor | None
) -> Tensor:
    """``linear(x, dequantize(w), bias)`` with int8 ``w`` (N, K)."""
    wd = dequantize_reference(w, w_scale, w_zero_point, _weight_axis(w_scale, group_size), group_size, x.dtype)
    return F.linear(x, wd, bias)


@torch.library.custom_op("kiln::qlinear_w8a16", mutates_args=())
def qlinear_w8a16(
    x: Tensor, w: Tensor, w_scale: Tensor, w_zero_point: Tensor | None, group_size: int | None, bias: Tensor | None
) -> Tensor:
    """Weight-only int8 linear: ``x (..., K)`` float, ``w (N, K)`` int8, scale ``()``/``(N,)``/``(N, K//g)``."""
    return qlinear_w8a16_reference(x, w, w_scale, w_zero_point, group_size, bias)


@qlinear_w8a16.register_fake
def _qlinear_w8a16_fake(x, w, w_scale, w_zero_point, group_size, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def qlinear_w4a16_reference(
    x: Tensor, w: Tensor, w_scale: Tensor, w_zero_point: Tensor | None, group_size: int, bias: Tensor | None
) -> Tensor:
    """``linear(x, (unpack(w) - zero) * scale, bias)``; zero point ``None`` means 8 (symmetric int4)."""
    u = unpack_int4(w)  # (N, K) uint8 in [0, 15]
    zp = w_zero_point if w_zero_point is not None else torch.full_like(w_scale, 8, dtype=torch.uint8)
    wd = dequantize_reference(u, w_scale, zp, None, group_size, x.dtype)
    return F.linear(x, wd, bias)


@torch.library.custom_op("kiln::qlinear_w4a16", mutates_args=())
def qlinear_w4a16(
    x: Tensor, w: Tensor, w_scale: Tensor, w_zero_point: Tensor | None, group_size: int, bias: Tensor | None
) -> Tensor:
    """Weight-only int4 linear, group-wise: ``w (N, K//2)`` packed uint8, scale and zero point ``(N, K//g)``."""
    return qlinear_w4a16_reference(x, w, w_scale, w_zero_point, group_size, bias)


@qlinear_w4a16.register_fake
def _qlinear_w4a16_fake(x, w, w_scale, w_zero_point, group_size, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def qlinear_w8a8_reference(
    x: Tensor, x_scale: Tensor, x_zero_point: Tensor | None, w: Tensor, w_scale: Tensor, bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """``linear(dequantize(x), dequantize(w), bias)`` with int8 codes on both sides."""
    xd = dequantize_reference(x, x_scale, x_zero_point, None, None, out_dtype)
    wd = dequantize_reference(w, w_scale, None, _weight_axis(w_scale, None), None, out_dtype)
    return F.linear(xd, wd, bias)


@torch.library.custom_op("kiln::qlinear_w8a8", mutates_args=())
def qlinear_w8a8(
    x: Tensor, x_scale: Tensor, x_zero_point: Tensor | None, w: Tensor, w_scale: Tensor, bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """int8 x int8 linear: ``x (..., K)`` codes with scale ``(..., 1)`` or ``()``, ``w (N, K)`` with ``()``/``(N,)``."""
    return qlinear_w8a8_reference(x, x_scale, x_zero_point, w, w_scale, bias, out_dtype)


@qlinear_w8a8.register_fake
def _qlinear_w8a8_fake(x, x_scale, x_zero_point, w, w_scale, bias, out_dtype):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=out_dtype)


def qlinear_fp8_reference(
    x: Tensor, x_scale: Tensor | None, w: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """``linear(dequantize(x), dequantize(w), bias)`` with e4m3 codes; ``x_scale=None``: ``x`` is float."""
    xd = x.to(out_dtype) if x_scale is None else dequantize_reference(x, x_scale, None, None, None, out_dtype)
    wd = dequantize_reference(w, w_scale, None, _weight_axis(w_scale, None), None, out_dtype)
    return F.linear(xd, wd, bias)


@torch.library.custom_op("kiln::qlinear_fp8", mutates_args=())
def qlinear_fp8(
    x: Tensor, x_scale: Tensor | None, w: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """fp8 e4m3 linear: ``w (N, K)`` e4m3 with scale ``()``/``(N,)``; ``x`` e4m3 codes + scale, or float."""
    return qlinear_fp8_reference(x, x_scale, w, w_scale, bias, out_dtype)


@qlinear_fp8.register_fake
def _qlinear_fp8_fake(x, x_scale, w, w_scale, bias, out_dtype):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=out_dtype)


#: Argument positions of every linear a graph pass places: ``aten.linear`` and the ``kiln::qlinear_*``
#: above. ``x`` (the activation, or its codes), its scale and zero point (quantized activations), the
#: weight, its scale, zero point and group size, and the bias.
LINEAR_SLOTS: dict[object, dict[str, int]] = {
    torch.ops.aten.linear.default: {"x": 0, "w": 1, "bias": 2},
    torch.ops.kiln.qlinear_w8a16.default: {"x": 0, "w": 1, "w_scale": 2, "w_zero_point": 3, "group_size": 4, "bias": 5},
    torch.ops.kiln.qlinear_w4a16.default: {"x": 0, "w": 1, "w_scale": 2, "w_zero_point": 3, "group_size": 4, "bias": 5},
    torch.ops.kiln.qlinear_w8a8.default: {"x": 0, "x_scale": 1, "x_zero_point": 2, "w": 3, "w_scale": 4, "bias": 5},
    torch.ops.kiln.qlinear_fp8.default: {"x": 0, "x_scale": 1, "w": 2, "w_scale": 3, "bias": 4},
}


def slot_index(lin: Node, slot: str) -> int | None:
    """The argument index of ``slot`` in linear ``lin`` (a target of :data:`LINEAR_SLOTS`; None: it has none)."""
    return LINEAR_SLOTS[lin.target].get(slot)


def operand(lin: Node, slot: str) -> object:
    """The argument of linear ``lin`` in ``slot`` (``x``, ``w``, ``w_scale``, ...; None when it has none)."""
    i = slot_index(lin, slot)
    if i is None:
        return None
    return lin.args[i] if len(lin.args) > i else lin.kwargs.get(slot)


def _check_weight(w: Tensor | None, scale: Tensor | None, k: object, group: int | None, packed: bool) -> str | None:
    if w is None or scale is None:
        return "weight and scale need shape metadata"
    if w.dim() != 2:
        return f"weight must be 2-D (N, K), got {tuple(w.shape)}"
    kw = w.shape[1] * (2 if packed else 1)
    if str(kw) != str(k):
        return f"weight holds K={kw} {'(packed, 2 per byte) ' if packed else ''}but x has K={k}"
    n = w.shape[0]
    if group is not None:
        if kw % group:
            return f"group size {group} does not divide K={kw}"
        if tuple(scale.shape) != (n, kw // group):
            return f"group-wise scale must be ({n}, {kw // group}), got {tuple(scale.shape)}"
    elif tuple(scale.shape) not in ((), (n,)):
        return f"weight scale must be () or ({n},), got {tuple(scale.shape)}"
    return None


@invariant(torch.ops.kiln.qlinear_w8a16.default)
def _qlinear_w8a16_invariant(node: Node) -> str | None:
    x, w, s = (meta_val(a) for a in node.args[:3])
    if x is None or w is None or w.dtype != torch.int8:
        return "qlinear_w8a16 takes a float x and an int8 weight"
    return _check_weight(w, s, x.shape[-1], node.args[4], packed=False)  # type: ignore[arg-type]


@invariant(torch.ops.kiln.qlinear_w4a16.default)
def _qlinear_w4a16_invariant(node: Node) -> str | None:
    x, w, s, zp = (meta_val(a) for a in node.args[:4])
    if x is None or w is None or w.dtype != torch.uint8:
        return "qlinear_w4a16 takes a float x and a packed uint8 weight (N, K // 2)"
    if zp is not None and (zp.dtype != torch.uint8 or s is None or zp.shape != s.shape):
        return "the int4 zero point must be uint8 shaped like the scale"
    return _check_weight(w, s, x.shape[-1], node.args[4], packed=True)  # type: ignore[arg-type]


@invariant(torch.ops.kiln.qlinear_w8a8.default)
def _qlinear_w8a8_invariant(node: Node) -> str | None:
    x, xs, _, w, s = (meta_val(a) for a in node.args[:5])
    if x is None or w is None or x.dtype != torch.int8 or w.dtype != torch.int8:
        return "qlinear_w8a8 takes int8 activation codes and an int8 weight"
    if xs is None or xs.dim() not in (0, x.dim()):
        return "the activation scale must be per tensor () or per token (..., 1)"
    return _check_weight(w, s, x.shape[-1], None, packed=False)


@invariant(torch.ops.kiln.qlinear_fp8.default)
def _qlinear_fp8_invariant(node: Node) -> str | None:
    x, xs, w, s = (meta_val(a) for a in node.args[:4])
    if x is None or w is None or w.dtype != torch.float8_e4m3fn:
        return "qlinear_fp8 takes an e4m3 weight"
    if (xs is None) != (x.dtype != torch.float8_e4m3fn):
        return "x must be e4m3 codes with a scale, or a float tensor without one"
    return _check_weight(w, s, x.shape[-1], None, packed=False)


#: The qlinear overloads, for passes and reports.
QLINEAR_OPS = (
    torch.ops.kiln.qlinear_w8a16.default,
    torch.ops.kiln.qlinear_w4a16.default,
    torch.ops.kiln.qlinear_w8a8.default,
    torch.ops.kiln.qlinear_fp8.default,
)

__all__ = [
    "QLINEAR_OPS",
    "dequantize",
    "dequantize_reference",
    "dynamic_scale",
    "dynamic_scale_reference",
    "pack_int4",
    "qlinear_fp8",
    "qlinear_fp8_reference",
    "qlinear_w4a16",
    "qlinear_w4a16_reference",
    "qlinear_w8a8",
    "qlinear_w8a8_reference",
    "qlinear_w8a16",
    "qlinear_w8a16_reference",
    "quantize",
    "quantize_reference",
    "unpack_int4",
]
