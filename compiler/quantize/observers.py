"""Ranges and scales: from tensors (weights) or from calibration (observers) to ``(scale, zero_point)``.

How a range becomes a scale (integer formats include 0 in the range, so zero is exact)::

    symmetric:  scale = max(|lo|, |hi|) / qmax                       zero point: none
    asymmetric: scale = (hi - lo) / (qmax - qmin), zp = qmin - round(lo / scale)
    fp8 e4m3:   scale = max(|lo|, |hi|) / 448                         zero point: none

How a range is chosen (``QuantSpec.observer``), after PyTorch's ``torch.ao`` observers:

- ``minmax``: the observed minimum and maximum.
- ``percentile``: the ``percentile``-th and ``(100 - percentile)``-th percentiles of the values
  (clips rare outliers; Wu et al., "Integer Quantization for Deep Learning Inference", 2020).
- ``mse``: the min-max range shrunk by the factor in ``[0.3, 1]`` that minimizes the squared
  quantization error (a grid search per quantization group, as in Banner et al. 2019's analysis).

Observers are ``nn.Module`` s returning their input unchanged, so the prepared graph runs them
as ``call_module`` nodes (see :mod:`kiln.quantize.calibrate`). :class:`StatsObserver` records
what the PTQ methods need: per-channel ``max|x|`` and ``mean|x|``, per-channel ranges, the
Hessian ``Σ xᵀx`` (GPTQ) and a uniform sample of input rows (AWQ's searches, reports).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from kiln.quantize.config import PerAxis, PerGroup, PerTensor, PerToken, QuantSpec, scale_shape
from kiln.quantize.ops import dequantize_reference, quantize_reference

_EPS = 1e-8
#: Shrink factors the MSE search tries (1 = min-max).
MSE_GRID = torch.linspace(1.0, 0.3, 36)


def to_rows(x: Tensor, granularity: object) -> tuple[Tensor, tuple[int, ...]]:
    """``x`` as rows ``(G, n)``, one row per quantization group, and the scale shape to restore."""
    shape = scale_shape(tuple(x.shape), granularity)  # type: ignore[arg-type]
    if isinstance(granularity, PerTensor):
        return x.reshape(1, -1), shape
    if isinstance(granularity, PerAxis):
        return x.movedim(granularity.axis, 0).reshape(x.shape[granularity.axis], -1), shape
    if isinstance(granularity, PerGroup):
        return x.reshape(-1, granularity.group_size), shape
    if isinstance(granularity, PerToken):
        return x.reshape(-1, x.shape[-1]), shape
    raise TypeError(f"unknown granularity {granularity!r}")


def qparams(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    """``(scale, zero_point)`` of ranges ``[lo, hi]`` (any shape; results have that shape)."""
    lo, hi = lo.float().clamp(max=0.0), hi.float().clamp(min=0.0)
    if spec.symmetric or spec.format.is_float:
        scale = torch.maximum(-lo, hi).clamp(min=_EPS) / spec.qmax
        return scale, None
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp(min=_EPS)
    zp = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
    return scale, zp.to(spec.storage)


def fake_quantize_rows(rows: Tensor, scale: Tensor, zp: Tensor | None, spec: QuantSpec) -> Tensor:
    """``dequantize(quantize(rows))`` with one scale per row (``scale`` (G,))."""
    q = quantize_reference(rows, scale, zp, spec.qmin, spec.qmax, spec.storage, axis=0)
    return dequantize_reference(q, scale, zp, axis=0, out_dtype=torch.float32)


def row_range(rows: Tensor, spec: QuantSpec, *, observer: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-row ``(lo, hi)`` of ``rows (G, n)`` by ``spec.observer`` (or ``observer``)."""
    rows = rows.float()
    how = observer or spec.observer
    if how == "percentile":
        p = spec.percentile / 100.0
        sample = rows if rows.shape[1] <= 1 << 16 else rows[:, torch.randperm(rows.shape[1])[: 1 << 16]]
        return torch.quantile(sample, 1.0 - p, dim=1), torch.quantile(sample, p, dim=1)
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    if how == "mse":
        return mse_range(rows, lo, hi, spec)
    return lo, hi


def mse_range(rows: Tensor, lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """The shrink of ``[lo, hi]`` per row minimizing ``Σ (x - fq(x))²`` over :data:`MSE_GRID`."""
    best = torch.full_like(lo, math.inf)
    best_lo, best_hi = lo.clone(), hi.clone()
    for r in MSE_GRID.tolist():
        s, z = qparams(lo * r, hi * r, spec)
        err = (fake_quantize_rows(rows, s, z, spec) - rows).pow(2).sum(dim=1)  # (G,)
        better = err < best
        best = torch.where(better, err, best)
        best_lo, best_hi = torch.where(better, lo * r, best_lo), torch.where(better, hi * r, best_hi)
    return best_lo, best_hi


def weight_qparams(w: Tensor, spec: QuantSpec, *, clip: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Scale and zero point of weight ``w`` at ``spec.granularity`` (shapes per the config table).

    ``clip`` (shaped like the scale) multiplies the observed range (AWQ's clipping search).
    """
    rows, shape = to_rows(w.detach(), spec.granularity)
    lo, hi = row_range(rows, spec)
    if clip is not None:
        lo, hi = lo * clip.reshape(-1), hi * clip.reshape(-1)
    scale, zp = qparams(lo, hi, spec)
    return scale.reshape(shape), (zp.reshape(shape) if zp is not None else None)


def qdq_args(spec: QuantSpec, shape: tuple[int, ...]) -> dict[str, int | None]:
    """The ``axis`` / ``group_size`` keyword arguments of kiln::quantize for ``spec`` on a tensor of ``shape``."""
    g = spec.granularity
    if isinstance(g, PerAxis):
        return {"axis": g.axis % len(shape)}
    if isinstance(g, PerGroup):
        return {"group_size": g.group_size}
    return {}


def fake_quantize(x: Tensor, scale: Tensor, zp: Tensor | None, spec: QuantSpec) -> Tensor:
    """``dequantize(quantize(x))`` at ``spec``'s granularity, in ``x``'s dtype."""
    kw = qdq_args(spec, tuple(x.shape))
    q = quantize_reference(x, scale, zp, spec.qmin, spec.qmax, spec.storage, **kw)
    return dequantize_reference(q, scale, zp, out_dtype=x.dtype, **kw)


# --------------------------------------------------------------------------------------
# Observers: nn.Modules the prepared graph calls; each returns its input unchanged.
# --------------------------------------------------------------------------------------


class StopGraph(Exception):  # noqa: N818 - a signal, not an error
    """Raised by an observer marked ``stop`` once it has observed: the rest of the graph need not run."""


class Observer(nn.Module):
    """Base class: ``forward(x)`` records ``x`` and returns it (or, marked ``stop``, ends the run)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0
        self.stop = False  # raise StopGraph after observing (set on the last observer a run needs)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.observe(x.detach())
        self.batches += 1
        if self.stop:
            raise StopGraph
        return x

    def observe(self, x: Tensor) -> None:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running minimum and maximum of everything seen (per tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.lo, self.hi = math.inf, -math.inf

    def observe(self, x: Tensor) -> None:
        self.lo = min(self.lo, x.min().item())
        self.hi = max(self.hi, x.max().item())

    def range(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        return torch.tensor(self.lo), torch.tensor(self.hi)

    def qparams(self, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
        """Per-tensor ``(scale, zero_point)`` for ``spec`` from what was observed."""
        if self.batches == 0:
            raise RuntimeError("observer saw no data: calibration did not reach this value")
        lo, hi = self.range(spec)
        return qparams(lo, hi, spec)


class _SampledObserver(MinMaxObserver):
    """Keeps the exact range plus a uniform random sample of the values (at most ``max_values``)."""

    def __init__(self, max_values: int = 1 << 20, seed: int = 0) -> None:
        super().__init__()
        self.sampler = RowSampler(max_values, seed)

    def observe(self, x: Tensor) -> None:
        super().observe(x)
        self.sampler.add(x.reshape(-1, 1).float())

    @property
    def values(self) -> Tensor:
        return self.sampler.rows.reshape(1, -1)


class PercentileObserver(_SampledObserver):
    """Range = the ``spec.percentile`` percentiles of a uniform sample of the values."""

    def range(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        lo, hi = row_range(self.values, spec, observer="percentile")
        return lo[0], hi[0]


class MSEObserver(_SampledObserver):
    """Range = the min-max range shrunk to minimize the sample's squared quantization error."""

    def range(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        lo, hi = mse_range(self.values, torch.tensor([self.lo]), torch.tensor([self.hi]), spec)
        return lo[0], hi[0]


OBSERVER_TYPES: dict[str, type[MinMaxObserver]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(spec: QuantSpec) -> MinMaxObserver:
    """The activation observer ``spec.observer`` names."""
    return OBSERVER_TYPES[spec.observer]()


class RowSampler:
    """A uniform sample without replacement of at most ``capacity`` rows (random keys, keep the smallest)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: Tensor = torch.empty(0)
        self.keys: Tensor = torch.empty(0)

    def add(self, rows: Tensor) -> None:
        keys = torch.rand(rows.shape[0], generator=self.gen)
        if self.rows.numel() == 0:
            self.rows, self.keys = rows[:0].clone(), keys[:0]
        rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if rows.shape[0] > self.capacity:
            keep = torch.topk(keys, self.capacity, largest=False).indices
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys


class StatsObserver(Observer):
    """Per-channel statistics of a linear input ``x (..., K)`` for the PTQ methods.

    ``needs`` picks what is kept: ``absmax`` / ``absmean`` / ``range`` (per channel, (K,)),
    ``hessian`` (``Σ xᵀx`` in float64, (K, K), and the token count), ``samples`` (a uniform
    sample of at most ``max_tokens`` rows).
    """

    def __init__(self, needs: Iterable[str], max_tokens: int = 1024, seed: int = 0) -> None:
        super().__init__()
        self.needs = frozenset(needs)
        self.tokens = 0
        self.absmax: Tensor | None = None
        self.abssum: Tensor | None = None
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None
        self.xtx: Tensor | None = None
        self.sampler = RowSampler(max_tokens, seed)

    def observe(self, x: Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()  # (n, K)
        self.tokens += rows.shape[0]
        a = rows.abs()
        if "absmax" in self.needs:
            m = a.amax(dim=0)
            self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if "absmean" in self.needs:
            s = a.sum(dim=0, dtype=torch.float64)
            self.abssum = s if self.abssum is None else self.abssum + s
        if "range" in self.needs:
            lo, hi = rows.amin(dim=0), rows.amax(dim=0)
            self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
            self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if "hessian" in self.needs:
            xtx = (rows.T @ rows).double()  # per batch in fp32, summed in fp64
            self.xtx = xtx if self.xtx is None else self.xtx + xtx
        if "samples" in self.needs:
            self.sampler.add(rows)

    @property
    def absmean(self) -> Tensor:
        assert self.abssum is not None, "absmean was not recorded"
        return (self.abssum / max(self.tokens, 1)).float()

    @property
    def hessian(self) -> Tensor:
        """GPTQ's ``H = 2 XᵀX / n`` (float64)."""
        assert self.xtx is not None, "the Hessian was not recorded"
        return 2.0 * self.xtx / max(self.tokens, 1)

    @property
    def samples(self) -> Tensor:
        return self.sampler.rows


__all__ = [
    "MSE_GRID",
    "MSEObserver",
    "MinMaxObserver",
    "OBSERVER_TYPES",
    "Observer",
    "PercentileObserver",
    "RowSampler",
    "StatsObserver",
    "StopGraph",
    "fake_quantize",
    "fake_quantize_rows",
    "make_observer",
    "mse_range",
    "qdq_args",
    "qparams",
    "row_range",
    "to_rows",
    "weight_qparams",
]
