"""Tests of ``passes/fuse_rotary_pairs.py``: a layer's query and key rotations on one table become one
``kiln.rotary_pair`` with outputs equal to the unfused graph's, and what stays unpaired."""

from __future__ import annotations

import torch
from kiln_testing import canonical_graph, count_op
from torch import nn

import kiln
from kiln.ir import print_ir, verify
from kiln.models import from_preset
from kiln.passes.fuse_rotary_pairs import FuseRotaryPairs
from kiln.passes.lower_rotary import LowerRotary
from kiln.pipeline import pass_names

X = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(3))


def test_each_layer_gets_one_pair_with_equal_outputs() -> None:
    model = from_preset("llama-tiny", seed=0, dtype=torch.bfloat16).eval()
    layers = model.config.num_hidden_layers
    gm = canonical_graph(model, torch.randint(0, 512, (1, 8)))
    want = {n: gm(input_ids=X[:, :n]) for n in (1, 9)}
    LowerRotary(devices=("cpu",))(gm)
    result = FuseRotaryPairs()(gm)
    verify(result.gm)
    ir = print_ir(result.gm)
    assert result.stats == {"pairs_fused": layers}
    assert count_op(ir, "kiln.rotary_pair") == layers and count_op(ir, "kiln.rotary(") == 0
    assert "[fuse-rotary-pairs]" in ir
    for n, ref in want.items():
        assert torch.equal(result.gm(input_ids=X[:, :n]), ref)


def test_what_stays_unpaired() -> None:
    rotary = torch.ops.kiln.rotary

    class Rotations(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
            twice = rotary(rotary(a, cos, sin), cos, sin)  # the second depends on the first: never a pair
            other = rotary(b, sin, cos)  # another table: alone
            wide = rotary(torch.cat((a, a), -1), torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))
            return twice, other, wide

    a, b = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos, sin = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    gm = canonical_graph(Rotations(), a, b, cos, sin)
    before = print_ir(gm)
    result = FuseRotaryPairs()(gm)
    assert not result.modified and print_ir(result.gm) == before


def test_pairs_the_keys_of_a_layer_after_its_queries_even_when_other_work_sits_between() -> None:
    rotary = torch.ops.kiln.rotary

    class Layer(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            rq = rotary(q, cos, sin)
            k2 = k * 2  # the keys' own work between the two rotations
            rk = rotary(k2, cos, sin)
            return (rq @ rk.transpose(-1, -2)).sum(-1)

    args = dict(q=torch.randn(1, 4, 3, 8), k=torch.randn(1, 4, 3, 8), cos=torch.randn(1, 1, 3, 8),
                sin=torch.randn(1, 1, 3, 8))  # fmt: skip
    gm = canonical_graph(Layer(), *args.values())
    result = FuseRotaryPairs()(gm)
    assert result.stats == {"pairs_fused": 1}
    verify(result.gm)
    assert torch.equal(result.gm(**args), Layer()(**args))


def test_runs_after_lower_rotary_in_the_runtime_graph_only() -> None:
    names = pass_names(kiln.CompileConfig(kv_cache=True))
    assert names.index("lower-rotary") < names.index("fuse-rotary-pairs")
    assert "fuse-rotary-pairs" not in pass_names(kiln.CompileConfig())
