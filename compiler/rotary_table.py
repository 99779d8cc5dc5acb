"""``kiln::rotary_table``: the cos / sin tables of rotary position embeddings for the step's positions, in one kernel.

Llama-family models compute the tables every step from the position ids (Hugging Face's
``LlamaRotaryEmbedding``, kiln's ``RotaryEmbedding``): positions to float, times the inverse
frequencies, the product concatenated with itself, its cosine and sine, optionally scaled
(``attention_scaling``), cast to the model's dtype. That is seven element-wise kernels of ~1.5-2 us
each in a decode step (and on every tensor-parallel rank); ``fuse-rotary-table`` rewrites them to this
op, whose CUDA kernel (``kiln.backends.triton.rotary_table``) is one launch. The reference below is the
CPU implementation and the ops the pass replaces.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import Node

from kiln.ops import invariant


@torch.library.custom_op("kiln::rotary_table", mutates_args=())
def rotary_table(
    positions: Tensor, inv_freq: Tensor, scale: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(cos(e) * scale, sin(e) * scale)`` cast to ``dtype``, for ``e = cat(f, f)`` over the last axis and
    ``f = positions.float() * inv_freq``: integer ``positions`` of shape ``(..., 1)``, fp32 ``inv_freq`` of
    ``H`` elements (shape ``(H,)`` or with leading ones); both tables have shape ``(..., 2H)``. A scale of
    1.0 is no multiplication."""
    return rotary_table_reference(positions, inv_freq, scale, dtype)


def rotary_table_reference(
    positions: Tensor, inv_freq: Tensor, scale: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The plain-torch reference of ``kiln::rotary_table``: the op sequence ``fuse-rotary-table`` replaces."""
    f = positions.to(torch.float32) * inv_freq
    e = torch.cat((f, f), -1)
    cos, sin = e.cos(), e.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


@rotary_table.register_fake
def _rotary_table_fake(
    positions: Tensor, inv_freq: Tensor, scale: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    shape = (*positions.shape[:-1], 2 * inv_freq.shape[-1])
    return positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype)


def table_problem(positions: Tensor, inv_freq: Tensor, dtype: object) -> str | None:
    """Why ``positions`` and ``inv_freq`` do not make a table (dtypes, shapes), or None."""
    if positions.dtype not in (torch.int32, torch.int64):
        return f"positions must be int32 or int64, got {positions.dtype}"
    if positions.dim() == 0 or str(positions.shape[-1]) != "1":
        return f"positions must have a last dimension of 1, got {tuple(positions.shape)}"
    if inv_freq.dtype != torch.float32 or inv_freq.dim() == 0 or inv_freq.dim() > positions.dim():
        return f"inv_freq must be fp32 with at most positions' rank, got {inv_freq.dtype} {tuple(inv_freq.shape)}"
    if any(str(s) != "1" for s in inv_freq.shape[:-1]):
        return f"inv_freq's leading dimensions must be 1, got {tuple(inv_freq.shape)}"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype must be float32, float16 or bfloat16, got {dtype}"
    return None


@invariant(torch.ops.kiln.rotary_table.default)
def _rotary_table_invariant(node: Node) -> str | None:
    positions, inv_freq = (a.meta.get("val") for a in node.args[:2])  # type: ignore[union-attr]
    if positions is None or inv_freq is None:
        return None
    return table_problem(positions, inv_freq, node.args[3])


__all__ = ["rotary_table", "rotary_table_reference", "table_problem"]
