"""Token-level distillation losses: forward KL, reverse KL, generalized JSD, mixed with hard labels.

For a student distribution ``q`` and a teacher distribution ``p`` over the vocabulary, both
softened by a temperature ``T`` (``softmax(logits / T)``), at every position:

- forward KL ``KL(p || q) = sum p (log p - log q)``: mode-covering; the loss of Hinton et al.,
  "Distilling the Knowledge in a Neural Network" (2015);
- reverse KL ``KL(q || p) = sum q (log q - log p)``: mode-seeking (Gu et al., "MiniLLM", 2024);
- generalized JSD with ``beta`` in (0, 1): ``beta KL(p || m) + (1 - beta) KL(q || m)`` with
  ``m = beta p + (1 - beta) q`` (Agarwal et al., "On-Policy Distillation of Language Models:
  Learning from Self-Generated Mistakes" (GKD), ICLR 2024, as in TRL's ``GKDTrainer``);
  ``beta = 0`` and ``beta = 1`` denote forward and reverse KL there, and so here.

:func:`distill_loss` mixes the divergence with the hard-label cross-entropy:
``w * CE(student, labels) + (1 - w) * T^2 * divergence``; the ``T^2`` keeps the soft term's
gradients at the hard term's scale as ``T`` changes (Hinton et al.). Batches without labels
(the student's own samples) drop the hard term.

A teacher is either dense logits ``(..., V)`` or a :class:`TopK`: its ``k`` most likely tokens'
log-probabilities at temperature ``T`` (exact: computed from the full logits), the form kept in
a cache (:mod:`kiln.distill.cache`). Divergences against a :class:`TopK` teacher are computed on
``k + 1`` categories: the ``k`` tokens and one "rest" bucket holding the remaining mass of each
distribution. By the data-processing inequality this is a lower bound of the full divergence,
equal to it when the teacher's tail is empty; the gradient still reaches every student logit
(through the rest bucket's log-sum-exp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.errors import ConfigError

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")
#: Floor of the teacher's rest-bucket probability when its top-k holds (numerically) all the mass.
TAIL_FLOOR = 1e-9


@dataclass(frozen=True)
class TopK:
    """A teacher's ``k`` most likely tokens per position, as log-probabilities at ``temperature``."""

    logprobs: Tensor  # (..., k) log softmax(teacher logits / temperature) at indices, descending
    indices: Tensor  # (..., k) int64 token ids
    temperature: float  # the temperature the log-probabilities were computed at

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float = 1.0) -> TopK:
        """The top ``k`` of dense ``logits`` (..., V) at ``temperature``."""
        if not 1 <= k <= logits.shape[-1]:
            raise ConfigError(f"top_k={k} must be in [1, vocabulary size {logits.shape[-1]}]")
        logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
        values, indices = logprobs.topk(k, dim=-1)
        return cls(values, indices, float(temperature))

    def to(self, device: torch.device | str) -> TopK:
        return TopK(self.logprobs.to(device), self.indices.to(device), self.temperature)

    def __getitem__(self, index: object) -> TopK:
        return TopK(self.logprobs[index], self.indices[index], self.temperature)


Teacher = Tensor | TopK


def log_prob_pair(student_logits: Tensor, teacher: Teacher, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Normalized log-probabilities ``(log q, log p)`` of student and teacher on one support.

    Dense teacher: both ``(..., V)``. :class:`TopK` teacher: both ``(..., k + 1)``, the teacher's
    ``k`` tokens then the rest bucket. Computed in fp32.
    """
    if temperature <= 0 or not math.isfinite(temperature):
        raise ConfigError(f"temperature must be a positive finite number, got {temperature}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
    if isinstance(teacher, TopK):
        if abs(teacher.temperature - temperature) > 1e-6:
            raise ConfigError(f"the teacher's top-k log-probabilities were computed at temperature "
                              f"{teacher.temperature}, the loss uses {temperature}; rebuild the cache")
        idx = teacher.indices.long()
        if idx.shape[:-1] != log_q.shape[:-1]:
            raise ConfigError(f"teacher top-k shape {tuple(idx.shape)} does not match student logits "
                              f"{tuple(student_logits.shape)}")
        q_top = log_q.gather(-1, idx)  # (..., k)
        if idx.shape[-1] == log_q.shape[-1]:  # k = V: the whole vocabulary, no rest bucket
            return q_top, teacher.logprobs.float()
        q_rest = log_q.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)  # (..., 1)
        p_top = teacher.logprobs.float()
        p_rest = torch.log((1.0 - p_top.exp().sum(-1, keepdim=True)).clamp_min(TAIL_FLOOR))
        return torch.cat([q_top, q_rest], -1), torch.cat([p_top, p_rest], -1)
    if teacher.shape != student_logits.shape:
        raise ConfigError(f"teacher logits {tuple(teacher.shape)} and student logits "
                          f"{tuple(student_logits.shape)} differ; distillation needs one vocabulary")
    return log_q, F.log_softmax(teacher.float() / temperature, dim=-1)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``KL(a || b)`` over the last axis, from log-probabilities (0 log 0 = 0)."""
    return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)


def token_divergence(
    student_logits: Tensor, teacher: Teacher, *, divergence: Divergence = "forward_kl", beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Per-position divergence between teacher and student, shape ``student_logits.shape[:-1]``."""
    if divergence not in DIVERGENCES:
        raise ConfigError(f"divergence {divergence!r} is not one of {', '.join(DIVERGENCES)}")
    log_q, log_p = log_prob_pair(student_logits, teacher, temperature)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _kl(log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl(log_q, log_p)
    if not 0.0 < beta < 1.0:
        raise ConfigError(f"jsd beta must be in [0, 1], got {beta}")
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))  # m = beta p + (1 - beta) q
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def forward_kl(student_logits: Tensor, teacher: Teacher, temperature: float = 1.0) -> Tensor:
    """Per-position ``KL(p_teacher || q_student)``."""
    return token_divergence(student_logits, teacher, divergence="forward_kl", temperature=temperature)


def reverse_kl(student_logits: Tensor, teacher: Teacher, temperature: float = 1.0) -> Tensor:
    """Per-position ``KL(q_student || p_teacher)``."""
    return token_divergence(student_logits, teacher, divergence="reverse_kl", temperature=temperature)


def generalized_jsd(student_logits: Tensor, teacher: Teacher, beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """Per-position generalized Jensen-Shannon divergence with weight ``beta`` on the teacher."""
    return token_divergence(student_logits, teacher, divergence="jsd", beta=beta, temperature=temperature)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is true (all when None)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """The distillation loss: a divergence at a temperature, mixed with hard-label cross-entropy."""

    divergence: Divergence = "forward_kl"  # forward_kl, reverse_kl or jsd
    beta: float = 0.5  # jsd: the teacher's weight in the mixture (0: forward KL, 1: reverse KL)
    temperature: float = 1.0  # softens both distributions; the soft term is scaled by temperature^2
    hard_label_weight: float = 0.0  # w: w * CE(labels) + (1 - w) * T^2 * divergence

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"LossConfig.divergence={self.divergence!r}; use one of {', '.join(DIVERGENCES)}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"LossConfig.beta={self.beta} must be in [0, 1]")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"LossConfig.temperature={self.temperature} must be a positive finite number")
        if not 0.0 <= self.hard_label_weight <= 1.0:
            raise ConfigError(f"LossConfig.hard_label_weight={self.hard_label_weight} must be in [0, 1]")

    @property
    def needs_teacher(self) -> bool:
        """Whether the loss reads the teacher (False for pure hard-label training)."""
        return self.hard_label_weight < 1.0


def distill_loss(
    student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None, config: LossConfig,
    mask: Tensor | None = None,
) -> Tensor:
    """``w * CE(labels) + (1 - w) * T^2 * divergence``, averaged over the positions in ``mask``.

    ``student_logits`` (B, T, V); ``teacher`` dense (B, T, V) or a :class:`TopK` (needed when
    ``w < 1``); ``labels`` (B, T) next tokens, or None on unlabeled batches (the hard term is
    dropped); ``mask`` (B, T) bool, None for every position.
    """
    w = config.hard_label_weight
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if w > 0 and labels is not None:
        ce = F.cross_entropy(student_logits.float().flatten(0, -2), labels.flatten(), reduction="none")
        loss = loss + w * masked_mean(ce.view(labels.shape), mask)
    if w < 1:
        if teacher is None:
            raise ConfigError("a distillation loss with hard_label_weight < 1 needs the teacher's logits")
        div = token_divergence(student_logits, teacher, divergence=config.divergence, beta=config.beta,
                               temperature=config.temperature)
        loss = loss + (1 - w) * config.temperature**2 * masked_mean(div, mask)
    return loss


__all__ = [
    "DIVERGENCES",
    "LossConfig",
    "TopK",
    "distill_loss",
    "forward_kl",
    "generalized_jsd",
    "log_prob_pair",
    "masked_mean",
    "reverse_kl",
    "token_divergence",
]
