"""The quantized-GEMM kernels (``kiln.backends.triton.quant_gemm``) against the plain-torch references.

Kernels run in Triton's interpreter on the CPU (``conftest.py`` sets ``TRITON_INTERPRET=1``), or
compiled on a GPU when there is one, on small random shapes with ragged M / N / K edges; outputs
are poisoned with NaN first, so an element a kernel forgets to write fails the comparison. The oracle is each op's reference on
fp32 inputs; tolerances fit the output dtype. The inline PTX the GPU runs instead of the
interpreter's plain-op twins is checked by emulating it instruction by instruction.
"""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
import torch
import triton
import triton.language as tl

from kiln.backends.triton import _quant_codes as qs
from kiln.backends.triton import _utils as triton_utils
from kiln.backends.triton import quant_gemm as qg
from kiln.backends.triton import quant_gemm_kernels as qk
from kiln.backends.triton.quant_gemm_tune import (
    DECODE_M,
    GEMV_MAX_M,
    Candidate,
    m_bucket,
    w8a8_candidates,
    weight_only_candidates,
)
from kiln.errors import ConfigError
from kiln.quantize import ops as ref

TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # compiled kernels on a GPU


def _dev(*ts: torch.Tensor | None) -> list:
    return [t.to(DEV) if t is not None else None for t in ts]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        fill = float("nan") if dtype.is_floating_point else -77
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(qg, "new_output", poisoned)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == dtype
    assert not torch.isnan(got).any(), "an output element was never written"
    err = (got.float().cpu() - want.float().cpu()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def gemv(bn: int, bkw: int, split: int, prmt: bool = False, depth: int = 1, xpre: bool = False,
         stages: int = 1, packed: bool = False) -> Candidate:  # fmt: skip
    """The split-K GEMV: ``BLOCK_N`` rows, K steps of ``bkw`` words, K cut into ``split`` slices (``xpre``:
    the next step's x loaded ahead; ``depth`` 0 with ``stages``: each step loads its own words, pipelined by Triton;
    ``packed``: int4 words summed in bf16x2 arithmetic)."""
    return Candidate("gemv", dict(BLOCK_N=bn, BLOCK_KW=bkw, num_warps=1, SPLIT=split, PRMT=prmt, DEPTH=depth,
                                  XPRE=xpre, STAGES=stages, PACKED=packed))


def dot(bn: int, bkw: int, split: int) -> Candidate:
    """The split-K ``tl.dot`` form, 16 rows of x per program."""
    return Candidate("dot", dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_KW=bkw, num_warps=1, SPLIT=split))


def mm(bm: int = 16, bn: int = 16, bk: int = 32, split: int = 1) -> Candidate:
    return Candidate(
        "mm", dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2, num_warps=1, num_stages=1, SPLIT_K=split)
    )


DEQ = Candidate("dequant_matmul", dict(BLOCK_N=8, BLOCK_K=32))


def _int4_weight(n: int, k: int, g: int, zp: bool, gen: torch.Generator) -> tuple:
    u = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    s = torch.rand(n, k // g, generator=gen) * 0.05 + 0.01
    z = torch.randint(0, 16, (n, k // g), dtype=torch.uint8, generator=gen) if zp else None
    return ref.pack_int4(u), s, z


# --------------------------------------------------------------------------------------
# Weight-only: int4
# --------------------------------------------------------------------------------------

INT4_CASES = [
    # (M, N, K, g, zero point, bias, x dtype, candidate): ragged N everywhere (20 / 24 rows, BN 8 / 16)
    (3, 20, 64, 32, True, True, torch.bfloat16, None),  # the default choice (split-K GEMV)
    (1, 20, 80, 16, True, False, torch.float32, gemv(8, 2, 3)),  # a group per K step; splits of 2, 2, 1 steps
    (2, 20, 80, 16, False, True, torch.bfloat16, gemv(8, 2, 2, prmt=True, depth=2)),  # 2 steps in flight
    (2, 20, 80, 16, True, True, torch.bfloat16, gemv(8, 2, 2, prmt=True, xpre=True)),  # x of the next step ahead
    (1, 20, 96, 32, True, False, torch.float16, gemv(8, 4, 2, depth=2, xpre=True)),  # 3 K steps split 2 + 1
    (2, 20, 96, 32, True, True, torch.bfloat16, gemv(8, 4, 2, prmt=True)),  # a group per 4-word step
    (1, 20, 128, 64, False, False, torch.float32, gemv(8, 4, 4, depth=2)),  # a group is 2 steps, 2 in flight
    (2, 20, 128, 64, True, True, torch.bfloat16, gemv(8, 4, 3, depth=2, xpre=True)),  # both, over a 2-step group
    (2, 20, 96, 32, True, True, torch.bfloat16, gemv(8, 4, 2, prmt=True, depth=0, stages=3)),  # loads in the step
    (1, 24, 48, 24, False, False, torch.float32, gemv(16, 4, 2, depth=0, stages=2, xpre=True)),  # per-word scales
    (2, 20, 128, 64, False, True, torch.float16, gemv(8, 4, 2)),  # a group is 2 steps; no zero point (8)
    (1, 24, 48, 24, True, False, torch.float32, gemv(16, 4, 2)),  # 3-word groups: a scale per word
    (1, 20, 64, 64, True, True, torch.float32, gemv(8, 2, 1)),  # g = K: per-channel scales, one split
    (2, 20, 128, 32, True, True, torch.bfloat16, gemv(8, 4, 3, prmt=True)),  # codes by prmt (GPU) / its twin
    (1, 24, 48, 24, False, False, torch.float32, gemv(16, 4, 2, prmt=True)),
    # packed (bf16x2 word sums): a group per step, groups of 2 steps, per-word scales, no zero point, x ahead,
    # pipelined, ragged K (a masked last step)
    (2, 20, 128, 32, True, True, torch.bfloat16, gemv(8, 4, 2, packed=True)),
    (1, 20, 128, 64, True, False, torch.bfloat16, gemv(8, 4, 3, depth=2, packed=True)),
    (1, 24, 48, 24, True, True, torch.bfloat16, gemv(16, 4, 2, packed=True, xpre=True)),
    (2, 20, 96, 32, False, True, torch.bfloat16, gemv(8, 4, 2, packed=True, depth=0, stages=3)),
    (1, 20, 80, 16, True, False, torch.bfloat16, gemv(8, 4, 2, packed=True)),
    (5, 20, 96, 32, True, True, torch.bfloat16, dot(16, 4, 2)),  # tl.dot, a group per K step
    (3, 24, 96, 24, True, False, torch.float32, dot(16, 4, 1)),  # tl.dot, a scale per word (3-word groups)
    (20, 20, 64, 32, False, True, torch.float16, dot(16, 2, 3)),  # two M tiles of 16
    (17, 20, 64, 32, True, True, torch.bfloat16, mm()),  # M > 16: the tensor-core GEMM
    (3, 24, 48, 24, True, False, torch.float32, mm(bk=32)),  # any group: per-element scales
    (2, 20, 72, 72, False, True, torch.float16, mm(bk=32)),  # per channel, ragged K step
    (3, 20, 96, 32, True, True, torch.float32, mm(bk=32, split=2)),  # split-K: 2 + 1 K steps, atomic adds
    (5, 20, 64, 16, True, True, torch.float32, DEQ),  # dequantize + matmul
]


@pytest.mark.parametrize(("m", "n", "k", "g", "zp", "bias", "dtype", "cand"), INT4_CASES)
def test_w4a16_matches_reference(m, n, k, g, zp, bias, dtype, cand) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(m * 1000 + n + k + g)
    w, s, z = _int4_weight(n, k, g, zp, gen)
    x = torch.randn(1, m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    want = ref.qlinear_w4a16_reference(x.float(), w, s, z, g, b.float() if bias else None)
    got = qg.qlinear_w4a16(*_dev(x, w, s, z), g, *_dev(b), candidate=cand)
    _close(got, want, dtype)


# --------------------------------------------------------------------------------------
# Weight-only: int8 and fp8
# --------------------------------------------------------------------------------------

INT8_CASES = [
    # (M, N, K, scale kind, zero point, x dtype, candidate)
    (1, 20, 72, "channel", True, torch.bfloat16, gemv(8, 4, 2)),  # ragged K (18 words = 4 + 4 + 1 steps)
    (3, 20, 64, "tensor", True, torch.float32, gemv(8, 2, 3)),
    (2, 20, 96, "group48", True, torch.float16, None),  # the default choice; 12-word groups
    (1, 20, 64, "group16", False, torch.float32, gemv(8, 8, 1)),  # 2 groups per K step: a scale per word
    (3, 20, 96, "group48", True, torch.bfloat16, gemv(8, 4, 2, prmt=True)),  # codes by prmt (GPU) / its twin
    (1, 20, 72, "channel", False, torch.float16, gemv(8, 4, 2, depth=2)),  # 2 steps in flight, ragged K
    (2, 20, 72, "channel", True, torch.bfloat16, gemv(8, 4, 2, prmt=True, xpre=True)),  # x ahead, ragged K
    (1, 20, 72, "channel", False, torch.float16, gemv(8, 4, 2, xpre=True)),  # fp16 pairs ahead, ragged K
    (2, 20, 72, "channel", True, torch.bfloat16, gemv(8, 4, 2, prmt=True, depth=0, stages=3)),  # pipelined, ragged K
    (6, 20, 64, "channel", False, torch.bfloat16, dot(16, 4, 2)),
    (6, 20, 64, "channel", True, torch.bfloat16, None),  # per-channel zero points: no tl.dot form, the GEMM
    (2, 20, 66, "channel", True, torch.float32, None),  # K % 4 != 0: no split-K words, the GEMM runs
    (17, 20, 72, "channel", True, torch.bfloat16, mm(bk=32)),  # ragged M and K
    (2, 20, 72, "channel", True, torch.float16, mm(bk=32, split=3)),  # split-K, the last slice ragged
    (3, 20, 96, "group48", True, torch.float32, mm(bk=32)),  # 16 | 48: scales after the dot
    (2, 20, 64, "tensor", False, torch.float16, DEQ),
]


@pytest.mark.parametrize(("m", "n", "k", "kind", "zp", "dtype", "cand"), INT8_CASES)
def test_w8a16_matches_reference(m, n, k, kind, zp, dtype, cand) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    g = int(kind[5:]) if kind.startswith("group") else None
    shape = {"channel": (n,), "tensor": ()}.get(kind, (n, k // g if g else 1))
    s = torch.rand(shape, generator=gen) * 0.01 + 1e-3
    z = torch.randint(-20, 20, shape, dtype=torch.int8, generator=gen) if zp else None
    x = torch.randn(2, m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    want = ref.qlinear_w8a16_reference(x.float(), w, s, z, g, b.float())
    _close(qg.qlinear_w8a16(*_dev(x, w, s, z), g, *_dev(b), candidate=cand), want, dtype)


class _LaunchSpy:
    """Stands in for a Triton kernel: records each launch's keyword arguments, then launches the real one."""

    def __init__(self, kernel: object) -> None:
        self.kernel = kernel
        self.calls: list[dict] = []

    def __getitem__(self, grid: tuple):  # type: ignore[no-untyped-def]
        launch = self.kernel[grid]  # type: ignore[index]

        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls.append(kwargs)
            return launch(*args, **kwargs)

        return run


@pytest.mark.parametrize(
    ("g", "dtype", "xpre", "packed"),
    [
        (32, torch.bfloat16, True, True),  # 16-bit x: its pairs loaded a step ahead; bf16 pairs: the packed sums
        (32, torch.float32, False, False),  # fp32 x: no 16-bit pairs to load ahead or to multiply in pairs
        (24, torch.float16, True, False),  # fp16 pairs: the fp32 form (bf16x2 arithmetic takes bf16 x)
    ],
)
def test_gemv_options_reach_the_kernel_where_they_apply(g, dtype, xpre, packed, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    spy = _LaunchSpy(qg.K2.wo_gemv_kernel)
    monkeypatch.setattr(qg.K2, "wo_gemv_kernel", spy)
    gen = torch.Generator().manual_seed(g)
    w, s, z = _int4_weight(16, 96, g, True, gen)
    x = torch.randn(1, 96, generator=gen).to(dtype)
    got = qg.qlinear_w4a16(*_dev(x, w, s, z), g, None, candidate=gemv(8, 4, 2, xpre=True, packed=True))
    _close(got, ref.qlinear_w4a16_reference(x.float(), w, s, z, g, None), dtype)
    assert spy.calls and spy.calls[-1]["XPRE"] is xpre and spy.calls[-1]["PACKED"] is packed


def test_packed_gemv_tiles_are_tuner_candidates_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    import kiln.backends.triton.quant_gemm_tune as tune

    def packed(**kw: object) -> int:
        return sum(bool(c.params.get("PACKED")) for c in weight_only_candidates(1, 512, False, **kw))

    monkeypatch.setattr(tune, "INT4_PACKED", False)  # KILN_INT4_PACKED unset: off
    assert packed(packed=True) == 0
    monkeypatch.setattr(tune, "INT4_PACKED", True)
    assert packed(packed=True) == len(tune.GEMV_PACKED_TILES) and packed(packed=False) == 0


@pytest.mark.parametrize("cand", [gemv(8, 2, 3), dot(16, 4, 2), mm(bk=32)])
def test_fp8_weight_only_matches_reference(cand: Candidate) -> None:
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(20, 64, generator=gen) * 4).to(torch.float8_e4m3fn)
    w[0, :8] = torch.tensor([448.0, -448.0, 2.0**-9, -(2.0**-9), 0.0, -0.0, 0.0137, -3.5]).to(torch.float8_e4m3fn)
    s = torch.rand(20, generator=gen) * 0.1 + 0.01
    x = torch.randn(3, 64, generator=gen)
    want = ref.qlinear_fp8_reference(x, None, w, s, None, torch.float32)
    _close(qg.qlinear_fp8(*_dev(x), None, *_dev(w, s), None, torch.float32, candidate=cand), want, torch.float32)


# --------------------------------------------------------------------------------------
# W8A8 and FP8 activations
# --------------------------------------------------------------------------------------

W8A8_CASES = [
    # (M, K, per-token x scale, per-channel w scale, x zero point, bias, out dtype, candidate)
    (1, 64, True, True, False, False, torch.bfloat16, None),  # the default choice (split-K GEMV)
    (17, 72, True, True, False, True, torch.float32, None),  # ragged M and K: the int8 tensor-core GEMM
    (3, 64, False, False, True, True, torch.float32, gemv(8, 4, 3)),  # per-tensor both, asymmetric x
    (5, 96, True, False, True, False, torch.float16, dot(16, 4, 2)),  # per-token zero points
    (2, 64, True, True, True, True, torch.bfloat16, Candidate("w8a8", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32,
                                                                            GROUP_M=8, num_warps=1, num_stages=1))),
]


@pytest.mark.parametrize(("m", "k", "xs_row", "ws_row", "xzp", "bias", "out", "cand"), W8A8_CASES)
def test_w8a8_matches_reference(m, k, xs_row, ws_row, xzp, bias, out, cand) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(m + k)
    n = 20
    x = torch.randint(-128, 128, (1, m, k), dtype=torch.int8, generator=gen)
    xs = torch.rand((1, m, 1) if xs_row else (), generator=gen) * 0.02 + 1e-3
    xz = torch.randint(-10, 10, xs.shape, dtype=torch.int8, generator=gen) if xzp else None
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    ws = torch.rand((n,) if ws_row else (), generator=gen) * 0.02 + 1e-3
    b = torch.randn(n, generator=gen).to(out) if bias else None
    want = ref.qlinear_w8a8_reference(x, xs, xz, w, ws, b.float() if bias else None, torch.float32)
    _close(qg.qlinear_w8a8(*_dev(x, xs, xz, w, ws, b), out, candidate=cand), want, out)


@pytest.mark.parametrize(("per_token", "per_channel", "out"), [
    (True, True, torch.bfloat16),  # row-wise torch._scaled_mm
    (False, False, torch.float32),  # tensor-wise
    (True, False, torch.float16),  # row-wise scales into fp16: unit-scale GEMM, scaled after
])  # fmt: skip
def test_fp8_activations_match_reference(per_token: bool, per_channel: bool, out: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    xf = (torch.randn(2, 3, 32, generator=gen) * 3).to(DEV)
    xs = qg.dynamic_scale(xf, 448.0, per_token)
    xq = qg.quantize(xf, xs, None, -448, 448, torch.float8_e4m3fn)
    w = (torch.randn(48, 32, generator=gen) * 2).to(torch.float8_e4m3fn).to(DEV)
    ws = (torch.rand((48,) if per_channel else (), generator=gen) + 0.5).to(DEV)
    b = torch.randn(48, generator=gen).to(DEV)
    want = ref.qlinear_fp8_reference(xq, xs, w, ws, b, torch.float32)
    got = qg.qlinear_fp8(xq, xs, w, ws, b.to(out), out)
    assert got.shape == (2, 3, 48) and got.dtype == out
    err = (got.float() - want).abs().max().item()
    assert err <= 1.6e-2 * want.abs().max().item()


# --------------------------------------------------------------------------------------
# Dynamic quantization
# --------------------------------------------------------------------------------------


def test_dynamic_scale_and_int8_codes_equal_reference() -> None:
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 5, 300, generator=gen) * 4).to(torch.bfloat16).to(DEV)  # K not a power of two: masked tail
    s = qg.dynamic_scale(x, 127.0)
    assert torch.equal(s, ref.dynamic_scale_reference(x, 127.0))
    assert torch.equal(
        qg.quantize(x, s, None, -128, 127, torch.int8),
        ref.quantize_reference(x, s, None, -128, 127, torch.int8),
    )
    # per-tensor asymmetric: scale () and zero point (), ties exactly on .5
    xt = (torch.arange(-40, 40, dtype=torch.float32).reshape(4, 20) * 0.25 + 0.125).to(DEV)
    st, zt = torch.tensor(0.25, device=DEV), torch.tensor(3, dtype=torch.int8, device=DEV)
    assert torch.equal(
        qg.quantize(xt, st, zt, -128, 127, torch.int8),
        ref.quantize_reference(xt, st, zt, -128, 127, torch.int8),
    )


def test_fp8_codes_round_half_even_like_torch() -> None:
    """Every e4m3 binade, its ties and subnormals, clamped at +-448: codes equal torch's cast."""
    grid = torch.cat([torch.linspace(-460, 460, 9201), torch.linspace(-0.03, 0.03, 6001)])
    exact = torch.tensor([float(v) for v in torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
                          if abs(float(v)) <= 448])  # fmt: skip
    exact = torch.sort(exact).values
    mids = (exact[:-1] + exact[1:]) / 2  # ties between neighbouring codes
    x = torch.cat([grid, exact, mids]).reshape(1, -1).to(DEV)
    one = torch.ones(1, 1, device=DEV)
    got = qg.quantize(x, one, None, -448, 448, torch.float8_e4m3fn)
    want = ref.quantize_reference(x, one, None, -448, 448, torch.float8_e4m3fn)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


# --------------------------------------------------------------------------------------
# The inline PTX of the GPU path, emulated
# --------------------------------------------------------------------------------------


def _f16_bits(v: float, dt: torch.dtype) -> int:
    return int(torch.tensor(v, dtype=dt).view(torch.int16).item()) & 0xFFFF


def _from_f16_bits(b: int, dt: torch.dtype) -> float:
    return float(torch.tensor(b if b < 0x8000 else b - 0x10000, dtype=torch.int16).view(dt).item())


def _f32(bits: int) -> torch.Tensor:
    return torch.tensor(bits - (bits >> 31 << 32), dtype=torch.int32).view(torch.float32)


def _round_exact(v: Fraction, dt: torch.dtype) -> float:
    """``v`` rounded to the nearest ``dt`` value (bf16 or fp16, ties to even), from its exact value (finite range)."""
    bits, min_exp = (8, -126) if dt == torch.bfloat16 else (11, -14)
    if v == 0:
        return 0.0
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    e -= Fraction(2) ** e > a  # 2**e <= a < 2**(e + 1)
    ulp = Fraction(2) ** (max(e, min_exp) - bits + 1)
    n, rest = divmod(a / ulp, 1)
    n += rest > Fraction(1, 2) or (rest == Fraction(1, 2) and n % 2 == 1)
    return float(n * ulp) if v > 0 else -float(n * ulp)


def _run_ptx(asm: str, regs: dict[str, int]) -> dict[str, int]:
    """Execute the straight-line PTX of ``quant_gemm_kernels`` (PTX ISA semantics) on 32-bit values."""
    r = dict(regs)

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 16) if tok.startswith("0x") else int(tok) if tok.isdigit() else r[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        d, *src = [t.strip() for t in rest.split(",")]
        a = [val(t) for t in src]
        if op in ("mov.b32",):
            r[d] = a[0]
        elif op == "and.b32":
            r[d] = a[0] & a[1]
        elif op == "xor.b32":
            r[d] = a[0] ^ a[1]
        elif op == "or.b32":
            r[d] = a[0] | a[1]
        elif op == "shl.b32":
            r[d] = (a[0] << a[1]) & 0xFFFFFFFF
        elif op == "shr.u32":
            r[d] = a[0] >> a[1]
        elif op == "prmt.b32":  # default mode: selector nibble i picks byte i of d from {b, a}
            pool = a[0].to_bytes(4, "little") + a[1].to_bytes(4, "little")
            r[d] = int.from_bytes(bytes(pool[(a[2] >> 4 * i) & 7] for i in range(4)), "little")
        elif re.fullmatch(r"fma\.rn\.(bf16x2|f16x2)", op):
            dt = torch.bfloat16 if "bf16" in op else torch.float16
            halves = []
            for sh in (0, 16):
                x, y, z = (Fraction(_from_f16_bits((v >> sh) & 0xFFFF, dt)) for v in a)
                halves.append(_f16_bits(_round_exact(x * y + z, dt), dt))  # one rounding of the exact value
            r[d] = halves[0] | halves[1] << 16
        elif op == "add.f32":
            r[d] = int((_f32(a[0]) + _f32(a[1])).view(torch.int32).item()) & 0xFFFFFFFF
        elif re.fullmatch(r"cvt\.rn\.(bf16x2|f16x2)\.f32", op):  # d = {hi: cvt(a), lo: cvt(b)}
            dt = torch.bfloat16 if "bf16" in op else torch.float16
            hi, lo = (float(_f32(v)) for v in a)
            r[d] = _f16_bits(lo, dt) | _f16_bits(hi, dt) << 16
        else:
            raise AssertionError(f"the emulator does not know {op}")
    return r


@pytest.mark.parametrize("bf16", [True, False])
def test_inline_ptx_int4_dequant_semantics(bf16: bool) -> None:
    asm = (qk.INT4_BF16_ASM if bf16 else qk.INT4_F16_ASM).value
    dt, magic = (torch.bfloat16, 128.0) if bf16 else (torch.float16, 1024.0)
    gen = torch.Generator().manual_seed(0)
    for z in (0, 3, 8, 15):
        zbn = _f16_bits(-(magic + z), dt)
        for _ in range(40):
            word = bytes(torch.randint(0, 256, (4,), generator=gen).tolist())
            regs = {f"${i}": 0 for i in range(4)} | {
                "$4": int.from_bytes(word, "little"),
                "$5": zbn * 0x10001,
                "$6": zbn * 0x10001,
            }
            out = _run_ptx(asm, regs)
            vals = [_from_f16_bits(out[f"${j}"] >> sh & 0xFFFF, dt) for j in range(4) for sh in (0, 16)]
            # outputs: low nibbles of bytes 0..3 (lo tensor), then high nibbles (hi tensor)
            assert vals == [float((b & 0xF) - z) for b in word] + [float((b >> 4) - z) for b in word]


@pytest.mark.parametrize("bf16", [True, False])
def test_inline_ptx_int8_dequant_semantics(bf16: bool) -> None:
    asm = (qk.INT8_BF16_ASM if bf16 else qk.INT8_F16_ASM).value
    dt = torch.bfloat16 if bf16 else torch.float16
    for z in (0, -7, 20):
        zb = int(torch.tensor(-(8388608.0 + 128.0 + z)).view(torch.int32).item()) & 0xFFFFFFFF
        for q0 in range(-128, 128, 3):
            q = [q0, -q0 - 1, (q0 * 7) % 256 - 128, 127]
            word = bytes(v & 0xFF for v in q)
            regs = {"$0": 0, "$1": 0, "$2": int.from_bytes(word, "little")} | {
                f"${i}": zb for i in range(3, 7)
            }
            out = _run_ptx(asm, regs)
            vals = [_from_f16_bits(out[f"${j}"] >> sh & 0xFFFF, dt) for j in range(2) for sh in (0, 16)]
            assert vals == [float(torch.tensor(float(v - z), dtype=dt)) for v in q]


def _packed_cases(count: int, seed: int) -> list[tuple[int, list[float], int]]:
    """(word, the eight bf16 x values of its codes, zero point): x spread over 2**-24 .. 2**24, so that a product
    at a bf16 tie meets a sum far smaller than its fp32 ulp, where rounding once and rounding twice part."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        word = int(torch.randint(0, 2**32, (1,), dtype=torch.int64, generator=gen))
        scale = 2.0 ** torch.randint(-24, 25, (8,), generator=gen)
        xs = (torch.randn(8, generator=gen) * scale).to(torch.bfloat16).float().tolist()
        out.append((word, xs, (0, 3, 8, 15, 127)[i % 5]))
    return out


def _packed_model(word: int, xs: list[float], z: int) -> float:
    """The packed word's stated semantics: exact q - z times x, each half summed in bf16 (one rounding an fma) in
    the order codes 0-1, 4-5, 2-3, 6-7, the halves added in fp32."""
    halves = [Fraction(0), Fraction(0)]
    for p in (0, 2, 1, 3):
        for h in (0, 1):
            c = 2 * p + h
            q = (word >> ((c % 4) * 8 + (c // 4) * 4)) & 0xF
            halves[h] = Fraction(_round_exact((q - z) * Fraction(xs[c]) + halves[h], torch.bfloat16))
    return float(torch.tensor(float(halves[0]), dtype=torch.float32) + torch.tensor(float(halves[1]), dtype=torch.float32))


def _x_pair_bits(xs: list[float]) -> list[int]:
    return [_f16_bits(xs[2 * p], torch.bfloat16) | _f16_bits(xs[2 * p + 1], torch.bfloat16) << 16 for p in range(4)]


def test_inline_ptx_packed_word_sum_semantics() -> None:
    asm = qs.PACKED_INT4_BF16.value
    for word, xs, z in _packed_cases(400, seed=2):
        nz = _f16_bits(-(128.0 + z), torch.bfloat16)
        pairs = _x_pair_bits(xs)
        out = _run_ptx(asm, {"$0": 0, "$1": word, **{f"${2 + p}": pairs[p] for p in range(4)}, "$6": nz * 0x10001})
        assert float(_f32(out["$0"])) == _packed_model(word, xs, z), (hex(word), xs, z)


@triton.jit
def _packed_twin_probe(W, X, Z, Out, N: tl.constexpr):
    o = tl.arange(0, N)
    wu = tl.load(W + o)[None, :].to(tl.uint32, bitcast=True)  # (1, N): one row of N words
    sums = qs.packed_word_sums(wu, tl.load(X + 4 * o), tl.load(X + 4 * o + 1), tl.load(X + 4 * o + 2),
                               tl.load(X + 4 * o + 3), tl.load(Z + o)[None, :], False)  # fmt: skip
    tl.store(Out + o[None, :], sums)


def test_packed_twin_equals_the_stated_semantics() -> None:
    """The plain-op twin the interpreter runs (two-sum round-to-odd, then bf16) rounds each fma once, as the PTX."""
    cases = _packed_cases(1024, seed=3)
    as_i32 = lambda v: v - (v >> 31 << 32)  # noqa: E731
    w = torch.tensor([as_i32(c[0]) for c in cases], dtype=torch.int32, device=DEV)
    x = torch.tensor([as_i32(b) for c in cases for b in _x_pair_bits(c[1])], dtype=torch.int32, device=DEV)
    z = torch.tensor([float(c[2]) for c in cases], device=DEV)
    out = torch.empty(len(cases), device=DEV)
    _packed_twin_probe[(1,)](w, x, z, out, N=len(cases))
    assert out.cpu().tolist() == [_packed_model(*c) for c in cases]


@pytest.mark.parametrize("int4", [True, False])
def test_inline_ptx_prmt_decode_equals_its_twin(int4: bool) -> None:
    """The split-K GEMV's ``prmt`` decode gives each code the bits its plain-op twin computes."""
    asm = (qs.PRMT_INT4 if int4 else qs.PRMT_INT8).value
    n_out = 8 if int4 else 4
    gen = torch.Generator().manual_seed(1)
    for word in torch.randint(0, 2**32, (200,), dtype=torch.int64, generator=gen).tolist() + [0, 2**32 - 1]:
        out = _run_ptx(asm, {f"${i}": 0 for i in range(n_out)} | {f"${n_out}": word})
        for c in range(n_out):
            if int4:
                u = (word >> ((c % 4) * 8 + (c // 4) * 4)) & 0xF
                want = (u << 16) | 0x3F000000  # 0.5 + u / 256
            else:
                u = ((word >> (8 * c)) & 0xFF) ^ 0x80  # q + 128
                want = (u << 8) | 0x3F800000  # 1 + u / 32768
            assert out[f"${c}"] == want, (hex(word), c)


# --------------------------------------------------------------------------------------
# Dispatch, candidates and errors
# --------------------------------------------------------------------------------------


def test_gpu_candidates_cover_decode_and_prefill() -> None:
    """On the GPU: split-K kernels up to DECODE_M rows (the GEMV up to GEMV_MAX_M), the GEMMs above."""
    for m in (1, 2, 4, 5, 16, 17, 4096):
        kinds = {c.kernel for c in weight_only_candidates(m, k_words=512, interpret=False)}
        assert ("gemv" in kinds) == (m <= GEMV_MAX_M) and ("dot" in kinds) == (m <= DECODE_M)
        assert ("mm" in kinds) == (m > DECODE_M) and ("dequant_matmul" in kinds) == (m > 64)
        w8 = {c.kernel for c in w8a8_candidates(m, interpret=False, k_words=512)}
        assert "w8a8" in w8 and ("dot" in w8) == (m <= DECODE_M)
    assert {c.kernel for c in weight_only_candidates(1, k_words=None, interpret=False)} == {"mm"}
    # tl.dot forms take whole K steps only; with none left, 5..16 rows go to the tensor-core GEMM
    assert all(c.params["BLOCK_KW"] == 16 for c in weight_only_candidates(8, k_words=80, interpret=False))
    assert {c.kernel for c in weight_only_candidates(8, k_words=9, interpret=False)} == {"mm"}
    assert [m_bucket(m) for m in (1, 2, 3, 16, 17)] == [1, 2, 4, 16, 32]


@pytest.mark.parametrize(("k_words", "tiles", "params"), [
    (512, 64, dict(BLOCK_KW=16, WAVES=4)),  # int4 K=4096, N=4096 in 64-row tiles: 8 splits of 4 steps
    (1792, 32, dict(BLOCK_KW=16, WAVES=4)),  # K=14336 in 128-row tiles
    (512, 112, dict(BLOCK_KW=16, WAVES=4)),  # N=14336: 4 splits (448 programs), not a part-full second wave
    (10, 3, dict(BLOCK_KW=2, SPLIT=3)),  # forced: 5 steps as 2 + 2 + 1
    (7, 1000, dict(BLOCK_KW=4, WAVES=2)),  # more tiles than programs: no split
])  # fmt: skip
def test_split_plan_covers_k_exactly_once(k_words: int, tiles: int, params: dict) -> None:
    split, steps = qg.split_plan(k_words, tiles, params, sms=132)
    step_words = steps * params["BLOCK_KW"]
    assert split >= 1 and (split - 1) * step_words < k_words <= split * step_words  # no empty split, all of K
    if "SPLIT" in params:
        assert split == params["SPLIT"]
    else:
        assert split * tiles <= params["WAVES"] * 132 or split == 1  # one wave


def test_split_k_is_deterministic_and_leaves_counters_zeroed() -> None:
    gen = torch.Generator().manual_seed(11)
    w, s, z = _int4_weight(40, 128, 32, True, gen)
    x = torch.randn(2, 128, generator=gen)
    args = [*_dev(x, w, s, z), 32, None]
    first = qg.qlinear_w4a16(*args, candidate=gemv(8, 2, 4))
    again = qg.qlinear_w4a16(*args, candidate=gemv(8, 2, 4))
    assert torch.equal(first, again)  # partial sums added in a fixed order, whichever split is last
    _close(first, ref.qlinear_w4a16_reference(x, w, s, z, 32, None), torch.float32)
    assert all(int(buf.abs().sum()) == 0 for buf in triton_utils._COUNTERS.values())


def test_dot_form_refuses_a_ragged_k_step_and_per_channel_zero_points() -> None:
    w, s, z = _dev(*_int4_weight(20, 48, 24, True, torch.Generator().manual_seed(2)))
    with pytest.raises(ConfigError, match="whole K steps"):
        qg.qlinear_w4a16(torch.randn(5, 48).to(DEV), w, s, z, 24, None, candidate=dot(16, 4, 1))  # 6 words
    w8, s8, z8 = _dev(torch.ones(20, 64, dtype=torch.int8), torch.ones(20), torch.ones(20, dtype=torch.int8))
    with pytest.raises(ConfigError, match="per-channel zero points"):
        qg.qlinear_w8a16(torch.randn(5, 64).to(DEV), w8, s8, z8, None, None, candidate=dot(16, 4, 1))
    assert {c.kernel for c in weight_only_candidates(8, k_words=16, interpret=False, dot=False)} == {"mm"}


def test_bad_inputs_raise_config_errors() -> None:
    x = torch.randn(2, 64).to(DEV)
    w4, s4, z4 = _dev(*_int4_weight(16, 64, 32, True, torch.Generator().manual_seed(0)))
    with pytest.raises(ConfigError, match="K=48 but the weight holds K=64"):
        qg.qlinear_w4a16(torch.randn(2, 48), w4, s4, z4, 32, None)
    with pytest.raises(ConfigError, match="multiple of 8"):
        qg.qlinear_w4a16(
            torch.randn(2, 12), torch.zeros(4, 6, dtype=torch.uint8), torch.ones(4, 2), None, 6, None
        )
    with pytest.raises(ConfigError, match="packed uint8"):
        qg.qlinear_w4a16(x, w4.to(torch.int8), s4, z4, 32, None)
    with pytest.raises(ConfigError, match="scale of shape"):
        qg.qlinear_w8a16(x, torch.zeros(16, 64, dtype=torch.int8), torch.ones(16, 3), None, 16, None)
    with pytest.raises(ConfigError, match="per token"):
        qg.qlinear_w8a8(torch.zeros(2, 64, dtype=torch.int8), torch.ones(3, 1), None,
                        torch.zeros(16, 64, dtype=torch.int8), torch.ones(16), None, torch.float32)  # fmt: skip
    with pytest.raises(ConfigError, match="divisible by 16"):
        qg.qlinear_fp8(torch.zeros(2, 24, dtype=torch.float8_e4m3fn), torch.ones(()),
                       torch.zeros(16, 24, dtype=torch.float8_e4m3fn), torch.ones(()), None, torch.float32)  # fmt: skip


def test_registration_names_every_quantization_op() -> None:
    names = qg.register_quant_kernels()
    assert names == {"kiln.qlinear_w8a16", "kiln.qlinear_w4a16", "kiln.qlinear_w8a8", "kiln.qlinear_fp8",
                     "kiln.dynamic_scale", "kiln.quantize", "kiln.dequantize"}  # fmt: skip
