"""The quantized-GEMM kernels (``kiln.backends.triton.quant_gemm``) against the plain-torch references.

Kernels run in Triton's interpreter on the CPU (``conftest.py`` sets ``TRITON_INTERPRET=1``) on
small random shapes with ragged M / N / K edges; outputs are poisoned with NaN first, so an
element a kernel forgets to write fails the comparison. The oracle is each op's reference on
fp32 inputs; tolerances fit the output dtype. The inline PTX the GPU runs instead of the
interpreter's plain-op twins is checked by emulating it instruction by instruction.
"""

from __future__ import annotations

import re

import pytest
import torch

from kiln.backends.triton import quant_gemm as qg
from kiln.backends.triton import quant_gemm_kernels as qk
from kiln.backends.triton.quant_gemm_tune import Candidate, gemv_slots, m_bucket, weight_only_candidates
from kiln.errors import ConfigError
from kiln.quantize import ops as ref

TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        fill = float("nan") if dtype.is_floating_point else -77
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(qg, "new_output", poisoned)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == dtype
    assert not torch.isnan(got).any(), "an output element was never written"
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def gemv(bn: int, step: int, slot: int, gpt: int) -> Candidate:
    return Candidate("gemv", dict(BLOCK_N=bn, STEP=step, SLOT=slot, GPT=gpt, num_warps=1, num_stages=1))


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
    (3, 20, 64, 32, True, True, torch.bfloat16, None),  # the default choice: GEMV, one group per slot
    (1, 20, 80, 16, True, False, torch.float32, gemv(8, 8, 8, 4)),  # 4 groups per step, ragged last step
    (2, 20, 128, 64, False, True, torch.float16, gemv(8, 16, 16, 1)),  # a group cut into 2 slots, zero 8
    (1, 24, 48, 24, True, False, torch.float32, gemv(16, 12, 16, 2)),  # 12-byte groups padded to 16 lanes
    (1, 20, 64, 64, True, True, torch.float32, gemv(8, 16, 16, 2)),  # g = K: per-channel scales
    (17, 20, 64, 32, True, True, torch.bfloat16, mm()),  # two M tiles, scales after the dot
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
    got = qg.qlinear_w4a16(x, w, s, z, g, b, candidate=cand)
    _close(got, want, dtype)


# --------------------------------------------------------------------------------------
# Weight-only: int8 and fp8
# --------------------------------------------------------------------------------------

INT8_CASES = [
    # (M, N, K, scale kind, zero point, x dtype, candidate)
    (1, 20, 72, "channel", True, torch.bfloat16, gemv(8, 32, 32, 1)),  # ragged K (72 = 2 x 32 + 8)
    (3, 20, 64, "tensor", True, torch.float32, gemv(8, 16, 16, 2)),
    (2, 20, 96, "group48", True, torch.float16, None),  # the default choice; 48-byte groups, 64 lanes
    (1, 20, 64, "group16", False, torch.float32, gemv(8, 16, 16, 4)),
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
    _close(qg.qlinear_w8a16(x, w, s, z, g, b, candidate=cand), want, dtype)


@pytest.mark.parametrize("cand", [gemv(8, 16, 16, 2), mm(bk=32)])
def test_fp8_weight_only_matches_reference(cand: Candidate) -> None:
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(20, 64, generator=gen) * 4).to(torch.float8_e4m3fn)
    s = torch.rand(20, generator=gen) * 0.1 + 0.01
    x = torch.randn(3, 64, generator=gen)
    want = ref.qlinear_fp8_reference(x, None, w, s, None, torch.float32)
    _close(qg.qlinear_fp8(x, None, w, s, None, torch.float32, candidate=cand), want, torch.float32)


# --------------------------------------------------------------------------------------
# W8A8 and FP8 activations
# --------------------------------------------------------------------------------------

W8A8_CASES = [
    # (M, K, per-token x scale, per-channel w scale, x zero point, bias, out dtype)
    (1, 64, True, True, False, False, torch.bfloat16),
    (17, 72, True, True, False, True, torch.float32),  # ragged M and K
    (3, 64, False, False, True, True, torch.float32),  # per-tensor both, asymmetric activations
    (5, 96, True, False, True, False, torch.float16),  # per-token zero points
]


@pytest.mark.parametrize(("m", "k", "xs_row", "ws_row", "xzp", "bias", "out"), W8A8_CASES)
def test_w8a8_matches_reference(m, k, xs_row, ws_row, xzp, bias, out) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(m + k)
    n = 20
    x = torch.randint(-128, 128, (1, m, k), dtype=torch.int8, generator=gen)
    xs = torch.rand((1, m, 1) if xs_row else (), generator=gen) * 0.02 + 1e-3
    xz = torch.randint(-10, 10, xs.shape, dtype=torch.int8, generator=gen) if xzp else None
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    ws = torch.rand((n,) if ws_row else (), generator=gen) * 0.02 + 1e-3
    b = torch.randn(n, generator=gen).to(out) if bias else None
    want = ref.qlinear_w8a8_reference(x, xs, xz, w, ws, b.float() if bias else None, torch.float32)
    _close(qg.qlinear_w8a8(x, xs, xz, w, ws, b, out), want, out)


@pytest.mark.parametrize(("per_token", "per_channel", "out"), [
    (True, True, torch.bfloat16),  # row-wise torch._scaled_mm
    (False, False, torch.float32),  # tensor-wise
    (True, False, torch.float16),  # row-wise scales into fp16: unit-scale GEMM, scaled after
])  # fmt: skip
def test_fp8_activations_match_reference(per_token: bool, per_channel: bool, out: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    xf = torch.randn(2, 3, 32, generator=gen) * 3
    xs = qg.dynamic_scale(xf, 448.0, per_token)
    xq = qg.quantize(xf, xs, None, -448, 448, torch.float8_e4m3fn)
    w = (torch.randn(48, 32, generator=gen) * 2).to(torch.float8_e4m3fn)
    ws = torch.rand((48,) if per_channel else (), generator=gen) + 0.5
    b = torch.randn(48, generator=gen)
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
    x = (torch.randn(2, 5, 300, generator=gen) * 4).to(torch.bfloat16)  # K not a power of two: masked tail
    s = qg.dynamic_scale(x, 127.0)
    assert torch.equal(s, ref.dynamic_scale_reference(x, 127.0))
    assert torch.equal(
        qg.quantize(x, s, None, -128, 127, torch.int8),
        ref.quantize_reference(x, s, None, -128, 127, torch.int8),
    )
    # per-tensor asymmetric: scale () and zero point (), ties exactly on .5
    xt = torch.arange(-40, 40, dtype=torch.float32).reshape(4, 20) * 0.25 + 0.125
    st, zt = torch.tensor(0.25), torch.tensor(3, dtype=torch.int8)
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
    x = torch.cat([grid, exact, mids]).reshape(1, -1)
    one = torch.ones(1, 1)
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
        elif op == "shr.u32":
            r[d] = a[0] >> a[1]
        elif op == "prmt.b32":  # default mode: selector nibble i picks byte i of d from {b, a}
            pool = a[0].to_bytes(4, "little") + a[1].to_bytes(4, "little")
            r[d] = int.from_bytes(bytes(pool[(a[2] >> 4 * i) & 7] for i in range(4)), "little")
        elif re.fullmatch(r"fma\.rn\.(bf16x2|f16x2)", op):
            dt = torch.bfloat16 if "bf16" in op else torch.float16
            halves = []
            for sh in (0, 16):
                x, y, z = (_from_f16_bits((v >> sh) & 0xFFFF, dt) for v in a)
                halves.append(_f16_bits(x * y + z, dt))  # exact here: small integers
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


# --------------------------------------------------------------------------------------
# Dispatch, candidates and errors
# --------------------------------------------------------------------------------------


def test_gpu_candidates_fit_llama_shapes() -> None:
    """On the GPU every decode shape of Llama-3 8B gets GEMV and GEMM candidates whose slots fit its groups."""
    for g in (128, None):
        for m in (1, 16, 4096):
            cands = weight_only_candidates(m, g // 2 if g else None, interpret=False, word=4)
            kinds = {c.kernel for c in cands}
            assert "mm" in kinds and ("gemv" in kinds) == (m <= 2) and ("dequant_matmul" in kinds) == (m > 64)
            for c in cands:
                if c.kernel == "gemv":
                    p = c.params
                    assert p["STEP"] <= p["SLOT"] and p["STEP"] % 4 == 0
                    assert g is None or (g // 2) % p["STEP"] == 0 or p["STEP"] == g // 2
    assert gemv_slots(256, 64) == (64, 64, 4) and gemv_slots(128, 512) == (128, 128, 1)
    assert (
        gemv_slots(256, 6, word=4) is None and gemv_slots(16, 24) is None
    )  # a slot would split a word / 8 | 24
    assert [m_bucket(m) for m in (1, 2, 3, 16, 17)] == [1, 2, 4, 16, 32]


def test_bad_inputs_raise_config_errors() -> None:
    x = torch.randn(2, 64)
    w4, s4, z4 = _int4_weight(16, 64, 32, True, torch.Generator().manual_seed(0))
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
