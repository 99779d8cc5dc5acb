"""Tests of ``passes/insert_qdq.py``: IR text, numerics against fp32, and linears that must not match."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kiln_testing import hf_gpt2
from torch import nn

import kiln
from kiln.errors import ConfigError
from kiln.ir import SYMBOLS_KEY, print_ir, verify
from kiln.models import from_preset
from kiln.passes.canonicalize import Canonicalize
from kiln.passes.insert_qdq import QUANT_META, InsertQDQ
from kiln.quantize import PerGroup, PerTensor, PerToken, QuantConfig, QuantSpec

X = torch.randint(0, 512, (1, 11), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return from_preset("llama-tiny", seed=0).eval()


@pytest.fixture(scope="module")
def capture(model):
    return kiln.capture(model, (torch.randint(0, 512, (1, 8)),))


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 512, (1024,), generator=torch.Generator().manual_seed(3))


def run(capture, config: QuantConfig):
    """A fresh canonical graph of the capture, its fp32 output, and the result of insert-qdq on it."""
    gm = capture.module()
    gm.meta[SYMBOLS_KEY] = dict(capture.gm.meta.get(SYMBOLS_KEY, {}))
    Canonicalize()(gm)
    ref = gm(input_ids=X)
    result = InsertQDQ(config)(gm)
    verify(result.gm)
    return ref, result, print_ir(result.gm)


def count(ir: str, op: str) -> int:
    return sum(f"= {op}(" in line for line in ir.splitlines())


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_int8_per_channel_weights(capture) -> None:
    ref, result, ir = run(capture, QuantConfig.preset("w8a16"))
    # IR: every linear but the skipped lm_head reads its weight through quantize -> dequantize
    assert ("= kiln.quantize(%model_layers_0_self_attn_q_proj_weight, %_quant_model_layers_0_self_attn_q_proj_w_scale, "
            "None, -128, 127, i8, axis=0) : i8[64, 64]  # model.layers.0.self_attn.q_proj") in ir
    assert "kiln.dequantize(%quantize_default, %_quant_model_layers_0_self_attn_q_proj_w_scale, None, axis=0, out_dtype=f32)" in ir
    assert count(ir, "kiln.quantize") == count(ir, "kiln.dequantize") == 14
    assert '_quant_model_layers_1_mlp_down_proj_w_scale" : f32[64]' in ir
    assert "[insert-qdq]" in ir
    assert result.stats["weights_quantized"] == 14 and result.stats["layers_skipped"] == 1
    # must not match: the skipped lm_head still reads its float weight
    lm_head = [n for n in result.gm.graph.nodes if n.target == torch.ops.aten.linear.default][-1]
    assert lm_head.args[1].op == "get_attr" and "lm_head" in str(lm_head.args[1].target)
    assert not any("lm_head" in line for line in ir.splitlines() if "kiln.quantize" in line)
    # numerics: close to fp32, but not equal
    out = result.gm(input_ids=X)
    assert 0 < rel_error(out, ref) < 0.01
    assert result.gm.meta[QUANT_META]["model.layers.0.mlp.up_proj"]["weight_error"] < 0.01


def test_int4_group_wise_weights(capture) -> None:
    config = QuantConfig(weights=QuantSpec(dtype="int4", granularity=PerGroup(16), symmetric=False))
    ref, result, ir = run(capture, config)
    assert "0, 15, i8, group_size=16) : i8[176, 64]  # model.layers.0.mlp.gate_proj" in ir
    assert '_quant_model_layers_0_mlp_gate_proj_w_scale" : f32[176, 4]' in ir  # (N, K / g)
    assert '_quant_model_layers_0_mlp_gate_proj_w_zero_point" : i8[176, 4]' in ir
    assert '_quant_model_layers_0_mlp_down_proj_w_scale" : f32[64, 11]' in ir  # K = 176 = 11 groups
    out = result.gm(input_ids=X)
    assert 0.005 < rel_error(out, ref) < 0.15


def test_dynamic_per_token_activations_shared_by_a_group(capture) -> None:
    config = QuantConfig(activations=QuantSpec(dtype="int8", granularity=PerToken(), dynamic=True))
    ref, result, ir = run(capture, config)
    # one activation Q/DQ per input: q/k/v share one, gate/up share one, o and down have their own
    assert count(ir, "kiln.dynamic_scale") == 4 * 2 and result.stats["activations_quantized"] == 8
    assert "kiln.dynamic_scale(%mul_2, 127.0, True) : f32[1, T, 1]  # model.layers.0.self_attn" in ir
    dq = next(n for n in result.gm.graph.nodes if n.target == torch.ops.kiln.dequantize.default
              and n.args[0].args[0].name == "mul_2")
    assert sorted(u.meta["nn_module_stack"] and list(u.meta["nn_module_stack"].values())[-1][0] for u in dq.users) == [
        f"model.layers.0.self_attn.{p}_proj" for p in "kqv"]
    out = result.gm(input_ids=X)
    assert 0 < rel_error(out, ref) < 0.02


def test_static_activation_scales_from_calibration(capture, calib) -> None:
    act = QuantSpec(dtype="int8", granularity=PerTensor(), symmetric=False, observer="percentile")
    config = QuantConfig(activations=act).with_calibration(calib, num_samples=4, seq_len=64, progress=False)
    ref, result, ir = run(capture, config)
    assert '_quant_model_layers_0_mlp_down_proj_x_scale" : f32[]' in ir
    assert '_quant_model_layers_0_mlp_down_proj_x_zero_point" : i8[]' in ir
    assert "_kiln_observer" not in ir and result.stats["calibration_samples"] == 4
    out = result.gm(input_ids=X)
    assert 0 < rel_error(out, ref) < 0.05


def test_smoothquant_inserts_one_smoothing_per_input(capture, calib) -> None:
    config = QuantConfig.preset("w8a8").with_calibration(calib, num_samples=4, seq_len=64, progress=False)
    ref, result, ir = run(capture, config)
    smooth = [line for line in ir.splitlines() if "= aten.mul.Tensor(" in line and "_inv_smooth)" in line]
    assert len(smooth) == 8 and result.stats["inputs_smoothed"] == 8
    assert '_quant_model_layers_0_self_attn_q_proj_k_proj_v_proj_inv_smooth" : f32[64]' in ir
    assert "kiln.dynamic_scale(%mul_tensor" in ir  # the smoothed value is what gets quantized
    out = result.gm(input_ids=X)
    assert 0 < rel_error(out, ref) < 0.02


def test_skip_patterns_leave_layers_in_full_precision(capture) -> None:
    ref, result, ir = run(capture, QuantConfig(skip=("lm_head", "mlp", "model.layers.1")))
    assert count(ir, "kiln.quantize") == 4 and result.stats["layers_skipped"] == 11
    assert all("model.layers.0.self_attn" in line for line in ir.splitlines() if "= kiln.quantize(" in line)


def test_group_size_is_checked_against_the_graph(capture) -> None:
    with pytest.raises(ConfigError, match="group size 32 does not divide the input dimension 176"):
        run(capture, QuantConfig(weights=QuantSpec(dtype="int4", granularity=PerGroup(32))))


class Mixed(nn.Module):
    """One linear by a constant weight, one by an activation (must not match)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.linear(self.proj(x), y)


def test_only_constant_weights_match() -> None:
    model = Mixed().eval()
    x, y = torch.randn(2, 16), torch.randn(8, 16)
    cap = kiln.capture(model, (x, y), dynamic=False)
    gm = cap.module()
    Canonicalize()(gm)
    result = InsertQDQ(QuantConfig(skip=()))(gm)
    verify(result.gm)
    ir = print_ir(result.gm)
    assert count(ir, "kiln.quantize") == 1 and "kiln.quantize(%proj_weight" in ir
    assert "aten.linear(%linear, %y)" in ir  # the activation x activation product is untouched
    torch.testing.assert_close(result.gm(x=x, y=y), model(x, y), rtol=0.02, atol=0.02)


def test_gpt2_conv1d_weights_behind_permute() -> None:
    model = hf_gpt2()
    cap = kiln.capture(model, {"input_ids": torch.randint(0, 128, (1, 8))})
    gm = cap.module()
    Canonicalize()(gm)
    ids = torch.randint(0, 128, (1, 6))
    ref = gm(input_ids=ids, use_cache=False).logits
    result = InsertQDQ(QuantConfig.preset("w8a16"))(gm)
    verify(result.gm)
    ir = print_ir(result.gm)
    # Conv1D stores (in, out): the pass quantizes a new (out, in) tensor per output channel
    assert count(ir, "kiln.quantize") == 8 and '_quant_transformer_h_0_attn_c_attn_weight" : f32[96, 32]' in ir
    out = result.gm(input_ids=ids, use_cache=False).logits
    assert 0 < rel_error(out, ref) < 0.01
