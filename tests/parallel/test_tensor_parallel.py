"""shard-tensor-parallel: the IR of each rank's shard, its weights, and its outputs on 2 Gloo ranks.

The IR checks run in this process (``CompileConfig(rank=r)`` builds rank r's shard without a
process group); the numerical checks run the shards on 2 spawned ranks (``kiln.parallel.launch``)
and compare with the unsharded model in fp32.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from kiln_testing import hf_gpt2, hf_llama, hf_qwen2

import kiln
from kiln.models.presets import from_config, get_preset
from kiln.parallel.launch import launch
from kiln.parallel.tp_collectives import collective_counts
from kiln.parallel.tp_shards import compile_shards, run_lockstep
from kiln.parallel.tp_solver import weight_of

TP2 = kiln.ParallelConfig(tensor_parallel_size=2)


def tiny_llama(layers: int = 2) -> torch.nn.Module:
    """kiln's Llama: 4 query heads sharing 2 kv heads, hidden 64, SwiGLU 176, vocab 512."""
    return from_config(dataclasses.replace(get_preset("llama-tiny"), num_hidden_layers=layers), seed=1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _logits(x: object) -> torch.Tensor:
    x = x[0] if isinstance(x, (list, tuple)) else x
    return x if isinstance(x, torch.Tensor) else x.logits  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def llama() -> tuple[torch.nn.Module, kiln.Capture]:
    model = tiny_llama()
    return model, kiln.capture(model, {"input_ids": torch.randint(0, 100, (1, 6))})


def _params(compiled: kiln.CompiledModel) -> dict[str, torch.Tensor]:
    gm = compiled.graph_module
    return dict(gm.named_parameters()) | dict(gm.named_buffers())


# -- the IR of each rank, built in this process ---------------------------------------------


def test_ir_has_two_all_reduces_per_layer_and_sliced_heads(llama: tuple[torch.nn.Module, kiln.Capture]) -> None:
    model, cap = llama
    # no kv cache, no merged linears: the checks below read each projection's shard by its weight's name
    shards = compile_shards(cap, config=kiln.CompileConfig(parallel=TP2))
    ir = shards[1].ir
    per_layer: dict[str, int] = {}
    for line in ir.splitlines():
        if "_c10d_functional.all_reduce(" in line:
            layer = re.search(r"# model\.(layers\.\d+|embed_tokens)", line)
            assert layer, line
            per_layer[layer.group(1)] = per_layer.get(layer.group(1), 0) + 1
    assert per_layer == {"embed_tokens": 1, "layers.0": 2, "layers.1": 2}
    assert collective_counts(shards[1].graph_module) == {"all_reduce": 5, "all_gather": 1, "reduce_scatter": 0}
    # each rank: 2 of 4 query heads, 1 of 2 kv heads, 88 of 176 MLP units, 256 of 512 vocabulary rows
    assert ir.count("= kiln.attention(") == 2 and re.search(r"kiln\.attention\(.*: f32\[1, 2, T, 16\]", ir)
    assert 'weight "model.layers.0.self_attn.q_proj.weight" : f32[32, 64]' in ir
    assert 'weight "model.layers.0.self_attn.k_proj.weight" : f32[16, 64]' in ir
    assert 'weight "model.layers.0.self_attn.o_proj.weight" : f32[64, 32]' in ir
    assert 'weight "model.layers.0.mlp.down_proj.weight" : f32[64, 88]' in ir
    assert re.search(r"aten\.reshape\(%\w+, \[1, %\w+, 2, 16\]\)", ir)  # head counts rewritten
    assert not re.search(r"aten\.reshape\(%\w+, \[1, %\w+, 4, 16\]\)", ir)
    assert re.search(r"all_gather_into_tensor\(.*\n.*\n.*: f32\[1, T, 512\]", ir)
    stats = shards[1].stats["shard-tensor-parallel"]
    assert (stats["attention_sharded"], stats["mlp_sharded"], stats["column_linears"], stats["row_linears"]) == (2, 2, 10, 4)
    # the weights are each rank's rows / columns of the model's
    layer = model.model.layers[0]
    for r, shard in enumerate(shards):
        p = _params(shard)
        torch.testing.assert_close(p["model.layers.0.self_attn.q_proj.weight"], layer.self_attn.q_proj.weight[32 * r : 32 * (r + 1)])
        torch.testing.assert_close(p["model.layers.0.self_attn.v_proj.weight"], layer.self_attn.v_proj.weight[16 * r : 16 * (r + 1)])
        torch.testing.assert_close(p["model.layers.0.mlp.down_proj.weight"], layer.mlp.down_proj.weight[:, 88 * r : 88 * (r + 1)])
    # run side by side in this process (collectives done across the shards' values): the model's logits
    ids = torch.randint(0, 512, (1, 9))
    for out in run_lockstep([s.graph_module for s in shards], [ids]):
        assert _rel(_logits(out), model(ids)) <= 1e-5


def test_gqa_replicates_kv_heads_when_a_group_spans_ranks(llama: tuple[torch.nn.Module, kiln.Capture]) -> None:
    model, cap = llama  # 4 query heads, 2 kv heads, 4 ranks: ranks 0, 1 read kv head 0; ranks 2, 3 kv head 1
    config = kiln.CompileConfig(parallel=kiln.ParallelConfig(tensor_parallel_size=4))
    (shard,) = compile_shards(cap, config=config, ranks=[2])  # k_proj's shard keeps its name
    assert shard.stats["shard-tensor-parallel"]["kv_heads_replicated"] == 2
    k = model.model.layers[0].self_attn.k_proj.weight
    torch.testing.assert_close(_params(shard)["model.layers.0.self_attn.k_proj.weight"], k[16:32], rtol=0, atol=0)
    assert re.search(r"kiln\.attention\(.*: f32\[1, 1, T, 16\]", shard.ir)
    with pytest.raises(kiln.KilnError, match="4 attention heads do not split over 3 ranks"):
        compile_shards(cap, config=kiln.CompileConfig(parallel=kiln.ParallelConfig(tensor_parallel_size=3)), ranks=[0])


def test_fused_qkv_and_conv1d_weights_are_split_per_head_group() -> None:
    model = hf_gpt2(layers=1)  # c_attn: one (32 -> 96) Conv1D projection split into q, k, v; tied embeddings
    shards = compile_shards(model, {"input_ids": torch.randint(0, 100, (1, 6))}, config=kiln.CompileConfig(parallel=TP2))
    ir = shards[0].ir
    assert re.search(r"aten\.split_with_sizes\(%\w+, \[16, 16, 16\], 2\)", ir)
    assert collective_counts(shards[0].graph_module)["all_reduce"] == 3  # 2 in the layer, 1 for the token embedding
    ids = torch.randint(0, 128, (1, 7))
    want = model(input_ids=ids).logits
    for out in run_lockstep([s.graph_module for s in shards], [ids, False]):
        assert _rel(_logits(out), want) <= 1e-5


def test_found_by_pattern_not_by_name_and_rejected_candidates() -> None:
    class MLP(torch.nn.Module):  # no embedding, no attention: fc1 -> gelu -> fc2 is found all the same
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    from kiln.passes.shard_tensor_parallel import ShardTensorParallel

    model, x = MLP(), torch.randn(3, 16)
    passes = [ShardTensorParallel(2, r) for r in range(2)]
    shards = [kiln.compile(model, x, config=kiln.CompileConfig(dynamic=False, extra_passes=(p,))) for p in passes]
    stats = shards[0].stats["shard-tensor-parallel"]
    assert (stats["mlp_sharded"], stats["column_linears"], stats["row_linears"], stats["all_reduces"]) == (1, 1, 1, 1)
    assert [(name, "graph input" in why) for name, why in passes[0].skipped] == [("linear", True)]  # fc1 is not row-parallel
    assert "f32[32, 16]" not in shards[0].ir and 'weight "fc1.weight" : f32[16, 16]' in shards[0].ir
    for out in run_lockstep([s.graph_module for s in shards], [x]):
        assert _rel(_logits(out), model(x)) <= 1e-5


# -- outputs on 2 Gloo ranks --------------------------------------------------------------


def _rank_outputs(rank: int) -> dict[str, object]:
    """Each case: the TP=2 shard's logits against the unsharded model's, on a prompt and on one token."""
    torch.manual_seed(0)
    cases = {"kiln-llama": tiny_llama(), "hf-llama-1kv": hf_llama(layers=2, kv_heads=1)}  # qwen2, gpt2: sequence-parallel tests
    out: dict[str, object] = {}
    for name, model in cases.items():
        compiled = kiln.compile(model, {"input_ids": torch.randint(0, 100, (1, 6))}, parallel=TP2)
        for t in (9, 1):
            ids = torch.randint(0, 100, (1, t))
            out[f"{name}/T={t}"] = _rel(_logits(compiled(input_ids=ids)), _logits(model(input_ids=ids)))
        out[f"{name}/collectives"] = collective_counts(compiled.graph_module)
    return out


def test_tp2_outputs_equal_single_device_outputs() -> None:
    results = launch(_rank_outputs, 2)
    for rank, res in enumerate(results):
        for key, value in res.items():
            if key.endswith("collectives"):
                assert value == {"all_reduce": 5, "all_gather": 1, "reduce_scatter": 0}, (rank, key, value)
            else:
                assert value <= 1e-5, (rank, key, value)


def test_compile_outside_torch_distributed_spawns_ranks(tmp_path: object) -> None:
    """kiln.compile(..., parallel=) in a single process: ranks in worker processes, one dump per rank."""
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 100, (1, 5))
    config = kiln.CompileConfig(dump_dir=str(tmp_path))
    with kiln.compile(model, {"input_ids": ids}, config=config, parallel=TP2) as compiled:
        got = compiled(input_ids=torch.randint(0, 100, (1, 7)))
        assert "_c10d_functional.all_reduce" in compiled.ir(rank=1)
        with torch.no_grad():
            ids7 = torch.randint(0, 100, (1, 7))
            assert _rel(compiled(input_ids=ids7), model(input_ids=ids7)) <= 1e-5
    assert got.shape == (1, 7, 512)
    dumps = sorted(p.name for p in tmp_path.iterdir())  # type: ignore[attr-defined]
    assert dumps == ["rank0", "rank1"]
    assert any("shard-tensor-parallel" in p.name for p in (tmp_path / "rank1").iterdir())  # type: ignore[operator]


def test_llm_generation_under_tp2_equals_single_device() -> None:
    model = tiny_llama()
    prompts = [[5, 17, 99, 3, 42, 7, 11], [200, 1, 2]]
    params = kiln.SamplingParams(max_tokens=6, temperature=0.0)
    single = kiln.LLM(model, num_blocks=16, block_size=4)
    want = [o.outputs[0].token_ids for o in single.generate(prompts, params, use_tqdm=False)]
    sharded = kiln.LLM(model, num_blocks=16, block_size=4, tensor_parallel_size=2)
    try:
        got = [o.outputs[0].token_ids for o in sharded.generate(prompts, params, use_tqdm=False)]
        assert sharded.runner.layout.num_kv_heads == (1, 1)  # each rank caches 1 of the 2 kv heads
    finally:
        sharded.runner.close()
    assert got == want
    assert all(len(t) == 6 for t in got)


# -- weight-only quantized linears ------------------------------------------------------------


def _int4(group: int | None) -> kiln.QuantConfig:
    """Asymmetric int4 (zero points sliced with the scales), group-wise or per channel (None)."""
    granularity = kiln.PerGroup(group) if group else kiln.PerAxis(0)
    return kiln.QuantConfig.preset("w4a16-g128", weights=kiln.QuantSpec(dtype="int4", granularity=granularity,
                                                                         symmetric=False))  # fmt: skip


_CALIBRATION = torch.randint(0, 500, (4, 16), generator=torch.Generator().manual_seed(3))
QUANTIZED = {  # llama-tiny: K = 64 (attention output) and 176 (MLP down: 88 a rank = 11 groups of 8)
    "w8a16-per-channel": kiln.QuantConfig.preset("w8a16"),
    "w8a16-per-tensor": kiln.QuantConfig.preset("w8a16", weights=kiln.QuantSpec(dtype="int8", granularity=kiln.PerTensor())),
    "w4a16-g8": _int4(8),
    "w4a16-per-channel": _int4(None),  # one group of all K: stays whole on row-parallel linears, its size localized
    # per-token dynamic activations: a row-parallel input's scale is all-reduced (max) over the ranks' slices
    "w8a8-smoothquant": kiln.QuantConfig.preset("w8a8").with_calibration(_CALIBRATION),
    "fp8": kiln.QuantConfig.preset("fp8"),
    # a calibrated (static) per-tensor activation scale holds for every slice as it is
    "w8a8-static": kiln.QuantConfig(
        weights=kiln.QuantSpec(dtype="int8", granularity=kiln.PerAxis(0)),
        activations=kiln.QuantSpec(dtype="int8", granularity=kiln.PerTensor(), dynamic=False),
    ).with_calibration(_CALIBRATION),
}
QUANTIZED["fp8-lm-head"] = dataclasses.replace(QUANTIZED["fp8"], skip=())  # the LM head too: vocabulary-parallel
QUANTIZED["w4a16-g8-lm-head"] = dataclasses.replace(QUANTIZED["w4a16-g8"], skip=())
_SCALE_REDUCES = {"w8a8-smoothquant": 4, "fp8": 4, "fp8-lm-head": 4}  # o and down projections of 2 layers


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_quantized_shards_compute_the_single_device_quantized_model(name: str) -> None:
    """Quantize first, then shard: each rank holds its slice of the codes, scales and zero points, and the
    lockstep shards give the single-device quantized graph's logits (fp32)."""
    model, quant = tiny_llama(), QUANTIZED[name]
    ids = torch.randint(0, 100, (1, 6))
    single = kiln.compile(model, {"input_ids": ids}, config=kiln.CompileConfig(quant=quant))
    shards = compile_shards(model, {"input_ids": ids}, config=kiln.CompileConfig(quant=quant, parallel=TP2))
    stats = shards[0].stats["shard-tensor-parallel"]
    assert stats["attention_sharded"] == 2 and stats["mlp_sharded"] == 2 and stats["all_reduces"] == 5
    assert stats.get("scale_all_reduces", 0) == _SCALE_REDUCES.get(name, 0)
    gm = shards[1].graph_module
    qlinears = [n for n in gm.graph.nodes if str(n.target).startswith("kiln.qlinear")]
    head = name.endswith("lm-head")
    assert len(qlinears) == 14 + head  # 7 projections a layer (and the LM head unless skipped)
    assert stats["vocab_parallel_lm_heads"] == 1
    for n in qlinears:  # every projection holds half of its weight: rows (column-parallel) or K (row-parallel)
        full = next(m for m in single.graph_module.graph.nodes if m.name == n.name)
        assert weight_of(n).meta["val"].numel() * 2 == weight_of(full).meta["val"].numel(), n.name
    x = torch.randint(0, 500, (1, 9))
    with torch.no_grad():
        want = _logits(single(input_ids=x))
        got = _logits(run_lockstep([s.graph_module for s in shards], [x])[0])
    assert _rel(got, want) <= 1e-5
    assert _rel(got, _logits(model(input_ids=x))) > 1e-4  # quantized: not the float model's logits


@pytest.mark.parametrize("name", ["w4a16-g8", "fp8", "fp8-unsharded-mlp"])
def test_quantized_shards_with_sequence_parallelism(name: str) -> None:
    model, quant = tiny_llama(layers=1), QUANTIZED[name.removesuffix("-unsharded-mlp")]
    if name.endswith("unsharded-mlp"):  # 175 hidden units do not split: the MLP runs on the rank's tokens, its
        model = from_config(dataclasses.replace(get_preset("llama-tiny"), num_hidden_layers=1, intermediate_size=175),
                            seed=1)  # per-token activation scales sliced with them  # fmt: skip
    ids = torch.randint(0, 100, (1, 6))
    single = kiln.compile(model, {"input_ids": ids}, config=kiln.CompileConfig(quant=quant))
    sp = kiln.ParallelConfig(tensor_parallel_size=2, sequence_parallel=True)
    shards = compile_shards(model, {"input_ids": ids}, config=kiln.CompileConfig(quant=quant, parallel=sp))
    reduces = 2 if name.endswith("unsharded-mlp") else 3  # the embedding's, o's and down's
    assert shards[0].stats["sequence-parallel"]["reduce_scatters"] == reduces
    x = torch.randint(0, 500, (1, 9))
    with torch.no_grad():
        assert _rel(_logits(run_lockstep([s.graph_module for s in shards], [x])[0]), _logits(single(input_ids=x))) <= 1e-5


def test_quantized_sharding_refuses_slices_off_the_groups() -> None:
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 100, (1, 6))
    shards = compile_shards(model, {"input_ids": ids}, config=kiln.CompileConfig(quant=_int4(16), parallel=TP2), ranks=[0])
    stats = shards[0].stats["shard-tensor-parallel"]  # 88 of the MLP's 176 inputs a rank: 5.5 groups of 16
    assert stats["attention_sharded"] == 1 and "mlp_sharded" not in stats
    x = torch.randint(0, 500, (1, 7))
    with torch.no_grad():  # the MLP stays whole on every rank: still the single-device model
        single = kiln.compile(model, {"input_ids": ids}, config=kiln.CompileConfig(quant=_int4(16)))
        both = compile_shards(model, {"input_ids": ids}, config=kiln.CompileConfig(quant=_int4(16), parallel=TP2))
        assert _rel(_logits(run_lockstep([s.graph_module for s in both], [x])[0]), _logits(single(input_ids=x))) <= 1e-5
    attn_only = dataclasses.replace(_int4(32), skip=("lm_head", "down_proj"))
    tp4 = kiln.CompileConfig(quant=attn_only, parallel=kiln.ParallelConfig(tensor_parallel_size=4))
    with pytest.raises(kiln.PassError, match="group-wise scales .group size 32. need each rank's K slice"):
        compile_shards(model, {"input_ids": ids}, config=tp4, ranks=[0])  # 16 attention outputs a rank


def _quantized_rank_outputs(rank: int) -> dict[str, float]:
    """Qwen2 (biased q/k/v) quantized, sharded over 2 real Gloo ranks: the max all-reduce of activation
    scales and the row-parallel biases through c10d."""
    torch.manual_seed(0)
    model = hf_qwen2(layers=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # biases and norms away from their initial values
    out = {}
    for name in ("fp8", "w4a16-g8"):
        ids = torch.randint(0, 100, (1, 6))
        config = kiln.CompileConfig(quant=QUANTIZED[name])
        single = kiln.compile(model, {"input_ids": ids}, config=config)
        sharded = kiln.compile(model, {"input_ids": ids}, config=config, parallel=TP2)
        x = torch.randint(0, 100, (1, 9))
        with torch.no_grad():
            out[name] = _rel(_logits(sharded(input_ids=x)), _logits(single(input_ids=x)))
    return out


def test_quantized_qwen2_with_biases_on_two_gloo_ranks() -> None:
    for res in launch(_quantized_rank_outputs, 2):
        assert all(v <= 1e-5 for v in res.values()), res


@pytest.mark.parametrize(("quant", "tp", "pp", "kv"), [("w4a16-g8", 2, 1, "int8"), ("fp8", 1, 2, "auto"),
                                                       ("fp8-lm-head", 2, 1, "auto")])  # fmt: skip
def test_llm_generation_of_a_quantized_model_under_tp_or_pp_equals_single_device(quant: str, tp: int, pp: int,
                                                                                  kv: str) -> None:  # fmt: skip
    model = tiny_llama()
    prompts = [[5, 17, 99, 3, 42, 7, 11], [200, 1, 2]]
    params = kiln.SamplingParams(max_tokens=6, temperature=0.0)
    config = kiln.CompileConfig(kv_cache=True, quant=QUANTIZED[quant])
    single = kiln.LLM(model, num_blocks=16, block_size=4, compile_config=config, kv_cache_dtype=kv)
    want = [o.outputs[0].token_ids for o in single.generate(prompts, params, use_tqdm=False)]
    with kiln.LLM(model, num_blocks=16, block_size=4, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                  compile_config=config, kv_cache_dtype=kv) as sharded:  # fmt: skip
        got = [o.outputs[0].token_ids for o in sharded.generate(prompts, params, use_tqdm=False)]
    assert got == want
