"""Quantized graphs as ONNX: QuantizeLinear/DequantizeLinear (axis, block_size), MatMulNBits, MatMulInteger;
onnxruntime parity against kiln's own quantized reference, for both the Q/DQ and the lowered form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from kiln_testing import hf_llama
from torch import nn

import kiln
from kiln.backends.onnx import OrtGenerator, export_onnx
from kiln.backends.onnx import quant_translations as qt
from kiln.backends.onnx.matmul_nbits import block_size_for, matmul_nbits_reference
from kiln.cli import main as cli_main
from kiln.generate import generate
from kiln.quantize import PerGroup, QuantSpec, quantize
from kiln.quantize import ops as quant_ops
from kiln.runtime.speculative import SpeculativeConfig


class MLP(nn.Module):
    """Two linears, K = 96 then 192: group sizes 16, 24, 32 and 48 divide both."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(96, 192)
        self.down = nn.Linear(192, 40, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


def _quantized(preset: str, form: str, **overrides: object) -> kiln.CompiledModel:
    calibration = [torch.randn(1, 16, 96, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    config = kiln.CompileConfig(disable=("lower-qdq",)) if form == "qdq" else None
    return quantize(
        _mlp(),
        preset,
        calibration,
        example_inputs=(torch.randn(1, 8, 96),),
        compile_config=config,
        skip=(),
        **overrides,
    )


def _nodes(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path)).graph.node)


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ort_vs_kiln(path: Path, compiled: kiln.CompiledModel) -> float:
    """Relative error of onnxruntime (ORT_ENABLE_ALL, kiln's session options) against kiln on fresh inputs."""
    from kiln.backends.onnx.validate import ort_session

    session = ort_session(path)
    worst = 0.0
    for seed in (5, 6):
        x = torch.randn(1, 8, 96, generator=torch.Generator().manual_seed(seed)) * 3
        with torch.no_grad():
            want = compiled(x).numpy()
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    return worst


# what each export must contain: (op type, attributes that must hold) and op types that must not appear
EXPECT = {
    ("w8a16", "lowered"): ([("DequantizeLinear", {"axis": 0})], {"QuantizeLinear", "MatMulNBits"}),
    ("w4a16-g32", "lowered"): (
        [("MatMulNBits", {"bits": 4, "block_size": 32, "K": 96, "N": 192})],
        {"DequantizeLinear", "QuantizeLinear"},
    ),
    ("w8a8", "lowered"): (
        [("MatMulInteger", {}), ("QuantizeLinear", {"axis": 2, "block_size": 96, "output_dtype": 3})],
        {"MatMul"},
    ),
    ("fp8", "lowered"): (
        [("QuantizeLinear", {"output_dtype": 17, "block_size": 192}), ("DequantizeLinear", {"axis": 0})],
        set(),
    ),
    ("w4a16-g32", "qdq"): (
        [
            ("QuantizeLinear", {"axis": 1, "block_size": 32, "output_dtype": 3}),
            ("Clip", {}),
            ("DequantizeLinear", {"axis": 1, "block_size": 32}),
        ],
        {"MatMulNBits"},
    ),
    ("w8a8", "qdq"): (
        [("QuantizeLinear", {"axis": 2, "block_size": 96}), ("DequantizeLinear", {"axis": 0})],
        {"MatMulInteger"},
    ),
}


@pytest.mark.parametrize(("preset", "form"), sorted(EXPECT), ids=lambda v: v)
def test_presets_export_and_match_kilns_quantized_reference(preset: str, form: str, tmp_path: Path) -> None:
    overrides = {}
    if preset == "w4a16-g32":  # the w4a16-g128 preset at a group size the small layers divide
        preset, overrides = (
            "w4a16-g128",
            {"weights": QuantSpec(dtype="int4", granularity=PerGroup(32), symmetric=False)},
        )
    compiled = _quantized(preset, form, **overrides)
    report = export_onnx(compiled, tmp_path / "q.onnx")
    assert report.max_rel_error is not None and report.max_rel_error <= 1e-4
    assert _ort_vs_kiln(report.path, compiled) <= 1e-4
    nodes = _nodes(report.path)
    must, must_not = EXPECT[(preset if not overrides else "w4a16-g32", form)]
    for op_type, attrs in must:
        found = [_attrs(n) for n in nodes if n.op_type == op_type]
        assert any(all(a.get(k) == v for k, v in attrs.items()) for a in found), (op_type, attrs, found)
    assert not must_not & {n.op_type for n in nodes}
    if form == "lowered" and preset == "w4a16-g128":
        assert all(n.domain == "com.microsoft" for n in nodes if n.op_type == "MatMulNBits")


@pytest.mark.parametrize(("group", "symmetric", "block"), [(48, True, 16), (24, False, None)])
def test_int4_groups_become_matmul_nbits_blocks_or_blocked_dequantize(
    group: int, symmetric: bool, block: int | None, tmp_path: Path
) -> None:
    assert block_size_for(group) == block
    compiled = _quantized(
        "w4a16-g128",
        "lowered",
        weights=QuantSpec(dtype="int4", granularity=PerGroup(group), symmetric=symmetric),
    )
    report = export_onnx(compiled, tmp_path / "q.onnx", validate=False)
    assert _ort_vs_kiln(report.path, compiled) <= 1e-4
    nodes = _nodes(report.path)
    if block is not None:  # a group of 48 is three MatMulNBits blocks of 16 with repeated scales
        assert sorted(_attrs(n)["block_size"] for n in nodes if n.op_type == "MatMulNBits") == [16, 16]
    else:  # no power-of-two block >= 16 divides 24: DequantizeLinear of uint8 codes, block_size 24
        assert not any(n.op_type == "MatMulNBits" for n in nodes)
        assert sorted(_attrs(n)["block_size"] for n in nodes if n.op_type == "DequantizeLinear") == [24, 24]


def test_int4_without_matmul_nbits_in_onnxruntime_takes_dequantize_linear(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("kiln.backends.onnx.matmul_nbits.ort_runs_matmul_nbits", lambda: False)
    compiled = _quantized("w4a16-g128", "lowered", weights=QuantSpec(dtype="int4", granularity=PerGroup(32)))
    report = export_onnx(compiled, tmp_path / "q.onnx")
    assert report.max_rel_error is not None and report.max_rel_error <= 1e-4
    dq = [n for n in _nodes(report.path) if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 and all(_attrs(n)["block_size"] == 32 for n in dq)
    assert not any(n.op_type == "MatMulNBits" for n in _nodes(report.path))


def test_int4_export_reads_whatever_layout_kiln_packs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def pack(u: torch.Tensor) -> torch.Tensor:  # high nibble first, and the two halves of K swapped
        u = u.to(torch.uint8)
        u = torch.cat([u[..., u.shape[-1] // 2 :], u[..., : u.shape[-1] // 2]], -1)
        return (u[..., 0::2] << 4) | (u[..., 1::2] & 0xF)

    def unpack(p: torch.Tensor) -> torch.Tensor:
        u = torch.stack((p >> 4, p & 0xF), dim=-1).flatten(-2)
        return torch.cat([u[..., u.shape[-1] // 2 :], u[..., : u.shape[-1] // 2]], -1)

    codes = torch.randint(0, 16, (3, 32), dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes)), codes) and not torch.equal(
        pack(codes), quant_ops.pack_int4(codes)
    )
    monkeypatch.setattr("kiln.passes.lower_qdq.pack_int4", pack)
    monkeypatch.setattr(quant_ops, "unpack_int4", unpack)
    compiled = _quantized("w4a16-g128", "lowered", weights=QuantSpec(dtype="int4", granularity=PerGroup(16)))
    report = export_onnx(compiled, tmp_path / "q.onnx")  # validated against the patched reference
    assert report.max_rel_error is not None and report.max_rel_error <= 1e-4
    assert sum(n.op_type == "MatMulNBits" for n in _nodes(report.path)) == 2


def test_matmul_nbits_reference_is_the_contrib_op() -> None:
    k, n, bs = 40, 6, 16  # K not a multiple of the block: the last block is padded
    gen = torch.Generator().manual_seed(3)
    blocks = -(-k // bs)
    u = torch.randint(0, 16, (n, blocks * bs), generator=gen, dtype=torch.uint8)
    b = ((u[:, 0::2] & 0xF) | (u[:, 1::2] << 4)).reshape(n, blocks, bs // 2)
    scales = torch.rand(n, blocks, generator=gen) + 0.1
    zp = torch.randint(0, 16, (n, blocks), generator=gen, dtype=torch.uint8)
    zp_packed = torch.nn.functional.pad(zp, (0, 1))[:, 0::2] | (
        torch.nn.functional.pad(zp, (0, 1))[:, 1::2] << 4
    )
    a = torch.randn(2, 3, k, generator=gen)
    w = ((u.float() - zp.repeat_interleave(bs, 1)) * scales.repeat_interleave(bs, 1))[:, :k]
    torch.testing.assert_close(
        matmul_nbits_reference(a, b, scales, zp_packed, k, n, bs), a @ w.T, rtol=1e-5, atol=1e-5
    )
    node = onnx.helper.make_node(
        "MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=bs
    )
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [2, 3, k])],
        [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [2, 3, n])],
        initializer=[
            onnx.numpy_helper.from_array(t.numpy(), name)
            for t, name in ((b, "B"), (scales, "S"), (zp_packed, "Z"))
        ],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 21), onnx.helper.make_opsetid("com.microsoft", 1)]
    )
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"A": a.numpy()}
    )
    np.testing.assert_allclose(y, (a @ w.T).numpy(), rtol=1e-5, atol=1e-5)


def test_quantized_decoder_generates_what_kiln_generates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = hf_llama()
    weights = QuantSpec(dtype="int4", granularity=PerGroup(16), symmetric=False)
    compiled = quantize(model, "w4a16-g128", example_inputs=(torch.randint(0, 128, (1, 8)),), weights=weights)
    report = export_onnx(compiled, tmp_path / "decoder.onnx", kv_cache=True, lengths=(4,))
    assert report.max_rel_error is not None and report.max_rel_error <= 1e-4
    assert any(n.op_type == "MatMulNBits" for n in _nodes(report.path))
    ort_gen = OrtGenerator(report.path)
    prompt = torch.tensor([[5, 9, 5, 9, 5, 9, 7], [1, 2, 3, 4, 1, 2, 3]])
    want = generate(compiled, prompt, 10)  # kiln's quantized reference, no cache
    assert torch.equal(ort_gen.generate(prompt, 10), want)
    assert torch.equal(ort_gen.generate(prompt, 10, speculative=SpeculativeConfig(method="ngram")), want)


def test_quantized_export_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    compiled = _quantized("w8a16", "lowered")
    with pytest.raises(kiln.ExportError, match="opset >= 21"):
        export_onnx(compiled, tmp_path / "q.onnx", opset=18)
    fp8 = _quantized("fp8", "lowered")
    monkeypatch.setattr(qt, "ort_runs_fp8", lambda: False)
    with pytest.raises(kiln.ExportError, match="float8"):
        export_onnx(fp8, tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_cli_export_onnx_quant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "w8.onnx"
    assert cli_main(["export-onnx", "gpt2-tiny", "-o", str(out), "--quant", "w8a16"]) == 0
    assert "max rel error" in capsys.readouterr().out
    ops = {n.op_type for n in _nodes(out)}
    assert "DequantizeLinear" in ops
