"""Batch sources of the distillation methods, and the loss that reads their batches.

Each source is a :class:`kiln.train.BatchSource`: ``batch(index)`` is a pure function of the
index (and of the student's weights at that step, for on-policy samples), so a resumed run
repeats an uninterrupted one. Every batch is a :class:`DistillBatch` of ``batch_size x seq_len``
positions.

- :class:`WindowSource`: random windows of the training stream with next-token labels, and the
  teacher's cached top-k when a :class:`~kiln.distill.cache.TopKCache` is given.
- :class:`GeneratedSource`: sequences the teacher wrote (:mod:`kiln.distill.generate`), the loss
  masked to the teacher's tokens.
- :class:`OnPolicySource`: GKD's mixture. With probability ``lmbda`` (a coin seeded by the
  index) the student samples continuations of training prompts with ``kiln.LLM`` -- an engine
  built on the student module itself, whose compiled graph reads the live parameters, so every
  sample comes from the current weights -- and the loss covers the sampled tokens; otherwise
  the batch is a training window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kiln.distill.cache import TopKCache
from kiln.distill.losses import LossConfig, TopK, distill_loss
from kiln.errors import ConfigError
from kiln.eval import logits_of
from kiln.train import TokenWindows


@dataclass
class DistillBatch:
    """One micro-batch of a distillation method."""

    inputs: Tensor  # (B, T) token ids
    labels: Tensor | None  # (B, T) next tokens; None for the student's own samples (no hard labels)
    mask: Tensor | None  # (B, T) bool: positions whose next-token prediction is trained; None: all
    teacher: TopK | None = None  # the teacher's cached top-k; None: the loss runs the teacher
    kind: str = "window"  # "window", "generated" (teacher's text) or "on_policy" (student's samples)

    @property
    def num_tokens(self) -> int:
        """Positions trained in this batch."""
        return int(self.mask.sum()) if self.mask is not None else self.inputs.numel()


def _generator(seed: int, index: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 7_919 + salt) % (2**63))


class WindowSource:
    """Training windows with next-token labels; the teacher's top-k from ``cache`` when given."""

    def __init__(self, windows: TokenWindows, cache: TopKCache | None = None) -> None:
        self.windows, self.cache = windows, cache

    def batch(self, index: int) -> DistillBatch:
        inputs, labels = self.windows.batch(index)
        teacher = self.cache.get(index, inputs.device) if self.cache is not None else None
        return DistillBatch(inputs, labels, None, teacher, "window")


class GeneratedSource:
    """Random batches of teacher-written sequences ``(N, seq_len + 1)``; the loss covers what ``mask`` marks."""

    def __init__(self, sequences: Tensor, trained: Tensor, *, batch_size: int, seed: int,
                 device: torch.device | str = "cpu") -> None:
        if sequences.ndim != 2 or trained.shape != sequences.shape or sequences.shape[0] < 1:
            raise ConfigError(f"generated data must be (N, L) sequences with a same-shaped mask and N >= 1, got "
                              f"{tuple(sequences.shape)} and {tuple(trained.shape)}")
        self.sequences, self.trained = sequences.to(device), trained.to(device)
        self.batch_size, self.seed = batch_size, seed

    def batch(self, index: int) -> DistillBatch:
        rows = torch.randint(0, self.sequences.shape[0], (self.batch_size,), generator=_generator(self.seed, index))
        rows = rows.to(self.sequences.device)
        seq, trained = self.sequences[rows], self.trained[rows]  # (B, L)
        return DistillBatch(seq[:, :-1], seq[:, 1:], trained[:, 1:], None, "generated")


class OnPolicySource:
    """GKD batches: the student's own samples with probability ``lmbda``, training windows otherwise.

    Args:
        student: the module being trained (its parameters must be what the engine reads).
        windows: training windows (``seq_len`` inputs) for the off-policy batches and the prompts.
        prompt_tokens: prompt length; the student writes ``seq_len + 1 - prompt_tokens`` tokens.
        lmbda, temperature, top_p, seed: GKD's on-policy fraction and the sampling.
        eos_token_id: samples stop at it (the loss covers it, then nothing).
    """

    def __init__(self, student: nn.Module, windows: TokenWindows, *, prompt_tokens: int, lmbda: float,
                 temperature: float, top_p: float, seed: int, eos_token_id: int | None = None) -> None:
        self.student, self.windows = student, windows
        self.prompt_tokens, self.lmbda, self.seed = prompt_tokens, lmbda, seed
        self.length = windows.seq_len + 1  # tokens per sequence
        self.new_tokens = self.length - prompt_tokens
        if self.new_tokens < 1:
            raise ConfigError(f"prompt_tokens={prompt_tokens} leaves no room to sample within seq_len="
                              f"{windows.seq_len}; use prompt_tokens <= seq_len")
        self.temperature, self.top_p, self.eos = temperature, top_p, eos_token_id
        self._llm: Any = None
        self.samples = 0  # on-policy batches generated
        self.sampled_tokens = 0

    def is_on_policy(self, index: int) -> bool:
        """Whether batch ``index`` is sampled by the student (a coin seeded by the index)."""
        return bool(torch.rand((), generator=_generator(self.seed, index, salt=1)) < self.lmbda)

    def engine(self) -> Any:
        """``kiln.LLM`` over the student module (built once; it reads the live parameters)."""
        if self._llm is None:
            from kiln.runtime.engine import LLM

            device = next(self.student.parameters()).device
            was_training = self.student.training
            blocks = self.windows.batch_size * (-(-self.length // 16) + 1)
            from kiln.compile import CompileConfig

            live = CompileConfig(kv_cache=True, disable=("merge-parallel-linears",))  # no merged weight copies
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self._llm = LLM(self.student, num_blocks=blocks, block_size=16, max_num_seqs=self.windows.batch_size,
                                max_num_batched_tokens=max(self.windows.batch_size * self.length, 256),
                                enable_prefix_caching=False, device=device, compile_config=live)
            self.student.train(was_training)
            graph = {t.data_ptr() for t in [*self._llm.runner.gm.parameters(), *self._llm.runner.gm.buffers()]}
            stale = [n for n, p in self.student.named_parameters() if p.data_ptr() not in graph]
            if stale:
                raise ConfigError(f"kiln.LLM's graph of the student does not read its live parameters ({stale[:3]}); "
                                  "on-policy samples would come from stale weights")
        return self._llm

    @torch.no_grad()
    def sample(self, prompts: Tensor, index: int) -> tuple[Tensor, Tensor]:
        """Student continuations of ``prompts`` (B, P): sequences (B, seq_len + 1) and their trained mask."""
        from kiln.runtime.request import SamplingParams

        llm = self.engine()
        base = (self.seed * 1_000_003 + index * 7_919) % (2**31)
        params = [SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.new_tokens,
                                 seed=(base + j) % (2**31), ignore_eos=self.eos is None)
                  for j in range(prompts.shape[0])]
        was_training = self.student.training
        self.student.eval()
        try:
            outs = llm.generate(prompts.tolist(), params, use_tqdm=False)
        finally:
            self.student.train(was_training)
        seq = torch.zeros(prompts.shape[0], self.length, dtype=torch.long)
        trained = torch.zeros_like(seq, dtype=torch.bool)
        seq[:, : self.prompt_tokens] = prompts.cpu()
        for i, out in enumerate(outs):
            ids = list(out.outputs[0].token_ids)[: self.new_tokens]
            seq[i, self.prompt_tokens : self.prompt_tokens + len(ids)] = torch.tensor(ids, dtype=torch.long)
            trained[i, self.prompt_tokens : self.prompt_tokens + len(ids)] = True
            self.sampled_tokens += len(ids)
        self.samples += 1
        return seq.to(prompts.device), trained.to(prompts.device)

    def batch(self, index: int) -> DistillBatch:
        window, labels = self.windows.batch(index)  # (B, seq_len) each
        if not self.is_on_policy(index):
            return DistillBatch(window, labels, None, None, "window")
        full = torch.cat([window, labels[:, -1:]], 1)  # (B, seq_len + 1)
        seq, trained = self.sample(full[:, : self.prompt_tokens], index)
        return DistillBatch(seq[:, :-1], None, trained[:, 1:], None, "on_policy")


class DistillLossFn:
    """``loss_fn(model, batch)`` for :func:`kiln.train`: :func:`~kiln.distill.losses.distill_loss` on a
    :class:`DistillBatch`, running the (frozen) teacher when the batch carries no cached scores."""

    def __init__(self, teacher: nn.Module | None, config: LossConfig) -> None:
        self.teacher, self.config = teacher, config

    def __call__(self, model: nn.Module, batch: DistillBatch) -> Tensor:
        logits = logits_of(model(batch.inputs))  # (B, T, V)
        teacher: Any = batch.teacher
        if teacher is None and self.config.needs_teacher:
            if self.teacher is None:
                raise ConfigError("this loss needs a teacher model or cached teacher scores")
            with torch.no_grad():  # under the training loop's autocast, if any
                teacher = logits_of(self.teacher(batch.inputs)).float()
        return distill_loss(logits, teacher, batch.labels, self.config, batch.mask)


__all__ = ["DistillBatch", "DistillLossFn", "GeneratedSource", "OnPolicySource", "WindowSource"]
