"""Tests of ``compiler/quantize/ops.py``: scale shapes, round-trip bounds, qlinear references, invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.errors import VerificationError
from kiln.ir import verify
from kiln.quantize import PerAxis, PerGroup, PerTensor, PerToken, QuantSpec
from kiln.quantize.observers import fake_quantize, qdq_args, qparams, to_rows, weight_qparams
from kiln.quantize.ops import (
    dequantize_reference,
    pack_int4,
    qlinear_fp8_reference,
    qlinear_w4a16_reference,
    qlinear_w8a8_reference,
    qlinear_w8a16_reference,
    unpack_int4,
)

kiln_ops = torch.ops.kiln
GRANULARITIES = [PerTensor(), PerAxis(0), PerGroup(16)]


def heavy_tailed(*shape: int) -> torch.Tensor:
    x = torch.randn(*shape)
    return x + (torch.rand(*shape) < 0.01) * torch.randn(*shape) * 20  # a few outliers, never all zeros


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=repr)
def test_weight_scales_have_the_documented_shapes(granularity) -> None:
    w = heavy_tailed(48, 64)
    scale, zp = weight_qparams(w, QuantSpec(dtype="int4", granularity=granularity, symmetric=False))
    want = {PerTensor: (), PerAxis: (48,), PerGroup: (48, 4)}[type(granularity)]
    assert tuple(scale.shape) == want and zp is not None and tuple(zp.shape) == want and zp.dtype == torch.int8
    assert weight_qparams(w, QuantSpec(granularity=granularity))[1] is None  # symmetric: no zero point


def test_per_token_activation_scales() -> None:
    x = heavy_tailed(2, 5, 64)
    scale = kiln_ops.dynamic_scale(x, 127.0, True)
    assert scale.shape == (2, 5, 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / 127.0)
    assert kiln_ops.dynamic_scale(x, 127.0, False).shape == ()
    rows, shape = to_rows(x, PerToken())
    assert rows.shape == (10, 64) and shape == (2, 5, 1)


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=repr)
@pytest.mark.parametrize(("dtype", "symmetric"), [("int8", True), ("int8", False), ("int4", True), ("int4", False)])
def test_integer_round_trip_is_within_half_a_step(granularity, dtype: str, symmetric: bool) -> None:
    spec = QuantSpec(dtype=dtype, granularity=granularity, symmetric=symmetric)
    x = heavy_tailed(32, 64)
    scale, zp = weight_qparams(x, spec)
    kw = qdq_args(spec, tuple(x.shape))
    q = kiln_ops.quantize(x, scale, zp, spec.qmin, spec.qmax, spec.storage, **kw)
    assert q.dtype == torch.int8 and int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    dq = kiln_ops.dequantize(q, scale, zp, **kw, out_dtype=torch.float32)
    step = dequantize_reference(torch.ones_like(q), scale, None, **kw)  # the scale broadcast to x's shape
    assert ((x - dq).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert not torch.equal(x, dq)  # something was rounded


def test_fp8_round_trip_is_within_the_relative_bound() -> None:
    spec = QuantSpec(dtype="fp8_e4m3", granularity=PerAxis(0))
    x = heavy_tailed(32, 64)
    scale, _ = weight_qparams(x, spec)
    q = kiln_ops.quantize(x, scale, None, -448, 448, torch.float8_e4m3fn, axis=0)
    assert q.dtype == torch.float8_e4m3fn
    dq = kiln_ops.dequantize(q, scale, None, axis=0)
    s = scale[:, None]
    # 3 mantissa bits: half an ulp is 2^-4 relative; subnormals (below 2^-6) are spaced 2^-9 apart
    assert ((x - dq).abs() <= x.abs() * 2**-4 + s * 2**-10 + 1e-7).all()


def test_asymmetric_ranges_keep_zero_exact() -> None:
    x = torch.rand(8, 32) + 0.5  # all positive: the range is extended to include 0
    spec = QuantSpec(dtype="int8", granularity=PerAxis(0), symmetric=False)
    scale, zp = qparams(torch.zeros(8), x.amax(1), spec)
    zero = fake_quantize(torch.zeros(8, 32), scale, zp, spec)
    assert torch.equal(zero, torch.zeros(8, 32))


@pytest.mark.parametrize("k", [40, 46, 6])
def test_pack_int4_round_trips_eight_codes_per_word(k: int) -> None:
    u = torch.randint(0, 16, (6, k), dtype=torch.uint8)
    p = pack_int4(u)
    assert p.shape == (6, k // 2) and p.dtype == torch.uint8
    if k >= 8:
        assert int(p[0, 1]) == int(u[0, 1]) | (int(u[0, 5]) << 4)  # byte i of a word: codes i and 4 + i
    tail = k % 8
    if tail:  # a last partial block of L codes: byte i holds codes i and L/2 + i
        first = k - tail
        assert int(p[0, first // 2]) == int(u[0, first]) | (int(u[0, first + tail // 2]) << 4)
    assert torch.equal(unpack_int4(p), u)


def _int8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n) * 0.01 + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlinear_references_equal_dequantize_then_linear(dtype: torch.dtype) -> None:
    x, b = torch.randn(2, 3, 64, dtype=dtype), torch.randn(24, dtype=dtype)
    w, s = _int8_weight(24, 64)
    # w8a16, per channel, per tensor and per group (with zero points)
    want = F.linear(x, dequantize_reference(w, s, None, 0, None, dtype), b)
    assert torch.equal(qlinear_w8a16_reference(x, w, s, None, None, b), want)
    assert torch.equal(kiln_ops.qlinear_w8a16(x, w, s, None, None, b), want)
    sg, zg = torch.rand(24, 4) * 0.01 + 1e-3, torch.randint(-3, 3, (24, 4), dtype=torch.int8)
    want = F.linear(x, dequantize_reference(w, sg, zg, None, 16, dtype), None)
    assert torch.equal(kiln_ops.qlinear_w8a16(x, w, sg, zg, 16, None), want)
    # w4a16: unsigned nibbles, zero point (None means 8)
    u = torch.randint(0, 16, (24, 64), dtype=torch.uint8)
    zu = torch.randint(0, 16, (24, 4), dtype=torch.uint8)
    want = F.linear(x, dequantize_reference(u, sg, zu, None, 16, dtype), b)
    assert torch.equal(qlinear_w4a16_reference(x, pack_int4(u), sg, zu, 16, b), want)
    eight = torch.full((24, 4), 8, dtype=torch.uint8)
    assert torch.equal(kiln_ops.qlinear_w4a16(x, pack_int4(u), sg, None, 16, b),
                       F.linear(x, dequantize_reference(u, sg, eight, None, 16, dtype), b))
    # w8a8: per-token activation codes x per-channel weights
    xq = torch.randint(-128, 128, (2, 3, 64), dtype=torch.int8)
    xs = torch.rand(2, 3, 1) * 0.02 + 1e-3
    want = F.linear(dequantize_reference(xq, xs, None, None, None, dtype), dequantize_reference(w, s, None, 0, None, dtype), b)
    assert torch.equal(qlinear_w8a8_reference(xq, xs, None, w, s, b, dtype), want)
    assert kiln_ops.qlinear_w8a8(xq, xs, None, w, s, b, dtype).dtype == dtype
    # fp8: e4m3 codes both sides, and weight-only
    w8 = (torch.randn(24, 64) * 100).to(torch.float8_e4m3fn)
    x8 = (torch.randn(2, 3, 64) * 100).to(torch.float8_e4m3fn)
    want = F.linear(dequantize_reference(x8, xs, out_dtype=dtype), dequantize_reference(w8, s, None, 0, None, dtype), b)
    assert torch.equal(qlinear_fp8_reference(x8, xs, w8, s, b, dtype), want)
    assert torch.equal(kiln_ops.qlinear_fp8(x, None, w8, s, b, dtype),
                       F.linear(x, dequantize_reference(w8, s, None, 0, None, dtype), b))


@pytest.mark.parametrize(
    ("op", "args", "kwargs"),
    [
        (kiln_ops.quantize.default, (torch.randn(4, 32), torch.rand(4) + 0.1, None, -128, 127, torch.int8), {"axis": 0}),
        (kiln_ops.quantize.default, (torch.randn(4, 32), torch.rand(4, 2) + 0.1, torch.zeros(4, 2, dtype=torch.int8),
                                     0, 15, torch.int8), {"group_size": 16}),
        (kiln_ops.dequantize.default, (torch.randint(-8, 8, (4, 32), dtype=torch.int8), torch.rand(4, 2) + 0.1),
         {"group_size": 16, "out_dtype": torch.bfloat16}),
        (kiln_ops.dynamic_scale.default, (torch.randn(2, 3, 32), 127.0, True), {}),
        (kiln_ops.qlinear_w4a16.default, (torch.randn(2, 32), torch.randint(0, 255, (4, 16), dtype=torch.uint8),
                                          torch.rand(4, 2) + 0.1, None, 16, None), {}),
        (kiln_ops.qlinear_w8a8.default, (torch.randint(-128, 127, (2, 32), dtype=torch.int8), torch.rand(2, 1) + 0.1,
                                         None, torch.randint(-128, 127, (4, 32), dtype=torch.int8), torch.rand(4) + 0.1,
                                         None, torch.float32), {}),
    ],
)
def test_fake_implementations_match_the_references(op, args, kwargs) -> None:
    torch.library.opcheck(op, args, kwargs, test_utils=("test_schema", "test_faketensor"))


class _Quantize(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.rand(4) + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.ops.kiln.quantize(x, self.scale, None, -128, 127, torch.int8, axis=0)
        return torch.ops.kiln.dequantize(q, self.scale, None, axis=0)


def test_invariants_reject_malformed_nodes() -> None:
    gm = torch.export.export(_Quantize(), (torch.randn(4, 32),)).module()
    verify(gm)
    node = next(n for n in gm.graph.nodes if n.target == kiln_ops.quantize.default)
    node.kwargs = {"axis": 1}  # a per-axis-1 scale would have 32 entries
    with pytest.raises(VerificationError, match=r"per axis 1 needs a scale of shape \(32,\)"):
        verify(gm)
    node.kwargs = {"group_size": 5}
    with pytest.raises(VerificationError, match="group size 5 does not divide"):
        verify(gm)
    node.kwargs = {"axis": 0}
    node.args = (*node.args[:3], 0, 300, torch.int8)
    with pytest.raises(VerificationError, match="does not fit int8"):
        verify(gm)
