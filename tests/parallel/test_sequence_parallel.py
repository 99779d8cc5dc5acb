"""sequence-parallel: token-sliced residual streams between tensor-parallel regions, on 2 Gloo ranks."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from kiln_testing import hf_gpt2, hf_qwen2

import kiln
from kiln.models.presets import from_config, get_preset
from kiln.parallel.launch import launch
from kiln.parallel.tp_collectives import collective_counts

SP2 = kiln.ParallelConfig(tensor_parallel_size=2, sequence_parallel=True)


def tiny_llama(layers: int = 2) -> torch.nn.Module:
    return from_config(dataclasses.replace(get_preset("llama-tiny"), num_hidden_layers=layers), seed=2)


def test_ir_reduce_scatters_and_gathers_tokens_around_each_region() -> None:
    compiled = kiln.compile(tiny_llama(), {"input_ids": torch.randint(0, 100, (1, 6))},
                            config=kiln.CompileConfig(parallel=SP2, rank=1))  # fmt: skip
    ir = compiled.ir
    # per layer: a reduce-scatter after o_proj and down_proj, an all-gather before q/k/v and gate/up;
    # plus the embedding's reduce-scatter, the gather before the LM head and the LM head's vocabulary gather
    assert collective_counts(compiled.graph_module) == {"all_reduce": 0, "all_gather": 6, "reduce_scatter": 5}
    per_layer: dict[str, list[str]] = {}
    for line in ir.splitlines():
        m = re.search(r"_c10d_functional\.(reduce_scatter_tensor|all_gather_into_tensor)\(.*# model\.layers\.(\d+)", line)
        if m:
            per_layer.setdefault(m.group(2), []).append(m.group(1))
    assert per_layer == {str(i): ["all_gather_into_tensor", "reduce_scatter_tensor"] * 2 for i in range(2)}
    # norms and residual adds hold ceil(T / 2) tokens; projections all T
    assert re.search(r"%\w+ = aten\.rsqrt\(%\w+\) : f32\[1, \(\(T \+ 1\)//2\), 1\]", ir)
    assert re.search(r"%\w+ = aten\.add\.Tensor\(%\w+, %\w+\) : f32\[1, \(\(T \+ 1\)//2\), 64\]  # model\.layers\.1 ", ir)
    assert re.search(r"aten\.linear\(%slice\w*, %model_layers_0_self_attn_q_proj_weight\) : f32\[1, T, 32\]", ir)
    assert not re.search(r"rsqrt\(%\w+\) : f32\[1, T, 1\]", ir)
    assert compiled.stats["sequence-parallel"]["token_sliced_nodes"] > 20


def test_requires_tensor_parallel_first() -> None:
    from kiln.passes.sequence_parallel import SequenceParallel

    with pytest.raises(kiln.KilnError, match="run shard-tensor-parallel first"):
        kiln.compile(tiny_llama(1), {"input_ids": torch.randint(0, 100, (1, 4))},
                     config=kiln.CompileConfig(extra_passes=(SequenceParallel(2, 0),)))  # fmt: skip
    with pytest.raises(kiln.ConfigError, match="sequence_parallel splits tokens inside a tensor-parallel group"):
        kiln.ParallelConfig(sequence_parallel=True)


def _rank_outputs(rank: int) -> dict[str, float]:
    """Each model under TP=2 + SP=2 against the unsharded model, for odd (padded), even and single-token inputs."""
    torch.manual_seed(0)
    out: dict[str, float] = {}
    for name, model in {"kiln-llama": tiny_llama(), "hf-qwen2": hf_qwen2(), "hf-gpt2": hf_gpt2()}.items():
        compiled = kiln.compile(model, {"input_ids": torch.randint(0, 100, (1, 6))}, parallel=SP2)
        assert collective_counts(compiled.graph_module)["all_reduce"] == 0
        for t in (9, 4, 1):
            ids = torch.randint(0, 100, (1, t))
            got, want = compiled(input_ids=ids), model(input_ids=ids)
            got, want = (x if isinstance(x, torch.Tensor) else x.logits for x in (got, want))
            out[f"{name}/T={t}"] = float((got - want).detach().norm() / want.detach().norm())
    return out


def test_sp2_outputs_equal_single_device_outputs() -> None:
    for rank, res in enumerate(launch(_rank_outputs, 2)):
        assert len(res) == 9
        for key, err in res.items():
            assert err <= 1e-5, (rank, key, err)
