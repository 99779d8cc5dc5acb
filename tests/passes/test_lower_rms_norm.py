"""Tests of ``passes/lower_rms_norm.py``: op-by-op RMSNorms become ``kiln.rms_norm`` in the IR with outputs
equal to the original graph's, on kiln's Llama and on a transformers Llama (fp32 and bf16), and what must stay."""

from __future__ import annotations

import pytest
import torch
from kiln_testing import canonical_graph, count_op, hf_llama
from torch import nn

import kiln
from kiln.ir import print_ir, verify
from kiln.models import from_preset
from kiln.passes.lower_rms_norm import LowerRMSNorm
from kiln.pipeline import pass_names

X = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kiln_llama_norms_become_one_op_with_equal_outputs(dtype: torch.dtype) -> None:
    model = from_preset("llama-tiny", seed=0, dtype=dtype).eval()
    layers = model.config.num_hidden_layers
    gm = canonical_graph(model, torch.randint(0, 512, (1, 8)))
    want = {n: gm(input_ids=X[:, :n]) for n in (1, 9)}
    before = print_ir(gm)
    result = LowerRMSNorm(devices=("cpu",))(gm)  # the CPU runs kiln::rms_norm's reference
    verify(result.gm)
    ir = print_ir(result.gm)
    assert count_op(ir, "kiln.rms_norm") == 2 * layers + 1
    assert count_op(ir, "aten.rsqrt") == 0 and count_op(ir, "aten.mean") == 0
    assert count_op(before, "aten.rsqrt") == 2 * layers + 1
    assert f"{dtype == torch.bfloat16}) : {'bf16' if dtype == torch.bfloat16 else 'f32'}[1, T, 64]" in ir
    assert "[lower-rms-norm]" in ir
    removed = 6 if dtype == torch.bfloat16 else 4  # casts in and out, pow, mean, add, rsqrt (+ the inner mul)
    assert result.stats == {"norms_lowered": 2 * layers + 1, "nodes_removed": (removed + 1) * (2 * layers + 1)}
    for n, ref in want.items():  # the reference runs the same ops: equal exactly
        assert torch.equal(result.gm(input_ids=X[:, :n]), ref)


def test_transformers_llama_norms_are_matched() -> None:
    model = hf_llama().eval()
    gm = canonical_graph(model, torch.randint(0, 128, (1, 8)))
    ids = torch.randint(0, 128, (1, 5))
    want = gm(input_ids=ids, use_cache=False)
    result = LowerRMSNorm(devices=("cpu",))(gm)
    assert result.stats["norms_lowered"] == 2 * model.config.num_hidden_layers + 1
    got = result.gm(input_ids=ids, use_cache=False)
    assert torch.equal(got.logits, want.logits)


def test_what_stays_op_by_op() -> None:
    bf16 = canonical_graph(from_preset("llama-tiny", seed=0, dtype=torch.bfloat16).eval(), torch.randint(0, 512, (1, 8)))
    before = print_ir(bf16)
    assert not LowerRMSNorm()(bf16).modified and print_ir(bf16) == before  # CPU weights: no CUDA kernel here

    class Norms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, dtype=torch.bfloat16))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            plain = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # 16-bit arithmetic, no upcast
            h = x.float()
            normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            shared = normed.to(x.dtype)
            computed = (self.w * 2) * shared  # the weight is computed, not a constant
            alpha = self.w * (h * torch.rsqrt(torch.add(h.pow(2).mean(-1, keepdim=True), 1e-6, alpha=2.0))).to(x.dtype)
            f64 = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True, dtype=torch.float64) + 1e-6)  # mean in another dtype
            return self.w * plain, computed, shared + 1, alpha, self.w.float() * f64  # shared: used elsewhere too

    gm = canonical_graph(Norms(), torch.randn(2, 16, dtype=torch.bfloat16))
    assert not LowerRMSNorm(devices=("cpu",))(gm).modified


def test_runs_in_the_runtime_graph_only_after_the_kv_cache() -> None:
    names = pass_names(kiln.CompileConfig(kv_cache=True))
    assert names.index("kv-cache") < names.index("lower-rms-norm")
    assert "lower-rms-norm" not in pass_names(kiln.CompileConfig())


def test_engine_generates_the_same_tokens_with_lowered_norms() -> None:
    model = from_preset("llama-tiny", seed=0).eval()
    params = kiln.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 9, 2, 7], [11, 3, 8, 1, 4, 6]]
    plain = kiln.LLM(model, num_blocks=32, enable_prefix_caching=False)
    lowered = kiln.LLM(model, num_blocks=32, enable_prefix_caching=False, compile_config=kiln.CompileConfig(
        kv_cache=True, extra_passes=[LowerRMSNorm(devices=("cpu",))]))  # fmt: skip
    assert count_op(print_ir(lowered.runner.compiled.graph_module), "kiln.rms_norm") == 2 * model.config.num_hidden_layers + 1
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in lowered.generate(prompts, params, use_tqdm=False)] == want
