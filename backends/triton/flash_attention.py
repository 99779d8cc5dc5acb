"""Flash attention forward (prefill) in Triton, with its plain-torch reference beside it.

Implements the forward pass of FlashAttention-2 (T. Dao, "FlashAttention-2: Faster Attention
with Better Parallelism and Work Partitioning", 2023, arXiv:2307.08691), itself built on
FlashAttention (Dao et al., NeurIPS 2022): each program owns a block of query rows of one
(sequence, head), streams key/value blocks through on-chip memory, keeps the running row
maximum and row sum of an online softmax in fp32, and rescales the output accumulator only
when the maximum moves; the 1/rowsum division happens once, at the end. The kernel layout
follows the Triton fused-attention tutorial: ``constexpr`` tiles, explicit autotune keys,
the inner loop in its own ``@triton.jit`` helper.

Conventions (the same as the ``flash-attn`` package):

- Grouped-query / multi-query attention: ``Hq % Hkv == 0`` and query head ``h`` reads
  key/value head ``h // (Hq // Hkv)``. K and V are never repeated in memory.
- Causal masking with ``Tq != Tk`` aligns the queries to the *end* of the keys (bottom-right):
  query ``i`` attends keys ``j <= i + Tk - Tq``. This is what a decode or chunked-prefill
  step needs (the new queries are the last ``Tq`` positions of a ``Tk``-long context). Note
  that ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` aligns to the
  top-left instead; the two agree only when ``Tq == Tk``.
- A query row that sees no key at all (causal with ``Tq > Tk``, or ``Tk == 0``) outputs zeros.

Kernel schedule: for the query block ``[m0, m0 + BLOCK_M)`` the key blocks fall in three
ranges. Blocks every row sees in full run an unmasked loop; the blocks on the causal diagonal
(and the ragged last block when ``Tk % BLOCK_N != 0``) run the same loop with masks; blocks no
row sees are skipped by the loop bound, so causal prefill does about half the work.

Public functions (each fast path has a reference with the same signature):

- :func:`flash_attention` / :func:`attention_reference`: padded batch ``(B, H, T, D)``.
- :func:`flash_attention_varlen` / :func:`attention_varlen_reference`: packed sequences
  ``(total_tokens, H, D)`` delimited by ``cu_seqlens`` (vLLM / flash-attn varlen layout).

Tensors on the CPU run only in Triton's interpreter: set ``TRITON_INTERPRET=1`` before this
module is imported (Triton reads it when the kernels are decorated).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kiln.backends.triton._utils import check_triton_device, interpret_mode, next_power_of_2
from kiln.backends.triton.timing import autotune_bench

__all__ = [
    "MAX_HEAD_DIM",
    "attention_reference",
    "attention_varlen_reference",
    "flash_attention",
    "flash_attention_varlen",
]

MAX_HEAD_DIM = 256
"""Largest supported head dimension; any ``1 <= D <= 256`` works (padded to a power of two)."""

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

# Read once, like Triton itself: the decorators below are interpreted iff this is true.
_INTERPRET = interpret_mode()


# ----------------------------------------------------------------------------- autotuning


def _configs() -> list[triton.Config]:
    """Autotune candidates. In the interpreter one small config keeps CPU tests fast.

    The interpreter config has BLOCK_M != BLOCK_N on purpose, so the causal diagonal spans
    two key blocks and tests exercise the masked loop with more than one iteration. The GPU
    list is what a sweep of 24 tiles kept on an H100 (bf16, D=128, causal, T=2048..8192):
    128x64 and 128x128 with 8 warps lead at long sequences, 64x64 with 4 warps at short.
    """
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    tiles = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 64, 8, 4),
        (64, 64, 4, 3),
        (128, 64, 4, 3),  # small head dims only (see _prune_configs)
        _FALLBACK_TILE,
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


# Fits shared memory for every head dim and dtype (D=256, or fp32 inputs): never pruned.
_FALLBACK_TILE = (64, 32, 4, 2)


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Drop tiles that cannot fit (large head dims) or waste work (short sequences).

    Tiles that still overflow shared memory (fp32 inputs) fail to compile and the autotuner
    skips them; the fallback tile is always kept so that something runs.
    """
    if len(configs) <= 1:
        return configs
    args = {**named_args, **kwargs}
    d_pad = int(args["HEAD_DIM_PAD"])
    q_bucket = int(args["Q_BUCKET"])
    kept = []
    for c in configs:
        bm, bn, w, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
        if (bm, bn, w, s) == _FALLBACK_TILE:
            kept.append(c)
            continue
        if d_pad >= 256 and (bm > 64 or bn > 32):  # (BM + 2 BN) x 256 tiles: shared memory
            continue
        if d_pad >= 128 and bm == 128 and w == 4:  # too few warps for 128 x 128 accumulators
            continue
        if q_bucket <= 64 and bm > 64:  # short query blocks: do not pad to 128 rows
            continue
        kept.append(c)
    return kept


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _attn_fwd_inner(
    acc,  # (BLOCK_M, HEAD_DIM_PAD) fp32 running numerator
    l_i,  # (BLOCK_M,) fp32 running row sum
    m_i,  # (BLOCK_M,) fp32 running row max (log2 domain, scaled)
    q,  # (BLOCK_M, HEAD_DIM_PAD) query tile, input dtype
    k_base,  # K pointer at key 0 of this (sequence, kv head)
    v_base,  # V pointer at key 0 of this (sequence, kv head)
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    last_key,  # (BLOCK_M,) int32: row i sees keys j <= last_key[i] (causal only)
    seqlen_k,
    lo,
    hi,
    qk_scale,  # softmax scale * log2(e)
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Stream key blocks ``[lo, hi)`` through the online softmax; MASKED for diagonal/tail."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_key = start_n + offs_n  # (BLOCK_N,)
        k_ptrs = k_base + offs_key[None, :] * stride_kt + offs_d[:, None] * stride_kd  # (D, BLOCK_N)
        v_ptrs = v_base + offs_key[:, None] * stride_vt + offs_d[None, :] * stride_vd  # (BLOCK_N, D)
        if MASKED:
            key_ok = offs_key < seqlen_k
            k = tl.load(k_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        if MASKED:
            visible = key_ok[None, :]
            if IS_CAUSAL:
                visible = visible & (offs_key[None, :] <= last_key[:, None])
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            # A row with nothing visible yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
            m_shift = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            qk = qk - m_shift[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_shift = m_ij
            qk = qk * qk_scale - m_shift[:, None]
        p = tl.math.exp2(qk)  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_shift)  # (BLOCK_M,) rescale of what came before
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        p = p.to(v.dtype)  # the P @ V product runs in the input dtype, as on the tensor cores
        if UPCAST_DOT:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.autotune(
    configs=_configs(),
    key=["Q_BUCKET", "K_BUCKET", "HEAD_DIM_PAD", "IS_CAUSAL", "IS_VARLEN"],
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=autotune_bench,
)
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "Q_BUCKET", "K_BUCKET"])
def _attn_fwd(
    Q,
    K,
    V,
    Out,
    cu_seqlens_q,  # (num_seqs + 1,) int32, varlen only
    cu_seqlens_k,
    stride_qb,  # dense: batch stride; varlen: unused
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    seqlen_q,  # dense only; varlen reads lengths from cu_seqlens
    seqlen_k,
    group_size,  # Hq // Hkv
    qk_scale,
    Q_BUCKET,  # autotune key: next power of two of (max) seqlen_q
    K_BUCKET,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter + bfloat16 only: see _upcast_dot
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (sequence, query head). Grid (m blocks, Hq, B)."""
    # Heaviest causal blocks (the last rows) launch first, which evens out the tail.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    if IS_VARLEN:
        q_start = tl.load(cu_seqlens_q + off_b)
        k_start = tl.load(cu_seqlens_k + off_b)
        seqlen_q = tl.load(cu_seqlens_q + off_b + 1) - q_start
        seqlen_k = tl.load(cu_seqlens_k + off_b + 1) - k_start
        q_off = q_start.to(tl.int64) * stride_qt
        k_off = k_start.to(tl.int64) * stride_kt
        v_off = k_start.to(tl.int64) * stride_vt
        o_off = q_start.to(tl.int64) * stride_ot
    else:
        q_off = off_b.to(tl.int64) * stride_qb
        k_off = off_b.to(tl.int64) * stride_kb
        v_off = off_b.to(tl.int64) * stride_vb
        o_off = off_b.to(tl.int64) * stride_ob
    if start_m * BLOCK_M >= seqlen_q:
        return
    off_hk = off_h // group_size
    q_off += off_h.to(tl.int64) * stride_qh
    o_off += off_h.to(tl.int64) * stride_oh
    k_base = K + k_off + off_hk.to(tl.int64) * stride_kh
    v_base = V + v_off + off_hk.to(tl.int64) * stride_vh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + q_off + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, D)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    # Causal, bottom-right aligned: row i sees keys j <= i + (seqlen_k - seqlen_q).
    diag = seqlen_k - seqlen_q
    last_key = offs_m + diag  # (BLOCK_M,)
    full_k = (seqlen_k // BLOCK_N) * BLOCK_N  # keys in whole blocks
    if IS_CAUSAL:
        hi = tl.minimum(seqlen_k, start_m * BLOCK_M + BLOCK_M + diag)  # past the last row's last key
        lo_mask = (tl.maximum(start_m * BLOCK_M + diag + 1, 0) // BLOCK_N) * BLOCK_N  # first row's
        lo_mask = tl.minimum(lo_mask, full_k)
    else:
        hi = seqlen_k
        lo_mask = full_k
    # Key blocks [0, lo_mask): every row sees every key.
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        last_key, seqlen_k, 0, lo_mask, qk_scale,
        False, IS_CAUSAL, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION, UPCAST_DOT,
    )  # fmt: skip
    # Key blocks [lo_mask, hi): the causal diagonal and the ragged tail, masked.
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        last_key, seqlen_k, lo_mask, hi, qk_scale,
        True, IS_CAUSAL, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, DOT_PRECISION, UPCAST_DOT,
    )  # fmt: skip

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows that saw no key output 0
    out = acc / l_i[:, None]
    o_ptrs = Out + o_off + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- validation


def _check_common(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, layout: str
) -> None:
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name}: {label} must have rank {rank} {layout}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name}: dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    if k.shape != v.shape:
        raise ValueError(
            f"{name}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"{name}: q and k must have the same head dim, got {d} and {k.shape[-1]}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim {d} is not supported; use 1..{MAX_HEAD_DIM}")
    hq, hkv = q.shape[1], k.shape[1]  # heads are axis 1 in both layouts
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{name}: query heads ({hq}) must be a multiple of key/value heads ({hkv}) for grouped-query attention"
        )


def _check_out(name: str, out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"{name}: out must match q's shape, dtype and device {tuple(q.shape)} {q.dtype} {q.device}, "
            f"got {tuple(out.shape)} {out.dtype} {out.device}"
        )
    return out


def _check_cu_seqlens(name: str, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int) -> None:
    for label, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 1:
            got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise ValueError(f"{name}: {label} must be a 1-D int32 tensor of num_seqs + 1 offsets, got {got}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(
            f"{name}: cu_seqlens_q and cu_seqlens_k must have the same length (num_seqs + 1), "
            f"got {cu_q.numel()} and {cu_k.numel()}"
        )
    for label, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            raise ValueError(f"{name}: {label} must be a non-negative int, got {m!r}")


def _upcast_dot(dtype: torch.dtype) -> bool:
    # Triton's interpreter stores bfloat16 as uint16 and its tl.dot multiplies the bit patterns
    # (triton-lang/triton#11584; the interpreter docs say to cast bf16 to fp32 first). Upcasting
    # bf16 tiles is exact, so interpreted results still match the compiled kernel's rounding.
    return _INTERPRET and dtype == torch.bfloat16


def _bhtd_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a packed (total_tokens, H, D) tensor in the kernel's (batch, head, token, dim) order."""
    return 0, t.stride(1), t.stride(0), t.stride(2)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would lose ~3 digits); 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------- fast paths


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused softmax(q k^T * scale) v on a padded batch, in one Triton kernel.

    Args:
        q: (B, Hq, Tq, D) float16, bfloat16 or float32; any strides.
        k: (B, Hkv, Tk, D), same dtype; ``Hq % Hkv == 0`` (GQA/MQA without repeating K/V).
        v: (B, Hkv, Tk, D), same dtype.
        causal: mask keys after each query, aligned to the end of the keys: query ``i``
            sees keys ``j <= i + Tk - Tq``. Rows that see no key output zeros.
        scale: softmax scale; default ``1 / sqrt(D)``.
        out: optional (B, Hq, Tq, D) buffer of q's dtype to write into.

    Returns:
        (B, Hq, Tq, D) in q's dtype (``out`` when given).
    """
    name = "flash_attention"
    _check_common(name, q, k, v, 4, "(B, H, T, D)")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{name}: q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    check_triton_device(name, _INTERPRET, q, k, v)
    out = _check_out(name, out, q)
    b, hq, tq, d = q.shape  # (B, Hq, Tq, D)
    hkv, tk = k.shape[1], k.shape[2]  # (B, Hkv, Tk, D)
    if out.numel() == 0:
        return out
    if tk == 0:
        return out.zero_()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(tq, meta["BLOCK_M"]), hq, b)

    _attn_fwd[grid](
        q, k, v, out, q, q,  # cu_seqlens unused when dense: any pointer
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        tq, tk, hq // hkv, scale * _LOG2E,
        next_power_of_2(tq), next_power_of_2(tk),
        HEAD_DIM=d, HEAD_DIM_PAD=max(16, next_power_of_2(d)),
        IS_CAUSAL=bool(causal), IS_VARLEN=False, DOT_PRECISION=_dot_precision(q.dtype), UPCAST_DOT=_upcast_dot(q.dtype),
    )  # fmt: skip
    return out


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused attention over packed variable-length sequences (flash-attn varlen layout).

    Sequence ``s`` owns query tokens ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` and key tokens
    ``cu_seqlens_k[s]:cu_seqlens_k[s+1]``; sequences never attend to each other. Causal
    masking is end-aligned per sequence (query ``i`` sees keys ``j <= i + Tk_s - Tq_s``).

    Args:
        q: (total_q, Hq, D) float16, bfloat16 or float32; any strides.
        k: (total_k, Hkv, D), same dtype; ``Hq % Hkv == 0``.
        v: (total_k, Hkv, D), same dtype.
        cu_seqlens_q: (num_seqs + 1,) int32 cumulative query lengths, starting at 0.
        cu_seqlens_k: (num_seqs + 1,) int32 cumulative key lengths, starting at 0.
        max_seqlen_q: the longest query length (sizes the grid; a smaller value drops rows).
        max_seqlen_k: the longest key length (used only to pick a tuned config).
        causal: end-aligned causal mask, as above.
        scale: softmax scale; default ``1 / sqrt(D)``.
        out: optional (total_q, Hq, D) buffer of q's dtype to write into.

    Returns:
        (total_q, Hq, D) in q's dtype. The contents of ``cu_seqlens`` are not checked (that
        would need a device-to-host copy): offsets must be non-decreasing and in range.
    """
    name = "flash_attention_varlen"
    _check_common(name, q, k, v, 3, "(total_tokens, H, D)")
    _check_cu_seqlens(name, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_triton_device(name, _INTERPRET, q, k, v, cu_seqlens_q, cu_seqlens_k)
    out = _check_out(name, out, q)
    _, hq, d = q.shape  # (total_q, Hq, D)
    hkv = k.shape[1]  # (total_k, Hkv, D)
    num_seqs = cu_seqlens_q.numel() - 1
    if out.numel() == 0 or num_seqs == 0 or max_seqlen_q == 0:
        return out
    if k.shape[0] == 0:
        return out.zero_()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), hq, num_seqs)

    _attn_fwd[grid](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k,
        *_bhtd_strides(q), *_bhtd_strides(k), *_bhtd_strides(v), *_bhtd_strides(out),
        0, 0, hq // hkv, scale * _LOG2E,
        next_power_of_2(max_seqlen_q), next_power_of_2(max_seqlen_k),
        HEAD_DIM=d, HEAD_DIM_PAD=max(16, next_power_of_2(d)),
        IS_CAUSAL=bool(causal), IS_VARLEN=True, DOT_PRECISION=_dot_precision(q.dtype), UPCAST_DOT=_upcast_dot(q.dtype),
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- references


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch oracle for :func:`flash_attention`: fp32 math, explicit mask, repeated K/V."""
    name = "attention_reference"
    _check_common(name, q, k, v, 4, "(B, H, T, D)")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{name}: q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    out = _check_out(name, out, q)
    tq, d = q.shape[2], q.shape[3]
    hq, hkv, tk = q.shape[1], k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kf = k.float().repeat_interleave(hq // hkv, dim=1)  # (B, Hq, Tk, D)
    vf = v.float().repeat_interleave(hq // hkv, dim=1)  # (B, Hq, Tk, D)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    if causal:
        i = torch.arange(tq, device=q.device)[:, None]
        j = torch.arange(tk, device=q.device)[None, :]
        visible = j <= i + (tk - tq)  # (Tq, Tk), end-aligned
    else:
        visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(visible.any(dim=-1, keepdim=True), probs, 0.0)  # no key seen: zeros, not NaN
    out.copy_(torch.matmul(probs, vf))  # (B, Hq, Tq, D)
    return out


def attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch oracle for :func:`flash_attention_varlen`: one :func:`attention_reference` per sequence."""
    name = "attention_varlen_reference"
    _check_common(name, q, k, v, 3, "(total_tokens, H, D)")
    _check_cu_seqlens(name, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out = _check_out(name, out, q)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cu_q) - 1):
        q_s = q[cu_q[s] : cu_q[s + 1]].transpose(0, 1)[None]  # (1, Hq, Tq_s, D)
        k_s = k[cu_k[s] : cu_k[s + 1]].transpose(0, 1)[None]  # (1, Hkv, Tk_s, D)
        v_s = v[cu_k[s] : cu_k[s + 1]].transpose(0, 1)[None]
        o_s = attention_reference(q_s, k_s, v_s, causal=causal, scale=scale)  # (1, Hq, Tq_s, D)
        out[cu_q[s] : cu_q[s + 1]] = o_s[0].transpose(0, 1)
    return out
