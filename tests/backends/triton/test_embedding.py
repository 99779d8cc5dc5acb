"""The vocabulary-parallel lookup kernel (``kiln.backends.triton.embedding``) against ``kiln::vocab_embedding``'s
reference, interpreted on the CPU (``conftest.py``): ids inside and outside the rank's rows, rows wider than
one program, int32 and int64 ids, and the tensor-parallel pass emitting the op."""

from __future__ import annotations

import pytest
import torch

from kiln.backends.triton import embedding
from kiln.backends.triton.embedding import vocab_embedding
from kiln.parallel.tp_embedding import vocab_embedding_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("block", [32, 1024])
def test_rows_inside_and_zeros_outside_equal_the_reference(
    ids_dtype: torch.dtype, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedding, "BLOCK_COLS", block)  # 32: a 70-wide row takes three programs
    g = torch.Generator().manual_seed(block)
    weight = torch.randn(10, 70, generator=g).to(DEVICE, torch.bfloat16)  # rows 12..21 of a 40-token vocabulary
    ids = torch.randint(0, 40, (2, 9), generator=g)
    ids[0, :3] = torch.tensor([11, 12, 21])  # the range's edges, and one row past it
    ids[0, 3] = 22
    ids = ids.to(DEVICE, ids_dtype)
    got, want = vocab_embedding(weight, ids, 12), vocab_embedding_reference(weight, ids, 12)
    assert got.shape == (2, 9, 70) and got.dtype == torch.bfloat16
    assert torch.equal(got, want)  # a copy: bit for bit
    inside = (ids >= 12) & (ids < 22)
    assert bool(inside.any()) and bool((~inside).any()) and bool(got[inside].abs().sum() > 0)
    assert not torch.equal(vocab_embedding(weight, ids, 13), want)  # the start is honoured


def test_refusals() -> None:
    w = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="int32 / int64"):
        vocab_embedding(w, torch.zeros(3, device=DEVICE), 0)
    with pytest.raises(ValueError, match="2-D"):
        vocab_embedding(w[None], torch.zeros(3, dtype=torch.long, device=DEVICE), 0)


def test_the_tensor_parallel_pass_emits_one_lookup_per_embedding() -> None:
    # the shard's embedding is kiln::vocab_embedding into its rows (no compare / masked-fill chain) before the
    # all-reduce, and it equals the unsharded embedding's rows of that range
    import dataclasses

    import kiln
    from kiln.models.presets import from_config, get_preset
    from kiln.parallel.tp_shards import compile_shards

    config = dataclasses.replace(get_preset("llama-tiny"), num_hidden_layers=1)
    model = from_config(config, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    cap = kiln.capture(model, {"input_ids": ids})
    shards = compile_shards(cap, config=kiln.CompileConfig(parallel=kiln.ParallelConfig(tensor_parallel_size=2)))
    for shard in shards:
        targets = [n.target for n in shard.graph_module.graph.nodes if n.op == "call_function"]
        assert targets.count(torch.ops.kiln.vocab_embedding.default) == 1
        assert torch.ops.aten.embedding.default not in targets
        assert torch.ops.aten.masked_fill.Scalar not in targets
