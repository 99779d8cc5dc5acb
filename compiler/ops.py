"""kiln's operators: the ``kiln::`` namespace of the IR.

Each op is a ``torch.library.custom_op`` with a fake (meta) implementation, so shapes and
dtypes propagate through passes, the graph re-exports and every backend can consume it.
Each op has exactly one reference implementation in plain torch (registered for every
device); fast kernels register themselves for CUDA in ``kiln.backends.triton`` and must
match the reference.

An op may also declare *invariants*: a function ``check(node) -> str | None`` returning a
reason when the node is malformed. ``kiln.ir.verify`` runs them on every kiln node.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.fx import Node

#: kiln op overload -> invariant checker returning a reason string when the node is malformed.
INVARIANTS: dict[object, Callable[[Node], str | None]] = {}


def invariant(op: object) -> Callable[[Callable[[Node], str | None]], Callable[[Node], str | None]]:
    """Register ``fn`` as the invariant checker of kiln op ``op`` (used by ``kiln.ir.verify``)."""

    def wrap(fn: Callable[[Node], str | None]) -> Callable[[Node], str | None]:
        INVARIANTS[op] = fn
        return fn

    return wrap


def is_kiln_op(target: object) -> bool:
    """Whether an FX node target is an operator of the ``kiln::`` namespace."""
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "kiln"


# --------------------------------------------------------------------------------------
# kiln::attention — scaled dot-product attention with GQA expressed by head counts.
# --------------------------------------------------------------------------------------


@torch.library.custom_op("kiln::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False, scale: float | None = None
) -> Tensor:
    """softmax(q kᵀ · scale + mask) v over (B, H, T, D) tensors.

    ``k`` and ``v`` may have fewer heads than ``q`` (grouped-query attention): query head
    ``h`` reads kv head ``h // (Hq // Hkv)``. ``causal`` masks key ``j`` for query ``i``
    when ``j > i + Tk - Tq`` (queries aligned to the end of the keys). ``mask`` is additive
    (float) or boolean (True = attend) and broadcasts to (B, Hq, Tq, Tk). A query row that
    may attend to no key at all outputs zeros.
    """
    return attention_reference(q, k, v, mask, causal, scale)


def attention_reference(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False, scale: float | None = None
) -> Tensor:
    """The plain-torch reference of ``kiln::attention`` (fp32 math, output in q's dtype)."""
    b, hq, tq, d = q.shape  # (B, Hq, Tq, D)
    hkv, tk = k.shape[1], k.shape[2]  # k, v: (B, Hkv, Tk, D)
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.float()
    kf = k.float().repeat_interleave(group, dim=1)  # (B, Hq, Tk, D)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(qf, kf.transpose(-2, -1)) * scale  # (B, Hq, Tq, Tk)
    if causal:
        i = torch.arange(tq, device=q.device).unsqueeze(1)
        j = torch.arange(tk, device=q.device).unsqueeze(0)
        scores = scores.masked_fill(j > i + (tk - tq), float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    # a query that may attend to nothing gets output 0 (as SDPA and the flash kernel), not NaN
    probs = torch.where(scores.amax(dim=-1, keepdim=True) == float("-inf"), 0.0, probs)
    return torch.matmul(probs, vf).to(q.dtype)  # (B, Hq, Tq, D)


@attention.register_fake
def _attention_fake(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False, scale: float | None = None
) -> Tensor:
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "kiln::attention takes (B, H, T, D)")
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@invariant(torch.ops.kiln.attention.default)
def _attention_invariant(node: Node) -> str | None:
    q, k, v = (a.meta.get("val") for a in node.args[:3])  # type: ignore[union-attr]
    if q is None or k is None or v is None:
        return "q, k and v need shape metadata"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be rank 4 (B, H, T, D), got ranks {q.dim()}, {k.dim()}, {v.dim()}"
    if k.shape[1] != v.shape[1]:
        return f"k and v head counts differ: {k.shape[1]} vs {v.shape[1]}"
    if isinstance(q.shape[1], int) and isinstance(k.shape[1], int) and q.shape[1] % k.shape[1]:
        return f"query heads {q.shape[1]} are not a multiple of kv heads {k.shape[1]}"
    if q.shape[-1] != k.shape[-1]:
        return f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    return None


# --------------------------------------------------------------------------------------
# kiln::paged_attention — write new K/V into a block-paged cache, attend over the cache.
# --------------------------------------------------------------------------------------

#: Quantized KV-cache storage dtypes and the largest code each holds (symmetric: codes in [-qmax, qmax]).
KV_CACHE_QMAX: dict[torch.dtype, float] = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def is_quantized_cache(kv_cache: Tensor) -> bool:
    """Whether ``kv_cache`` holds quantized codes (int8 or fp8 e4m3) that need ``kv_scales``."""
    return kv_cache.dtype in KV_CACHE_QMAX


def check_kv_scales(kv_cache: Tensor, kv_scales: Tensor | None) -> str:
    """The scale granularity of a (cache, scales) pair: ``"none"``, ``"tensor"`` or ``"token"``.

    - float cache: no scales (``kv_scales`` None);
    - ``"tensor"``: ``kv_scales`` (2,) fp32, one static scale for the keys and one for the
      values of the layer (vLLM's per-tensor ``k_scale`` / ``v_scale``);
    - ``"token"``: ``kv_scales`` (2, num_blocks, block_size, Hkv) fp32, one scale per cached
      (token, KV head), written with the codes (the cache's layout without the head dim).

    Raises ValueError saying what is wrong otherwise.
    """
    if not is_quantized_cache(kv_cache):
        if kv_scales is not None:
            raise ValueError(f"kv_scales are only for an int8 or fp8 cache; this cache is {kv_cache.dtype}")
        return "none"
    if kv_scales is None:
        raise ValueError(
            f"a {kv_cache.dtype} cache needs kv_scales: (2,) per-tensor or (2, blocks, block_size, Hkv) per-token"
        )
    if kv_scales.dtype != torch.float32:
        raise ValueError(f"kv_scales must be float32, got {kv_scales.dtype}")
    if tuple(kv_scales.shape) == (2,):
        return "tensor"
    if tuple(kv_scales.shape) == tuple(kv_cache.shape[:4]):
        return "token"
    raise ValueError(
        f"kv_scales {tuple(kv_scales.shape)} fit neither (2,) (per tensor) nor {tuple(kv_cache.shape[:4])} "
        "(per token and KV head) for this cache"
    )


def quantize_kv(x: Tensor, dtype: torch.dtype, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric quantization of rows ``x`` (..., D) to ``dtype`` codes; returns ``(codes, scale)``.

    ``scale`` None: one scale per row, ``amax(|row|) / qmax`` (shape ``x.shape[:-1]``; an
    all-zero row gets scale 0 and codes 0). Otherwise ``scale`` (a static scalar tensor) is
    used, and values beyond its range saturate. int8 rounds half away from zero; fp8 e4m3
    rounds to nearest even (a cast). The Triton cache-write kernel does the same fp32 ops.
    """
    qmax = KV_CACHE_QMAX[dtype]
    xf = x.float()
    if scale is None:
        scale = xf.abs().amax(dim=-1) / qmax
        s = scale.unsqueeze(-1)
    else:
        s = scale.float()
    y = (xf / torch.where(s == 0, torch.ones_like(s), s)).clamp(-qmax, qmax)
    if dtype == torch.int8:
        y = torch.where(y >= 0, torch.floor(y + 0.5), torch.ceil(y - 0.5))
    return y.to(dtype), scale


def _as_bytes(x: Tensor) -> Tensor:
    """fp8 tensors viewed as uint8 for indexing (CUDA index kernels do not all take fp8); others as they are."""
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def dequantize_kv(codes: Tensor, scale: Tensor) -> Tensor:
    """fp32 values of ``codes`` (..., D): ``codes * scale`` (scale per row (...), or a scalar)."""
    s = scale if scale.dim() == 0 else scale.unsqueeze(-1)
    return codes.float() * s


@torch.library.custom_op("kiln::paged_attention", mutates_args=("kv_cache", "kv_scales"))
def paged_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float | None,
    kv_scales: Tensor | None,
) -> Tensor:
    """Causal attention of a flattened batch of sequences over a block-paged KV cache.

    Layout (vLLM's, Kwon et al. 2023): the token axis of ``q``/``k``/``v`` (1, H, T, D)
    holds the new tokens of every scheduled sequence back to back; sequence ``i`` owns
    tokens ``query_start_loc[i]:query_start_loc[i+1]``. ``kv_cache`` (2, num_blocks,
    block_size, Hkv, D) holds keys ([0]) and values ([1]); token ``t``'s key and value are
    written at flat slot ``slot_mapping[t]`` (``block * block_size + offset``; negative:
    skip). Sequence ``i`` then attends over its first ``seq_lens[i]`` cached tokens, found
    through ``block_tables[i]``, with its queries aligned to the end (causal).

    Quantized cache (int8 or fp8 e4m3 ``kv_cache``): keys and values are quantized as they
    are written and dequantized as they are read, with ``kv_scales`` (see
    :func:`check_kv_scales`): static per-tensor scales are read, per-token scales are written
    beside the codes (so the op mutates ``kv_scales`` too).

    ``scale`` and ``kv_scales`` have no defaults: the dispatcher drops trailing arguments equal to
    their defaults before a Python kernel sees them, and torch 2.11's in-place bookkeeping of the
    mutated ``kv_scales`` then indexes past the arguments it was given (IndexError).
    """
    return paged_attention_reference(
        q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, scale, kv_scales
    )


def write_kv_cache(
    k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor, kv_scales: Tensor | None = None
) -> None:
    """Reference cache write: ``kv_cache[:, slot]`` <- the token's key and value (slot < 0: skipped).

    A float cache stores the values cast to its dtype; a quantized one stores
    :func:`quantize_kv` codes (and, per token, their scales in ``kv_scales``).
    """
    mode = check_kv_scales(kv_cache, kv_scales)
    _, num_blocks, block_size, hkv, d = kv_cache.shape
    flat = _as_bytes(kv_cache.view(2, num_blocks * block_size, hkv, d))  # (2, slots, Hkv, D)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for c, x in enumerate((k, v)):
        rows = x[0].transpose(0, 1)[keep]  # (T, Hkv, D)
        if mode == "none":
            flat[c, slots] = rows.to(kv_cache.dtype)
        elif mode == "tensor":
            flat[c, slots] = _as_bytes(quantize_kv(rows, kv_cache.dtype, kv_scales[c])[0])  # type: ignore[index]
        else:
            codes, s = quantize_kv(rows, kv_cache.dtype)  # s: (T, Hkv)
            flat[c, slots] = _as_bytes(codes)
            kv_scales.view(2, num_blocks * block_size, hkv)[c, slots] = s  # type: ignore[union-attr]


def gather_kv(
    kv_cache: Tensor, block_table: Tensor, length: int, kv_scales: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The first ``length`` cached keys and values of one sequence, as (1, Hkv, length, D).

    A float cache gives its own dtype; a quantized cache gives the dequantized fp32 values.
    """
    mode = check_kv_scales(kv_cache, kv_scales)
    block_size = kv_cache.shape[2]
    n_blocks = (length + block_size - 1) // block_size
    blocks = block_table[:n_blocks].long()
    out = []
    for c in (0, 1):
        x = _as_bytes(kv_cache)[c, blocks].flatten(0, 1)[:length].view(kv_cache.dtype)  # (length, Hkv, D)
        if mode == "tensor":
            x = dequantize_kv(x, kv_scales[c])  # type: ignore[index]
        elif mode == "token":
            x = dequantize_kv(x, kv_scales[c, blocks].flatten(0, 1)[:length])  # type: ignore[index]
        out.append(x.transpose(0, 1).unsqueeze(0))
    return out[0], out[1]


def paged_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float | None = None,
    kv_scales: Tensor | None = None,
) -> Tensor:
    """The plain-torch reference of ``kiln::paged_attention`` (one sequence at a time).

    A float cache is read in q's dtype; a quantized cache is dequantized to fp32 (the kernels
    multiply exact codes by the scales in fp32). Attention itself runs in fp32.
    """
    write_kv_cache(k, v, kv_cache, slot_mapping, kv_scales)
    quantized = is_quantized_cache(kv_cache)
    out = torch.zeros_like(q)  # (1, Hq, T, D); rows of padding tokens stay zero
    starts = query_start_loc.tolist()
    for i, length in enumerate(seq_lens.tolist()):
        lo, hi = starts[i], starts[i + 1]
        if hi == lo:
            continue
        ks, vs = gather_kv(kv_cache, block_tables[i], length, kv_scales)
        if not quantized:
            ks, vs = ks.to(q.dtype), vs.to(q.dtype)
        out[:, :, lo:hi] = attention_reference(q[:, :, lo:hi], ks, vs, None, True, scale)
    return out


@paged_attention.register_fake
def _paged_attention_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float | None,
    kv_scales: Tensor | None,
) -> Tensor:
    return torch.empty_like(q)


@invariant(torch.ops.kiln.paged_attention.default)
def _paged_attention_invariant(node: Node) -> str | None:
    q, k, v, cache = (a.meta.get("val") for a in node.args[:4])  # type: ignore[union-attr]
    if cache is None or cache.dim() != 5 or cache.shape[0] != 2:
        return "kv_cache must be (2, num_blocks, block_size, Hkv, D)"
    if k.shape[1] != cache.shape[3] or k.shape[-1] != cache.shape[4]:
        return f"k (heads {k.shape[1]}, dim {k.shape[-1]}) does not match the cache (heads {cache.shape[3]}, dim {cache.shape[4]})"
    if isinstance(q.shape[1], int) and q.shape[1] % k.shape[1]:
        return f"query heads {q.shape[1]} are not a multiple of kv heads {k.shape[1]}"
    scales = node.args[9] if len(node.args) > 9 else node.kwargs.get("kv_scales")
    scales_val = scales.meta.get("val") if isinstance(scales, Node) else None
    if scales is not None and scales_val is None:
        return "kv_scales needs shape metadata"
    if scales_val is not None and not is_quantized_cache(cache):
        return f"kv_scales are only for an int8 or fp8 cache; this cache is {cache.dtype}"
    if is_quantized_cache(cache):
        if scales_val is None:
            return f"a {cache.dtype} cache needs kv_scales"
        if scales_val.dtype != torch.float32:
            return f"kv_scales must be float32, got {scales_val.dtype}"
        shape = tuple(scales_val.shape)
        if shape != (2,) and (
            len(shape) != 4 or any(str(a) != str(b) for a, b in zip(shape, cache.shape[:4], strict=True))
        ):
            return f"kv_scales {shape} fit neither (2,) nor the cache's (2, blocks, block_size, Hkv) {tuple(cache.shape[:4])}"
    return None


# --------------------------------------------------------------------------------------
# kiln::gemv — a linear whose few rows (decode) stream the weight with a split-K kernel on CUDA.
# --------------------------------------------------------------------------------------


@torch.library.custom_op("kiln::gemv", mutates_args=())
def gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x (..., K) @ weight (N, K)ᵀ + bias (N,)``, as ``aten.linear``; the CUDA kernel
    (``kiln.backends.triton.gemv``) streams the weight with a split-K GEMV when x has few rows."""
    return gemv_reference(x, weight, bias)


def gemv_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The plain-torch reference of ``kiln::gemv``: fp32 products and sums, output in x's dtype."""
    b = bias.float() if bias is not None else None
    return torch.nn.functional.linear(x.float(), weight.float(), b).to(x.dtype)


@gemv.register_fake
def _gemv_fake(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@invariant(torch.ops.kiln.gemv.default)
def _gemv_invariant(node: Node) -> str | None:
    x, w = (a.meta.get("val") for a in node.args[:2])  # type: ignore[union-attr]
    if w is None or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        return f"weight must be (N, K) with K = x's last dim {x.shape[-1]}"
    if w.dtype != x.dtype:
        return f"weight dtype {w.dtype} differs from x's {x.dtype}"
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    b = bias.meta.get("val") if isinstance(bias, Node) else None
    if bias is not None and (b is None or tuple(b.shape) != (w.shape[0],)):
        return f"bias must be ({w.shape[0]},)"
    return None


# --------------------------------------------------------------------------------------
# kiln::rms_norm — RMSNorm in one kernel (the captured graph spells it in six to eight ops).
# --------------------------------------------------------------------------------------


@torch.library.custom_op("kiln::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float, upcast: bool) -> Tensor:
    """``weight * norm(x)`` with ``norm(x) = x / sqrt(mean(x², -1) + eps)``, as Llama-family models write it:
    with ``upcast`` the norm runs in fp32 and is cast back to x's dtype before the scale (Hugging Face's
    ``LlamaRMSNorm``); the CUDA kernel (``kiln.backends.triton.rms_norm``) does a row in one program."""
    return rms_norm_reference(x, weight, eps, upcast)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, upcast: bool) -> Tensor:
    """The plain-torch reference of ``kiln::rms_norm``: the op sequence ``lower-rms-norm`` replaces."""
    h = x.float() if upcast else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h.to(x.dtype) if upcast else h)


@rms_norm.register_fake
def _rms_norm_fake(x: Tensor, weight: Tensor, eps: float, upcast: bool) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@invariant(torch.ops.kiln.rms_norm.default)
def _rms_norm_invariant(node: Node) -> str | None:
    x, w = (a.meta.get("val") for a in node.args[:2])  # type: ignore[union-attr]
    if w is None or w.dim() != 1 or str(w.shape[0]) != str(x.shape[-1]):
        return f"weight must be (D,) with D = x's last dim {x.shape[-1]}"
    return None



@torch.library.custom_op("kiln::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float, upcast: bool) -> tuple[Tensor, Tensor]:
    """``(rms_norm(x + residual), x + residual)``: a residual add and the RMSNorm that reads it, in one kernel
    (vLLM's ``fused_add_rms_norm``); the sum is returned too, as the next residual add reads it."""
    return add_rms_norm_reference(x, residual, weight, eps, upcast)


def add_rms_norm_reference(x: Tensor, residual: Tensor, weight: Tensor, eps: float, upcast: bool) -> tuple[Tensor, Tensor]:
    """The plain-torch reference of ``kiln::add_rms_norm``: the add and the norm ``fuse-add-rms-norm`` replaces."""
    s = x + residual
    return rms_norm_reference(s, weight, eps, upcast), s


@add_rms_norm.register_fake
def _add_rms_norm_fake(x: Tensor, residual: Tensor, weight: Tensor, eps: float, upcast: bool) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), torch.empty_like(x)


@invariant(torch.ops.kiln.add_rms_norm.default)
def _add_rms_norm_invariant(node: Node) -> str | None:
    x, r, w = (a.meta.get("val") for a in node.args[:3])  # type: ignore[union-attr]
    if x is None or r is None or w is None:
        return None
    if x.dtype != r.dtype or [str(d) for d in x.shape] != [str(d) for d in r.shape]:
        return f"x {tuple(x.shape)} {x.dtype} and residual {tuple(r.shape)} {r.dtype} must match"
    if w.dim() != 1 or str(w.shape[0]) != str(x.shape[-1]):
        return f"weight must be (D,) with D = x's last dim {x.shape[-1]}"
    return None


# --------------------------------------------------------------------------------------
# kiln::silu_mul — the gated MLP's activation, silu(gate) * up, in one kernel (two in the graph).
# --------------------------------------------------------------------------------------


@torch.library.custom_op("kiln::silu_mul", mutates_args=())
def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (SwiGLU, Shazeer 2020; vLLM's ``silu_and_mul``); the CUDA kernel
    (``kiln.backends.triton.silu_mul``) reads both halves once and writes the product."""
    return silu_mul_reference(gate, up)


def silu_mul_reference(gate: Tensor, up: Tensor) -> Tensor:
    """The plain-torch reference of ``kiln::silu_mul``: the two ops ``fuse-silu-mul`` replaces."""
    return torch.nn.functional.silu(gate) * up


@silu_mul.register_fake
def _silu_mul_fake(gate: Tensor, up: Tensor) -> Tensor:
    return gate.new_empty(gate.shape)

# --------------------------------------------------------------------------------------
# kiln::rotary — rotary position embedding in one kernel (the captured graph spells it in five
# element-wise ops per tensor: x * cos, the halves swapped and one negated, times sin, added).
# --------------------------------------------------------------------------------------


@torch.library.custom_op("kiln::rotary", mutates_args=())
def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` (Su et al. 2021, RoFormer; the ``rotate_half`` convention of
    Llama / GPT-NeoX): ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``; ``cos`` and ``sin``
    broadcast to x's shape. The CUDA kernel (``kiln.backends.triton.rotary``) does it in one launch."""
    return rotary_reference(x, cos, sin)


def rotary_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The plain-torch reference of ``kiln::rotary``: the op sequence ``lower-rotary`` replaces."""
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


@rotary.register_fake
def _rotary_fake(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("kiln::rotary_pair", mutates_args=())
def rotary_pair(x: Tensor, y: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """``(rotary(x, cos, sin), rotary(y, cos, sin))``: a layer's queries and keys, rotated by one table in
    one CUDA launch (``fuse-rotary-pairs``); x and y share the last dimension."""
    return rotary_pair_reference(x, y, cos, sin)


def rotary_pair_reference(x: Tensor, y: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The plain-torch reference of ``kiln::rotary_pair``: two :func:`rotary_reference` calls."""
    return rotary_reference(x, cos, sin), rotary_reference(y, cos, sin)


@rotary_pair.register_fake
def _rotary_pair_fake(x: Tensor, y: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(y)


def _rotation_problem(x: Tensor, cos: Tensor, sin: Tensor) -> str | None:
    """Why ``cos`` and ``sin`` cannot rotate ``x`` (dtype, broadcast), or None."""
    if x.dtype != cos.dtype or x.dtype != sin.dtype:
        return f"x, cos and sin must share a dtype, got {x.dtype}, {cos.dtype}, {sin.dtype}"
    try:
        shape = torch.broadcast_shapes(x.shape, cos.shape, sin.shape)
    except RuntimeError:
        return f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must broadcast to x {tuple(x.shape)}"
    if len(shape) != x.dim() or any(str(a) != str(b) for a, b in zip(shape, x.shape, strict=True)):
        return f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must broadcast to x {tuple(x.shape)}"
    return None


@invariant(torch.ops.kiln.rotary.default)
def _rotary_invariant(node: Node) -> str | None:
    x, cos, sin = (a.meta.get("val") for a in node.args[:3])  # type: ignore[union-attr]
    if x is None or cos is None or sin is None:
        return None
    return _rotation_problem(x, cos, sin)


@invariant(torch.ops.kiln.rotary_pair.default)
def _rotary_pair_invariant(node: Node) -> str | None:
    x, y, cos, sin = (a.meta.get("val") for a in node.args[:4])  # type: ignore[union-attr]
    if x is None or y is None or cos is None or sin is None:
        return None
    if x.shape[-1] != y.shape[-1]:
        return f"x {tuple(x.shape)} and y {tuple(y.shape)} must share the last dimension"
    return _rotation_problem(x, cos, sin) or _rotation_problem(y, cos, sin)


__all__ = [
    "INVARIANTS",
    "add_rms_norm",
    "add_rms_norm_reference",
    "attention",
    "attention_reference",
    "check_kv_scales",
    "dequantize_kv",
    "gather_kv",
    "gemv",
    "gemv_reference",
    "invariant",
    "is_kiln_op",
    "is_quantized_cache",
    "KV_CACHE_QMAX",
    "paged_attention",
    "paged_attention_reference",
    "quantize_kv",
    "rms_norm",
    "rms_norm_reference",
    "rotary",
    "rotary_pair",
    "rotary_pair_reference",
    "rotary_reference",
    "silu_mul",
    "silu_mul_reference",
    "write_kv_cache",
]
