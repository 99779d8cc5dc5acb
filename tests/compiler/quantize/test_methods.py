"""Tests of ``compiler/quantize/methods.py``: GPTQ, AWQ and SmoothQuant against round-to-nearest."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.fx import Graph

from kiln.quantize import AWQ, GPTQ, RTN, PerAxis, PerGroup, PerToken, QuantConfig, QuantSpec, SmoothQuant
from kiln.quantize.methods import Group, Site, effective_weight, gptq_quantize, handler_for
from kiln.quantize.observers import StatsObserver, fake_quantize

W4 = QuantSpec(dtype="int4", granularity=PerGroup(16), symmetric=False)


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Rows whose channels are strongly correlated (a low-rank mix plus noise): where GPTQ pays off."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)
    return z @ torch.randn(8, k, generator=g) + 0.1 * torch.randn(n, k, generator=g)


def _group(ws: list[torch.Tensor], x: torch.Tensor, needs: frozenset[str], tokens: int = 1024) -> Group:
    graph = Graph()
    inp = graph.placeholder("x")
    sites = [Site(graph.placeholder(f"w{i}"), f"layer{i}", w, inp) for i, w in enumerate(ws)]
    stats = StatsObserver(needs, max_tokens=tokens)
    for chunk in x.chunk(4):
        stats(chunk)
    return Group(inp, sites, stats)


def _output_error(x: torch.Tensor, w: torch.Tensor, w_eff: torch.Tensor) -> float:
    return ((x @ w_eff.T - x @ w.T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize("method", [GPTQ(), GPTQ(mse=False), GPTQ(act_order=False, mse=False, block_size=16)], ids=repr)
@pytest.mark.parametrize("spec", [W4, QuantSpec(dtype="int4", granularity=PerAxis(0))], ids=["g16", "per-channel"])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(method: GPTQ, spec: QuantSpec) -> None:
    x, w = correlated_inputs(512, 64), torch.randn(32, 64)
    before = w.clone()
    config = QuantConfig(weights=spec, method=method)
    handler, needs = handler_for(config)
    plan = handler(_group([w], x, needs), config)
    qw = plan.weights[0]
    rtn = fake_quantize(w, *_rtn(w, spec), spec)
    gptq = effective_weight(qw, spec, None)
    assert _output_error(x, w, gptq) < 0.7 * _output_error(x, w, rtn)
    assert torch.equal(w, before) and qw.weight is not w  # the caller's weight is never written
    # the stored float weight quantizes back to GPTQ's own codes: the Q/DQ graph reproduces it
    torch.testing.assert_close(fake_quantize(qw.weight, qw.scale, qw.zero_point, spec), qw.weight)


def _rtn(w: torch.Tensor, spec: QuantSpec):
    plan = handler_for(QuantConfig(weights=spec))[0](_group([w], torch.randn(4, w.shape[1]), frozenset()),
                                                      QuantConfig(weights=spec))
    return plan.weights[0].scale, plan.weights[0].zero_point


def test_gptq_with_dead_input_channels() -> None:
    x = correlated_inputs(256, 32)
    x[:, 3] = 0  # a channel that never fires: its weights are zeroed, the Hessian stays invertible
    h = 2 * x.T.double() @ x.double() / x.shape[0]
    qw = gptq_quantize(torch.randn(16, 32), h, W4, GPTQ())
    assert torch.isfinite(qw.weight).all() and (qw.weight[:, 3] == 0).all()


def test_awq_protects_salient_channels() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 64, generator=g)
    x[:, :4] *= 25  # a few salient input channels, as in LLM activations
    ws = [torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g)]  # two linears sharing x
    config = QuantConfig(weights=W4, method=AWQ(grid=10))
    handler, needs = handler_for(config)
    plan = handler(_group(ws, x, needs, tokens=512), config)
    s = plan.input_scale
    assert s is not None and s.shape == (64,) and s[:4].mean() > s[4:].mean()  # salient channels scaled up
    for w, qw in zip(ws, plan.weights, strict=True):
        awq = effective_weight(qw, W4, s)
        rtn = fake_quantize(w, *_rtn(w, W4), W4)
        assert _output_error(x, w, awq) < 0.8 * _output_error(x, w, rtn)


def test_smoothquant_migrates_activation_outliers_for_w8a8() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, 5] *= 60  # one outlier channel ruins per-token activation scales
    w = torch.randn(32, 64, generator=g) * 0.05
    act = QuantSpec(dtype="int8", granularity=PerToken(), dynamic=True)
    config = QuantConfig.preset("w8a8")
    handler, needs = handler_for(config)
    assert config.method == SmoothQuant(alpha=0.5) and needs == {"absmax"}
    plan = handler(_group([w], x, needs), config)
    s = plan.input_scale
    assert s is not None and torch.argmax(s) == 5

    def w8a8_error(x_in: torch.Tensor, w_in: torch.Tensor) -> float:
        xq = fake_quantize(x_in, x_in.abs().amax(-1, keepdim=True) / 127, None, act)
        wq = fake_quantize(w_in, *_rtn(w_in, config.weights), config.weights)
        return ((xq @ wq.T - x @ w.T).norm() / (x @ w.T).norm()).item()

    assert w8a8_error(x / s, plan.weights[0].weight) < 0.5 * w8a8_error(x, w)


def test_every_method_has_a_handler() -> None:
    for method in (RTN(), GPTQ(), AWQ(), SmoothQuant()):
        cfg = QuantConfig.preset("w8a8") if isinstance(method, SmoothQuant) else QuantConfig(weights=W4)
        handler, needs = handler_for(dataclasses.replace(cfg, method=method))
        assert callable(handler) and (needs == frozenset()) == isinstance(method, RTN)
