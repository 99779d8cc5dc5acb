"""``kiln::vocab_embedding``: one tensor-parallel rank's lookup into its rows of a vocabulary-parallel table.

``shard-tensor-parallel`` emits it for every embedding of the vocabulary (followed by the all-reduce);
the CUDA kernel is ``kiln.backends.triton.embedding``, the reference below the CPU implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import Node

from kiln.ops import invariant


@torch.library.custom_op("kiln::vocab_embedding", mutates_args=())
def vocab_embedding(weight: Tensor, ids: Tensor, start: int) -> Tensor:
    """Rows ``ids - start`` of ``weight`` (this rank's ``weight.shape[0]`` rows of the vocabulary, from
    ``start``), zero for ids outside them: Megatron's vocabulary-parallel embedding before its all-reduce.
    The captured spelling is six ops (two compares, or, subtract, masked fill, lookup, masked fill); the
    CUDA kernel (``kiln.backends.triton.embedding``) is one launch."""
    return vocab_embedding_reference(weight, ids, start)


def vocab_embedding_reference(weight: Tensor, ids: Tensor, start: int) -> Tensor:
    """The plain-torch reference of ``kiln::vocab_embedding``: the ops ``shard-tensor-parallel`` emitted."""
    outside = (ids < start) | (ids >= start + weight.shape[0])
    rows = torch.nn.functional.embedding((ids - start).masked_fill(outside, 0), weight)
    return rows.masked_fill(outside.unsqueeze(-1), 0.0)


@vocab_embedding.register_fake
def _vocab_embedding_fake(weight: Tensor, ids: Tensor, start: int) -> Tensor:
    return weight.new_empty((*ids.shape, weight.shape[1]))


@invariant(torch.ops.kiln.vocab_embedding.default)
def _vocab_embedding_invariant(node: Node) -> str | None:
    weight, ids = (a.meta.get("val") for a in node.args[:2])  # type: ignore[union-attr]
    if weight is None or ids is None:
        return None
    if weight.dim() != 2:
        return f"weight must be a 2-D table, got {tuple(weight.shape)}"
    if ids.dtype not in (torch.int32, torch.int64):
        return f"ids must be int32 or int64, got {ids.dtype}"
    return None


__all__ = ["vocab_embedding", "vocab_embedding_reference"]
