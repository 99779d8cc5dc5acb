"""Quantized linears on the GPU: the CUDA implementations of ``kiln::qlinear_*`` and of dynamic quantization.

Each function has the signature of its op and matches the op's plain-torch reference in
:mod:`kiln.quantize.ops` (tests: ``tests/backends/triton/test_quant_gemm.py``):

================== =============================================================================
op                 how it runs
================== =============================================================================
qlinear_w8a16      decode (M <= 16): the split-K weight-streaming kernels of :mod:`quant_splitk_kernels`
qlinear_w4a16      (a CUDA-core GEMV for a few rows, a ``tl.dot`` form up to 16); larger M: weights
                   dequantized in registers and a ``tl.dot`` GEMM, or (M > 64) dequantize + cuBLAS.
                   The fastest candidate per shape is timed once (:mod:`quant_gemm_tune`). Any group
                   size dividing K (int4: K % 8 == 0; split-K needs whole 32-bit words per group).
qlinear_w8a8       decode: the split-K kernels with int8 activation codes; else int8 x int8 ``tl.dot``
                   with int32 accumulation; per-token x per-channel scales (and an activation zero
                   point) in the epilogue.
qlinear_fp8        e4m3 activations: ``torch._scaled_mm`` (cuBLASLt, tensor-wise or row-wise
                   scales); float activations (weight-only fp8): the weight-only kernels. Needs
                   compute capability >= 8.9.
dynamic_scale      per token: a Triton row max; per tensor: its torch reference.
quantize           per-token / per-tensor scales (activations): a Triton row kernel; per-axis
                   and per-group forms (weights, quantized once at compile time): the torch reference.
dequantize         its torch reference (graphs that keep ``dequantize + linear``).
================== =============================================================================

Decode (M = 1..16) is memory bound: every weight byte is read once, in (N tiles x K splits)
programs enough to fill the GPU, codes decoded in registers and each group's scale applied once
per word or K step; the last K split of a tile adds up the others' partial sums (one launch, no
zeroed output). Prefill is compute bound: tensor cores, or dequantize + cuBLAS.

Tensors on the CPU run only in Triton's interpreter (``TRITON_INTERPRET=1`` set before this
module is imported); ``torch._scaled_mm`` runs wherever torch has it.
"""

from __future__ import annotations

import torch
import triton

from kiln.backends.triton import _utils
from kiln.backends.triton import quant_gemm_kernels as K
from kiln.backends.triton import quant_splitk_kernels as K2
from kiln.backends.triton._utils import arrival_counters, check_triton_device, interpret_mode, pdl_enabled
from kiln.backends.triton.quant_gemm_tune import (
    Candidate,
    KernelTuner,
    m_bucket,
    w8a8_candidates,
    weight_only_candidates,
)
from kiln.errors import ConfigError, KilnError
from kiln.quantize import ops as ref

_INTERPRET = interpret_mode()
#: Under PDL (``_utils.QUANT_PDL``) the split-K kernels let the next kernel launch after their K loop: the int4
#: llama-8b step took 3.176 ms on an H100, 3.254 ms released at their start as the bf16 GEMV is (session 12;
#: session 10 had measured the start release 18% slower than no PDL, another machine). False: the start release.
PDL_RELEASE_LATE = True
TUNER = KernelTuner()
#: ``use_fast_accum`` of ``torch._scaled_mm`` (fp8 tensor-core accumulation without periodic fp32 promotion).
FP8_FAST_ACCUM = True
INT8, INT4, FP8 = 0, 1, 2  # WKIND of the kernels
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------
# Operands
# --------------------------------------------------------------------------------------


def _fail(op: str, msg: str) -> None:
    raise ConfigError(f"{op}: {msg}")


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x (..., K)`` as a 2-D (M, K) tensor with unit stride along K."""
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (uninitialized); tests poison it to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


class WeightOnly:
    """A weight-only linear's operands, normalized for the kernels (see ``quant_gemm_kernels``)."""

    def __init__(self, op: str, kind: int, w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None,
                 group_size: int | None, k: int) -> None:  # fmt: skip
        n = w.shape[0]
        self.op, self.kind, self.n, self.k = op, kind, n, k
        self.w = w if w.stride(-1) == 1 else w.contiguous()
        self.zp_default = 8 if kind == INT4 and zp is None else 0
        g = group_size
        if g is not None and scale.dim() == 2 and scale.shape[1] == 1 and g == k:
            g, scale = None, scale[:, 0]  # one group of K per row is a per-channel scale
            zp = zp[:, 0] if zp is not None else None
        scale = _f32(scale)
        if g is None:
            self.smode = 1 if scale.dim() == 1 else 0
            self.group = None
            s_strides = (scale.stride(0), 0) if scale.dim() == 1 else (0, 0)
        else:
            if scale.dim() != 2 or tuple(scale.shape) != (n, k // g) or k % g:
                _fail(
                    op,
                    f"group size {g} needs K % g == 0 and a scale of shape ({n}, {k // g}), got {tuple(scale.shape)}",
                )
            self.smode, self.group = 2, g
            s_strides = scale.stride()
        if zp is not None and tuple(zp.shape) != tuple(scale.shape):
            _fail(op, f"the zero point {tuple(zp.shape)} must have the scale's shape {tuple(scale.shape)}")
        self.scale, self.zp = scale, zp
        self.s_strides = s_strides
        self.z_strides = (
            (0, 0) if zp is None or zp.dim() == 0 else (zp.stride(0), zp.stride(1) if zp.dim() == 2 else 0)
        )
        cpw = 8 if kind == INT4 else 4  # codes per 32-bit word
        self.k_words = k // cpw
        # the split-K kernels read the codes as int32 words: rows of whole, 4-byte aligned words
        row_bytes = self.w.shape[1] * self.w.element_size()
        aligned = (
            k % cpw == 0
            and row_bytes % 4 == 0
            and (self.w.stride(0) * self.w.element_size()) % 4 == 0
            and self.w.data_ptr() % 4 == 0
        )
        self.words = self.w.view(torch.int32) if aligned and n > 0 else None
        self.group_words = None if self.group is None else self.group // cpw  # per-word scales need g % cpw == 0
        self.splitk_ok = self.words is not None and (self.group is None or self.group % cpw == 0)
        self.dot_ok = zp is None or self.smode == 2  # see launch_splitk

    def key(self) -> tuple:
        return (self.kind, self.n, self.k, self.group, self.smode, self.zp is not None, self.splitk_ok)


# --------------------------------------------------------------------------------------
# Decode launches: the split-K kernels of ``quant_splitk_kernels`` (each launch is a tuning candidate)
# --------------------------------------------------------------------------------------

def _sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (4 for the interpreter, which runs programs one after another)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


_SMS: dict[int, int] = {}
_RESIDENT: dict[tuple, int] = {}  # programs of a compiled split-K kernel one SM holds at once


def _note_residency(key: tuple, compiled: object) -> None:
    """How many programs of ``compiled`` fit on an SM at once (registers, threads), from its binary."""
    regs = getattr(compiled, "n_regs", None)
    meta = getattr(compiled, "metadata", None)
    if key in _RESIDENT or not regs or meta is None:  # interpreter: nothing compiled
        return
    threads = 32 * meta.num_warps
    alloc = -(-regs // 8) * 8  # registers are allocated 8 per thread at a time
    _RESIDENT[key] = max(1, min(65536 // (alloc * threads), 2048 // threads))


def split_plan(k_words: int, tiles: int, params: dict, sms: int = 132, resident: int | None = None) -> tuple[int, int]:
    """``(SPLIT, STEPS)``: K cut into ``SPLIT`` slices of ``STEPS`` steps of ``BLOCK_KW`` words.

    ``params["SPLIT"]`` fixes the number of slices (tests); else the ``tiles`` (M x N) output
    tiles times the slices stay within ``min(params["WAVES"], resident)`` programs per SM
    (``resident``: how many the compiled kernel fits on one), so a launch is one wave of
    resident programs (a second, part-full wave would add a whole program's time).
    """
    steps = triton.cdiv(k_words, params["BLOCK_KW"])
    per_sm = min(params.get("WAVES", 1), resident or params.get("WAVES", 1))
    want = params.get("SPLIT") or (per_sm * sms) // max(tiles, 1)
    per = triton.cdiv(steps, max(1, min(steps, want)))
    return triton.cdiv(steps, per), per


def launch_splitk(
    x: torch.Tensor, op: WeightOnly, bias: torch.Tensor | None, y: torch.Tensor, c: Candidate,
    x_codes: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> None:  # fmt: skip
    """The split-K decode kernels: ``c.kernel`` "gemv" (a row per program) or "dot" (16 rows, ``tl.dot``).

    ``x_codes`` = (scale, zero point) when ``x`` holds int8 codes (w8a8): (M,) or (1,) each.
    """
    p = c.params
    m = x.shape[0]
    dot = c.kernel == "dot"
    even = op.k_words % p["BLOCK_KW"] == 0
    if dot and not even:
        _fail(op.op, f"the tl.dot split-K kernel takes whole K steps: K={op.k} must be a multiple of "
                     f"{op.k // op.k_words * p['BLOCK_KW']} (the GEMV and the tensor-core GEMM take any K)")  # fmt: skip
    if dot and not op.dot_ok:
        _fail(op.op, "the tl.dot split-K kernel does not take per-channel zero points (its H100 results were wrong "
                     "with them, cause not found); the GEMV and the tensor-core GEMM do")  # fmt: skip
    m_tiles = triton.cdiv(m, p["BLOCK_M"]) if dot else m
    tiles = m_tiles * triton.cdiv(op.n, p["BLOCK_N"])
    res_key = (c.kernel, tuple(sorted(p.items())), op.kind, op.smode, op.zp is not None, x.dtype, x_codes is None)
    split, steps = split_plan(op.k_words, tiles, p, _sm_count(x.device), _RESIDENT.get(res_key))
    ws = torch.empty(split * m * op.n, dtype=torch.float32, device=x.device) if split > 1 else op.scale
    cnt = arrival_counters(x.device, tiles)
    zp = op.zp if op.zp is not None else op.scale
    xs, xz = x_codes if x_codes is not None else (op.scale, None)
    gw = op.group_words or 1
    group_per_step = op.smode == 2 and gw % p["BLOCK_KW"] == 0
    if dot:
        kernel = K2.wo_dot_kernel
        extra = dict(BLOCK_M=p["BLOCK_M"], DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                     UPCAST_DOT=_INTERPRET and (x.dtype == torch.bfloat16 or x_codes is not None))  # fmt: skip
    else:  # 16-bit x read two values per 32-bit load
        kernel = K2.wo_gemv_kernel
        pairs = x.stride(0) % 2 == 0 and x.data_ptr() % 4 == 0
        xp = {torch.bfloat16: 1, torch.float16: 2}.get(x.dtype, 0) if pairs else 0
        if xp:
            x = x.view(torch.int32)
        # prmt decodes int8 codes to within ~2e-5 of the fp32 sums (16-bit x only: far below their rounding)
        prmt = p.get("PRMT", False) and op.kind != FP8 and (xp > 0 or op.kind == INT4)
        # the packed form takes int4 codes and bf16 x pairs; elsewhere a PACKED candidate runs the fp32 form
        packed = bool(p.get("PACKED", False)) and op.kind == INT4 and xp == 1 and x_codes is None
        extra = dict(XP=xp, PRMT=prmt, EVEN_K=even, USE_ASM=not _INTERPRET, DEPTH=p.get("DEPTH", 1),
                     XPRE=bool(p.get("XPRE", False)) and xp > 0,  # x's prefetch takes 16-bit pairs
                     STAGES=int(p.get("STAGES", 1)), PACKED=packed)
    pdl = _utils.QUANT_PDL and pdl_enabled(x.device, _INTERPRET)
    compiled = kernel[(tiles, split)](
        x, xs, xz if xz is not None else xs, op.words, op.scale, zp, bias if bias is not None else op.scale, y, ws, cnt,
        m, op.n, op.k_words, steps, split,
        x.stride(0), op.words.stride(0), *op.s_strides, *op.z_strides, y.stride(0),
        WKIND=op.kind, SMODE=op.smode, HAS_ZP=op.zp is not None, ZP_DEFAULT=op.zp_default,
        HAS_BIAS=bias is not None, GW=gw, GROUP_PER_STEP=group_per_step,
        X_CODES=x_codes is not None, XS_PER_ROW=xs.numel() > 1, HAS_XZP=xz is not None, IS_SPLIT=split > 1,
        BLOCK_N=p["BLOCK_N"], BLOCK_KW=p["BLOCK_KW"], USE_PDL=pdl, RELEASE_LATE=PDL_RELEASE_LATE,
        num_warps=p["num_warps"], num_stages=1,
        launch_pdl=pdl, **extra,
    )  # fmt: skip
    _note_residency(res_key, compiled)


def _mm_block_k(op: WeightOnly, block_k: int) -> tuple[int, int]:
    """``(BLOCK_K, SMODE)`` for the tensor-core GEMM: a K step inside one group, else per-element scales."""
    if op.smode != 2:
        return block_k, op.smode
    bk = block_k
    while bk >= 16 and op.group % bk:  # type: ignore[operator]
        bk //= 2
    return (bk, 2) if bk >= 16 else (block_k, 3)


def launch_mm(
    x: torch.Tensor, op: WeightOnly, bias: torch.Tensor | None, y: torch.Tensor, c: Candidate
) -> None:
    """The weight-only GEMM on the tensor cores."""
    p = c.params
    m = x.shape[0]
    bk, smode = _mm_block_k(op, p["BLOCK_K"])
    split = p.get("SPLIT_K", 1)
    if split > 1:
        y.zero_()  # the splits add into it
    grid = (triton.cdiv(m, p["BLOCK_M"]) * triton.cdiv(op.n, p["BLOCK_N"]), split)
    zp = op.zp if op.zp is not None else op.scale
    K.wo_mm_kernel[grid](
        x, op.w, op.scale, zp, bias if bias is not None else op.scale, y,
        m, op.n, op.k,
        x.stride(0), op.w.stride(0), *op.s_strides, *op.z_strides, y.stride(0),
        G=op.group or 1, WKIND=op.kind, SMODE=smode, HAS_ZP=op.zp is not None, ZP_DEFAULT=op.zp_default,
        HAS_BIAS=bias is not None, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        USE_ASM=not _INTERPRET and x.dtype != torch.float32, EVEN_K=op.k % bk == 0,
        UPCAST_DOT=_INTERPRET and x.dtype == torch.bfloat16,
        BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], BLOCK_K=bk, GROUP_M=p["GROUP_M"], SPLIT_K=split,
        num_warps=p["num_warps"], num_stages=p["num_stages"],
    )  # fmt: skip


def dequantize_weight(op: WeightOnly, dtype: torch.dtype, block: tuple[int, int] = (32, 128)) -> torch.Tensor:
    """The dense weight ``(q - z) * s`` as (N, K) in ``dtype`` (fp32 math, as the reference)."""
    bn, bk = block
    out = new_output((op.n, op.k), dtype, op.w.device)
    zp = op.zp if op.zp is not None else op.scale
    K.dequantize_kernel[(triton.cdiv(op.n, bn), triton.cdiv(op.k, bk))](
        op.w, op.scale, zp, out, op.n, op.k, op.group or op.k,
        op.w.stride(0), *op.s_strides, *op.z_strides, out.stride(0),
        WKIND=op.kind, SMODE=op.smode, HAS_ZP=op.zp is not None, ZP_DEFAULT=op.zp_default,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
    )  # fmt: skip
    return out


def launch_dequant_matmul(
    x: torch.Tensor, op: WeightOnly, bias: torch.Tensor | None, y: torch.Tensor, c: Candidate
) -> None:
    """Dequantize to ``x``'s dtype, then cuBLAS (large M, where the GEMM is compute bound)."""
    w = dequantize_weight(op, x.dtype, (c.params.get("BLOCK_N", 32), c.params.get("BLOCK_K", 128)))
    if bias is not None:
        torch.addmm(bias, x, w.t(), out=y)
    else:
        torch.mm(x, w.t(), out=y)


_WO_LAUNCH = {"gemv": launch_splitk, "dot": launch_splitk, "mm": launch_mm, "dequant_matmul": launch_dequant_matmul}


def weight_only_linear(
    x: torch.Tensor, op: WeightOnly, bias: torch.Tensor | None, candidate: Candidate | None = None
) -> torch.Tensor:
    """``linear(x, dequantize(w), bias)`` for a weight-only ``op``; ``candidate`` forces a kernel (tests)."""
    if x.dtype not in _FLOATS:
        _fail(op.op, f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.shape[-1] != op.k:
        _fail(op.op, f"x has K={x.shape[-1]} but the weight holds K={op.k}")
    if bias is not None and tuple(bias.shape) != (op.n,):
        _fail(op.op, f"bias must be ({op.n},), got {tuple(bias.shape)}")
    tensors = [x, op.w, op.scale] + [t for t in (op.zp, bias) if t is not None]
    check_triton_device(op.op, _INTERPRET, *tensors)
    lead = x.shape[:-1]
    x2 = _rows(x, op.k)
    m = x2.shape[0]
    y = new_output((m, op.n), x.dtype, x.device)
    if m == 0 or op.n == 0:
        return y.reshape(*lead, op.n)
    if candidate is None:
        cands = weight_only_candidates(m, op.k_words if op.splitk_ok else None, _INTERPRET, dot=op.dot_ok,
                                       packed=op.kind == INT4 and x.dtype == torch.bfloat16)  # fmt: skip
        key = ("wo", m_bucket(m), x.dtype, bias is not None, *op.key())
        candidate = TUNER.choose(key, cands, lambda c: _WO_LAUNCH[c.kernel](x2, op, bias, y, c), x.device)
    _WO_LAUNCH[candidate.kernel](x2, op, bias, y, candidate)
    return y.reshape(*lead, op.n)


# --------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------


def qlinear_w8a16(x, w, w_scale, w_zero_point, group_size, bias, *, candidate=None):  # type: ignore[no-untyped-def]
    """``kiln::qlinear_w8a16``: int8 ``w (N, K)``, scale ``()``, ``(N,)`` or ``(N, K // g)``."""
    if w.dtype != torch.int8 or w.dim() != 2:
        _fail("qlinear_w8a16", f"w must be int8 (N, K), got {w.dtype} {tuple(w.shape)}")
    op = WeightOnly("qlinear_w8a16", INT8, w, w_scale, w_zero_point, group_size, w.shape[1])
    return weight_only_linear(x, op, bias, candidate)


def qlinear_w4a16(x, w, w_scale, w_zero_point, group_size, bias, *, candidate=None):  # type: ignore[no-untyped-def]
    """``kiln::qlinear_w4a16``: packed uint8 ``w (N, K // 2)``, scale / zero point ``(N, K // g)``."""
    if w.dtype != torch.uint8 or w.dim() != 2:
        _fail("qlinear_w4a16", f"w must be packed uint8 (N, K // 2), got {w.dtype} {tuple(w.shape)}")
    if w_zero_point is not None and w_zero_point.dtype != torch.uint8:
        _fail("qlinear_w4a16", f"the int4 zero point must be uint8, got {w_zero_point.dtype}")
    if w.shape[1] % 4:
        _fail(
            "qlinear_w4a16",
            f"the int4 kernels read 8 codes per 32-bit word: K must be a multiple of 8, got {2 * w.shape[1]}",
        )
    op = WeightOnly("qlinear_w4a16", INT4, w, w_scale, w_zero_point, group_size, 2 * w.shape[1])
    return weight_only_linear(x, op, bias, candidate)


def launch_w8a8(x, x_scale, x_zp, w, w_scale, bias, y, c: Candidate) -> None:  # type: ignore[no-untyped-def]
    """The int8 GEMM; ``x_scale`` / ``x_zp`` are (M,) or (1,) fp32 / int8, ``w_scale`` (N,) or (1,)."""
    p = c.params
    m, k = x.shape
    n = w.shape[0]
    grid = (triton.cdiv(m, p["BLOCK_M"]) * triton.cdiv(n, p["BLOCK_N"]),)
    K.w8a8_kernel[grid](
        x, x_scale, x_zp if x_zp is not None else x_scale, w, w_scale, bias if bias is not None else w_scale, y,
        m, n, k, x.stride(0), w.stride(0), y.stride(0),
        XS_PER_ROW=x_scale.numel() > 1, WS_PER_ROW=w_scale.numel() > 1,
        HAS_XZP=x_zp is not None, HAS_BIAS=bias is not None,
        BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], BLOCK_K=p["BLOCK_K"], GROUP_M=p["GROUP_M"],
        num_warps=p["num_warps"], num_stages=p["num_stages"],
    )  # fmt: skip


def qlinear_w8a8(x, x_scale, x_zero_point, w, w_scale, bias, out_dtype, *, candidate=None):  # type: ignore[no-untyped-def]
    """``kiln::qlinear_w8a8``: int8 codes ``x (..., K)`` with scale ``(..., 1)`` or ``()``, int8 ``w (N, K)``."""
    name = "qlinear_w8a8"
    if x.dtype != torch.int8 or w.dtype != torch.int8 or w.dim() != 2:
        _fail(name, f"x and w must be int8 codes, got {x.dtype} and {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    if x.shape[-1] != k:
        _fail(name, f"x has K={x.shape[-1]} but w has K={k}")
    lead = x.shape[:-1]
    x2 = _rows(x, k)
    m = x2.shape[0]
    if x_scale.numel() not in (1, m):
        _fail(name, f"the activation scale must be () or per token {(*lead, 1)}, got {tuple(x_scale.shape)}")
    if tuple(w_scale.shape) not in ((), (n,)):
        _fail(name, f"the weight scale must be () or ({n},), got {tuple(w_scale.shape)}")
    if x_zero_point is not None and x_zero_point.numel() != x_scale.numel():
        _fail(name, "the activation zero point must have the activation scale's shape")
    check_triton_device(
        name, _INTERPRET, *[t for t in (x, x_scale, x_zero_point, w, w_scale, bias) if t is not None]
    )
    xs = _f32(x_scale).reshape(-1)
    xz = x_zero_point.reshape(-1) if x_zero_point is not None else None
    ws = _f32(w_scale).reshape(-1)
    y = new_output((m, n), out_dtype, x.device)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    op = WeightOnly(name, INT8, w, ws if ws.numel() > 1 else ws.reshape(()), None, None, k)

    def launch(c: Candidate) -> None:
        if c.kernel == "w8a8":
            launch_w8a8(x2, xs, xz, w, ws, bias, y, c)
        else:
            launch_splitk(x2, op, bias, y, c, x_codes=(xs, xz))

    if candidate is None:
        key = ("w8a8", m_bucket(m), n, k, xs.numel() > 1, ws.numel() > 1, x_zero_point is not None, out_dtype,
               bias is not None, op.splitk_ok)  # fmt: skip
        cands = w8a8_candidates(m, _INTERPRET, op.k_words if op.splitk_ok else None)
        candidate = TUNER.choose(key, cands, launch, x.device)
    launch(candidate)
    return y.reshape(*lead, n)


def _check_fp8_device(name: str, t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        cap = torch.cuda.get_device_capability(t.device)
        if cap < (8, 9):
            raise KilnError(
                f"{name}: float8 e4m3 matmuls need compute capability >= 8.9 (Ada, Hopper or newer); "
                f"this GPU has {cap[0]}.{cap[1]}. Quantize with the 'w8a16' or 'w8a8' preset instead"
            )


def qlinear_fp8(x, x_scale, w, w_scale, bias, out_dtype, *, candidate=None):  # type: ignore[no-untyped-def]
    """``kiln::qlinear_fp8``: e4m3 ``w (N, K)`` with scale ``()``/``(N,)``; ``x`` e4m3 codes + scale, or float."""
    name = "qlinear_fp8"
    if w.dtype != torch.float8_e4m3fn or w.dim() != 2:
        _fail(name, f"w must be float8_e4m3fn (N, K), got {w.dtype} {tuple(w.shape)}")
    _check_fp8_device(name, w)
    n, k = w.shape
    if x_scale is None:  # weight-only fp8: the weight-only kernels with e4m3 codes
        if x.dtype != out_dtype:
            x = x.to(out_dtype)
        op = WeightOnly(name, FP8, w, w_scale, None, None, k)
        return weight_only_linear(x, op, bias, candidate)
    if x.dtype != torch.float8_e4m3fn:
        _fail(name, f"x must be float8_e4m3fn codes when x_scale is given, got {x.dtype}")
    if x.shape[-1] != k or k % 16 or n % 16:
        _fail(
            name, f"torch._scaled_mm needs K and N divisible by 16 and matching: x K={x.shape[-1]}, w {n}x{k}"
        )
    if tuple(w_scale.shape) not in ((), (n,)):
        _fail(name, f"the weight scale must be () or ({n},), got {tuple(w_scale.shape)}")
    lead = x.shape[:-1]
    x2 = _rows(x, k)
    m = x2.shape[0]
    if x_scale.numel() not in (1, m):
        _fail(name, f"the activation scale must be () or per token {(*lead, 1)}, got {tuple(x_scale.shape)}")
    xs, ws = _f32(x_scale), _f32(w_scale)
    if xs.numel() == 1 and ws.numel() == 1:  # tensor-wise scales: any output dtype
        y = torch._scaled_mm(
            x2, w.t(), xs.reshape(()), ws.reshape(()), out_dtype=out_dtype, use_fast_accum=FP8_FAST_ACCUM
        )
    elif out_dtype == torch.bfloat16:  # row-wise: (M, 1) x (1, N) scales, bf16 out
        sa = xs.reshape(-1, 1).expand(m, 1).contiguous()
        sb = ws.reshape(1, -1).expand(1, n).contiguous()
        y = torch._scaled_mm(x2, w.t(), sa, sb, out_dtype=out_dtype, use_fast_accum=FP8_FAST_ACCUM)
    else:  # row-wise scales into another dtype: a unit-scale fp32 GEMM, scaled after
        one = torch.ones((), dtype=torch.float32, device=x.device)
        acc = torch._scaled_mm(x2, w.t(), one, one, out_dtype=torch.float32, use_fast_accum=FP8_FAST_ACCUM)
        y = (acc * xs.reshape(-1, 1) * ws.reshape(1, -1)).to(out_dtype)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y.reshape(*lead, n)


# --------------------------------------------------------------------------------------
# Dynamic quantization of activations
# --------------------------------------------------------------------------------------


def dynamic_scale(x: torch.Tensor, qmax: float, per_token: bool = True) -> torch.Tensor:
    """``kiln::dynamic_scale``: ``max|x| / qmax`` per token (a Triton row max) or per tensor (torch)."""
    if not per_token or x.numel() == 0:
        return ref.dynamic_scale_reference(x, qmax, per_token)
    check_triton_device("dynamic_scale", _INTERPRET, x)
    k = x.shape[-1]
    x2 = _rows(x, k)
    out = new_output((x2.shape[0],), torch.float32, x.device)
    K.row_absmax_kernel[(x2.shape[0],)](
        x2, out, k, x2.stride(0), 1.0 / float(qmax), BLOCK_K=min(1024, triton.next_power_of_2(k))
    )
    return out.reshape(*x.shape[:-1], 1)


def quantize(  # type: ignore[no-untyped-def]
    x, scale, zero_point, qmin, qmax, dtype, axis=None, group_size=None
) -> torch.Tensor:
    """``kiln::quantize``: Triton for per-token / per-tensor scales of float activations, else the reference."""
    k = x.shape[-1] if x.dim() else 1
    rows = x.numel() // max(k, 1)
    per_row = scale.dim() == x.dim() and scale.shape[-1] == 1 and scale.numel() == rows
    simple = axis is None and group_size is None and x.dim() >= 1 and (scale.numel() == 1 or per_row)
    if (
        not simple
        or dtype not in (torch.int8, torch.float8_e4m3fn)
        or x.dtype not in _FLOATS
        or x.numel() == 0
        or (zero_point is not None and zero_point.numel() != scale.numel())
    ):
        return ref.quantize_reference(x, scale, zero_point, qmin, qmax, dtype, axis, group_size)
    if dtype == torch.float8_e4m3fn:
        _check_fp8_device("quantize", x)
    check_triton_device("quantize", _INTERPRET, x, scale)
    x2 = _rows(x, k)
    q = new_output(tuple(x2.shape), dtype, x.device)
    bk = min(1024, triton.next_power_of_2(k))
    zp = zero_point.reshape(-1) if zero_point is not None else None
    s = _f32(scale).reshape(-1)
    K.quantize_rows_kernel[(x2.shape[0], triton.cdiv(k, bk))](
        x2, s, zp if zp is not None else s, q, k, x2.stride(0), q.stride(0), float(qmin), float(qmax),
        S_PER_ROW=per_row and rows > 1, HAS_ZP=zp is not None, IS_FLOAT=dtype.is_floating_point, BLOCK_K=bk,
    )  # fmt: skip
    return q.reshape(x.shape)


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def register_quant_kernels() -> set[str]:
    """Register the functions above as the CUDA kernels of their kiln ops; returns the op names."""
    registrations = {
        "kiln::qlinear_w8a16": qlinear_w8a16,
        "kiln::qlinear_w4a16": qlinear_w4a16,
        "kiln::qlinear_w8a8": qlinear_w8a8,
        "kiln::qlinear_fp8": qlinear_fp8,
        "kiln::dynamic_scale": dynamic_scale,
        "kiln::quantize": quantize,
        "kiln::dequantize": ref.dequantize_reference,  # elementwise; only in graphs that keep dequantize + linear
    }
    for name, fn in registrations.items():
        torch.library.register_kernel(name, "cuda", fn)
    return {name.replace("::", ".") for name in registrations}


__all__ = [
    "FP8_FAST_ACCUM",
    "TUNER",
    "WeightOnly",
    "dequantize_weight",
    "dynamic_scale",
    "qlinear_fp8",
    "qlinear_w4a16",
    "qlinear_w8a8",
    "qlinear_w8a16",
    "quantize",
    "register_quant_kernels",
    "weight_only_linear",
]
