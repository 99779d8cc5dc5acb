"""Configuration of :func:`kiln.distill`: one frozen config per method, and the run's :class:`DistillConfig`.

Methods, looked up by config type (strings name their defaults):

- ``"hard"`` -- :class:`KnowledgeDistillation` with ``hard_label_weight=1``: plain next-token
  training, the baseline (the teacher only scores agreement).
- ``"kd"`` -- :class:`KnowledgeDistillation`: token-level divergence to the teacher on the
  training windows (Hinton et al. 2015), optionally from a top-k cache.
- ``"data"`` -- :class:`DataDistillation`: the teacher writes continuations of training
  prompts with ``kiln.LLM``; filtered, they are the student's training text (sequence-level
  KD, Kim and Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016).
- ``"on_policy"`` -- :class:`OnPolicyDistillation`: GKD (Agarwal et al., ICLR 2024); with
  probability ``lmbda`` a batch is sampled by the student itself with ``kiln.LLM``, otherwise
  it is a training window; the teacher scores every token of it.
- ``"qat"`` -- :class:`QATDistillation`: the student is the fake-quantized graph of
  ``kiln.quantize.prepare_qat`` and learns from the full-precision teacher.

Generated sequences (data and on-policy) are ``seq_len + 1`` tokens long, a prompt of
``prompt_tokens`` then ``seq_len + 1 - prompt_tokens`` new ones, so every method trains on
``batch_size x seq_len`` positions per micro-batch: equal compute per step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from kiln.distill.losses import LossConfig
from kiln.errors import ConfigError
from kiln.train import TrainConfig


def _check_sampling(owner: str, temperature: float, top_p: float, prompt_tokens: int) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"{owner}.temperature={temperature} must be >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"{owner}.top_p={top_p} must be in (0, 1]")
    if not isinstance(prompt_tokens, int) or prompt_tokens < 1:
        raise ConfigError(f"{owner}.prompt_tokens={prompt_tokens} must be an int >= 1")


@dataclass(frozen=True, kw_only=True)
class KnowledgeDistillation:
    """Token-level distillation on training windows (``hard_label_weight=1``: hard-label training)."""

    loss: LossConfig = field(default_factory=LossConfig)  # divergence, beta, temperature, hard-label weight
    top_k: int | None = None  # cache the teacher's top-k log-probabilities (None: dense logits, no cache)
    cache_dir: str | None = None  # where the top-k cache lives (default: OUT_DIR/teacher_topk)
    cache_dtype: str = "float32"  # storage of cached log-probabilities: float32, float16 or bfloat16

    def __post_init__(self) -> None:
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigError(f"KnowledgeDistillation.top_k={self.top_k} must be None or an int >= 1, e.g. 32")
        if self.cache_dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"KnowledgeDistillation.cache_dtype={self.cache_dtype!r}; use float32, float16, bfloat16")
        if self.top_k is not None and not self.loss.needs_teacher:
            raise ConfigError("top_k caches the teacher, but hard_label_weight=1 never reads it; drop top_k")

    @property
    def name(self) -> str:
        return "hard" if not self.loss.needs_teacher else "kd"


@dataclass(frozen=True, kw_only=True)
class DataDistillation:
    """The teacher generates continuations of training prompts; the student trains on the kept ones."""

    num_prompts: int = 256  # distinct prompts (windows of the training stream)
    samples_per_prompt: int = 2  # continuations per prompt (different seeds; the prompt's KV is prefix-cached)
    prompt_tokens: int = 32  # prompt length; continuations fill the sequence to seq_len + 1 tokens
    temperature: float = 0.8  # teacher sampling temperature (0: greedy)
    top_p: float = 0.95  # teacher nucleus sampling
    min_new_tokens: int = 8  # drop continuations that stop (EOS) earlier
    min_mean_logprob: float | None = None  # drop continuations whose mean teacher log-prob per token is lower
    keep_fraction: float = 1.0  # then keep this fraction with the highest mean teacher log-prob
    dedup: bool = True  # drop exact duplicate continuations
    min_distinct_4grams: float = 0.25  # drop degenerate loops: distinct 4-grams / 4-grams below this
    train_on_prompt: bool = False  # also train on the prompt tokens (real text), not only the teacher's
    loss: LossConfig = field(default_factory=lambda: LossConfig(hard_label_weight=1.0))  # CE on teacher text
    max_num_seqs: int = 64  # engine batch while generating

    def __post_init__(self) -> None:
        _check_sampling("DataDistillation", self.temperature, self.top_p, self.prompt_tokens)
        for name in ("num_prompts", "samples_per_prompt", "max_num_seqs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"DataDistillation.{name}={getattr(self, name)} must be an int >= 1")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 1:
            raise ConfigError(f"DataDistillation.min_new_tokens={self.min_new_tokens} must be an int >= 1")
        if not 0 < self.keep_fraction <= 1:
            raise ConfigError(f"DataDistillation.keep_fraction={self.keep_fraction} must be in (0, 1]")
        if not 0 <= self.min_distinct_4grams <= 1:
            raise ConfigError(f"DataDistillation.min_distinct_4grams={self.min_distinct_4grams} must be in [0, 1]")

    name = "data"


@dataclass(frozen=True, kw_only=True)
class OnPolicyDistillation:
    """GKD: the student samples, the teacher scores every token, the student minimizes the divergence."""

    lmbda: float = 0.5  # fraction of batches the student samples itself (the rest: training windows)
    prompt_tokens: int = 32  # prompt length of student samples; they fill the sequence to seq_len + 1 tokens
    temperature: float = 1.0  # student sampling temperature
    top_p: float = 1.0  # student nucleus sampling
    loss: LossConfig = field(default_factory=lambda: LossConfig(divergence="jsd", beta=0.5))

    def __post_init__(self) -> None:
        _check_sampling("OnPolicyDistillation", self.temperature, self.top_p, self.prompt_tokens)
        if not 0 <= self.lmbda <= 1:
            raise ConfigError(f"OnPolicyDistillation.lmbda={self.lmbda} must be in [0, 1]")
        if not self.loss.needs_teacher:
            raise ConfigError("on-policy distillation trains on the teacher's scores: hard_label_weight must be < 1")

    name = "on_policy"


@dataclass(frozen=True, kw_only=True)
class QATDistillation:
    """Quantization-aware training of the fake-quantized student against the full-precision teacher."""

    quant: Any = "w4a16-g128"  # a kiln.quantize.QuantConfig or a preset name
    loss: LossConfig = field(default_factory=LossConfig)  # usually forward KL to the teacher
    learn_scales: bool = False  # LSQ: train the weight scales too (kiln.quantize.prepare_qat)

    name = "qat"


MethodConfig = KnowledgeDistillation | DataDistillation | OnPolicyDistillation | QATDistillation

#: Method names and their default configs.
METHODS: dict[str, MethodConfig] = {
    "hard": KnowledgeDistillation(loss=LossConfig(hard_label_weight=1.0)),
    "kd": KnowledgeDistillation(),
    "data": DataDistillation(),
    "on_policy": OnPolicyDistillation(),
    "qat": QATDistillation(),
}


def resolve_method(method: str | MethodConfig) -> MethodConfig:
    """A method config from a name (``hard``, ``kd``, ``data``, ``on_policy``, ``qat``) or a config."""
    if isinstance(method, str):
        key = method.replace("-", "_")
        if key not in METHODS:
            raise ConfigError(f"unknown distillation method {method!r}; use one of {', '.join(METHODS)}")
        return METHODS[key]
    if not isinstance(method, KnowledgeDistillation | DataDistillation | OnPolicyDistillation | QATDistillation):
        raise ConfigError(f"method must be a name or a method config (KnowledgeDistillation, DataDistillation, "
                          f"OnPolicyDistillation, QATDistillation), got {type(method).__name__}")
    return method


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """A distillation run: the training loop's settings and what to measure."""

    train: TrainConfig = field(default_factory=TrainConfig)  # steps, batch, lr, eval/ckpt cadence, device...
    eval_max_tokens: int | None = None  # score only the first N eval tokens (None: all)
    agreement: bool = True  # also measure top-1 agreement with the teacher at each evaluation

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"DistillConfig.train must be a kiln.train.TrainConfig, got {type(self.train).__name__}")
        if self.eval_max_tokens is not None and self.eval_max_tokens < 2:
            raise ConfigError(f"DistillConfig.eval_max_tokens={self.eval_max_tokens} must be None or >= 2")

    def replace_train(self, **changes: Any) -> DistillConfig:
        """This config with ``train`` fields changed."""
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **changes))


__all__ = [
    "METHODS",
    "DataDistillation",
    "DistillConfig",
    "KnowledgeDistillation",
    "MethodConfig",
    "OnPolicyDistillation",
    "QATDistillation",
    "resolve_method",
]
