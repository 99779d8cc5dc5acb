"""One rank's vocabulary-parallel embedding lookup in one Triton kernel: ``kiln::vocab_embedding`` on CUDA.

Under tensor parallelism each rank holds ``rows`` rows of the vocabulary table from ``start``; a token
id inside that range reads its row, any other id gives zeros, and the all-reduce after it sums the
ranks (Megatron-LM's vocabulary-parallel embedding). The captured graph spells this in six element-wise
and gather kernels per rank; here one program per (token, column block) checks the id and copies the
row or writes zeros. The reference is :func:`kiln.parallel.tp_embedding.vocab_embedding_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.backends.triton._utils import check_triton_device, interpret_mode, next_power_of_2

_INTERPRET = interpret_mode()
#: Columns one program copies (wider rows take several programs).
BLOCK_COLS = 1024


@triton.jit
def _vocab_embedding_kernel(
    w_ptr, ids_ptr, out_ptr, start, rows, n_cols, stride_w, stride_out, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    local = tl.load(ids_ptr + t).to(tl.int64) - start + 0 * cols  # the row, as a vector (a vector mask)
    inside = (local >= 0) & (local < rows)
    row = tl.where(inside, local, 0)
    vals = tl.load(w_ptr + row * stride_w + cols, mask=mask & inside, other=0.0)  # outside: zeros, no read
    tl.store(out_ptr + t * stride_out + cols, vals, mask=mask)


def vocab_embedding(weight: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
    """``kiln::vocab_embedding`` on the GPU: rows ``ids - start`` of ``weight``, zeros outside its rows."""
    check_triton_device("vocab_embedding", _INTERPRET, weight, ids)
    if weight.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"vocab_embedding: weight must be 2-D and ids int32 / int64, got weight "
                         f"{tuple(weight.shape)} and ids {ids.dtype}")  # fmt: skip
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    flat = ids.reshape(-1)
    n = w.shape[1]
    out = torch.empty((flat.numel(), n), dtype=w.dtype, device=w.device)
    block = min(BLOCK_COLS, next_power_of_2(max(1, n)))
    if flat.numel() and n:
        _vocab_embedding_kernel[(flat.numel(), triton.cdiv(n, block))](
            w, flat, out, int(start), w.shape[0], n, w.stride(0), out.stride(0), BLOCK=block, num_warps=4,
        )  # fmt: skip
    return out.reshape(*ids.shape, n)


__all__ = ["vocab_embedding"]
