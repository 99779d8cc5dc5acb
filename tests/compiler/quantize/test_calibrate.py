"""Tests of ``compiler/quantize/calibrate.py``: the prepared graph, early stops, calibration samples."""

from __future__ import annotations

import pytest
import torch

import kiln
from kiln.errors import ConfigError
from kiln.ir import print_ir, verify
from kiln.passes.canonicalize import Canonicalize
from kiln.quantize import Calibration
from kiln.quantize.calibrate import calibrate, prepared, run_graph, samples_of
from kiln.quantize.observers import MinMaxObserver, StatsObserver


@pytest.fixture(scope="module")
def capture(tiny_llama):
    return kiln.capture(tiny_llama, (torch.randint(0, 512, (1, 8)),))


def _graph(capture):
    gm = capture.module()
    Canonicalize()(gm)
    return gm


def _linears(gm) -> list:
    return [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]


def test_prepared_graph_shows_observers_then_is_restored(capture, tokens) -> None:
    gm = _graph(capture)
    before = print_ir(gm)
    first, down = _linears(gm)[0], _linears(gm)[6]
    points = {first.args[0]: MinMaxObserver(), down.args[0]: StatsObserver({"absmax"})}
    users = {first.args[0]: [first], down.args[0]: [down]}
    with prepared(gm, points, users):
        ir = print_ir(gm)
        assert "module _kiln_observer_0(" in ir and "module _kiln_observer_1(" in ir
        assert f"aten.linear(%_kiln_observer_0, %{first.args[1].name})" in ir  # the linear reads the observed value
        verify(gm)
        samples = samples_of(Calibration(data=tokens, num_samples=3, seq_len=16), ["input_ids"])
        assert run_graph(gm, samples, progress=False) == 3
    assert print_ir(gm) == before and not hasattr(gm, "_kiln_observer_0")
    obs = points[first.args[0]]
    assert obs.batches == 3 and obs.lo < 0 < obs.hi
    assert points[down.args[0]].absmax.shape == (176,)


def test_calibration_stops_after_the_last_observer(capture, tokens) -> None:
    gm = _graph(capture)
    early, late = _linears(gm)[0], _linears(gm)[-1]  # q_proj of layer 0, lm_head
    samples = samples_of(Calibration(data=tokens, num_samples=2, seq_len=16), ["input_ids"])
    first, spy = StatsObserver({"absmax"}), MinMaxObserver()
    first.stop = True  # what calibrate() sets on the last observer it needs
    with prepared(gm, {early.args[0]: first, late.args[0]: spy}):
        run_graph(gm, samples, progress=False)
    assert first.batches == 2 and spy.batches == 0  # nothing after the stopping observer ran
    both = {early.args[0]: StatsObserver({"absmax"}), late.args[0]: StatsObserver({"absmax"})}
    assert calibrate(gm, both, Calibration(data=tokens, num_samples=2, seq_len=16, progress=False)) == 2
    assert all(o.batches == 2 and not o.stop for o in both.values())


def test_samples_of_every_data_form(tokens) -> None:
    cal = Calibration(data=tokens, num_samples=4, seq_len=100)
    windows = samples_of(cal, ["input_ids"])
    assert len(windows) == 4 and all(w["input_ids"].shape == (1, 100) for w in windows)
    assert torch.equal(windows[0]["input_ids"][0], tokens[:100]) and torch.equal(windows[-1]["input_ids"][0], tokens[-100:])
    rows = samples_of(Calibration(data=tokens[:300].reshape(3, 100), num_samples=2), ["input_ids"])
    assert [r["input_ids"].shape for r in rows] == [(1, 100), (1, 100)]
    listed = samples_of(Calibration(data=[tokens[:10], {"input_ids": tokens[None, :5]}]), ["input_ids"])
    assert [r["input_ids"].shape for r in listed] == [(1, 10), (1, 5)]
    with pytest.raises(ConfigError, match="give calibration samples as dicts"):
        samples_of(Calibration(data=tokens), ["input_ids", "position_ids"])
    with pytest.raises(ConfigError, match="lacks inputs"):
        samples_of(Calibration(data=[{"ids": tokens}]), ["input_ids"])
    with pytest.raises(ConfigError, match="not supported"):
        samples_of(Calibration(data=3.5), ["input_ids"])
    with pytest.raises(ConfigError, match="no calibration data"):
        samples_of(Calibration(), ["input_ids"])
