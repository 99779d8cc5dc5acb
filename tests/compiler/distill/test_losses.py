"""Distillation losses: each equals a direct computation, is zero at student == teacher, and has the right gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kiln.distill import (
    LossConfig,
    TopK,
    distill_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    token_divergence,
)
from kiln.errors import ConfigError

V = 11


def logits(seed: int, shape: tuple[int, ...] = (3, 5, V), scale: float = 2.0) -> torch.Tensor:
    return (
        torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
        * scale
    )


def direct(s: torch.Tensor, t: torch.Tensor, kind: str, beta: float = 0.5, temp: float = 1.0) -> torch.Tensor:
    """The divergences written out in float64 with explicit sums over the vocabulary."""
    q = torch.softmax(s.double() / temp, -1)
    p = torch.softmax(t.double() / temp, -1)
    if kind == "forward_kl":
        return (p * (p.log() - q.log())).sum(-1)
    if kind == "reverse_kl":
        return (q * (q.log() - p.log())).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)


@pytest.mark.parametrize("temp", [1.0, 2.5])
@pytest.mark.parametrize(
    ("kind", "beta"), [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)]
)
def test_divergence_equals_direct_computation(kind: str, beta: float, temp: float) -> None:
    s, t = logits(0), logits(1)
    got = token_divergence(s, t, divergence=kind, beta=beta, temperature=temp)  # type: ignore[arg-type]
    assert got.shape == (3, 5)
    torch.testing.assert_close(got.double(), direct(s, t, kind, beta, temp), rtol=1e-4, atol=1e-6)
    assert (got > 1e-3).all()  # random distributions differ


def test_named_wrappers_and_jsd_limits() -> None:
    s, t = logits(2), logits(3)
    torch.testing.assert_close(forward_kl(s, t), direct(s, t, "forward_kl").float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(reverse_kl(s, t), direct(s, t, "reverse_kl").float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        generalized_jsd(s, t, beta=0.3), direct(s, t, "jsd", 0.3).float(), rtol=1e-4, atol=1e-6
    )
    # GKD's convention (as TRL): beta = 0 is forward KL, beta = 1 reverse KL
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.0), forward_kl(s, t))
    torch.testing.assert_close(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t))
    # JSD(0.5) is symmetric and bounded by log 2
    js = generalized_jsd(s, t, beta=0.5)
    torch.testing.assert_close(js, generalized_jsd(t, s, beta=0.5), rtol=1e-5, atol=1e-6)
    assert (js <= math.log(2) + 1e-6).all()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_zero_when_student_equals_teacher(kind: str) -> None:
    t = logits(4)
    assert token_divergence(t.clone(), t, divergence=kind).abs().max() < 1e-6  # type: ignore[arg-type]
    assert (
        token_divergence(t + 3.0, t, divergence=kind).abs().max() < 1e-5
    )  # logits shifted: same distribution
    top = TopK.from_logits(t, k=4)
    assert token_divergence(t.clone(), top, divergence=kind).abs().max() < 1e-6  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_gradient_moves_student_toward_teacher(kind: str) -> None:
    s, t = logits(5), logits(6)
    s.requires_grad_(True)
    token_divergence(s, t, divergence=kind).sum().backward()  # type: ignore[arg-type]
    assert s.grad is not None
    # the gradient of the direct float64 formula
    s64 = s.detach().double().requires_grad_(True)
    direct(s64, t, kind).sum().backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    q, p = torch.softmax(s.detach().double(), -1), torch.softmax(t.double(), -1)
    if kind == "forward_kl":  # d KL(p || q) / dz = q - p: descent raises the logits the student under-weights
        torch.testing.assert_close(s.grad.double(), q - p, rtol=1e-4, atol=1e-6)
        assert (torch.sign(-s.grad) == torch.sign(p - q)).all()
        assert (
            (s.grad * (t - s.detach())).sum(-1) < 0
        ).all()  # convex in z: toward the teacher's logits is downhill
    if (
        kind == "reverse_kl"
    ):  # d KL(q || p) / dz_i = q_i (log q_i / p_i - KL): descent lowers over-weighted logits
        ratio = q.log() - p.log() - (q * (q.log() - p.log())).sum(-1, keepdim=True)
        torch.testing.assert_close(s.grad.double(), q * ratio, rtol=1e-4, atol=1e-6)
        assert (torch.sign(s.grad) == torch.sign(ratio)).all()
    # one small step against the gradient lowers the loss
    with torch.no_grad():
        before = token_divergence(s, t, divergence=kind).sum()  # type: ignore[arg-type]
        after = token_divergence(s - 0.1 * s.grad, t, divergence=kind).sum()  # type: ignore[arg-type]
    assert after < before


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_top_k_teacher_is_the_divergence_on_k_plus_one_buckets(kind: str) -> None:
    s, t, k = logits(7), logits(8), 4
    top = TopK.from_logits(t, k, temperature=1.5)
    got = token_divergence(s, top, divergence=kind, temperature=1.5)  # type: ignore[arg-type]
    # direct: both distributions coarsened to the teacher's top-k tokens and one bucket for the rest
    q, p = torch.softmax(s.double() / 1.5, -1), torch.softmax(t.double() / 1.5, -1)
    idx = p.topk(k, -1).indices
    qk, pk = q.gather(-1, idx), p.gather(-1, idx)
    qb = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    pb = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(got.double(), direct(qb.log(), pb.log(), kind), rtol=1e-4, atol=1e-6)
    # a lower bound of the full divergence (data processing), equal to it with k = V
    assert (got <= token_divergence(s, t, divergence=kind, temperature=1.5) + 1e-5).all()  # type: ignore[arg-type]
    full = TopK.from_logits(t, V, temperature=1.5)
    torch.testing.assert_close(
        token_divergence(s, full, divergence=kind, temperature=1.5),  # type: ignore[arg-type]
        token_divergence(s, t, divergence=kind, temperature=1.5),
        rtol=1e-4,
        atol=1e-5,
    )  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="temperature"):
        token_divergence(s, top, temperature=1.0)


def test_distill_loss_mixes_hard_labels_and_scales_by_t_squared() -> None:
    s, t = logits(9), logits(10)
    labels = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) < 0.6
    cfg = LossConfig(divergence="reverse_kl", temperature=2.0, hard_label_weight=0.3)
    got = distill_loss(s, t, labels, cfg, mask)
    ce = F.cross_entropy(s.double().flatten(0, 1), labels.flatten(), reduction="none").view(3, 5)
    div = direct(s, t, "reverse_kl", temp=2.0)
    want = 0.3 * ce[mask].mean() + 0.7 * 4.0 * div[mask].mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # unlabeled batches (student samples) drop the hard term
    torch.testing.assert_close(
        distill_loss(s, t, None, cfg, mask).double(), 0.7 * 4.0 * div[mask].mean(), rtol=1e-5, atol=1e-6
    )
    # hard-label training needs no teacher and is plain cross-entropy
    hard = distill_loss(s, None, labels, LossConfig(hard_label_weight=1.0))
    torch.testing.assert_close(hard.double(), ce.mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="teacher"):
        distill_loss(s, None, labels, LossConfig())


@pytest.mark.parametrize(
    "change",
    [
        {"divergence": "tvd"},
        {"beta": 1.5},
        {"temperature": 0.0},
        {"temperature": float("inf")},
        {"hard_label_weight": -0.1},
    ],
)
def test_loss_config_validation(change: dict) -> None:
    with pytest.raises(ConfigError):
        LossConfig(**change)


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="vocabulary"):
        forward_kl(logits(0), logits(1, (3, 5, V + 1)))
    with pytest.raises(ConfigError, match="top_k"):
        TopK.from_logits(logits(0), V + 1)
