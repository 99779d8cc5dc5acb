"""kiln.LLM(pipeline_parallel_size=2): the step graph in 2 stages on 2 Gloo ranks, each with its layers' KV cache;
and tensor x pipeline parallelism (2 x 2 ranks) through kiln.compile and the stage runner.

Greedy generation (continuous batching, chunked prefill, several sequences per step cut
into micro-batches) must equal single-device generation token for token, and each stage's
cache must hold only its own layers (so the same memory holds twice the blocks).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.models.llama import LlamaConfig
from kiln.models.presets import from_config
from kiln.parallel.launch import launch
from kiln.runtime.model_runner import ModelRunner, SequenceStep
from kiln.runtime.pipeline_runner import split_steps

STEPS = [SequenceStep([5, 17, 99, 3, 42], 0, [0, 1]), SequenceStep([100, 1, 2], 0, [2]), SequenceStep([7], 0, [3])]


def llama() -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return from_config(cfg, seed=11)


def test_llm_generation_under_pp2_equals_single_device() -> None:
    model = llama()
    prompts = [[5, 17, 99, 3, 42, 7, 11, 8, 60], [100, 1, 2], [3, 4, 5, 6, 7], [9]]
    params = kiln.SamplingParams(max_tokens=6, temperature=0.0)
    memory = 2**15  # fp32, 2 layers x 2 kv heads x 8 dims x 4 tokens: 1 KiB a block for both layers
    kw = {"kv_cache_memory": memory, "block_size": 4, "max_num_batched_tokens": 8}  # chunked prefill
    single = kiln.LLM(model, **kw)
    want = [o.outputs[0].token_ids for o in single.generate(prompts, params, use_tqdm=False)]
    staged = kiln.LLM(model, pipeline_parallel_size=2, **kw)
    try:
        got = [o.outputs[0].token_ids for o in staged.generate(prompts, params, use_tqdm=False)]
        assert staged.runner.num_blocks == 2 * single.runner.num_blocks == 64  # a stage caches 1 of 2 layers
        assert staged.runner.output_rank == 1
    finally:
        staged.runner.close()
    assert got == want
    assert all(len(t) == 6 for t in got)


def test_steps_split_into_balanced_contiguous_microbatches() -> None:
    def steps(*lengths: int) -> list[SequenceStep]:
        return [SequenceStep(list(range(n)), 0, [0]) for n in lengths]

    def sizes(groups: list[list[SequenceStep]]) -> list[list[int]]:
        return [[len(s.token_ids) for s in g] for g in groups]

    assert sizes(split_steps(steps(1, 1, 1, 1), 2)) == [[1, 1], [1, 1]]  # decode: half the sequences each
    assert sizes(split_steps(steps(9, 1, 1, 1), 2)) == [[9], [1, 1, 1]]
    assert sizes(split_steps(steps(1, 1, 9), 2)) == [[1, 1], [9]]
    assert sizes(split_steps(steps(5), 2)) == [[5]]  # one sequence: one micro-batch
    assert sizes(split_steps(steps(1, 1, 1), 4)) == [[1], [1], [1]]


def _tp_pp_rank(rank: int, model: torch.nn.Module, ids: torch.Tensor) -> dict:
    from kiln.runtime.pipeline_runner import PipelineStageRunner

    par = kiln.ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2)
    compiled = kiln.compile(model, {"input_ids": ids[:, :8].clone()}, parallel=par)
    runner = PipelineStageRunner(model, block_size=4, num_blocks=8, compile_config=kiln.CompileConfig(kv_cache=True, parallel=par))
    logits = runner.execute(STEPS)
    return {"compiled": compiled(input_ids=ids).numpy(), "layers": runner.layers, "heads": runner.layout.num_kv_heads,
            "step": logits.numpy() if logits is not None else None}  # fmt: skip


def test_tp2_pp2_on_4_ranks_equals_single_device() -> None:
    """Rank 2s + t: tensor shard t of stage s; each rank caches 1 kv head of 1 layer."""
    model, ids = llama(), torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        want = model(ids).numpy()
        single = ModelRunner(model, block_size=4, num_blocks=8).execute(STEPS).numpy()
    results = launch(_tp_pp_rank, 4, model, ids)
    for rank, r in enumerate(results):
        assert np.abs(r["compiled"] - want).max() <= 1e-5 * np.abs(want).max()  # every rank returns the logits
        assert r["layers"] == [rank // 2] and r["heads"] == (1, 1)
        if rank >= 2:  # the last stage's shards hold the logits
            assert np.abs(r["step"] - single).max() <= 1e-5 * np.abs(single).max()
        else:
            assert r["step"] is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pipeline_parallel_size": 0}, "pipeline_parallel_size must be a positive int"),
        ({"pipeline_parallel_size": 2, "async_scheduling": True}, "async_scheduling feeds tokens on one device"),
    ],
)
def test_bad_engine_configs_raise_config_error(kwargs: dict, match: str) -> None:
    with pytest.raises(kiln.ConfigError, match=match):
        kiln.LLM(llama(), num_blocks=8, block_size=4, **kwargs)
