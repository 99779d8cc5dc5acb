"""Tests of ``compiler/quantize/observers.py``: min-max, percentile and MSE ranges; method statistics."""

from __future__ import annotations

import torch

from kiln.quantize import PerAxis, PerGroup, PerTensor, QuantSpec
from kiln.quantize.observers import (
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    RowSampler,
    StatsObserver,
    fake_quantize,
    make_observer,
    weight_qparams,
)

SPEC = QuantSpec(dtype="int8", granularity=PerTensor(), symmetric=False)


def outliers(n: int = 20000) -> torch.Tensor:
    x = torch.randn(n)
    x[:5] = torch.tensor([40.0, -35.0, 50.0, 45.0, -60.0])  # rare, huge
    return x


def _error(x: torch.Tensor, observer: MinMaxObserver, spec: QuantSpec) -> float:
    scale, zp = observer.qparams(spec)
    return (fake_quantize(x, scale, zp, spec) - x).pow(2).mean().item()


def test_minmax_tracks_the_range_over_batches() -> None:
    obs = MinMaxObserver()
    for x in outliers().chunk(4):
        assert obs(x) is x  # observers return their input
    assert (obs.lo, obs.hi, obs.batches) == (-60.0, 50.0, 4)
    scale, zp = obs.qparams(SPEC)
    torch.testing.assert_close(scale, torch.tensor(110.0 / 255))
    assert zp is not None and zp.dtype == torch.int8


def test_percentile_and_mse_clip_rare_outliers() -> None:
    x = outliers()
    errors = {}
    for name in ("minmax", "percentile", "mse"):
        spec = QuantSpec(dtype="int4", granularity=PerTensor(), observer=name, percentile=99.9)
        obs = make_observer(spec)
        assert type(obs) is {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}[name]
        for chunk in x.chunk(4):
            obs(chunk)
        lo, hi = obs.range(spec)
        if name == "percentile":
            assert hi < 5 and lo > -5  # the 99.9th percentiles of a standard normal
        if name == "mse":
            assert hi < 25 and lo > -30  # shrunk from [-60, 50]
        errors[name] = _error(x, obs, spec)
    assert errors["mse"] < errors["minmax"] and errors["percentile"] < errors["minmax"]


def test_mse_weight_ranges_lower_the_error() -> None:
    w = torch.randn(32, 64)
    w[:, 0] *= 12  # one outlier column
    for granularity in (PerAxis(0), PerGroup(16)):
        minmax = QuantSpec(dtype="int4", granularity=granularity)
        mse = QuantSpec(dtype="int4", granularity=granularity, observer="mse")
        err = [(fake_quantize(w, *weight_qparams(w, s), s) - w).pow(2).sum() for s in (minmax, mse)]
        assert err[1] < err[0]


def test_stats_observer_hessian_absmax_absmean_and_samples() -> None:
    obs = StatsObserver({"hessian", "absmax", "absmean", "range", "samples"}, max_tokens=50)
    batches = [torch.randn(1, 30, 8) for _ in range(3)]
    for b in batches:
        obs(b)
    x = torch.cat([b.reshape(-1, 8) for b in batches])  # (90, 8)
    torch.testing.assert_close(obs.hessian, (2 * x.T.double() @ x.double() / 90))
    torch.testing.assert_close(obs.absmax, x.abs().amax(0))
    torch.testing.assert_close(obs.absmean, x.abs().mean(0))
    torch.testing.assert_close(obs.lo, x.amin(0))
    samples = obs.samples
    assert samples.shape == (50, 8)
    assert all(any(torch.equal(s, r) for r in x) for s in samples)  # real rows, no duplicates invented
    assert len({tuple(s.tolist()) for s in samples}) == 50


def test_row_sampler_is_uniform_without_replacement() -> None:
    sampler = RowSampler(100, seed=0)
    for start in range(0, 1000, 100):
        sampler.add(torch.arange(start, start + 100, dtype=torch.float32)[:, None])
    kept = sampler.rows[:, 0]
    assert kept.unique().numel() == 100 and kept.mean().item() > 300  # not just the first batch
