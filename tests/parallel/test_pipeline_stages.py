"""split-pipeline-stages: the partition, its cost balance, the stage IR and the stages' outputs (one process).

The stages run here one after another, each fed the previous one's sent values, so the
split itself is checked without a process group; ``test_pipeline.py`` runs them on 2 Gloo ranks.
"""

from __future__ import annotations

import re

import pytest
import torch
from kiln_testing import hf_llama, hf_qwen2

import kiln
from kiln.models.llama import LlamaConfig
from kiln.models.presets import from_config
from kiln.parallel.stages import PLAN_KEY, STAGE_KEY, CostModel, analyze, imbalance
from kiln.passes.split_pipeline_stages import SplitPipelineStages, partition, split_pipeline_stages


def llama(layers: int, hidden: int = 32) -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return from_config(cfg, seed=3)


def compiled(model: torch.nn.Module, positions: bool = True) -> kiln.CompiledModel:
    ids = torch.randint(0, 128, (1, 8))
    inputs = {"input_ids": ids, "position_ids": torch.arange(8)[None]} if positions else {"input_ids": ids}
    return kiln.compile(model, inputs)


@pytest.fixture(scope="module")
def llama4() -> kiln.CompiledModel:
    return compiled(llama(4))


@pytest.fixture(scope="module")
def llama8() -> kiln.CompiledModel:
    return compiled(llama(8, hidden=64))


def run_stages(plan, inputs):  # noqa: ANN001, ANN201 - test helper
    received: list = []
    for stage in plan.stages:
        received, outs = stage(inputs, received)
    return plan.outputs(outs)


def test_stage_ir_boundaries_and_annotations(llama4: kiln.CompiledModel) -> None:
    cm = llama4
    result = SplitPipelineStages(2)(cm.graph_module)
    plan = cm.graph_module.meta[PLAN_KEY]
    assert result.stats["stages"] == 2 and not result.modified
    s0, s1 = plan.stages
    # the cut is between layers 1 and 2: only the residual stream (and at most a norm's statistic) crosses
    assert all(str(v.shape[-1]) in ("32", "1") for v in s0.send)
    assert [v.name for v in s0.send] == [v.name for v in s1.recv]
    assert s0.cost.send_bytes <= 8 * 33 * 4  # (1, 8, 32) + (1, 8, 1) fp32 at the captured length
    ir0, ir1 = s0.ir(), s1.ir()
    # stage 0 holds the embedding and layers 0-1, stage 1 layers 2-3 and the head (weights are never sent)
    assert 'weight "model.layers.1.mlp.down_proj.weight"' in ir0 and not re.search(r'weight "model[._]layers[._]2[._]', ir0)
    assert 'weight "model.embed_tokens.weight"' in ir0 and 'weight "lm_head.weight"' not in ir0
    assert 'weight "model.layers.2.self_attn.o_proj.weight"' in ir1 and 'weight "lm_head.weight"' in ir1
    assert not re.search(r'weight "model[._]layers[._]1[._]', ir1) and 'weight "model.embed_tokens.weight"' not in ir1
    assert "// send to stage 1: %" in ir0 and "// recv from stage 0: %" in ir1
    assert f"// recv from stage 0: %{s1.recv[0].name}: f32[1, T, 32]" in ir1  # sizes by dimension name
    # every stage recomputes RoPE from position_ids rather than receiving it
    assert "aten.cos(" in ir0 and "aten.cos(" in ir1
    stages = [n.meta[STAGE_KEY] for n in cm.graph_module.graph.nodes if STAGE_KEY in n.meta]
    assert stages == sorted(stages) and set(stages) == {0, 1}


@pytest.mark.parametrize("stages", [2, 4])
def test_stage_costs_within_ten_percent(llama8: kiln.CompiledModel, stages: int) -> None:
    plan = split_pipeline_stages(llama8.graph_module, stages, cost_model=CostModel(tokens=512))
    costs = [s.cost.seconds for s in plan.stages]
    assert imbalance(costs) <= 0.10, plan.report()
    assert all(s.cost.param_bytes > 0 for s in plan.stages)
    assert "imbalance" in plan.report()


def test_partition_is_optimal_then_least_traffic(llama8: kiln.CompiledModel) -> None:
    an = analyze(llama8.graph_module, CostModel(tokens=256))
    prefix = an.prefix_seconds
    cuts = partition(an, 3, balance_tolerance=0.0)
    bottleneck = max(prefix[b] - prefix[a] for a, b in zip([0, *cuts], [*cuts, len(an.work)], strict=True))
    # brute force over every pair of allowed cuts: nothing has a smaller bottleneck
    from kiln.passes.split_pipeline_stages import candidate_cuts

    cands = candidate_cuts(an, 2.0)
    best = min(
        max(prefix[a], prefix[b] - prefix[a], prefix[-1] - prefix[b]) for a in cands for b in cands if a < b
    )
    assert bottleneck == pytest.approx(best, rel=1e-12)
    assert all(an.valid[c] for c in cuts)


@pytest.mark.parametrize("make", [None, hf_llama, hf_qwen2], ids=["kiln", "hf_llama", "hf_qwen2"])
def test_stages_in_sequence_equal_the_whole_graph(make, llama4: kiln.CompiledModel) -> None:  # noqa: ANN001
    cm = llama4 if make is None else compiled(make(4))
    plan = split_pipeline_stages(cm.graph_module, 3)
    ids = torch.randint(0, 128, (1, 11))
    pos = torch.arange(11)[None]
    inputs = {"input_ids": ids, "position_ids": pos, "use_cache": False}
    want = cm(input_ids=ids, position_ids=pos)
    got = run_stages(plan, inputs)
    want = want if isinstance(want, torch.Tensor) else want.logits
    got = got if isinstance(got, torch.Tensor) else got.logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same ops in the same order


def test_too_many_stages_is_an_error(llama4: kiln.CompiledModel) -> None:
    with pytest.raises(kiln.ConfigError, match="cannot split into 1000 pipeline stages"):
        split_pipeline_stages(llama4.graph_module, 1000)
    with pytest.raises(kiln.ConfigError, match="positive"):
        SplitPipelineStages(0)


def test_missing_input_size_is_reported(llama4: kiln.CompiledModel) -> None:
    plan = split_pipeline_stages(llama4.graph_module, 2)
    with pytest.raises(kiln.ConfigError, match="no input binds"):
        plan.stages[1].recv[0].concrete_shape({})


def test_measured_op_times_drive_the_partition(llama4: kiln.CompiledModel) -> None:
    from kiln.parallel.stages_cost import profile_costs

    gm = llama4.graph_module
    measured = profile_costs(gm, [torch.randint(0, 128, (1, 16)), torch.arange(16)[None]], repeats=1)
    assert set(measured) == {n.name for n in gm.graph.nodes if n.op == "call_function"}
    assert all(t >= 0 for t in measured.values())
    # every op 1 us except the LM head, which takes as long as all the others: stage 1 is the head alone
    uniform = dict.fromkeys(measured, 1e-6)
    head = [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)][-1]
    even = split_pipeline_stages(gm, 2, measured=uniform)
    skewed = split_pipeline_stages(gm, 2, measured={**uniform, head.name: 1e-6 * len(uniform)})
    assert skewed.stages[1].cost.num_nodes < even.stages[1].cost.num_nodes / 4
    head_ir = skewed.stages[1].ir()
    assert 'weight "lm_head.weight"' in head_ir and "model.layers." not in head_ir


def test_calibration_rebalances_on_measured_stage_times(llama8: kiln.CompiledModel) -> None:
    """The roofline prices every op alike; "the device" makes the last three layers' ops 3x slower. Scaling each
    stage's ops by its measured / modelled time and re-splitting finds the split that knowing the true costs gives."""
    from kiln.parallel.stages import calibrated_costs

    gm = llama8.graph_module
    an = analyze(gm)
    slow = re.compile(r"layers_(5|6|7)_|layers\.(5|6|7)\.")
    true = {n.name: c.seconds * (3.0 if slow.search(str(n.meta.get("nn_module_stack", ""))) else 1.0)
            for n, c in an.costs.items()}  # fmt: skip
    assert sum(true.values()) > 1.2 * sum(c.seconds for c in an.costs.values())  # the skew is real

    def device_times(plan):  # noqa: ANN001, ANN202 - the "measured" time of each stage: its work nodes' true cost
        bounds = (0, *plan.cuts, len(an.work))
        return [sum(true[n.name] for n in an.work[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    plan = split_pipeline_stages(gm, 4)
    before = max(device_times(plan))  # the bottleneck stage sets a pipeline's pace
    measured = None
    for _ in range(3):
        measured = calibrated_costs(gm, plan, device_times(plan), measured=measured)
        plan = split_pipeline_stages(gm, 4, measured=measured)
    after = max(device_times(plan))
    best = max(device_times(split_pipeline_stages(gm, 4, measured=true)))  # a split that knew the true costs
    assert after <= 1.02 * best and after < 0.75 * before, (before, after, best)
    # the calibrated model prices each stage at what it measured
    assert device_times(plan) == pytest.approx([s.cost.seconds for s in plan.stages], rel=0.15)
    with pytest.raises(kiln.ConfigError, match="one time per stage"):
        calibrated_costs(gm, plan, [1.0])
    with pytest.raises(kiln.ConfigError, match="positive"):
        calibrated_costs(gm, plan, [1.0, 0.0, 1.0, 1.0])
