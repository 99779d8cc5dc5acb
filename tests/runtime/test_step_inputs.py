"""The launch-ready step graph (attention told the longest query) and one-copy step inputs."""

import numpy as np
import pytest
import torch
from kiln_testing import hf_llama

import kiln
from kiln.models import from_preset
from kiln.runtime.model_runner import ModelRunner, SequenceStep
from kiln.runtime.step_inputs import MAX_QUERY_LEN, StagingBuffer, specialize_attention, stage

MODELS = {"kiln-llama": lambda: from_preset("llama-tiny").eval(), "hf-llama": lambda: hf_llama()}


def test_staging_packs_mixed_dtypes_into_aligned_views() -> None:
    arrays = {"a": np.arange(3, dtype=np.int64), "b": np.array([[7, 8, 9]], dtype=np.int32),
              "c": np.array([-1, 2**40], dtype=np.int64)}
    out = stage(arrays, torch.device("cpu"))
    for k, a in arrays.items():
        assert out[k].dtype == {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}[a.dtype]
        assert out[k].tolist() == a.tolist()
    buf = StagingBuffer({"x": (torch.int32, (3,)), "y": (torch.int64, (2, 2))}, torch.device("cpu"))
    assert buf.offsets == {"x": 0, "y": 16}  # int32 x3 = 12 bytes, padded to 16
    buf.host["y"][:] = [[1, 2], [3, 2**35]]
    buf.host["x"][:] = [4, 5, 6]
    assert buf.device_views["y"].tolist() == [[1, 2], [3, 2**35]] and buf.device_views["x"].tolist() == [4, 5, 6]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_specialized_step_graph_matches_the_compiled_one(name: str) -> None:
    model = MODELS[name]()
    runner = ModelRunner(model, num_blocks=16, block_size=4)
    assert runner.input_names[-1] == MAX_QUERY_LEN and runner.input_names[:-1] == runner.layout.input_names
    code = runner.step_gm.code
    assert "kiln_runtime.paged_attention" in code and "kiln.paged_attention" not in code
    assert "kiln.paged_attention" in runner.gm.code  # the compiled graph is left as it was
    for c in runner.caches:
        c.normal_()
    steps = [SequenceStep([3, 4, 5], 2, [1, 2]), SequenceStep([9], 6, [7, 0])]  # a chunk and a decode
    inputs = runner.build_inputs(steps)
    before = [c.clone() for c in runner.caches]
    with torch.no_grad():
        want = runner.gm(*inputs[:-1])[0]
        after = [c.clone() for c in runner.caches]
        for c, b in zip(runner.caches, before, strict=True):
            c.copy_(b)
        got = runner.step_gm(*inputs)[0]
    assert inputs[-1] == 3  # the longest query
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for c, a in zip(runner.caches, after, strict=True):
        assert torch.equal(c, a)


def test_specialize_attention_refuses_a_graph_without_paged_attention() -> None:
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(kiln.ConfigError, match="no kiln::paged_attention"):
        specialize_attention(gm)
