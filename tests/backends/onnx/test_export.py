"""export_onnx: parity in onnxruntime, kiln::attention translations, metadata, external data, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from kiln_testing import HF_MODELS
from torch import nn

import kiln
from kiln.backends.onnx import OnnxExportReport, export_onnx
from kiln.backends.onnx import export as export_mod
from kiln.backends.onnx.translations import TRANSLATIONS, translation_table
from kiln.cli import main as cli_main
from kiln.models import from_config, from_preset
from kiln.models.presets import get_preset
from kiln.ops import attention_reference

LENGTHS = (1, 5, 17, 40)


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _eager_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False) if hasattr(model, "generation_config") else model(ids)
    return out.logits if hasattr(out, "logits") else out


MODELS = {
    "kiln-llama": lambda: from_preset("llama-tiny"),
    "kiln-gpt2": lambda: from_preset("gpt2-tiny"),
    "hf-llama": lambda: HF_MODELS["llama"](),
    "hf-gpt2": lambda: HF_MODELS["gpt2"](),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_artifact_matches_the_model_at_many_lengths(name: str, tmp_path: Path) -> None:
    model = MODELS[name]()
    vocab = model.config.vocab_size
    compiled = kiln.compile(model, {"input_ids": torch.randint(0, vocab, (1, 8))})
    assert "kiln.attention" in compiled.node_counts()  # the fused graph is what ships
    report = export_onnx(compiled, tmp_path / "model.onnx")
    assert isinstance(report, OnnxExportReport) and report.path.exists()
    assert report.max_rel_error is not None and report.max_rel_error <= 1e-4
    assert report.dynamic_axes["input_ids"] == {0: "batch_size", 1: "sequence_length"}
    assert report.layers == 2 and report.outputs == ("logits",)

    proto = onnx.load(str(report.path))
    ops = {n.op_type for n in proto.graph.node}
    assert "Attention" in ops  # kiln::attention -> the opset-23 operator
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 23
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["kiln.version"] == kiln.__version__
    assert "fuse-attention" in json.loads(meta["kiln.passes"])
    assert json.loads(meta["kiln.compile_config"])["backend"] == "eager"

    session = _session(report.path)
    for batch in (1, 2):
        for tokens in LENGTHS:  # one artifact, every batch and length
            ids = torch.randint(0, vocab, (batch, tokens))
            (got,) = session.run(None, {"input_ids": ids.numpy()})
            want = _eager_logits(model, ids)
            rel = np.abs(got - want.numpy()).max() / want.abs().max().item()
            assert rel <= 1e-4, (name, batch, tokens, rel)


def test_padding_mask_input(tmp_path: Path) -> None:
    model = HF_MODELS["llama"](layers=1)
    example = {"input_ids": torch.randint(0, 128, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    compiled = kiln.compile(model, example)
    assert compiled.stats["fuse-attention"]["masks_kept"] == 1  # the padding part survives as a mask operand
    # transformers indexes the mask by a batch arange that constant folding baked for batch 1: the
    # batch check catches it and the artifact keeps batch 1, saying so
    with pytest.warns(UserWarning, match="keeps batch 1 static"):
        report = export_onnx(compiled, tmp_path / "masked.onnx", lengths=(6,))
    assert report.inputs == ("input_ids", "attention_mask") and report.checks == ("batch 1 x 6 tokens",)
    assert report.dynamic_axes["attention_mask"] == {1: "sequence_length"}
    session = _session(report.path)
    for pad in (0, 3):
        ids, mask = torch.randint(0, 128, (1, 7)), torch.ones(1, 7, dtype=torch.long)
        mask[0, :pad] = 0  # left padding
        (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        keep = mask.bool()  # padded queries attend to nothing: compare the real tokens
        np.testing.assert_allclose(got[keep.numpy()], want[keep].numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(kiln.ExportError, match="cannot take attention_mask"):
        export_onnx(compiled, tmp_path / "kv.onnx", kv_cache=True)


# --------------------------------------------------------------------------------------
# kiln::attention translations, directly
# --------------------------------------------------------------------------------------


class _AttentionCases(nn.Module):
    """Every flavour of kiln::attention in one graph: GQA, causal with Tq == Tk and Tq < Tk, masks."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tq, tk = qs.shape[2], k.shape[2]
        bool_mask = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq - 1)  # hides the last key too
        float_mask = torch.linspace(-1.0, 0.0, tk).expand(tq, tk)
        return (
            torch.ops.kiln.attention(q, k, v, None, True, None),  # causal, Tq == Tk, GQA 4/2
            torch.ops.kiln.attention(qs, k, v, None, True, 0.3),  # causal, Tq < Tk: end-aligned
            torch.ops.kiln.attention(qs, k, v, bool_mask, False, None),  # bool mask
            torch.ops.kiln.attention(qs, k, v, float_mask, True, None),  # additive mask + causal
        )


@pytest.mark.parametrize("opset", [23, 18])  # 23: the Attention operator; 18: the decomposition
def test_attention_translation_matches_reference(opset: int, tmp_path: Path) -> None:
    q, qs = torch.randn(2, 4, 7, 8), torch.randn(2, 4, 3, 8)
    k, v = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    program = torch.onnx.export(
        _AttentionCases().eval(), (q, k, v, qs), dynamo=True, opset_version=opset,
        custom_translation_table=translation_table(opset), verbose=False,
    )
    program.save(tmp_path / "attention.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "attention.onnx")).graph.node}
    assert ("Attention" in ops) == (opset >= 23)
    got = _session(tmp_path / "attention.onnx").run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "qs": qs.numpy()})
    want = _AttentionCases()(q, k, v, qs)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"case {i}")
    # end alignment is what distinguishes kiln's causal mask: the start-aligned one differs
    start_aligned = attention_reference(qs, k, v, torch.ones(3, 7, dtype=torch.bool).tril(), False)
    assert not np.allclose(got[1], start_aligned.numpy(), atol=1e-3)


# --------------------------------------------------------------------------------------
# Options: external data, CLI
# --------------------------------------------------------------------------------------


def _one_layer_llama() -> nn.Module:
    import dataclasses

    return from_config(dataclasses.replace(get_preset("llama-tiny"), num_hidden_layers=1))


@pytest.fixture(scope="module")
def small_compiled() -> kiln.CompiledModel:
    return kiln.compile(_one_layer_llama(), (torch.randint(0, 512, (1, 8)),))


def test_external_data_threshold() -> None:
    assert export_mod.EXTERNAL_DATA_THRESHOLD < 2**31  # protobuf's limit, with room for the graph
    assert export_mod.use_external_data(2**31, "auto") and not export_mod.use_external_data(2**20, "auto")
    assert export_mod.use_external_data(10, True) and not export_mod.use_external_data(2**32, False)


def test_cli_export_onnx_with_external_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpt2.onnx"
    assert cli_main(["export-onnx", "gpt2-tiny", "-o", str(out), "--external-data", "yes"]) == 0
    text = capsys.readouterr().out
    assert "max rel error" in text and "(external data)" in text and "ORT fused ops per layer" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.onnx", "gpt2.onnx.data"]  # no temp leftovers
    assert out.stat().st_size < 100_000 < (tmp_path / "gpt2.onnx.data").stat().st_size
    model = from_preset("gpt2-tiny")
    ids = torch.randint(0, 512, (2, 6))
    (got,) = _session(out).run(None, {"input_ids": ids.numpy()})
    np.testing.assert_allclose(got, _eager_logits(model, ids).numpy(), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@torch.library.custom_op("kiln_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@mystery.register_fake
def _mystery_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _Mystery(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(mystery(self.emb(input_ids)))  # MYSTERY-LINE


def test_untranslatable_op_names_the_op_and_source_line(tmp_path: Path) -> None:
    compiled = kiln.compile(_Mystery().eval(), (torch.randint(0, 16, (1, 4)),))
    dest = tmp_path / "m.onnx"
    with pytest.raises(kiln.ExportError) as err:
        export_onnx(compiled, dest)
    line = next(i for i, text in enumerate(Path(__file__).read_text().splitlines(), 1) if "MYSTERY-LINE" in text)
    assert "kiln_test.mystery" in str(err.value) and f"test_export.py:{line}" in str(err.value)
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_failed_validation_leaves_the_destination_untouched(
    small_compiled: kiln.CompiledModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def wrong(opset: int):  # a broken translation: attention returns its query
        return lambda q, k, v, mask=None, causal=False, scale=None: q

    monkeypatch.setitem(TRANSLATIONS, torch.ops.kiln.attention.default, wrong)
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"the previous artifact")
    with pytest.raises(kiln.ExportError, match="disagrees with eager"):
        export_onnx(small_compiled, dest, lengths=(4,))
    assert dest.read_bytes() == b"the previous artifact"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # the temp folder is gone


def test_generation_artifact_requires_fused_attention(tmp_path: Path) -> None:
    compiled = kiln.compile(
        _one_layer_llama(), (torch.randint(0, 512, (1, 8)),), config=kiln.CompileConfig(disable=("fuse-attention",))
    )
    with pytest.raises(kiln.ExportError, match="unfused attention.*fuse-attention"):
        export_onnx(compiled, tmp_path / "kv.onnx", kv_cache=True)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(small_compiled: kiln.CompiledModel, tmp_path: Path) -> None:
    with pytest.raises(kiln.ExportError, match="external_data"):
        export_onnx(small_compiled, tmp_path / "m.onnx", external_data="sometimes")
    with pytest.raises(kiln.ExportError, match="does not exist"):
        export_onnx(small_compiled, tmp_path / "missing" / "m.onnx")
