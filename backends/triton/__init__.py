"""kiln.backends.triton: Triton kernels, the CUDA implementations of kiln's ops.

``register_cuda_kernels()`` registers each kernel as the CUDA implementation of its
``kiln::`` op (``torch.library.register_kernel``); the plain-torch reference stays the CPU
implementation. An op or a case without a kernel raises on CUDA, naming what is missing;
it never falls back to the reference silently. ``import kiln`` calls this when CUDA is
available.
"""

from __future__ import annotations

import torch

from kiln.backends import register_backend
from kiln.errors import ConfigError, KilnError

#: kiln ops with a CUDA kernel; ``backend="triton"`` refuses graphs using any other kiln op.
KERNELS: set[str] = set()
_registered = False


def register_cuda_kernels() -> None:
    """Register the Triton kernels for the CUDA dispatch key of kiln's ops (idempotent)."""
    global _registered
    if _registered:
        return
    from kiln.backends.triton.flash_attention import flash_attention
    from kiln.backends.triton.paged_attention import paged_attention

    @torch.library.register_kernel("kiln::attention", "cuda")
    def _attention_cuda(q, k, v, mask=None, causal=False, scale=None):  # type: ignore[no-untyped-def]
        if mask is not None:
            raise KilnError(
                "kiln::attention with an explicit mask has no CUDA kernel yet; only causal and unmasked "
                "attention runs on the GPU (fuse-attention proves the masks of common models causal)"
            )
        return flash_attention(q, k, v, causal=causal, scale=scale)

    @torch.library.register_kernel("kiln::paged_attention", "cuda")
    def _paged_attention_cuda(  # type: ignore[no-untyped-def]
        q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, scale, kv_scales
    ):
        # Writes kv_cache (and per-token kv_scales of an int8/fp8 cache) in place, as the op declares;
        # one device-to-host copy per call.
        return paged_attention(
            q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, scale, kv_scales
        )

    from kiln.backends.triton.gemv import gemv

    @torch.library.register_kernel("kiln::gemv", "cuda")
    def _gemv_cuda(x, weight, bias=None):  # type: ignore[no-untyped-def]
        return gemv(x, weight, bias)  # the faster of the split-K kernel and cuBLAS, timed per shape

    from kiln.backends.triton.rms_norm import add_rms_norm, rms_norm

    @torch.library.register_kernel("kiln::rms_norm", "cuda")
    def _rms_norm_cuda(x, weight, eps, upcast):  # type: ignore[no-untyped-def]
        return rms_norm(x, weight, eps, upcast)

    @torch.library.register_kernel("kiln::add_rms_norm", "cuda")
    def _add_rms_norm_cuda(x, residual, weight, eps, upcast):  # type: ignore[no-untyped-def]
        return add_rms_norm(x, residual, weight, eps, upcast)

    from kiln.backends.triton.silu_mul import silu_mul

    @torch.library.register_kernel("kiln::silu_mul", "cuda")
    def _silu_mul_cuda(gate, up):  # type: ignore[no-untyped-def]
        return silu_mul(gate, up)

    import kiln.parallel.tp_embedding  # noqa: F401  (defines kiln::vocab_embedding)
    from kiln.backends.triton.embedding import vocab_embedding

    @torch.library.register_kernel("kiln::vocab_embedding", "cuda")
    def _vocab_embedding_cuda(weight, ids, start):  # type: ignore[no-untyped-def]
        return vocab_embedding(weight, ids, start)

    from kiln.backends.triton.rotary import rotary, rotary_pair

    @torch.library.register_kernel("kiln::rotary", "cuda")
    def _rotary_cuda(x, cos, sin):  # type: ignore[no-untyped-def]
        return rotary(x, cos, sin)

    @torch.library.register_kernel("kiln::rotary_pair", "cuda")
    def _rotary_pair_cuda(x, y, cos, sin):  # type: ignore[no-untyped-def]
        return rotary_pair(x, y, cos, sin)

    import kiln.rotary_table  # noqa: F401  (defines kiln::rotary_table)
    from kiln.backends.triton.rotary_table import rotary_table

    @torch.library.register_kernel("kiln::rotary_table", "cuda")
    def _rotary_table_cuda(positions, inv_freq, scale, dtype):  # type: ignore[no-untyped-def]
        return rotary_table(positions, inv_freq, scale, dtype)

    KERNELS.add("kiln.rotary_table")
    KERNELS.add("kiln.rms_norm")
    KERNELS.add("kiln.add_rms_norm")
    KERNELS.add("kiln.rotary")
    KERNELS.add("kiln.rotary_pair")
    KERNELS.add("kiln.silu_mul")
    KERNELS.add("kiln.vocab_embedding")
    KERNELS.add("kiln.attention")
    KERNELS.add("kiln.paged_attention")
    KERNELS.add("kiln.gemv")
    from kiln.backends.triton.quant_gemm import register_quant_kernels

    KERNELS.update(register_quant_kernels())  # kiln::qlinear_*, dynamic_scale, quantize, dequantize
    _registered = True


def lower(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The triton backend: the graph itself, with every kiln op dispatching to its CUDA kernel."""
    from kiln.ir import op_name
    from kiln.ops import is_kiln_op

    if not torch.cuda.is_available():
        raise ConfigError("backend 'triton' needs a CUDA GPU; use backend='eager' on the CPU")
    register_cuda_kernels()
    missing = sorted(
        {op_name(n) for n in gm.graph.nodes if n.op == "call_function" and is_kiln_op(n.target)} - KERNELS
    )
    if missing:
        raise ConfigError(f"backend 'triton' has no CUDA kernel for {missing} yet; use backend='eager'")
    return gm


register_backend("triton", lower)

__all__ = ["KERNELS", "lower", "register_cuda_kernels"]
