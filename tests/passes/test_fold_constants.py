"""Tests of ``passes/fold_constants.py``: IR text, numerics, and what the policy keeps."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.fx import GraphModule

from kiln.capture import capture
from kiln.ir import print_ir, verify
from kiln.passes.eliminate_common_subexpressions import EliminateCommonSubexpressions
from kiln.passes.fold_constants import FoldConstants


def lines(ir: str, op: str) -> int:
    """How many nodes of the printed IR compute ``op`` (e.g. ``aten.cos``)."""
    return sum(f"= {op}(" in line for line in ir.splitlines())


def run_fold(gm: GraphModule, **options: float) -> dict[str, int]:
    result = FoldConstants(**options)(gm)
    verify(result.gm)
    assert result.gm is gm
    return result.stats


class Foldable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.register_buffer("buf", torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.t() + torch.cos(self.buf) * 2 + torch.ones(8) * 3


class InputDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buf", torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * self.buf + torch.rand(8)  # rand: constant-free but random


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64))
        self.register_buffer("big", torch.randn(64))
        self.register_buffer("scale16", torch.randn(64).half())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = x[:, :32] @ self.w.t().reshape(64, 64)[:32]  # layout ops of one weight: kept
        same = self.big.to(torch.float32)  # a no-op conversion of one weight: kept
        grown = torch.cos(self.big).repeat(64, 1)  # 64x the bytes it reads: kept, cos folded
        cast = self.scale16.to(torch.float32)  # 2x the bytes it reads: folded
        return views + same + grown + cast


class Positions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(16, 8)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8).float() / 8))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1])[:, None].float()  # (T, 1): depends on T
        angles = pos * self.inv_freq  # (T, 8)
        scale = torch.sin(self.inv_freq).sum() + 1  # constant
        return self.tok(input_ids) * torch.cos(angles) * scale


def test_folds_constant_subgraph_into_a_buffer() -> None:
    model = Foldable()
    buf = model.buf.clone()
    gm = capture(model, (torch.randn(2, 8),), dynamic=False).gm
    x = torch.randn(2, 8)
    before = gm(x=x)
    assert lines(print_ir(gm), "aten.cos") == 1

    stats = run_fold(gm)

    ir = print_ir(gm)
    assert stats == {"nodes_folded": 4, "constants_created": 2}  # cos, mul; ones, mul
    assert lines(ir, "aten.cos") == 0 and lines(ir, "aten.ones") == 0
    assert 'weight "_folded_mul" : f32[8]' in ir
    assert "aten.t(%w)" in ir  # the transposed weight is left for later passes
    assert "test_fold_constants.py:" in ir.split('weight "_folded_mul"')[1].splitlines()[0]  # provenance
    torch.testing.assert_close(gm._folded_mul, torch.cos(buf) * 2, rtol=0, atol=0)
    assert not hasattr(gm, "buf")  # no node reads it any more
    assert torch.equal(model.buf, buf)  # the caller's model keeps its buffer, unchanged
    assert not gm._folded_mul.requires_grad
    torch.testing.assert_close(gm(x=x), before, rtol=1e-6, atol=1e-6)


def test_input_dependent_and_random_nodes_are_not_folded() -> None:
    gm = capture(InputDependent(), (torch.randn(8),), dynamic=False).gm
    before_ir = print_ir(gm)

    result = FoldConstants()(gm)

    assert result.stats == {"nodes_folded": 0, "constants_created": 0} and not result.modified
    ir = print_ir(gm)
    assert ir == before_ir
    assert lines(ir, "aten.sin") == 1 and lines(ir, "aten.rand") == 1 and "_folded" not in ir
    verify(gm)


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before = self.count * 2  # reads the buffer before this call's update
        self.count.add_(1)
        return x + before + self.count


def test_buffer_updated_in_place_is_not_a_constant() -> None:
    gm = capture(Counter(), (torch.randn(4),), dynamic=False).gm
    before_ir = print_ir(gm)
    assert lines(before_ir, "aten.add_.Tensor") == 1

    stats = run_fold(gm)

    assert stats == {"nodes_folded": 0, "constants_created": 0}
    assert print_ir(gm) == before_ir
    eager, x = Counter(), torch.randn(4)
    for _ in range(3):  # the graph and the model update their own counters alike
        torch.testing.assert_close(gm(x=x), eager(x), rtol=0, atol=0)


def test_policy_keeps_weight_layout_and_growth() -> None:
    model = Policy()
    gm = capture(model, (torch.randn(64, 64),), dynamic=False).gm
    x = torch.randn(64, 64)
    before = gm(x=x)

    stats = run_fold(gm)

    ir = print_ir(gm)
    assert stats == {"nodes_folded": 2, "constants_created": 2}  # cos, the f16 -> f32 cast
    assert "aten.t(%w)" in ir and lines(ir, "aten.reshape") + lines(ir, "aten.view") == 1
    assert lines(ir, "aten.slice.Tensor") == 2  # x[:, :32] and the weight's [:32]
    assert "aten.to.dtype(%big, f32)" in ir
    assert "aten.repeat(%_folded_cos, [64, 1])" in ir
    assert 'weight "_folded_to_1" : f32[64]' in ir and hasattr(model, "scale16")
    assert not hasattr(gm, "scale16")
    torch.testing.assert_close(gm(x=x), before, rtol=1e-6, atol=1e-6)
    # A larger growth limit folds the repeat too.
    assert run_fold(gm, max_growth=64.0) == {"nodes_folded": 1, "constants_created": 1}
    assert lines(print_ir(gm), "aten.repeat") == 0
    torch.testing.assert_close(gm(x=x), before, rtol=1e-6, atol=1e-6)


def test_dynamic_token_axis_folds_only_what_does_not_depend_on_tokens() -> None:
    model = Positions()
    ids = torch.randint(0, 16, (1, 6))
    gm = capture(model, {"input_ids": ids}).gm
    before = gm(input_ids=ids)

    stats = run_fold(gm)

    ir = print_ir(gm)
    assert "f32[T, 8]" in ir
    assert stats == {"nodes_folded": 3, "constants_created": 1}  # sin, sum, add
    assert lines(ir, "aten.sin") == 0 and lines(ir, "aten.sum") == 0
    assert lines(ir, "aten.cos") == 1 and lines(ir, "aten.arange") == 1
    assert "aten.mul.Tensor(%to, %inv_freq) : f32[T, 8]" in ir  # still computed per call
    assert 'weight "_folded_add" : f32[]' in ir
    torch.testing.assert_close(gm(input_ids=ids), before, rtol=1e-6, atol=1e-6)
    for t in (1, 11):
        ids = torch.randint(0, 16, (1, t))
        torch.testing.assert_close(gm(input_ids=ids), model(ids), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("dynamic", ["tokens", False])
def test_hf_llama_outputs_unchanged(llama: nn.Module, dynamic: str | bool) -> None:
    inv_freq = llama.model.rotary_emb.inv_freq.clone()
    ids = torch.randint(0, 128, (1, 8))
    gm = capture(llama, {"input_ids": ids}, dynamic=dynamic).gm
    with torch.no_grad():
        before = gm(input_ids=ids, use_cache=False).logits
    EliminateCommonSubexpressions()(gm)
    verify(gm)
    checks = lines(print_ir(gm), "aten._assert_tensor_metadata")

    stats = run_fold(gm)

    ir = print_ir(gm)
    assert stats["constants_created"] >= 1
    assert re.search(r"aten\.linear\(%\w+, %lm_head_weight\)", ir)  # weights are read as they were
    if dynamic is False:  # the causal mask and the rotary tables are constants for 8 tokens
        assert lines(ir, "aten.cos") == 0 and lines(ir, "aten.sin") == 0
        assert lines(ir, "aten.arange") == 0
        assert lines(ir, "aten._assert_tensor_metadata") < checks  # settled at compile time
    else:  # they depend on the token count
        assert lines(ir, "aten.cos") == 1 and lines(ir, "aten.sin") == 1
        assert lines(ir, "aten._assert_tensor_metadata") == checks
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids, use_cache=False).logits, before, rtol=1e-6, atol=1e-6)
    assert torch.equal(llama.model.rotary_emb.inv_freq, inv_freq)
