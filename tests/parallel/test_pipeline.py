"""Pipeline parallelism on 2 Gloo ranks: PP = 2 equals one device (fp32), under GPipe, 1F1B and interleaved decode.

The graphs are compiled and split here; one launch of 2 ranks runs every case (kiln's
Llama, Hugging Face Llama and Qwen2 prefill micro-batches under both schedules, a
virtual-clock run, and interleaved greedy decoding over the paged KV cache), and the
tests compare what the last rank returned with the unsplit graph.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
from kiln_testing import hf_llama, hf_qwen2

import kiln
from kiln.generate import generate
from kiln.models.llama import LlamaConfig
from kiln.models.presets import from_config
from kiln.parallel.launch import launch
from kiln.passes.kv_cache import layout_of
from kiln.passes.split_pipeline_stages import split_pipeline_stages

LENGTHS = (5, 9, 4, 12)  # prompt lengths of the 4 prefill micro-batches
GROUPS = [[[5, 17, 3]], [[9, 2, 44, 7, 1], [60, 61]], [[100, 3, 3, 8]]]  # decode: 3 groups of prompts
NEW_TOKENS = 5


def _logits(out: object) -> np.ndarray:
    t = out if isinstance(out, torch.Tensor) else out.logits  # type: ignore[attr-defined]
    return t.detach().numpy()


def _rank(rank: int, payload: dict) -> dict:
    """One pipeline rank: every case of ``payload`` in turn."""
    from kiln.parallel.pipeline import PipelineExecutor, VirtualClock
    from kiln.parallel.pipeline_decode import generate_interleaved

    out: dict = {}
    for name, (plan, mbs) in payload["prefill"].items():
        for schedule in ("gpipe", "1f1b"):
            outs, stats = PipelineExecutor(plan).run(mbs, schedule)
            out[(name, schedule)] = (
                [_logits(o) for o in outs] if outs is not None else None,
                stats.peak_in_flight,
            )
    plan, mbs = payload["prefill"]["kiln"]
    clock = VirtualClock(lock_path=payload["lock"])
    outs, stats = PipelineExecutor(plan, clock=clock).run(mbs, "1f1b")
    out["clock"] = ([_logits(o) for o in outs] if outs is not None else None, stats.events)
    plan, layout, constants = payload["decode"]
    tokens, _ = generate_interleaved(
        PipelineExecutor(plan), layout, GROUPS, NEW_TOKENS, block_size=4, constants=constants
    )
    out["decode"] = tokens
    return out


def _llama() -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return from_config(cfg, seed=5)


@pytest.fixture(scope="module")
def run() -> dict:
    gen = torch.Generator().manual_seed(0)
    mbs = [{"input_ids": torch.randint(0, 128, (1, n), generator=gen), "position_ids": torch.arange(n)[None],
            "use_cache": False} for n in LENGTHS]  # fmt: skip
    example = {"input_ids": torch.randint(0, 128, (1, 8)), "position_ids": torch.arange(8)[None]}
    prefill, refs = {}, {}
    llama = _llama()
    for name, model in [("kiln", llama), ("hf_llama", hf_llama(4)), ("hf_qwen2", hf_qwen2(4))]:
        cm = kiln.compile(model, example)
        prefill[name] = (split_pipeline_stages(cm.graph_module, 2), mbs)
        refs[name] = [_logits(cm(input_ids=mb["input_ids"], position_ids=mb["position_ids"])) for mb in mbs]
    step = kiln.compile(llama, {"input_ids": example["input_ids"]}, config=kiln.CompileConfig(kv_cache=True))
    decode = (
        split_pipeline_stages(step.graph_module, 2),
        layout_of(step.graph_module),
        step.capture.constants,
    )
    want = [[generate(llama, torch.tensor([p]), NEW_TOKENS)[0].tolist() for p in g] for g in GROUPS]
    with tempfile.TemporaryDirectory() as tmp:
        lock = os.path.join(tmp, "device.lock")
        results = launch(_rank, 2, {"prefill": prefill, "decode": decode, "lock": lock})
    return {"ranks": results, "refs": refs, "decode_want": want}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("name", ["kiln", "hf_llama", "hf_qwen2"])
def test_pp2_equals_one_device(run: dict, name: str, schedule: str) -> None:
    first, last = run["ranks"]
    assert first[(name, schedule)][0] is None  # outputs arrive on the last stage only
    got = last[(name, schedule)][0]
    assert len(got) == len(LENGTHS)
    for g, want in zip(got, run["refs"][name], strict=True):
        assert g.shape == want.shape
        assert np.abs(g - want).max() <= 1e-5 * np.abs(want).max()


def test_1f1b_bounds_microbatches_in_flight(run: dict) -> None:
    first, last = run["ranks"]
    m = len(LENGTHS)
    assert (first[("kiln", "gpipe")][1], last[("kiln", "gpipe")][1]) == (m, m)
    assert (first[("kiln", "1f1b")][1], last[("kiln", "1f1b")][1]) == (2, 1)  # p - s


def test_virtual_clock_timeline_respects_dependencies(run: dict) -> None:
    first, last = run["ranks"]
    for g, want in zip(last["clock"][0], run["refs"]["kiln"], strict=True):
        assert np.abs(g - want).max() <= 1e-5 * np.abs(want).max()
    ev0 = {a: (s, e) for a, s, e in first["clock"][1]}
    ev1 = {a: (s, e) for a, s, e in last["clock"][1]}
    assert list(ev0) == list(ev1) == [f"F{i}" for i in range(len(LENGTHS))]
    for i in range(len(LENGTHS)):
        assert ev1[f"F{i}"][0] >= ev0[f"F{i}"][1]  # stage 1 starts micro-batch i after stage 0 finished it
    ends = [e for _, e in ev0.values()]
    assert all(
        b[0] >= a for a, b in zip(ends[:-1], list(ev0.values())[1:], strict=True)
    )  # a rank computes one thing at a time


def test_interleaved_decode_equals_one_device_greedy(run: dict) -> None:
    first, last = run["ranks"]
    assert first["decode"] is None
    assert last["decode"] == run["decode_want"]
