"""``kiln::fake_quantize``: ``dequantize(quantize(x))`` in one op, with a straight-through backward.

The trainable form of a ``kiln::quantize`` / ``kiln::dequantize`` pair (same arguments, same
forward arithmetic, bit for bit), used by quantization-aware training (:mod:`kiln.quantize.qat`).

- ``x``: the straight-through estimator (Bengio et al. 2013), as ``torch.fake_quantize_per_channel_affine``:
  ``grad * 1[qmin <= round(x / s) + zp <= qmax]`` (e4m3: ``|x / s| <= 448``).
- ``scale``, when it requires grad: LSQ (Esser et al., ICLR 2020), as
  ``torch._fake_quantize_learnable_per_channel_affine``: ``(c - zp) - x / s`` inside the range,
  ``c - zp`` outside (``c`` the clamped code), summed per scale, times ``grad_factor``.
- ``zero_point``: no gradient (integer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.fx import Node

from kiln.ops import invariant

# --------------------------------------------------------------------------------------
# kiln::fake_quantize — dequantize(quantize(x)) with a straight-through backward.
# --------------------------------------------------------------------------------------


def _views(x: Tensor, scale: Tensor, axis: int | None, group_size: int | None) -> tuple[Tensor, Tensor]:
    """``x`` and ``scale`` reshaped so that they broadcast (groups: ``(..., K/g, g)`` and ``(..., K/g, 1)``)."""
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        return x, scale.reshape(shape)
    if group_size is not None:
        k = x.shape[-1]
        return x.reshape(*x.shape[:-1], k // group_size, group_size), scale.unsqueeze(-1)
    return x, scale


def _codes(
    v: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Clamped codes minus the zero point (as float) and the in-range mask, for ``v = x / s`` (broadcast views)."""
    if dtype.is_floating_point:
        inside = (v >= qmin) & (v <= qmax)
        return v.clamp(qmin, qmax).to(dtype).float(), inside
    r = torch.round(v)
    if zero_point is not None:
        r = r + zero_point
    inside = (r >= qmin) & (r <= qmax)
    c = r.clamp(qmin, qmax)
    return (c - zero_point if zero_point is not None else c), inside


def fake_quantize_reference(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    dtype: torch.dtype,
    axis: int | None = None,
    group_size: int | None = None,
    grad_factor: float = 1.0,
) -> Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype: exactly what the kiln::quantize / kiln::dequantize pair computes."""
    xs, s = _views(x.float(), scale.float(), axis, group_size)
    zp = None if zero_point is None else _views(x, zero_point.float(), axis, group_size)[1]
    c, _ = _codes(xs / s, zp, qmin, qmax, dtype)
    return (c * s).reshape(x.shape).to(x.dtype)


@torch.library.custom_op("kiln::fake_quantize", mutates_args=())
def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    dtype: torch.dtype,
    axis: int | None = None,
    group_size: int | None = None,
    grad_factor: float = 1.0,
) -> Tensor:
    """``kiln.dequantize(kiln.quantize(x, scale, zero_point, qmin, qmax, dtype, axis, group_size))``, trainable.

    Arguments as ``kiln::quantize``'s; the result has ``x``'s dtype. Backward: the straight-through
    estimator for ``x`` (identity where the code is within ``[qmin, qmax]``, zero where it is
    clamped) and, when ``scale`` requires grad, LSQ's step-size gradient times ``grad_factor``.
    """
    return fake_quantize_reference(x, scale, zero_point, qmin, qmax, dtype, axis, group_size, grad_factor)


@fake_quantize.register_fake
def _fake_quantize_fake(x, scale, zero_point, qmin, qmax, dtype, axis=None, group_size=None, grad_factor=1.0):
    return torch.empty_like(x)


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum the broadcast tensor ``t`` down to ``shape`` (a view shape of the scale)."""
    if len(shape) == 0:
        return t.sum()
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead > 0 else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, scale, zero_point, qmin, qmax, dtype, axis, group_size, grad_factor = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = (qmin, qmax, dtype, axis, group_size, grad_factor)


def _backward(ctx: Any, grad: Tensor) -> tuple:
    x, scale, zero_point = ctx.saved_tensors
    qmin, qmax, dtype, axis, group_size, grad_factor = ctx.args
    xs, s = _views(x.float(), scale.float(), axis, group_size)
    zp = None if zero_point is None else _views(x, zero_point.float(), axis, group_size)[1]
    v = xs / s
    c, inside = _codes(v, zp, qmin, qmax, dtype)
    g = grad.float().reshape(xs.shape)
    grad_x = grad_scale = None
    if ctx.needs_input_grad[0]:
        grad_x = (g * inside).reshape(x.shape).to(x.dtype)
    if ctx.needs_input_grad[1]:
        d_s = torch.where(inside, c - v, c)  # LSQ: d(s * c(x / s)) / ds with round's derivative taken as 1
        grad_scale = (_sum_to(g * d_s, s.shape) * grad_factor).reshape(scale.shape).to(scale.dtype)
    return grad_x, grad_scale, None, None, None, None, None, None, None


fake_quantize.register_autograd(_backward, setup_context=_setup_context)


@invariant(torch.ops.kiln.fake_quantize.default)
def _fake_quantize_invariant(node: Node) -> str | None:
    x, scale = (a.meta.get("val") if isinstance(a, Node) else None for a in node.args[:2])
    if x is None or scale is None:
        return "x and scale need shape metadata"
    if not x.dtype.is_floating_point:
        return f"fake_quantize takes a float tensor, got {x.dtype}"
    qmin, qmax = node.args[3], node.args[4]
    if qmin >= qmax:  # type: ignore[operator]
        return f"empty code range [{qmin}, {qmax}]"
    group = node.kwargs.get("group_size")
    if group is not None and isinstance(x.shape[-1], int) and x.shape[-1] % group:
        return f"group size {group} does not divide the last dimension {x.shape[-1]}"
    return None


__all__ = ["fake_quantize", "fake_quantize_reference"]
