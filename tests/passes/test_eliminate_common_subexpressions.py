"""Tests of ``passes/eliminate_common_subexpressions.py``: IR text, numerics, non-matches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph, GraphModule

from kiln.capture import capture
from kiln.ir import infer_meta, print_ir, verify
from kiln.pass_manager import PassManager
from kiln.passes.eliminate_common_subexpressions import EliminateCommonSubexpressions
from kiln.passes.fold_constants import FoldConstants

aten = torch.ops.aten


def lines(ir: str, op: str) -> int:
    """How many nodes of the printed IR compute ``op`` (e.g. ``aten.sin``)."""
    return sum(f"= {op}(" in line for line in ir.splitlines())


def run_cse(gm: GraphModule) -> dict[str, int]:
    result = EliminateCommonSubexpressions()(gm)
    verify(result.gm)
    assert result.gm is gm
    return result.stats


class Duplicates(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.sin(x) + torch.sin(x)
        b = torch.cos(x) * 2 + torch.cos(x) * 2  # a chain: cos merges, then the muls
        c = x.sum(dim=[0], keepdim=True) + x.sum(dim=[0], keepdim=True)  # list args
        d = x.to(torch.float64).sum() + x.to(torch.float64).sum()
        return a + b + c + d


class DistinctValues(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ints = x * 1 + x * 1.0 + x * True  # 1 == 1.0 == True, yet three different ops
        zeros = (x + 0.0) * (x + -0.0)  # 0.0 == -0.0, yet x + -0.0 keeps -0.0
        casts = x.to(torch.float64).sum() + x.to(torch.float16).sum()
        return ints + zeros + casts


class Random(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.rand_like(x) + torch.rand_like(x)
        drop = F.dropout(x, 0.5, training=True) + F.dropout(x, 0.5, training=True)
        return noise + drop + torch.exp(x) + torch.exp(x)


class Weights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + torch.sin(self.w).sum()


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(16, 8)
        self.pos = nn.Embedding(32, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos_a = torch.arange(input_ids.shape[1])  # two helpers computing the same positions
        pos_b = torch.arange(input_ids.shape[1])
        return self.tok(input_ids) + self.pos(pos_a) + self.pos(pos_b)


def test_merges_duplicates_into_first_occurrence() -> None:
    gm = capture(Duplicates(), (torch.randn(4, 8),), dynamic=False).gm
    x = torch.randn(4, 8)
    before_ir, before = print_ir(gm), gm(x=x)
    assert lines(before_ir, "aten.sin") == 2 and lines(before_ir, "aten.cos") == 2
    first_sin = next(n for n in gm.graph.nodes if n.target is aten.sin.default)

    stats = run_cse(gm)

    ir = print_ir(gm)
    assert stats == {"nodes_merged": 6}  # sin, cos, mul, sum.dim_IntList, to, sum
    assert lines(ir, "aten.sin") == 1 and lines(ir, "aten.cos") == 1
    assert lines(ir, "aten.mul.Tensor") == 1 and lines(ir, "aten.sum.dim_IntList") == 1
    assert lines(ir, "aten.to.dtype") == 1 and lines(ir, "aten.sum") == 1
    assert f"aten.add.Tensor(%{first_sin.name}, %{first_sin.name})" in ir
    assert first_sin in gm.graph.nodes  # the first occurrence is the one kept
    torch.testing.assert_close(gm(x=x), before, rtol=1e-6, atol=1e-6)
    assert EliminateCommonSubexpressions()(gm).stats == {"nodes_merged": 0}  # a fixed point


def test_python_values_compare_by_type_and_value() -> None:
    gm = capture(DistinctValues(), (torch.randn(4, 8),), dynamic=False).gm
    x = torch.randn(4, 8)
    x[0, 0] = -0.0
    before_ir, before = print_ir(gm), gm(x=x)

    result = EliminateCommonSubexpressions()(gm)

    assert result.stats == {"nodes_merged": 0} and not result.modified
    ir = print_ir(gm)
    assert ir == before_ir
    assert lines(ir, "aten.mul.Tensor") == 4  # x * 1, x * 1.0, x * True, zeros
    assert "aten.add.Tensor(%x, 0.0)" in ir and "aten.add.Tensor(%x, -0.0)" in ir
    assert lines(ir, "aten.to.dtype") == 2
    verify(gm)
    torch.testing.assert_close(gm(x=x), before, rtol=0, atol=0)


def test_random_ops_are_never_merged() -> None:
    gm = capture(Random(), (torch.randn(4, 8),), dynamic=False).gm

    stats = run_cse(gm)

    ir = print_ir(gm)
    assert stats == {"nodes_merged": 1}  # only exp
    assert lines(ir, "aten.rand_like") == 2
    assert lines(ir, "aten.dropout") == 2
    assert lines(ir, "aten.exp") == 1


def test_duplicate_weight_reads_merge() -> None:
    gm = capture(Weights(), (torch.randn(2, 8),), dynamic=False).gm
    graph = gm.graph
    w = next(n for n in graph.nodes if n.op == "get_attr")
    sin = next(n for n in graph.nodes if n.target is aten.sin.default)
    with graph.inserting_before(sin):
        w_again = graph.get_attr(str(w.target))  # as a pass that re-reads a weight leaves it
    w_again.meta["val"] = w.meta["val"]
    sin.replace_input_with(w, w_again)
    gm.recompile()
    verify(gm)
    x = torch.randn(2, 8)
    before = gm(x=x)
    assert print_ir(gm).count('= weight "w"') == 2

    stats = run_cse(gm)

    assert stats == {"nodes_merged": 1}
    assert print_ir(gm).count('= weight "w"') == 1
    torch.testing.assert_close(gm(x=x), before, rtol=1e-6, atol=1e-6)


def test_reads_around_an_in_place_write_are_not_merged() -> None:
    # clone(p); p.add_(1); clone(p): the same (target, args) but different values.
    graph = Graph()
    p = graph.placeholder("p")
    before_write = graph.call_function(aten.clone.default, (p,))
    graph.call_function(aten.add_.Tensor, (p, 1))
    after_write = graph.call_function(aten.clone.default, (p,))
    graph.output(graph.call_function(aten.sub.Tensor, (after_write, before_write)))
    gm = GraphModule(nn.Module(), graph)
    mode = FakeTensorMode()
    p.meta["val"] = mode.from_tensor(torch.zeros(4))
    for n in graph.nodes:
        if n.op == "call_function":
            infer_meta(n, mode)
    verify(gm)

    stats = run_cse(gm)

    assert stats == {"nodes_merged": 0}
    assert lines(print_ir(gm), "aten.clone") == 2
    torch.testing.assert_close(gm(torch.zeros(4)), torch.ones(4), rtol=0, atol=0)


def test_dynamic_token_axis() -> None:
    model = Tokens()
    ids = torch.randint(0, 16, (1, 6))
    gm = capture(model, {"input_ids": ids}).gm
    before_ir, before = print_ir(gm), gm(input_ids=ids)
    assert "[1, T]" in before_ir and lines(before_ir, "aten.arange") == 2

    stats = run_cse(gm)

    ir = print_ir(gm)
    assert stats == {"nodes_merged": 2}  # arange, then the position-embedding lookup
    assert lines(ir, "aten.arange") == 1
    assert lines(ir, "aten.embedding") == 2  # token and position lookups differ
    torch.testing.assert_close(gm(input_ids=ids), before, rtol=1e-6, atol=1e-6)
    for t in (1, 9):
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


def test_hf_llama_outputs_unchanged(llama: nn.Module) -> None:
    ids = torch.randint(0, 128, (1, 8))
    gm = capture(llama, {"input_ids": ids}).gm
    with torch.no_grad():
        before = gm(input_ids=ids, use_cache=False).logits
    aranges = lines(print_ir(gm), "aten.arange")

    manager = PassManager([EliminateCommonSubexpressions(), FoldConstants()], verify_each=True)
    gm, report = manager.run(gm)

    assert report.records[0].stats["nodes_merged"] > 0
    assert lines(print_ir(gm), "aten.arange") < aranges
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids, use_cache=False).logits, before, rtol=1e-6, atol=1e-6)
        longer = torch.randint(0, 128, (1, 13))  # the token axis is still dynamic
        torch.testing.assert_close(
            gm(input_ids=longer, use_cache=False).logits,
            llama(input_ids=longer, use_cache=False).logits,
            rtol=1e-5,
            atol=1e-5,
        )
