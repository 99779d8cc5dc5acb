"""Tests of the front end (``kiln.quantize.quantize``), the compile hook and the report."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kiln
from kiln.errors import ConfigError, PassError
from kiln.passes.insert_qdq import InsertQDQ
from kiln.pipeline import pass_names
from kiln.quantize import GPTQ, PerGroup, QuantConfig, QuantSpec, quantize
from kiln.quantize.report import graph_bytes, quant_report

W4 = QuantSpec(dtype="int4", granularity=PerGroup(16), symmetric=False)
IDS = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(5))


def test_compile_pipeline_has_the_quantization_phase() -> None:
    names = pass_names(kiln.CompileConfig(quant=QuantConfig.preset("w8a16")))
    at = names.index("insert-qdq")
    assert names[at : at + 3] == ["insert-qdq", "lower-qdq", "eliminate-dead-code"]
    assert names.index("fuse-attention") < at and "merge-parallel-linears" not in names  # merging: step graphs only
    step = pass_names(kiln.CompileConfig(quant=QuantConfig.preset("w8a16"), kv_cache=True))
    assert step.index("insert-qdq") < step.index("merge-parallel-linears") < step.index("kv-cache")
    assert "insert-qdq" not in pass_names(kiln.CompileConfig())


def test_front_end_quantizes_without_touching_the_model(tiny_llama, tokens) -> None:
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    config = QuantConfig(weights=W4, method=GPTQ(sequential=True))
    compiled = quantize(tiny_llama, config, tokens, example_inputs=(IDS,),
                        calibration=kiln.quantize.Calibration(num_samples=2, seq_len=64, progress=False))
    assert compiled.node_counts()["kiln.qlinear_w4a16"] == 14
    assert compiled.stats["insert-qdq"]["calibration_samples"] == 2 * 2  # two blocks, quantized in turn
    for k, v in tiny_llama.state_dict().items():
        assert torch.equal(v, state[k]), k  # weights are quantized into new tensors
    x = torch.randint(0, 512, (1, 21))
    out, ref = compiled(x), tiny_llama(x)
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.2
    assert graph_bytes(compiled.graph_module) < 0.75 * graph_bytes(compiled.capture.gm)


def test_preset_names_and_overrides(tiny_llama) -> None:
    compiled = quantize(tiny_llama, "w8a16", example_inputs=(IDS,), skip=("lm_head", "mlp"))
    assert compiled.node_counts()["kiln.qlinear_w8a16"] == 8
    with pytest.raises(ConfigError, match="group size 128 does not divide"):
        quantize(tiny_llama, "w4a16-g128", example_inputs=(IDS,))


def test_keeping_the_qdq_form_by_disabling_the_lowering(tiny_llama) -> None:
    base = kiln.CompileConfig(disable=("lower-qdq",))
    compiled = quantize(tiny_llama, "w8a16", example_inputs=(IDS,), compile_config=base)
    counts = compiled.node_counts()
    assert counts["kiln.quantize"] == counts["kiln.dequantize"] == 14 and "kiln.qlinear_w8a16" not in counts
    lowered = quantize(tiny_llama, "w8a16", example_inputs=(IDS,))
    x = torch.randint(0, 512, (1, 9))
    assert torch.equal(compiled(x), lowered(x))


def test_errors_inside_the_pass_name_it(tiny_llama) -> None:
    config = QuantConfig(weights=W4, method="gptq")  # no calibration data, and the check is bypassed
    with pytest.raises(PassError, match="insert-qdq.*needs calibration data"):
        kiln.compile(tiny_llama, (IDS,), config=kiln.CompileConfig(extra_passes=(InsertQDQ(config),)))


def test_report_per_layer_errors_memory_and_perplexity(tiny_llama, tokens) -> None:
    config = QuantConfig(weights=W4).with_calibration(tokens, progress=False)
    dynamic = kiln.CompileConfig(dynamic={"input_ids": {0: "B", 1: "T"}})
    compiled = quantize(tiny_llama, config, example_inputs=(torch.cat([IDS, IDS]),), compile_config=dynamic)
    rep = quant_report(tiny_llama, compiled, eval_tokens=tokens[:600], seq_len=128, batch_size=4, progress=False)
    assert len(rep.layers) == 14 and rep.layers[0].name == "model.layers.0.self_attn.q_proj"
    for layer in rep.layers:
        assert layer.op == "qlinear_w4a16" and 0 < layer.weight_error < 0.2 and 0 < layer.output_error < 0.3
        assert layer.bytes_q * 16 == layer.bytes_fp // 4 * 13
    assert rep.bytes_after < rep.bytes_before and 0 < rep.logits_error < 0.2
    assert rep.eval_tokens == 600 and rep.perplexity_q > 1 and abs(rep.perplexity_increase) < 0.2
    text = rep.format()
    assert "model.layers.1.mlp.down_proj" in text and "perplexity:" in text and "memory (graph constants)" in text
    assert dataclasses.asdict(rep)["layers"][0]["shape"] == (64, 64)
