"""Tests of ``compiler/quantize/config.py``: presets, validation that says what to change, skip patterns."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kiln
from kiln.errors import ConfigError
from kiln.quantize import (
    AWQ,
    GPTQ,
    RTN,
    PerAxis,
    PerGroup,
    PerTensor,
    PerToken,
    QuantConfig,
    QuantSpec,
    SmoothQuant,
)
from kiln.quantize.config import scale_shape


def test_presets() -> None:
    w8 = QuantConfig.preset("w8a16")
    assert w8.weights == QuantSpec(dtype="int8", granularity=PerAxis(0)) and w8.activations is None
    assert isinstance(w8.method, RTN) and w8.skip == ("lm_head",)
    w4 = QuantConfig.preset("w4a16-g128")
    assert (w4.weights.dtype, w4.weights.granularity, w4.weights.symmetric, w4.weights.qrange) == (
        "int4", PerGroup(128), False, (0, 15))
    w8a8 = QuantConfig.preset("w8a8")
    assert w8a8.activations == QuantSpec(dtype="int8", granularity=PerToken(), dynamic=True)
    assert w8a8.method == SmoothQuant(alpha=0.5) and w8a8.needs_calibration
    fp8 = QuantConfig.preset("fp8")
    assert fp8.weights.storage == torch.float8_e4m3fn and fp8.weights.qrange == (-448, 448)
    assert QuantConfig.preset("w4a16-g128", method="gptq").method == GPTQ(block_size=128, damp=0.01, act_order=True, mse=True)
    assert QuantConfig.preset("w4a16-g128", method="awq").method == AWQ()
    assert not QuantConfig.preset("w4a16-g128").needs_calibration
    with pytest.raises(dataclasses.FrozenInstanceError):
        w8.skip = ()  # type: ignore[misc]
    with pytest.raises(ConfigError, match="unknown quantization preset 'w3'.*w8a16"):
        QuantConfig.preset("w3")


def test_torch_dtypes_and_strings_are_accepted() -> None:
    assert QuantSpec(dtype=torch.int8).dtype == "int8"  # type: ignore[arg-type]
    assert QuantSpec(dtype="fp8").dtype == "fp8_e4m3"
    assert QuantConfig(method="GPTQ", skip="lm_head").skip == ("lm_head",)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: QuantConfig(weights=QuantSpec(dynamic=True)), "set dynamic=False"),
        (lambda: QuantConfig(weights=QuantSpec(granularity=PerToken())), r"PerAxis\(0\)"),
        (lambda: QuantConfig(weights=QuantSpec(granularity=PerAxis(1))), r"PerGroup\(size\)"),
        (lambda: QuantConfig(activations=QuantSpec(dtype="int4", granularity=PerTensor())), "int8 or fp8_e4m3"),
        (lambda: QuantConfig(activations=QuantSpec(granularity=PerToken())), "set dynamic=True"),
        (lambda: QuantConfig(activations=QuantSpec(granularity=PerGroup(32), dynamic=True)), "PerToken"),
        (lambda: QuantConfig(activations=QuantSpec(granularity=PerTensor(), dynamic=True, symmetric=False)),
         "symmetric=True"),
        (lambda: QuantSpec(dtype="fp8_e4m3", symmetric=False), "no zero point"),
        (lambda: QuantSpec(dtype="fp8_e4m3", granularity=PerGroup(128)), r"PerAxis\(0\)"),
        (lambda: QuantSpec(dtype="int4", granularity=PerGroup(33)), "even group size"),
        (lambda: PerGroup(1), ">= 2"),
        (lambda: QuantSpec(dtype="int3"), "int8"),
        (lambda: QuantSpec(observer="kl"), "minmax"),
        (lambda: QuantConfig(method="smoothquant"), "w8a8"),
        (lambda: QuantConfig(weights=QuantSpec(dtype="fp8_e4m3"), method="gptq"), "int4"),
        (lambda: QuantConfig(method="magic"), "rtn"),
        (lambda: QuantConfig(weights=None), "quantizes nothing"),
        (lambda: QuantConfig(kv_cache=QuantSpec()), "leave kv_cache=None"),
        (lambda: GPTQ(damp=1.5), "damp"),
        (lambda: SmoothQuant(alpha=2.0), r"\[0, 1\]"),
        (lambda: kiln.CompileConfig(quant="w8a16"), "QuantConfig"),  # type: ignore[arg-type]
    ],
)
def test_invalid_configs_say_what_to_change(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_group_size_checked_when_the_config_meets_the_model(tiny_llama) -> None:
    config = QuantConfig(weights=QuantSpec(dtype="int4", granularity=PerGroup(32)))
    with pytest.raises(ConfigError, match=r"group size 32 does not divide the input dimension 176 of "
                                          r"model\.layers\.0\.mlp\.down_proj.*PerGroup\(16\)"):
        config.check_model(tiny_llama)
    with pytest.raises(ConfigError, match="does not divide"):  # kiln.compile checks before capturing
        kiln.compile(tiny_llama, (torch.zeros(1, 4, dtype=torch.long),), config=kiln.CompileConfig(quant=config))
    ok = dataclasses.replace(config, skip=("lm_head", "down_proj"))
    assert len(ok.check_model(tiny_llama)) == 2 * 6  # q k v o gate up per layer


def test_skip_patterns(tiny_llama) -> None:
    config = QuantConfig(skip=("lm_head", "model.layers.1", "*.mlp.up_proj"))
    assert config.skips("lm_head") and config.skips("model.layers.1.self_attn.q_proj")
    assert config.skips("model.layers.0.mlp.up_proj")
    assert not config.skips("model.layers.0.mlp.down_proj")
    assert not QuantConfig(skip=("model.layers.1",)).skips("model.layers.10.mlp.down_proj")
    assert QuantConfig(skip=("down_proj",)).skips("model.layers.3.mlp.down_proj")
    with pytest.raises(ConfigError, match="skip pattern 'lm_haed' matches no linear layer.*lm_head"):
        QuantConfig(skip=("lm_haed",)).check_model(tiny_llama)
    with pytest.raises(ConfigError, match="leaves no linear layer"):
        QuantConfig(skip=("*",)).check_model(tiny_llama)


def test_calibration_data_required_where_needed(tiny_llama, tokens) -> None:
    with pytest.raises(ConfigError, match="method gptq needs calibration data"):
        QuantConfig.preset("w4a16-g128", method="gptq", weights=QuantSpec(dtype="int4", granularity=PerGroup(16))
                           ).check_model(tiny_llama)
    static = QuantConfig(activations=QuantSpec(granularity=PerTensor()))
    with pytest.raises(ConfigError, match="static activation scales need"):
        static.check_model(tiny_llama)
    assert static.with_calibration(tokens).check_model(tiny_llama)


def test_documented_scale_shapes() -> None:
    assert scale_shape((48, 64), PerTensor()) == ()
    assert scale_shape((48, 64), PerAxis(0)) == (48,)
    assert scale_shape((48, 64), PerGroup(16)) == (48, 4)
    assert scale_shape((2, 5, 64), PerToken()) == (2, 5, 1)
    assert QuantSpec(dtype="int4", granularity=PerGroup(128), symmetric=False).describe() == "int4 g128 asym"
