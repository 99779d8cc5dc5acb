"""Tests of ``passes/lower_decode_linears.py``: 16-bit linears become ``kiln.gemv`` in the IR, outputs
equal the linears', and linears that must not be lowered (fp32, another device, a computed weight)."""

from __future__ import annotations

import torch
from kiln_testing import canonical_graph, count_op
from torch import nn

import kiln
from kiln.ir import print_ir, verify
from kiln.models import from_preset
from kiln.passes.lower_decode_linears import LowerDecodeLinears
from kiln.pipeline import pass_names

X = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(7))


def test_bf16_linears_become_gemv_with_equal_outputs() -> None:
    model = from_preset("llama-tiny", seed=0, dtype=torch.bfloat16).eval()
    gm = canonical_graph(model, torch.randint(0, 512, (1, 8)))
    want = {n: gm(input_ids=X[:, :n]) for n in (1, 9)}
    result = LowerDecodeLinears(devices=("cpu",))(gm)  # the CPU runs kiln::gemv's reference
    verify(result.gm)
    ir = print_ir(result.gm)
    assert count_op(ir, "kiln.gemv") == 15 and count_op(ir, "aten.linear") == 0
    assert "= kiln.gemv(%mul_2, %model_layers_0_self_attn_q_proj_weight, None) : bf16[1, T, 64]" in ir
    assert "[lower-decode-linears]" in ir
    assert result.stats == {"linears_lowered": 15, "weight_bytes": 2 * sum(
        p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight") or n == "lm_head.weight")}
    for n, ref in want.items():  # fp32 sums rounded once to bf16, as the linear's
        torch.testing.assert_close(result.gm(input_ids=X[:, :n]), ref, rtol=1.6e-2, atol=1e-2)


def test_fp32_cpu_and_computed_weights_stay_linears() -> None:
    fp32 = canonical_graph(from_preset("llama-tiny", seed=0).eval(), torch.randint(0, 512, (1, 8)))
    before = print_ir(fp32)
    assert not LowerDecodeLinears(devices=("cpu",))(fp32).modified and print_ir(fp32) == before  # fp32
    bf16 = canonical_graph(from_preset("llama-tiny", seed=0, dtype=torch.bfloat16).eval(), torch.randint(0, 512, (1, 8)))
    before = print_ir(bf16)
    assert not LowerDecodeLinears()(bf16).modified and print_ir(bf16) == before  # CPU weights: no CUDA kernel

    class Computed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 16, dtype=torch.bfloat16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.w * 2)

    gm = canonical_graph(Computed(), torch.randn(2, 16, dtype=torch.bfloat16))
    assert not LowerDecodeLinears(devices=("cpu",))(gm).modified


def test_runs_in_the_runtime_graph_only_after_the_kv_cache() -> None:
    names = pass_names(kiln.CompileConfig(kv_cache=True))
    assert names.index("kv-cache") < names.index("lower-decode-linears")
    assert "lower-decode-linears" not in pass_names(kiln.CompileConfig())
