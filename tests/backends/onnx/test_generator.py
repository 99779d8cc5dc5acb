"""The generation artifact (contiguous KV cache) and OrtGenerator vs kiln's eager generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from kiln_testing import HF_MODELS
from onnx import TensorProto, helper

import kiln
from kiln.backends.onnx import OrtGenerator, export_onnx
from kiln.generate import generate, sample_next
from kiln.models import from_preset

MODELS = {
    "kiln-llama": lambda: from_preset("llama-tiny"),
    "kiln-gpt2": lambda: from_preset("gpt2-tiny"),
    "hf-llama": lambda: HF_MODELS["llama"](),
    "hf-gpt2": lambda: HF_MODELS["gpt2"](),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_generation_equals_eager_token_for_token(name: str, tmp_path: Path) -> None:
    model = MODELS[name]()
    vocab = model.config.vocab_size
    compiled = kiln.compile(model, {"input_ids": torch.randint(0, vocab, (1, 8))})
    report = export_onnx(compiled, tmp_path / "decoder.onnx", kv_cache=True, lengths=(5,))
    assert report.kv_cache and report.max_rel_error is not None and report.max_rel_error <= 1e-4
    assert report.inputs == ("input_ids", "past_key_values.0.key", "past_key_values.0.value",
                             "past_key_values.1.key", "past_key_values.1.value")
    assert report.outputs == ("logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value")
    assert report.dynamic_axes["past_key_values.0.key"] == {0: "batch_size", 2: "past_sequence_length"}
    proto = onnx.load(str(report.path))
    present = next(o for o in proto.graph.output if o.name == "present.0.key")
    heads, dim = (d.dim_value for d in present.type.tensor_type.shape.dim[1::2])
    assert (heads, dim) == ((2, 16) if name == "kiln-llama" else (2, 8) if name == "hf-llama" else (4, 16 if name == "kiln-gpt2" else 8))

    generator = OrtGenerator(report.path)
    assert generator.layers == 2
    logits, past = generator.step(np.zeros((3, 5), np.int64), generator.empty_cache(3))
    assert logits.shape == (3, 5, vocab) and past[0].shape == (3, heads, 5, dim)
    logits, past = generator.step(np.zeros((3, 1), np.int64), past)
    assert logits.shape == (3, 1, vocab) and past[-1].shape == (3, heads, 6, dim)
    for prompt in (torch.randint(0, vocab, (2, 6)), torch.randint(0, vocab, (1, 1))):
        want = generate(model, prompt, 12)
        got = generator.generate(prompt, 12)
        assert torch.equal(got, want), (name, got, want)
    if name == "kiln-llama":  # the compiled model is an oracle too, and sampling with a seed draws alike
        assert torch.equal(generate(compiled, prompt, 12), want)
        kw = {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 7}
        sampled = generator.generate(prompt, 12, **kw)
        assert torch.equal(sampled, generate(model, prompt, 12, **kw))
        assert not torch.equal(sampled, generator.generate(prompt, 12, **{**kw, "seed": 8}))


def test_ort_generator_rejects_an_artifact_without_a_cache(tmp_path: Path) -> None:
    node = helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "plain.onnx")
    with pytest.raises(kiln.ExportError, match="kv_cache=True"):
        OrtGenerator(tmp_path / "plain.onnx")


# --------------------------------------------------------------------------------------
# kiln.generate, the oracle
# --------------------------------------------------------------------------------------


def test_sample_next_filters() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # top_k=1 and a tiny top_p leave only the argmax
        assert sample_next(logits, do_sample=True, top_k=1, generator=gen).tolist() == [1, 0]
        assert sample_next(logits, do_sample=True, top_p=0.01, generator=gen).tolist() == [1, 0]
    draws = {tuple(sample_next(logits, do_sample=True, top_k=2, generator=gen).tolist()) for _ in range(50)}
    assert {d[0] for d in draws} == {1, 3}  # top-2 of row 0
    with pytest.raises(kiln.ConfigError, match="temperature"):
        sample_next(logits, do_sample=True, temperature=0.0)


def test_generate_stops_at_eos_and_pads_finished_rows() -> None:
    model = from_preset("gpt2-tiny")
    prompt = torch.randint(0, 512, (2, 4))
    free = generate(model, prompt, 6)
    eos = int(free[0, 5])  # the second token row 0 generates
    out = generate(model, prompt, 6, eos_token_id=eos)
    assert out[0, 5] == eos and torch.all(out[0, 5:] == eos)
    assert torch.equal(out[:, :6], free[:, :6])
    with pytest.raises(kiln.ConfigError):
        generate(model, prompt[0], 3)
