"""Tests of ``passes/lower_rotary.py``: op-by-op rotary embeddings become ``kiln.rotary`` in the IR with outputs
equal to the original graph's, on kiln's Llama (fp32 and bf16) and a transformers Llama, and what must stay."""

from __future__ import annotations

import pytest
import torch
from kiln_testing import canonical_graph, count_op, hf_llama
from torch import nn

import kiln
from kiln.ir import print_ir, verify
from kiln.models import from_preset
from kiln.passes.lower_rotary import LowerRotary
from kiln.pipeline import pass_names

X = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kiln_llama_rotaries_become_one_op_each_with_equal_outputs(dtype: torch.dtype) -> None:
    model = from_preset("llama-tiny", seed=0, dtype=dtype).eval()
    layers = model.config.num_hidden_layers
    gm = canonical_graph(model, torch.randint(0, 512, (1, 8)))
    want = {n: gm(input_ids=X[:, :n]) for n in (1, 9)}
    before = print_ir(gm)
    result = LowerRotary(devices=("cpu",))(gm)  # the CPU runs kiln::rotary's reference
    verify(result.gm)
    ir = print_ir(result.gm)
    assert count_op(ir, "kiln.rotary") == 2 * layers  # queries and keys of every layer
    assert count_op(before, "aten.neg") == 2 * layers and count_op(ir, "aten.neg") == 0
    assert count_op(ir, "aten.cat") == count_op(before, "aten.cat") - 2 * layers  # the cos/sin table's cat stays
    assert "[lower-rotary]" in ir
    # per tensor: both products, the concatenation, the negation, both halves and the chunk
    assert result.stats == {"rotaries_lowered": 2 * layers, "nodes_removed": 7 * 2 * layers}
    for n, ref in want.items():  # the reference runs the same ops: equal exactly
        assert torch.equal(result.gm(input_ids=X[:, :n]), ref)


def test_transformers_llama_rotaries_are_matched() -> None:
    model = hf_llama().eval()
    gm = canonical_graph(model, torch.randint(0, 128, (1, 8)))
    ids = torch.randint(0, 128, (1, 5))
    want = gm(input_ids=ids, use_cache=False)
    result = LowerRotary(devices=("cpu",))(gm)
    assert result.stats["rotaries_lowered"] == 2 * model.config.num_hidden_layers
    got = result.gm(input_ids=ids, use_cache=False)
    assert torch.equal(got.logits, want.logits)


def test_what_stays_op_by_op() -> None:
    cpu = canonical_graph(from_preset("llama-tiny", seed=0).eval(), torch.randint(0, 512, (1, 8)))
    before = print_ir(cpu)
    assert not LowerRotary()(cpu).modified and print_ir(cpu) == before  # CPU tensors: no CUDA kernel here

    class Rotations(nn.Module):
        def forward(self, xs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
            a, b, c, e, f = xs.unbind(0)  # one input per case: no common subexpressions across them
            a1, a2 = a.chunk(2, -1)
            swapped = a * cos + torch.cat((a1, -a2), -1) * sin  # the negation on the wrong half
            b1, b2 = b.chunk(2, -1)
            shared_cat = torch.cat((-b2, b1), -1)
            used_twice = b * cos + shared_cat * sin  # the rotated halves are used elsewhere too
            c1, c2 = c.chunk(2, -1)
            other = c * sin + torch.cat((-c2, c1), -1) * sin  # matched: the "cos" is any broadcastable tensor
            e1, e2 = e.float().chunk(2, -1)
            mixed = e.float() * cos + torch.cat((-e2, e1), -1) * sin  # a float x with 16-bit tables
            f1, f2 = f.chunk(2, -1)
            wide = cos.unsqueeze(0).expand(2, *cos.shape)  # cos broadcast beyond x's shape
            too_big = f * wide + torch.cat((-f2, f1), -1) * sin
            return swapped, used_twice, shared_cat + 1, other, mixed, too_big

    xs, cos, sin = torch.randn(5, 1, 2, 3, 8, dtype=torch.bfloat16), *(torch.randn(1, 1, 3, 8, dtype=torch.bfloat16) for _ in range(2))
    gm = canonical_graph(Rotations(), xs, cos, sin)
    result = LowerRotary(devices=("cpu",))(gm)
    assert result.stats == {"rotaries_lowered": 1, "nodes_removed": 7}  # only `other`
    out, want = result.gm(xs=xs, cos=cos, sin=sin), Rotations()(xs, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(out, want, strict=True))


def test_runs_in_the_runtime_graph_only_after_the_norms() -> None:
    names = pass_names(kiln.CompileConfig(kv_cache=True))
    assert names.index("kv-cache") < names.index("lower-rms-norm") < names.index("lower-rotary")
    assert "lower-rotary" not in pass_names(kiln.CompileConfig())


def test_engine_generates_the_same_tokens_with_lowered_rotaries() -> None:
    model = from_preset("llama-tiny", seed=0).eval()
    params = kiln.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 9, 2, 7], [11, 3, 8, 1, 4, 6]]
    plain = kiln.LLM(model, num_blocks=32, enable_prefix_caching=False)
    lowered = kiln.LLM(model, num_blocks=32, enable_prefix_caching=False, compile_config=kiln.CompileConfig(
        kv_cache=True, extra_passes=[LowerRotary(devices=("cpu",))]))  # fmt: skip
    assert count_op(print_ir(lowered.runner.compiled.graph_module), "kiln.rotary") == 2 * model.config.num_hidden_layers
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in lowered.generate(prompts, params, use_tqdm=False)] == want
