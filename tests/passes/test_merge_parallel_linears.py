"""Tests of ``passes/merge_parallel_linears.py``: merged Q/K/V and gate/up in the IR, outputs equal
to the unmerged graph's, and linears that must not merge."""

from __future__ import annotations

import pytest
import torch
from kiln_testing import canonical_graph, count_op, has_attr
from torch import nn

import kiln
from kiln.ir import print_ir, verify
from kiln.models import from_preset
from kiln.passes.merge_parallel_linears import MergeParallelLinears
from kiln.pipeline import pass_names

X = torch.randint(0, 512, (1, 13), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def llama():
    return from_preset("llama-tiny", seed=0).eval()


def test_llama_qkv_and_gate_up_become_one_linear_each(llama) -> None:
    gm = canonical_graph(llama, torch.randint(0, 512, (1, 8)))
    assert count_op(print_ir(gm), "aten.linear") == 15  # 7 per layer x 2 + lm_head
    want = {n: gm(input_ids=X[:, :n]) for n in (1, 5, 13)}  # decode, short, longer than the capture
    attn = llama.model.layers[0].self_attn
    saved = {p: p.weight.detach().clone() for p in (attn.q_proj, attn.k_proj, attn.v_proj)}
    result = MergeParallelLinears()(gm)
    verify(result.gm)
    ir = print_ir(result.gm)
    # IR: per layer one QKV linear (64 + 32 + 32 rows) and one gate/up linear (2 x 176), each split back
    assert result.stats == {"groups_merged": 4, "linears_merged": 10, "weights_deleted": 10,
                            "bytes_merged": 2 * (128 + 352) * 64 * 4}  # fmt: skip
    assert count_op(ir, "aten.linear") == 2 * 4 + 1  # qkv, o, gate_up, down per layer + lm_head
    assert count_op(ir, "aten.split_with_sizes") == 4
    assert 'weight "model_layers_0_self_attn_merged_q_proj_k_proj_v_proj_weight" : f32[128, 64]' in ir
    assert 'weight "model_layers_1_mlp_merged_gate_proj_up_proj_weight" : f32[352, 64]' in ir
    assert "split_with_sizes(%linear_default, [64, 32, 32], -1)" in ir
    assert "[176, 176], -1)" in ir and "[merge-parallel-linears]" in ir
    assert "q_proj_weight\" : " not in ir and "gate_proj_weight\" : " not in ir  # originals gone from the IR
    assert "o_proj_weight" in ir and "down_proj_weight" in ir and "lm_head_weight" in ir  # single linears stay
    # memory: the originals are gone from the module, the merged copies replace them
    assert not has_attr(result.gm, "model.layers.0.self_attn.q_proj.weight")
    assert has_attr(result.gm, "model.layers.0.self_attn.o_proj.weight")
    # ... and the model's own q/k/v and gate/up weights are now views of the merged tensors: one copy in memory
    merged = result.gm.get_buffer("model_layers_0_self_attn_merged_q_proj_k_proj_v_proj_weight")
    attn = llama.model.layers[0].self_attn
    for proj, rows in ((attn.q_proj, slice(0, 64)), (attn.k_proj, slice(64, 96)), (attn.v_proj, slice(96, 128))):
        assert proj.weight.untyped_storage().data_ptr() == merged.untyped_storage().data_ptr()
        torch.testing.assert_close(proj.weight, saved[proj], rtol=0, atol=0)
        assert torch.equal(merged[rows], saved[proj])
    # numerics: the unmerged graph's outputs at every length
    for n, ref in want.items():
        torch.testing.assert_close(result.gm(input_ids=X[:, :n]), ref, rtol=1e-5, atol=1e-5)
    # a second run finds nothing left to merge
    again = MergeParallelLinears()(result.gm)
    assert not again.modified and print_ir(again.gm) == ir


class Branches(nn.Module):
    """Linears over one input with biases; linears that must not merge with them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 8), nn.Linear(16, 24), nn.Linear(16, 4)
        self.no_bias = nn.Linear(16, 8, bias=False)  # same input, no bias: another group (alone)
        self.other = nn.Linear(16, 8)  # reads another input
        self.wide = nn.Linear(32, 8)  # reads a concatenation of x (another input, other K)
        self.shared = nn.Parameter(torch.randn(8, 16))  # read by a linear of x and one of y

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s1 = nn.functional.linear(x, self.shared)  # no bias: joins no_bias's group
        s2 = nn.functional.linear(y, self.shared)
        outs = [self.a(x), self.b(x).sum(-1, keepdim=True), self.c(x), self.no_bias(x), self.other(y), s1, s2,
                self.wide(torch.cat([x, x], -1)), nn.functional.linear(x, self.a.weight * 2)]  # fmt: skip
        return torch.cat(outs, -1)


def test_biases_merge_and_mismatched_linears_do_not() -> None:
    torch.manual_seed(0)
    model = Branches()
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    gm = canonical_graph(model, x, y)
    ref = gm(x=x, y=y)
    result = MergeParallelLinears()(gm)
    verify(result.gm)
    ir = print_ir(result.gm)
    # a, b, c (with biases) merge; no_bias + shared (without) merge; other, wide, the computed weight do not
    assert result.stats["groups_merged"] == 2 and result.stats["linears_merged"] == 5
    assert "split_with_sizes(%linear_default_1, [8, 24, 4], -1)" in ir
    assert 'weight "merged_a_b_c_bias" : f32[36]' in ir and 'weight "merged_shared_no_bias_weight" : f32[16, 16]' in ir
    assert count_op(ir, "aten.linear") == 2 + 4  # the merged two + other, s2, wide, x @ (2 a.weight)
    # the shared weight is still read by the linear of y: it stays, in the graph and the module
    assert result.stats["weights_deleted"] == 6  # b, c, no_bias weights; a, b, c biases
    assert has_attr(result.gm, "shared") and "= aten.linear(%y, %shared" in ir
    assert not has_attr(result.gm, "a.bias") and has_attr(result.gm, "a.weight")  # a.weight also feeds the mul
    torch.testing.assert_close(result.gm(x=x, y=y), ref, rtol=1e-5, atol=1e-5)


class Unmergeable(nn.Module):
    """Linears of one input that must stay apart: another dtype, a computed weight, one alone."""

    def __init__(self) -> None:
        super().__init__()
        self.f32 = nn.Linear(16, 8)
        self.f64 = nn.Linear(16, 8).double()
        self.w = nn.Parameter(torch.randn(8, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        computed = nn.functional.linear(x, self.w.t().t() + 1)  # not a constant weight
        return self.f32(x) + self.f64(x.double()).float() + computed


def test_nothing_merges_across_dtypes_or_with_computed_weights() -> None:
    x = torch.randn(2, 16)
    model = Unmergeable()
    gm = canonical_graph(model, x)
    before = print_ir(gm)
    result = MergeParallelLinears()(gm)
    assert not result.modified and result.stats == {} and print_ir(result.gm) == before
    torch.testing.assert_close(result.gm(x=x), model(x))


def test_the_pipeline_merges_in_step_graphs_only(llama) -> None:
    from kiln.runtime.model_runner import ModelRunner

    plain = kiln.compile(llama, (torch.randint(0, 512, (1, 8)),))
    assert "merge-parallel-linears" not in [r.name for r in plain.report.records]  # it may train: keep the parameters
    runner = ModelRunner(llama, num_blocks=8, block_size=4)  # the runtime's step graph
    assert runner.compiled.stats["merge-parallel-linears"]["linears_merged"] == 10
    steps = pass_names(kiln.CompileConfig(kv_cache=True))
    assert steps.index("merge-parallel-linears") < steps.index("kv-cache")

def test_each_tensor_parallel_rank_merges_its_shards(llama) -> None:
    from kiln.parallel.tp_shards import compile_shards

    cap = kiln.capture(llama, {"input_ids": torch.randint(0, 512, (1, 6))})
    config = kiln.CompileConfig(parallel=kiln.ParallelConfig(tensor_parallel_size=2), kv_cache=True)  # a step graph
    (shard,) = compile_shards(cap, config=config, ranks=[1])
    ir = shard.ir
    # rank 1 holds 2 of 4 query heads (32 rows), 1 of 2 kv heads (16 + 16), 88 of 176 gate and up rows
    assert 'weight "model_layers_0_self_attn_merged_q_proj_k_proj_v_proj_weight" : f32[64, 64]' in ir
    assert 'weight "model_layers_1_mlp_merged_gate_proj_up_proj_weight" : f32[176, 64]' in ir
    assert "[32, 16, 16], -1)" in ir and "[88, 88], -1)" in ir
    assert shard.stats["merge-parallel-linears"]["linears_merged"] == 10
    names = [r.name for r in shard.report.records]
    assert names.index("shard-tensor-parallel") < names.index("merge-parallel-linears")


@pytest.mark.parametrize(
    ("preset", "granularity", "groups"),
    [("w4a16-g128", kiln.PerGroup(16), 4), ("w4a16-g128", kiln.PerAxis(0), 4), ("fp8", None, 4),
     ("w8a16", kiln.PerTensor(), 0)],  # a per-tensor scale differs between linears: nothing merges
)  # fmt: skip
def test_quantized_linears_merge_with_their_scales(preset: str, granularity: object, groups: int) -> None:
    model = from_preset("llama-tiny").eval()
    quant = kiln.QuantConfig.preset(preset)
    if granularity is not None:
        quant = kiln.QuantConfig.preset(preset, weights=kiln.QuantSpec(dtype=quant.weights.dtype, granularity=granularity,
                                                                        symmetric=quant.weights.symmetric))  # fmt: skip
    ids = torch.randint(0, 100, (1, 6))
    plain = kiln.compile(model, {"input_ids": ids}, config=kiln.CompileConfig(quant=quant))
    merged = kiln.compile(model, {"input_ids": ids}, config=kiln.CompileConfig(quant=quant,
                                                                                extra_passes=(MergeParallelLinears(),)))  # fmt: skip
    stats = merged.stats.get("merge-parallel-linears", {})
    assert stats.get("groups_merged", 0) == groups  # Q/K/V and gate/up of 2 layers
    qlinears = [n for n in merged.graph_module.graph.nodes if str(n.target).startswith("kiln.qlinear")]
    assert len(qlinears) == (8 if groups else 14)  # 7 a layer -> merged Q/K/V and gate/up, o, down
    x = torch.randint(0, 500, (1, 9))
    with torch.no_grad():
        want, got = plain(input_ids=x), merged(input_ids=x)
    want, got = (t[0] if isinstance(t, (tuple, list)) else t for t in (want, got))
    assert float((got - want).norm() / want.norm()) <= 1e-5
