"""Tests of ``passes/fuse_add_rms_norm.py``: each residual add that a lowered RMSNorm reads joins it in one
``kiln.add_rms_norm``, with outputs equal to the unfused graph's (fp32 and bf16), and what must stay."""

from __future__ import annotations

import pytest
import torch
from kiln_testing import canonical_graph, count_op
from torch import nn

import kiln
from kiln.ir import print_ir, verify
from kiln.models import from_preset
from kiln.passes.fuse_add_rms_norm import FuseAddRMSNorm
from kiln.passes.lower_rms_norm import LowerRMSNorm
from kiln.pipeline import pass_names

X = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_adds_join_the_norms_that_read_them(dtype: torch.dtype) -> None:
    model = from_preset("llama-tiny", seed=0, dtype=dtype).eval()
    layers = model.config.num_hidden_layers
    gm = canonical_graph(model, torch.randint(0, 512, (1, 8)))
    want = {n: gm(input_ids=X[:, :n]) for n in (1, 9)}
    LowerRMSNorm(devices=("cpu",))(gm)
    adds_before = count_op(print_ir(gm), "aten.add.Tensor")
    result = FuseAddRMSNorm()(gm)
    verify(result.gm)
    ir = print_ir(result.gm)
    # every norm but the first layer's input norm (it reads the embedding) reads a residual add
    assert result.stats == {"adds_fused": 2 * layers}
    assert count_op(ir, "kiln.add_rms_norm") == 2 * layers and count_op(ir, "kiln.rms_norm") == 1
    assert count_op(ir, "aten.add.Tensor") == adds_before - 2 * layers
    assert "[fuse-add-rms-norm]" in ir
    for n, ref in want.items():  # the references compute the same add and norm: equal exactly
        assert torch.equal(result.gm(input_ids=X[:, :n]), ref)


def test_what_stays_unfused() -> None:
    class Adds(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8))

        def norm(self, h: torch.Tensor) -> torch.Tensor:
            return self.w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))

        def forward(self, a: torch.Tensor, b: torch.Tensor, row: torch.Tensor) -> tuple[torch.Tensor, ...]:
            broadcast = self.norm(a + row)  # a (1, 8) row broadcast over a's rows: not one row per row
            scaled = self.norm(torch.add(b, a, alpha=2.0))  # alpha
            plain = a * 3
            fused = self.norm(plain + b)  # fusable; the sum is used again below
            return broadcast, scaled, fused, plain + b + 1

    a, b, row = torch.randn(4, 8), torch.randn(4, 8), torch.randn(1, 8)
    module = Adds()
    gm = canonical_graph(module, a, b, row)
    LowerRMSNorm(devices=("cpu",))(gm)
    result = FuseAddRMSNorm()(gm)
    assert result.stats == {"adds_fused": 1}
    got, want = result.gm(a=a, b=b, row=row), module(a, b, row)
    assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))


def test_runs_after_the_norms_are_lowered_and_leaves_them_to_inductor() -> None:
    from kiln.runtime.engine import INDUCTOR_FUSES

    names = pass_names(kiln.CompileConfig(kv_cache=True))
    assert names.index("lower-rms-norm") < names.index("fuse-add-rms-norm")
    assert "fuse-add-rms-norm" not in pass_names(kiln.CompileConfig())
    assert {
        "lower-rms-norm", "fuse-add-rms-norm", "lower-rotary", "fuse-rotary-pairs", "fuse-rotary-table", "fuse-silu-mul"
    } == set(INDUCTOR_FUSES)  # fmt: skip


def test_engine_generates_the_same_tokens_with_every_cuda_fusion() -> None:
    # the kernels the CUDA step graph gets (norms, fused adds, rotary embeddings in pairs and their table, SwiGLU), run here by
    # their references: generation is unchanged
    from kiln.passes.fuse_rotary_pairs import FuseRotaryPairs
    from kiln.passes.fuse_rotary_table import FuseRotaryTable
    from kiln.passes.fuse_silu_mul import FuseSiluMul
    from kiln.passes.lower_rotary import LowerRotary

    model = from_preset("llama-tiny", seed=0).eval()
    layers = model.config.num_hidden_layers
    params = kiln.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 9, 2, 7], [11, 3, 8, 1, 4, 6]]
    plain = kiln.LLM(model, num_blocks=32, enable_prefix_caching=False)
    cpu = ("cpu",)
    fused = kiln.LLM(model, num_blocks=32, enable_prefix_caching=False, compile_config=kiln.CompileConfig(
        kv_cache=True, extra_passes=[LowerRMSNorm(devices=cpu), FuseAddRMSNorm(), LowerRotary(devices=cpu),
                                     FuseRotaryPairs(), FuseRotaryTable(devices=cpu), FuseSiluMul(devices=cpu)]))  # fmt: skip
    ir = print_ir(fused.runner.compiled.graph_module)
    assert count_op(ir, "kiln.add_rms_norm") == 2 * layers and count_op(ir, "kiln.rms_norm") == 1
    assert count_op(ir, "kiln.rotary_pair") == layers and count_op(ir, "kiln.silu_mul") == layers
    assert count_op(ir, "kiln.rotary_table") == 1
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in fused.generate(prompts, params, use_tqdm=False)] == want
