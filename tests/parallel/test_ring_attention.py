"""Ring attention (context parallelism): the online-softmax merge, the rewrite, and CP = 2 on 2 Gloo ranks.

Everything is checked against ``kiln::attention`` (op level) or the unsplit model (model
level), fp32, on random data, with uneven shards (13 and 19 tokens over 2 ranks).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kiln_testing import hf_llama, hf_qwen2

import kiln
from kiln.models.llama import LlamaConfig
from kiln.models.presets import from_config
from kiln.parallel.launch import launch
from kiln.parallel.ring_attention import block_attention, merge_blocks, ring_attention, shard_indices
from kiln.parallel.ring_attention_pass import ContextParallelAttention, ContextParallelRunner

CP = kiln.CompileConfig(extra_passes=(ContextParallelAttention(),))


def qkv(tokens: int = 13) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return tuple(
        torch.randn(1, h, tokens, 8, generator=g) for h in (4, 2, 2)
    )  # GQA: 4 query heads, 2 kv heads


def llama() -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return from_config(cfg, seed=2)


def _rel(got: torch.Tensor | np.ndarray, want: torch.Tensor | np.ndarray) -> float:
    got, want = np.asarray(got), np.asarray(want)
    return float(np.abs(got - want).max() / np.abs(want).max())


# -- one process ----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_merged_blocks_equal_attention_in_any_order(causal: bool) -> None:
    q, k, v = qkv()
    pos = torch.arange(13)
    want = torch.ops.kiln.attention(q, k, v, None, causal, None)
    blocks = [torch.tensor([9, 10, 11, 12]), torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5, 6, 7, 8])]
    out = torch.zeros(1, 4, 13, 8)
    lse = torch.full((1, 4, 13), float("-inf"))
    for b in blocks:  # the first block is in the future of most queries: their rows stay -inf until later
        o, s = block_attention(q, k[:, :, b], v[:, :, b], pos, pos[b], causal, 8**-0.5)
        out, lse = merge_blocks(out, lse, o, s)
    assert torch.isfinite(out).all()
    assert _rel(out, want) <= 1e-6


def test_single_rank_ring_is_attention() -> None:
    q, k, v = qkv()
    got = ring_attention(q, k, v, torch.arange(13), True, None, group=None)
    assert _rel(got, torch.ops.kiln.attention(q, k, v, None, True, None)) <= 1e-6


def test_zigzag_shards_cover_the_sequence_and_balance_causal_work() -> None:
    for tokens, world in [(13, 2), (32, 4), (8, 4)]:
        shards = [shard_indices(tokens, r, world) for r in range(world)]
        assert sorted(torch.cat(shards).tolist()) == list(range(tokens))
    work = [int((shard_indices(32, r, 4) + 1).sum()) for r in range(4)]  # causal work ~ sum of (position + 1)
    assert max(work) == min(work)
    contiguous = [int((shard_indices(32, r, 4, zigzag=False) + 1).sum()) for r in range(4)]
    assert max(contiguous) > 3 * min(contiguous)


def test_rewrite_ir_and_position_binding() -> None:
    cm = kiln.compile(llama(), {"input_ids": torch.randint(0, 128, (1, 8)), "position_ids": torch.arange(8)[None]},
                      config=CP)  # fmt: skip
    assert cm.ir.count("= kiln.ring_attention(") == 2 and "kiln.attention(" not in cm.ir
    assert cm.stats["context-parallel-attention"]["positions_bound"] == 0
    hf = kiln.compile(hf_llama(2), {"input_ids": torch.randint(0, 128, (1, 8))}, config=CP)
    assert hf.stats["context-parallel-attention"] == pytest.approx(
        {
            "attention_ringed": 2,
            "positions_bound": 1,
            "seconds": hf.stats["context-parallel-attention"]["seconds"],
        }
    )
    assert "%position_ids: i64[1, T]" in hf.ir  # the runner feeds each rank's global positions


def test_masked_attention_is_not_rewritten() -> None:
    # Hugging Face builds a packed-sequence mask from position_ids: not provably causal, so no ring
    with pytest.raises(kiln.PassError, match="unmasked"):
        kiln.compile(hf_qwen2(1), {"input_ids": torch.randint(0, 128, (1, 8)), "position_ids": torch.arange(8)[None]},
                     config=CP)  # fmt: skip


# -- 2 ranks --------------------------------------------------------------------------------


def _rank(rank: int, payload: dict) -> dict:
    from kiln.parallel.ring_attention import gather_tokens, resolve_group

    group = resolve_group("")
    q, k, v = payload["qkv"]
    out = {}
    for zigzag in (False, True):
        idx = shard_indices(q.shape[2], rank, 2, zigzag=zigzag)
        for causal in (True, False):
            local = ring_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx], idx, causal, None, group)
            out[("op", zigzag, causal)] = gather_tokens(local, q.shape[2], 2, group, zigzag=zigzag).numpy()
        for name, (runner, inputs) in payload["models"].items():
            runner.zigzag = zigzag
            got = runner(inputs)
            out[(name, zigzag)] = (got if isinstance(got, torch.Tensor) else got.logits).numpy()
    return out


@pytest.fixture(scope="module")
def ranks() -> tuple[list[dict], dict]:
    q, k, v = qkv()
    refs = {("op", c): torch.ops.kiln.attention(q, k, v, None, c, None).numpy() for c in (True, False)}
    ids, example = torch.randint(0, 128, (1, 19)), {"input_ids": torch.randint(0, 128, (1, 8))}
    models = {}
    with torch.no_grad():
        m = llama()
        cm = kiln.compile(m, {**example, "position_ids": torch.arange(8)[None]}, config=CP)
        models["kiln"] = (
            ContextParallelRunner(cm.graph_module),
            {"input_ids": ids, "position_ids": torch.arange(19)[None]},
        )
        refs["kiln"] = m(ids, torch.arange(19)[None]).numpy()
        for name, make in [("hf_llama", hf_llama), ("hf_qwen2", hf_qwen2)]:
            hf = make(2)
            models[name] = (
                ContextParallelRunner(kiln.compile(hf, example, config=CP).graph_module),
                {"input_ids": ids},
            )
            refs[name] = hf(input_ids=ids).logits.numpy()
    return launch(_rank, 2, {"qkv": (q, k, v), "models": models}), refs


@pytest.mark.parametrize("zigzag", [False, True], ids=["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cp2_ring_attention_equals_attention(
    ranks: tuple[list[dict], dict], zigzag: bool, causal: bool
) -> None:
    results, refs = ranks
    for r in results:  # every rank gathers the whole sequence
        assert _rel(r[("op", zigzag, causal)], refs[("op", causal)]) <= 1e-5


@pytest.mark.parametrize("zigzag", [False, True], ids=["contiguous", "zigzag"])
@pytest.mark.parametrize("name", ["kiln", "hf_llama", "hf_qwen2"])
def test_cp2_model_equals_one_device(ranks: tuple[list[dict], dict], name: str, zigzag: bool) -> None:
    results, refs = ranks
    for r in results:
        assert r[(name, zigzag)].shape == refs[name].shape
        assert _rel(r[(name, zigzag)], refs[name]) <= 1e-5
