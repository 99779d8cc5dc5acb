"""Post-training quantization methods: each turns a group of linears into quantized weights.

A *group* is the set of linears reading one input value (a block's q/k/v projections, the
MLP's gate/up projections, each o/down projection alone). A method's handler, looked up by
the type of ``QuantConfig.method`` (torchao's habit), says which calibration statistics it
needs and returns a :class:`GroupPlan`: per linear, a **new** float weight whose
round-to-nearest codes (``kiln::quantize`` with the plan's scale and zero point) are the
method's codes, plus an optional per-input-channel scale ``s`` (the group's input is divided
by ``s``, the weights multiplied by it). The caller's parameters are never written.

- Round to nearest (RTN): scale and zero point from the weights' observer range, then round.
- GPTQ — Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers" (ICLR 2023): quantize one column at a time and spread its
  rounding error over the columns not yet quantized through the inverse Hessian
  ``H = 2XᵀX`` of the layer's inputs (Cholesky form, lazy block updates of ``block_size``
  columns, damping ``damp · mean(diag H)``, act-order with static groups by default). Group
  ranges are searched for the least squared rounding error by default (``GPTQ(mse=True)``,
  the reference quantizer's ``mse`` option); ``mse=False`` follows ``QuantSpec.observer``.
- AWQ — Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
  Acceleration" (MLSys 2024): scale input channel ``j`` by ``s_j = mean|x_j|^α`` (with AutoAWQ's
  duo scaling, divided by ``mean|ŵ_j|^(1-α)``, ``ŵ`` the weights relative to their group's
  max) with ``α`` searched on a grid to minimize the group's output error, then search a
  per-group clipping of the weight range that minimizes each layer's output error.
- SmoothQuant — Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization
  for Large Language Models" (ICML 2023): ``s_j = max|x_j|^α / max|w_j|^(1-α)`` (α = 0.5)
  moves activation outliers into the weights so that W8A8 per-token quantization loses little.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from torch.fx import Node

from kiln.quantize.config import (
    AWQ,
    GPTQ,
    RTN,
    PerAxis,
    PerGroup,
    PerTensor,
    QuantConfig,
    QuantSpec,
    SmoothQuant,
)
from kiln.quantize.observers import StatsObserver, fake_quantize, qparams, weight_qparams


@dataclass
class Site:
    """One linear to quantize: ``y = linear(x, W, b)``."""

    node: Node  # the aten.linear node
    path: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    weight: Tensor  # W (N, K) as the model holds it (read only)
    weight_node: Node  # the node the linear reads W from (get_attr, or permute of one)


@dataclass
class Group:
    """Linears reading the same input value."""

    input: Node  # x, shared by every site
    sites: list[Site]
    stats: StatsObserver | None = None  # calibration statistics of x, when the method needs them


@dataclass
class QuantizedWeight:
    """What the graph quantizes: ``quantize(weight, scale, zero_point)`` gives the codes."""

    weight: Tensor  # float (N, K); a new tensor unless it is the model's own W (RTN)
    scale: Tensor  # shapes per kiln.quantize.config's table
    zero_point: Tensor | None


@dataclass
class GroupPlan:
    """A method's result for one group."""

    weights: list[QuantizedWeight | None]  # one per site (None: weights stay in full precision)
    input_scale: Tensor | None = None  # s (K,): the group reads x / s; weights were multiplied by s
    info: dict[str, float] = field(default_factory=dict)  # e.g. {"alpha": 0.45}


Handler = Callable[[Group, QuantConfig], GroupPlan]
#: What each method needs from calibration (StatsObserver keys).
NEEDS: dict[type, frozenset[str]] = {}
#: method config type -> handler.
HANDLERS: dict[type, Handler] = {}


def register(method: type, needs: frozenset[str] = frozenset()) -> Callable[[Handler], Handler]:
    """Make ``fn`` the handler of method config type ``method``."""

    def wrap(fn: Handler) -> Handler:
        HANDLERS[method] = fn
        NEEDS[method] = needs
        return fn

    return wrap


def handler_for(config: QuantConfig) -> tuple[Handler, frozenset[str]]:
    """The handler of ``config.method`` and the statistics it needs."""
    kind = type(config.method)
    return HANDLERS[kind], NEEDS[kind]


def _rtn(w: Tensor, spec: QuantSpec) -> QuantizedWeight:
    scale, zp = weight_qparams(w, spec)
    return QuantizedWeight(w, scale, zp)


# --------------------------------------------------------------------------------------
# Round to nearest
# --------------------------------------------------------------------------------------


@register(RTN)
def round_to_nearest(group: Group, config: QuantConfig) -> GroupPlan:
    """Each weight scaled by its own range (``QuantSpec.observer``) and rounded."""
    spec = config.weights
    return GroupPlan([_rtn(s.weight, spec) if spec else None for s in group.sites])


# --------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------


def _fq_column(w: Tensor, scale: Tensor, zp: Tensor | None, spec: QuantSpec) -> Tensor:
    """Round one column ``w (N,)`` with per-row ``scale`` / ``zp`` (N,) or scalar; dequantized."""
    q = torch.round(w / scale)
    if zp is not None:
        q = q + zp
    q = q.clamp(spec.qmin, spec.qmax)
    return (q - zp if zp is not None else q) * scale


@dataclass
class GPTQFactors:
    """What GPTQ derives from one input Hessian, shared by every linear reading that input."""

    perm: Tensor  # column order (act-order: by decreasing diag H; else identity)
    hinv: Tensor  # upper Cholesky factor of the damped inverse Hessian, permuted (K, K), fp32
    dead: Tensor  # input channels that never fired (diag H = 0): their weights are zeroed


def gptq_factors(hessian: Tensor, method: GPTQ) -> GPTQFactors:
    """Permutation, dead channels and ``chol(H⁻¹)ᵀ`` of a Hessian (K, K), with damping."""
    H = hessian.double().clone()
    k = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(H), descending=True) if method.act_order else torch.arange(k)
    H = H[perm][:, perm]
    H += method.damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    hinv = torch.linalg.cholesky(torch.cholesky_solve(torch.eye(k, dtype=H.dtype), L), upper=True)
    return GPTQFactors(perm, hinv.float(), dead)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run small sequential tensor ops on one thread (thread hand-offs dominate them otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def gptq_quantize(
    w: Tensor, hessian: Tensor | None, spec: QuantSpec, method: GPTQ, factors: GPTQFactors | None = None
) -> QuantizedWeight:
    """GPTQ on one weight ``w (N, K)`` with input Hessian ``(K, K)``; returns dequantized values + params."""
    f = factors if factors is not None else gptq_factors(hessian, method)  # type: ignore[arg-type]
    if method.mse:
        spec = replace(spec, observer="mse")
    W = w.detach().float().clone()  # (N, K), our copy
    W[:, f.dead] = 0.0
    n, k = W.shape
    group = spec.granularity.group_size if isinstance(spec.granularity, PerGroup) else None
    if group is None or method.act_order:  # parameters fixed up front (static groups under act-order)
        scale, zp = weight_qparams(W, spec)
    else:  # filled as each group is reached, from the error-updated weights
        scale, zp = torch.empty(n, k // group), (torch.empty(n, k // group) if not spec.symmetric else None)
    order = f.perm.tolist()
    W, hinv = W[:, f.perm], f.hinv
    Q = torch.zeros_like(W)
    with _one_thread():
        _gptq_columns(W, Q, hinv, order, scale, zp, group, spec, method)
    Q = Q[:, torch.argsort(f.perm)]
    if zp is not None:
        zp = zp.to(spec.storage)
    return QuantizedWeight(Q, scale, zp)


def _gptq_columns(
    W: Tensor, Q: Tensor, hinv: Tensor, order: list[int], scale: Tensor, zp: Tensor | None, group: int | None,
    spec: QuantSpec, method: GPTQ,
) -> None:
    """GPTQ's loop: round column by column, push the error onto later columns (fills ``Q``, edits ``W``)."""
    n, k = W.shape
    for i1 in range(0, k, method.block_size):
        i2 = min(i1 + method.block_size, k)
        W1, Q1, E1 = W[:, i1:i2].clone(), torch.zeros(n, i2 - i1), torch.zeros(n, i2 - i1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            if group is not None and not method.act_order and col % group == 0:
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group]  # the group's current values
                s_g, z_g = weight_qparams(ahead, _per_row(spec))
                scale[:, col // group] = s_g
                if zp is not None and z_g is not None:
                    zp[:, col // group] = z_g.float()
            if group is not None:
                s_c = scale[:, col // group]
                z_c = zp[:, col // group].float() if zp is not None else None
            else:
                s_c, z_c = scale.float(), (zp.float() if zp is not None else None)
            w_i = W1[:, i]
            q = _fq_column(w_i, s_c, z_c, spec)
            Q1[:, i] = q
            err = (w_i - q) / h1[i, i]
            W1[:, i:] -= err[:, None] * h1[i, i:][None, :]  # (a broadcast: addr_ on this view is slow)
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ hinv[i1:i2, i2:]


def _per_row(spec: QuantSpec) -> QuantSpec:
    return replace(spec, granularity=PerAxis(0))


@register(GPTQ, frozenset({"hessian"}))
def gptq(group: Group, config: QuantConfig) -> GroupPlan:
    """GPTQ per linear, with the Hessian of the group's shared input."""
    assert group.stats is not None and config.weights is not None
    factors = gptq_factors(group.stats.hessian, config.method)  # type: ignore[arg-type]
    return GroupPlan([gptq_quantize(s.weight, None, config.weights, config.method, factors)  # type: ignore[arg-type]
                      for s in group.sites])


# --------------------------------------------------------------------------------------
# AWQ
# --------------------------------------------------------------------------------------


def _fake_quant_weight(w: Tensor, spec: QuantSpec) -> Tensor:
    scale, zp = weight_qparams(w, spec)
    return fake_quantize(w, scale, zp, spec)


def awq_clip(w: Tensor, x: Tensor, spec: QuantSpec, method: AWQ) -> Tensor | None:
    """Per-group range shrink (shaped like the scale) minimizing ``|x wᵀ - x q(w)ᵀ|²`` per group."""
    g = spec.granularity
    if isinstance(g, PerTensor):
        return None
    n_out, k = w.shape
    size = g.group_size if isinstance(g, PerGroup) else k
    x = x[: min(x.shape[0], 512)].float()  # (n, K)
    wg = w.float().reshape(n_out, k // size, size)  # (N, G, g)
    xg = x.reshape(x.shape[0], k // size, size)  # (n, G, g)
    ref = torch.einsum("ngc,mgc->nmg", xg, wg)  # (n, N, G) per-group partial outputs
    lo, hi = wg.amin(-1), wg.amax(-1)  # (N, G)
    best = torch.full_like(lo, math.inf)
    ratio = torch.ones_like(lo)
    row_spec = _per_row(spec)
    for i in range(int(method.max_shrink * method.grid)):
        r = 1.0 - i / method.grid
        scale, zp = qparams(lo * r, hi * r, spec)  # (N, G)
        rows = wg.reshape(-1, size)
        q = fake_quantize(rows, scale.reshape(-1), zp.reshape(-1) if zp is not None else None, row_spec)
        out = torch.einsum("ngc,mgc->nmg", xg, q.reshape(wg.shape))
        err = (out - ref).pow(2).mean(0)  # (N, G)
        better = err < best
        best, ratio = torch.where(better, err, best), torch.where(better, torch.full_like(ratio, r), ratio)
    return ratio.reshape(n_out) if isinstance(g, PerAxis) else ratio


def _normalized_weight_mean(w: Tensor, spec: QuantSpec) -> Tensor:
    """Per input channel, the mean over rows of ``|w|`` relative to its quantization group's max (K,)."""
    g = spec.granularity
    size = g.group_size if isinstance(g, PerGroup) else w.shape[1]
    rows = w.abs().reshape(-1, size)
    return (rows / (rows.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape).mean(dim=0)


@register(AWQ, frozenset({"absmean", "samples"}))
def awq(group: Group, config: QuantConfig) -> GroupPlan:
    """AWQ: search ``s = mean|x|^α`` (α on a grid) for the group, then per-layer clipping."""
    assert group.stats is not None and config.weights is not None
    spec, method = config.weights, config.method
    assert isinstance(method, AWQ)
    x = group.stats.samples.float()  # (n, K)
    x_mean = group.stats.absmean  # (K,)
    weights = [s.weight.detach().float() for s in group.sites]
    ref = [x @ w.T for w in weights]
    w_mean = _normalized_weight_mean(torch.cat(weights), spec) if method.duo_scaling else None
    best, best_s, best_alpha = math.inf, torch.ones_like(x_mean), 0.0
    for i in range(method.grid):
        alpha = i / method.grid
        s = x_mean.pow(alpha)
        if w_mean is not None:
            s = s / (w_mean.pow(1.0 - alpha) + 1e-4)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(((x @ (_fake_quant_weight(w * s, spec) / s).T) - r).pow(2).mean().item() for w, r in zip(weights, ref, strict=True))
        if err < best:
            best, best_s, best_alpha = err, s, alpha
    plans: list[QuantizedWeight | None] = []
    for w in weights:
        ws = w * best_s  # a new tensor
        clip = awq_clip(ws, x / best_s, spec, method) if method.clip else None
        scale, zp = weight_qparams(ws, spec, clip=clip)
        plans.append(QuantizedWeight(ws, scale, zp))
    return GroupPlan(plans, input_scale=best_s, info={"alpha": best_alpha})


# --------------------------------------------------------------------------------------
# SmoothQuant
# --------------------------------------------------------------------------------------


@register(SmoothQuant, frozenset({"absmax"}))
def smoothquant(group: Group, config: QuantConfig) -> GroupPlan:
    """SmoothQuant: ``s_j = max|x_j|^α / max|w_j|^(1-α)`` over the group, weights ``W·s`` rounded."""
    assert group.stats is not None and group.stats.absmax is not None and config.weights is not None
    alpha = config.method.alpha  # type: ignore[union-attr]
    weights = [s.weight.detach().float() for s in group.sites]
    w_max = torch.cat(weights).abs().amax(dim=0).clamp(min=1e-5)  # (K,)
    a_max = group.stats.absmax.float().clamp(min=1e-5)  # (K,)
    s = (a_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=1e-5)
    return GroupPlan([_rtn(w * s, config.weights) for w in weights], input_scale=s, info={"alpha": alpha})


def effective_weight(qw: QuantizedWeight, spec: QuantSpec, input_scale: Tensor | None) -> Tensor:
    """The float weight the quantized layer applies to the *original* input: ``dq(q(W·s)) / s``."""
    dq = fake_quantize(qw.weight.float(), qw.scale, qw.zero_point, spec)
    return dq / input_scale if input_scale is not None else dq


__all__ = [
    "HANDLERS",
    "NEEDS",
    "Group",
    "GroupPlan",
    "QuantizedWeight",
    "Site",
    "awq",
    "awq_clip",
    "effective_weight",
    "GPTQFactors",
    "gptq",
    "gptq_factors",
    "gptq_quantize",
    "handler_for",
    "register",
    "round_to_nearest",
    "smoothquant",
]
