"""Tests of ``passes/lower_qdq.py``: each qlinear variant in the IR, outputs equal to the Q/DQ graph,
memory that shrinks, and Q/DQ that must not be folded."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kiln_testing import has_attr

import kiln
from kiln.ir import SYMBOLS_KEY, print_ir, verify
from kiln.models import PRESETS, from_config, from_preset
from kiln.passes.canonicalize import Canonicalize
from kiln.passes.insert_qdq import InsertQDQ
from kiln.passes.lower_qdq import LowerQDQ
from kiln.quantize import PerAxis, PerGroup, PerTensor, PerToken, QuantConfig, QuantSpec
from kiln.quantize.report import graph_bytes

X = torch.randint(0, 512, (1, 13), generator=torch.Generator().manual_seed(4))
INT8_TOKENS = QuantSpec(dtype="int8", granularity=PerToken(), dynamic=True)


@pytest.fixture(scope="module")
def capture():
    return kiln.capture(from_preset("llama-tiny", seed=0).eval(), (torch.randint(0, 512, (1, 8)),))


def qdq_graph(capture, config: QuantConfig):
    gm = capture.module()
    gm.meta[SYMBOLS_KEY] = dict(capture.gm.meta.get(SYMBOLS_KEY, {}))
    Canonicalize()(gm)
    return InsertQDQ(config)(gm).gm


CASES = {
    "w8a16": (QuantConfig.preset("w8a16"), "qlinear_w8a16", "i8[176, 64]"),
    "w8a16-g16": (QuantConfig(weights=QuantSpec(granularity=PerGroup(16))), "qlinear_w8a16", "i8[176, 64]"),
    "w4a16-g16": (QuantConfig(weights=QuantSpec(dtype="int4", granularity=PerGroup(16), symmetric=False)),
                  "qlinear_w4a16", "u8[176, 32]"),
    "w4a16-per-channel": (QuantConfig(weights=QuantSpec(dtype="int4", granularity=PerAxis(0))), "qlinear_w4a16",
                          "u8[176, 32]"),
    "w8a8": (QuantConfig(activations=INT8_TOKENS), "qlinear_w8a8", "i8[176, 64]"),
    "fp8": (QuantConfig.preset("fp8"), "qlinear_fp8", "f8e4m3[176, 64]"),
    "fp8-weight-only": (QuantConfig(weights=QuantSpec(dtype="fp8_e4m3")), "qlinear_fp8", "f8e4m3[176, 64]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lowered_graph_equals_the_qdq_graph(capture, case: str) -> None:
    config, op, weight = CASES[case]
    gm = qdq_graph(capture, config)
    qdq_out = gm(input_ids=X)
    bytes_before = graph_bytes(gm)
    result = LowerQDQ()(gm)
    verify(result.gm)
    ir = print_ir(result.gm)
    # IR: every quantized linear is one qlinear over stored codes; no weight is quantized at run time
    assert sum(f"= kiln.{op}(" in line for line in ir.splitlines()) == 14 and result.stats[op] == 14
    assert "_qlinear_model_layers_0_mlp_gate_proj_w_" in ir and f" : {weight}" in ir
    assert "= kiln.quantize(%model_layers" not in ir and "= aten.linear(" in ir  # lm_head (skipped) stays
    assert "[lower-qdq]" in ir
    # numerics: what the Q/DQ graph computed, bit for bit
    assert torch.equal(result.gm(input_ids=X), qdq_out)
    # memory: the float weights are gone from the module
    assert not has_attr(result.gm, "model.layers.0.mlp.gate_proj.weight")
    assert has_attr(result.gm, "lm_head.weight")
    assert graph_bytes(result.gm) < bytes_before and result.stats["bytes_after"] < result.stats["bytes_before"]


def test_int4_packs_two_codes_per_byte(capture) -> None:
    gm = qdq_graph(capture, CASES["w4a16-g16"][0])
    result = LowerQDQ()(gm)
    packed = result.gm._qlinear_model_layers_0_mlp_down_proj_w_packed
    zeros = result.gm._qlinear_model_layers_0_mlp_down_proj_w_zero_point
    assert packed.shape == (64, 88) and packed.dtype == torch.uint8 and zeros.shape == (64, 11)
    # 4 bits per weight, plus an f32 scale and a u8 zero point per 16 weights: 13/16 byte per weight, was 4
    weights = result.stats["bytes_before"] // 4
    assert result.stats["bytes_after"] * 16 == weights * 13


def test_static_activations_with_zero_points_lower_to_w8a8(capture) -> None:
    act = QuantSpec(dtype="int8", granularity=PerTensor(), symmetric=False)
    calib = torch.randint(0, 512, (512,))
    gm = qdq_graph(capture, QuantConfig(activations=act).with_calibration(calib, num_samples=2, seq_len=64, progress=False))
    out = gm(input_ids=X)
    result = LowerQDQ()(gm)
    verify(result.gm)
    ir = print_ir(result.gm)
    assert "_x_zero_point, %_qlinear_model_layers_0_self_attn_q_proj_w_int8" in ir and result.stats["qlinear_w8a8"] == 14
    assert torch.equal(result.gm(input_ids=X), out)


def test_combinations_without_a_kernel_keep_dequantize_but_store_codes(capture) -> None:
    config = QuantConfig(weights=QuantSpec(dtype="int4", granularity=PerGroup(16)), activations=INT8_TOKENS)
    gm = qdq_graph(capture, config)  # int4 weights x int8 activations: no qlinear variant
    out = gm(input_ids=X)
    result = LowerQDQ()(gm)
    verify(result.gm)
    ir = print_ir(result.gm)
    assert result.stats["dequantize_kept"] == 14 and "kiln.qlinear" not in ir
    assert "= kiln.dequantize(%_qlinear_model_layers_0_mlp_gate_proj_w_codes" in ir
    assert "= kiln.quantize(%model_layers" not in ir  # weights are no longer quantized at run time
    assert torch.equal(result.gm(input_ids=X), out)


def test_nothing_to_fold_without_weight_qdq(capture) -> None:
    gm = qdq_graph(capture, QuantConfig(weights=None, activations=INT8_TOKENS))
    before = print_ir(gm)
    result = LowerQDQ()(gm)
    assert not result.modified and print_ir(result.gm) == before


def test_a_tied_lm_head_keeps_the_embedding_weight() -> None:
    config = dataclasses.replace(PRESETS["llama-tiny"], tie_word_embeddings=True)
    model = from_config(config, seed=0).eval()
    compiled = kiln.compile(model, (X[:, :8],), config=kiln.CompileConfig(quant=QuantConfig(skip=())))
    assert compiled.node_counts()["kiln.qlinear_w8a16"] == 15  # lm_head too
    torch.testing.assert_close(compiled(X), model(X), rtol=0.05, atol=0.05)
    embedding = [n for n in compiled.graph_module.graph.nodes if n.target == torch.ops.aten.embedding.default]
    assert embedding and embedding[0].args[0].op == "get_attr"  # the float table stays for the embedding
