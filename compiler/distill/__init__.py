"""Distillation: knowledge, data and on-policy distillation, and QAT with a teacher.

``kiln.distill`` is both this package and its entry point::

    import kiln
    from kiln.distill import DistillConfig, OnPolicyDistillation
    from kiln.train import TrainConfig

    result = kiln.distill("models/kiln-drafter", "models/kiln-teacher", "train", method="kd",
                          config=DistillConfig(train=TrainConfig(steps=300)), eval_data="eval",
                          out_dir="runs/kd")
    result.eval_perplexity, result.agreement, result.model_dir

Methods (:mod:`kiln.distill.config`): ``hard`` (hard-label baseline), ``kd`` (forward KL, reverse
KL or generalized JSD at a temperature, mixed with hard labels, optionally from a top-k teacher
cache), ``data`` (the teacher writes filtered training text with ``kiln.LLM``), ``on_policy``
(GKD: the student samples with ``kiln.LLM``, the teacher scores every token) and ``qat`` (the
fake-quantized student of ``kiln.quantize.prepare_qat`` learns from the full-precision teacher).

Modules: ``losses`` (divergences and the mixed loss), ``cache`` (teacher top-k on disk),
``generate`` (teacher-written data and its filters), ``sources`` (each method's batches and the
loss over them), ``config``, ``api`` (:func:`distill`), ``cli`` (``kiln distill``).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from kiln.distill.api import DistillResult, TeacherAgreement, distill
from kiln.distill.cache import TopKCache
from kiln.distill.config import (
    METHODS,
    DataDistillation,
    DistillConfig,
    KnowledgeDistillation,
    OnPolicyDistillation,
    QATDistillation,
)
from kiln.distill.generate import GeneratedData, generate_data
from kiln.distill.losses import (
    LossConfig,
    TopK,
    distill_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    token_divergence,
)
from kiln.distill.sources import DistillBatch, DistillLossFn, GeneratedSource, OnPolicySource, WindowSource


class _CallableModule(types.ModuleType):
    """Lets ``kiln.distill(...)`` call :func:`distill` while ``kiln.distill`` stays the package."""

    def __call__(self, *args: Any, **kwargs: Any) -> DistillResult:
        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "METHODS",
    "DataDistillation",
    "DistillBatch",
    "DistillConfig",
    "DistillLossFn",
    "DistillResult",
    "GeneratedData",
    "GeneratedSource",
    "KnowledgeDistillation",
    "LossConfig",
    "OnPolicyDistillation",
    "OnPolicySource",
    "QATDistillation",
    "TeacherAgreement",
    "TopK",
    "TopKCache",
    "WindowSource",
    "distill",
    "distill_loss",
    "forward_kl",
    "generalized_jsd",
    "generate_data",
    "reverse_kl",
    "token_divergence",
]
