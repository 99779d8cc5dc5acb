"""to_mlir: golden substrings of the compiled graph in each torch-mlir dialect; kiln ops lowered first."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

import kiln
from kiln.backends.mlir import DIALECTS, to_mlir
from kiln.models import from_config
from kiln.models.presets import get_preset

#: dialect -> substrings the MLIR text must hold (dynamic token axis except for TOSA, which is static).
GOLDEN = {
    "torch": ["func.func @main(%arg0: !torch.vtensor<[1,?],si64>) -> !torch.vtensor<[1,?,512],f32>",
              "torch.aten.mm", "torch.aten.exp", "torch.aten.rsqrt", "torch.aten.cos"],
    "linalg": ["func.func @main(%arg0: tensor<1x?xi64>) -> tensor<1x?x512xf32>",
               "linalg.matmul", "linalg.batch_matmul", "linalg.generic", "math.exp"],
    "stablehlo": ["func.func @main(%arg0: tensor<1x?xi64>) -> tensor<1x?x512xf32>",
                  "stablehlo.dot_general", "stablehlo.exponential", "stablehlo.rsqrt"],
    "tosa": ["func.func @main(%arg0: tensor<1x8xi64>) -> tensor<1x8x512xf32>", "tosa.matmul", "tosa.exp"],
}
#: what must not survive lowering to each dialect
ABSENT = {"torch": ["kiln"], "linalg": ["kiln", "torch.aten"], "stablehlo": ["kiln", "torch.aten"],
          "tosa": ["kiln", "torch.aten"]}


@pytest.fixture(scope="module")
def compiled() -> kiln.CompiledModel:
    config = dataclasses.replace(get_preset("llama-tiny"), num_hidden_layers=1)
    compiled = kiln.compile(from_config(config), (torch.randint(0, 512, (1, 8)),))
    assert compiled.node_counts()["kiln.attention"] == 1  # MLIR must see its reference instead
    return compiled


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_golden_substrings(compiled: kiln.CompiledModel, dialect: str) -> None:
    pytest.importorskip("torch_mlir")
    text = to_mlir(compiled, dialect)
    for want in GOLDEN[dialect]:
        assert want in text, (dialect, want)
    for unwanted in ABSENT[dialect]:
        assert unwanted not in text, (dialect, unwanted)
    assert len(text) < 200_000  # weights are elided, not dumped


def test_unknown_dialect_and_missing_torch_mlir(compiled: kiln.CompiledModel, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(kiln.ExportError, match="unknown MLIR dialect 'llvm'"):
        to_mlir(compiled, "llvm")
    monkeypatch.setitem(sys.modules, "torch_mlir", None)  # as if it were not installed
    with pytest.raises(kiln.ExportError, match=r"pip install 'kiln\[mlir\]'"):
        to_mlir(compiled, "torch")


def test_cli_ir_mlir(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch_mlir")
    from kiln.cli import main

    assert main(["ir", "gpt2-tiny", "--mlir", "torch"]) == 0
    out = capsys.readouterr().out
    assert "func.func @main(%arg0: !torch.vtensor<[1,?],si64>)" in out and "kiln" not in out
