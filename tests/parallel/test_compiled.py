"""kiln.compile(parallel=) under pipeline (PP = 2) and context (CP = 2) parallelism on 2 Gloo ranks.

One launch of 2 ranks compiles and runs every case (kiln's Llama and Hugging Face Llama,
PP under 1F1B and GPipe with several micro-batches, CP with zigzag shards of an odd token
count); the tests compare what *every* rank returned with the unsplit model in this
process (fp32, relative error <= 1e-5), and check each rank's IR and dump. Bad
configurations raise ConfigError before any rank starts.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from kiln_testing import hf_llama

import kiln
from kiln.models.llama import LlamaConfig
from kiln.models.presets import from_config
from kiln.parallel.compiled import microbatch_example
from kiln.parallel.launch import launch

PP2 = kiln.ParallelConfig(pipeline_parallel_size=2)
CP2 = kiln.ParallelConfig(context_parallel_size=2)


def llama(layers: int = 2) -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return from_config(cfg, seed=3)


def _np(out: object) -> np.ndarray:
    t = out if isinstance(out, torch.Tensor) else out.logits  # type: ignore[attr-defined]
    return t.detach().numpy()


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _rank(rank: int, models: dict, calls: dict, dump: str) -> dict:
    out: dict = {}
    kl, hf = models["kiln"], models["hf"]
    # PP = 2, kiln's Llama: example batch 2 -> micro-batches of 1 row; a call of 4 rows runs 4 micro-batches
    ex = {"input_ids": calls["ids"][:2, :8].clone(), "position_ids": torch.arange(8)[None]}
    config = kiln.CompileConfig(dump_dir=dump)
    pp = kiln.compile(kl, ex, config=config, parallel=PP2)
    out["pp/ir"] = pp.ir
    out["pp/stages"] = [s.cost.seconds for s in pp.plan.stages]
    out["pp/kiln/b4"] = _np(pp(input_ids=calls["ids"], position_ids=calls["pos"]))
    out["pp/kiln/b1"] = _np(pp(input_ids=calls["ids"][:1, :1], position_ids=calls["pos"][:, :1]))
    # PP = 2 under GPipe, a Hugging Face model: example batch 4, micro-batches of 2 rows
    gpipe = kiln.ParallelConfig(pipeline_parallel_size=2, schedule="gpipe")
    hpp = kiln.compile(hf, {"input_ids": calls["ids"][:, :6].clone()}, parallel=gpipe)
    out["pp/hf/b4"] = _np(hpp(input_ids=calls["ids"]))
    try:
        hpp(input_ids=calls["ids"][:3])
    except kiln.ConfigError as e:
        out["pp/hf/b3"] = str(e)
    # CP = 2: 19 tokens over 2 ranks (zigzag), gathered on every rank
    cp = kiln.compile(kl, {"input_ids": calls["ids"][:1, :8].clone(), "position_ids": torch.arange(8)[None]}, parallel=CP2)
    out["cp/kiln"] = _np(cp(input_ids=calls["ids"][:1], position_ids=calls["pos"]))
    out["cp/ir"] = cp.ir
    hcp = kiln.compile(hf, {"input_ids": calls["ids"][:1, :8].clone()}, parallel=CP2)
    out["cp/hf"] = _np(hcp(input_ids=calls["ids"][1:2]))
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict, str]:
    torch.manual_seed(0)
    models = {"kiln": llama(), "hf": hf_llama(layers=2)}
    calls = {"ids": torch.randint(0, 128, (4, 19)), "pos": torch.arange(19)[None]}
    with torch.no_grad():
        refs = {
            "kiln": _np(models["kiln"](calls["ids"], calls["pos"])),
            "hf": _np(models["hf"](input_ids=calls["ids"])),
        }
    dump = str(tmp_path_factory.mktemp("dumps"))
    return launch(_rank, 2, models, calls, dump), refs, dump


def test_pp2_compile_equals_one_device_on_every_rank(ranks: tuple[list[dict], dict, str]) -> None:
    results, refs, _ = ranks
    for r in results:  # the last stage broadcasts the outputs: every rank returns them
        assert r["pp/kiln/b4"].shape == refs["kiln"].shape == (4, 19, 128)
        assert _rel(r["pp/kiln/b4"], refs["kiln"]) <= 1e-5
        assert r["pp/kiln/b1"].shape == (1, 1, 128)
        assert _rel(r["pp/kiln/b1"], refs["kiln"][:1, :1]) <= 1e-5
        assert _rel(r["pp/hf/b4"], refs["hf"]) <= 1e-5
        assert "micro-batches of the captured 2 rows" in r["pp/hf/b3"]


def test_pp2_each_rank_holds_its_stage_and_dumps_it(ranks: tuple[list[dict], dict, str]) -> None:
    results, _, dump = ranks
    first, last = results[0]["pp/ir"], results[1]["pp/ir"]
    assert first.startswith("// stage 0") and "// send to stage 1: %" in first and "recv" not in first
    assert last.startswith("// stage 1") and "// recv from stage 0: %" in last and "send to" not in last
    assert 'weight "model.layers.0.' in first and 'weight "model.layers.0.' not in last  # layer 0 on rank 0
    assert 'weight "model.layers.1.' in last and 'weight "model.layers.1.' not in first  # layer 1 on rank 1
    a, b = results[0]["pp/stages"]
    assert abs(a - b) <= 0.1 * max(a, b)  # the cost model balances the stages
    for r in (0, 1):
        files = os.listdir(os.path.join(dump, f"rank{r}"))
        assert f"stage{r}.txt" in files and any("split-pipeline-stages" in f for f in files)


def test_cp2_compile_equals_one_device_on_every_rank(ranks: tuple[list[dict], dict, str]) -> None:
    results, refs, _ = ranks
    for r in results:
        assert r["cp/kiln"].shape == (1, 19, 128)
        assert _rel(r["cp/kiln"], refs["kiln"][:1]) <= 1e-5
        assert _rel(r["cp/hf"], refs["hf"][1:2]) <= 1e-5
        assert r["cp/ir"].count("= kiln.ring_attention(") == 2 and "kiln.attention(" not in r["cp/ir"]


def test_microbatches_cut_the_example_batch() -> None:
    ids, pos = torch.zeros(6, 5, dtype=torch.long), torch.arange(5)[None]
    (cut, _, m) = microbatch_example({"input_ids": ids, "position_ids": pos}, None, 4, None)
    assert m == 3 and cut["input_ids"].shape == (2, 5) and cut["position_ids"].shape == (1, 5)  # largest divisor <= 4
    assert microbatch_example(ids, None, 2, 6)[0].shape == (1, 5)
    with pytest.raises(kiln.ConfigError, match="does not divide the example batch of 6"):
        microbatch_example(ids, None, 2, 4)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (kiln.ParallelConfig(pipeline_parallel_size=2, context_parallel_size=2), "context parallelism combined"),
        (kiln.ParallelConfig(tensor_parallel_size=2, context_parallel_size=2), "context parallelism combined"),
        (kiln.ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2, sequence_parallel=True),
         "sequence parallelism inside pipeline stages"),
    ],
)  # fmt: skip
def test_unsupported_combinations_raise_config_error(config: kiln.ParallelConfig, match: str) -> None:
    with pytest.raises(kiln.ConfigError, match=match):
        kiln.compile(llama(1), {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, parallel=config)


def test_bad_pipeline_configs_raise_before_spawning() -> None:
    model, ids = llama(1), {"input_ids": torch.zeros(3, 4, dtype=torch.long)}
    with pytest.raises(kiln.ConfigError, match="does not divide the example batch of 3"):
        kiln.compile(model, ids, parallel=kiln.ParallelConfig(pipeline_parallel_size=2, num_microbatches=2))
    with pytest.raises(kiln.ConfigError, match="kv_cache=True"):
        kiln.CompileConfig(kv_cache=True, parallel=CP2)
    with pytest.raises(kiln.ConfigError, match="eager backend"):
        kiln.CompileConfig(backend="triton", parallel=PP2)
    with pytest.raises(kiln.ConfigError, match="in a torch.distributed process group"):
        kiln.compile(model, ids, config=kiln.CompileConfig(parallel=PP2, rank=0))
