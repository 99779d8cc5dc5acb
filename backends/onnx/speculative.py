"""Speculative decoding on ONNX Runtime: the runtime's drafters and exact verification over kiln's decoder artifact.

The target is a KV-cache decoder (``export_onnx(compiled, path, kv_cache=True)``) driven by
:class:`kiln.backends.onnx.OrtGenerator`. Everything that decides tokens is the GPU
runtime's own (:mod:`kiln.runtime.speculative`): the drafters' interface,
:class:`~kiln.runtime.drafters.NgramDrafter` (prompt lookup),
:func:`~kiln.runtime.speculative.verify` (greedy acceptance and exact speculative
sampling, Leviathan et al. 2023 / Chen et al. 2023), :func:`~kiln.runtime.sampler.processed_probs`
and :class:`~kiln.runtime.speculative.SpeculationPolicy` (k adapted to the acceptance). What
is ONNX-specific:

- :class:`OrtDraftModelDrafter`: a draft model that is its own exported decoder artifact,
  with its own contiguous cache per sequence, kept in sync by truncation;
- :func:`speculative_generate`: each step feeds the last token and the k drafts to the target
  in one call (the decoder takes several new tokens after a past cache), verifies them, and
  rolls the rejected drafts' keys and values back by truncating the cache's length axis to
  the accepted prefix: nothing is recomputed and nothing copied but the kept prefix.

The contiguous cache has one length for the whole batch, while rows accept different numbers
of drafts; so a batch is decoded one row at a time (each row is its own request), which is
also how prompt lookup and the draft model see it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from kiln.errors import ConfigError
from kiln.runtime.drafters import Draft, Drafter, DraftRequest, NgramDrafter
from kiln.runtime.request import Request, RequestMetrics, SamplingParams
from kiln.runtime.sampler import _GREEDY_EPS, processed_probs, random_sample
from kiln.runtime.speculative import (
    SpeculationPolicy,
    SpeculativeConfig,
    derive_rates,
    record_verification,
    verify,
)

if TYPE_CHECKING:
    from kiln.backends.onnx.generator import OrtGenerator


def truncate(past: Sequence[np.ndarray], length: int) -> list[np.ndarray]:
    """The cache ``past`` (B, Hkv, P, D) cut to its first ``length`` positions: a rollback."""
    return [np.ascontiguousarray(p[:, :, :length]) for p in past]


def _last_logits(logits: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(logits[0, -1:, :], dtype=np.float32))  # (1, V)


@dataclass
class _DraftState:
    tokens: list[int] = field(default_factory=list)  # the tokens whose K/V the draft cache holds, in order
    past: list[np.ndarray] | None = None  # the draft model's cache (1, Hkv, len(tokens), D)


class OrtDraftModelDrafter(Drafter):
    """A draft model on ONNX Runtime: its own decoder artifact and one contiguous cache per request.

    Each :meth:`propose` catches the request's cache up on the tokens it lacks (the prompt
    at first, then the accepted drafts and the target's own token), after cutting it back to
    the prefix the request still agrees with, then drafts ``num_tokens`` tokens one call at a
    time: the argmax for a greedy request, else a draw from the request's processed
    distribution (:func:`~kiln.runtime.sampler.processed_probs`), whose rows are returned
    as ``q`` for verification.

    Args:
        model: the draft decoder (a path to ``export_onnx(..., kv_cache=True)``'s file, or an
            :class:`~kiln.backends.onnx.OrtGenerator` over it).
        vocab_size: the target's vocabulary, to check the drafter's is not larger.
    """

    def __init__(
        self, model: OrtGenerator | str | os.PathLike[str], *, vocab_size: int | None = None
    ) -> None:
        from kiln.backends.onnx.generator import OrtGenerator

        self.model = model if isinstance(model, OrtGenerator) else OrtGenerator(model)
        self.vocab_size = vocab_size
        self.calls = 0  # draft decoder calls so far
        self._states: dict[str, _DraftState] = {}

    def on_finished(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def propose(self, batch: Sequence[DraftRequest]) -> dict[str, Draft]:
        return {d.request.request_id: self._draft(d) for d in batch}

    def _draft(self, d: DraftRequest) -> Draft:
        tokens = d.request.all_token_ids
        params = d.request.sampling_params
        state = self._states.setdefault(d.request.request_id, _DraftState())
        c = 0  # the cached prefix the request still agrees with
        while c < min(len(state.tokens), len(tokens)) and state.tokens[c] == tokens[c]:
            c += 1
        c = min(c, len(tokens) - 1)  # the last token's logits draft the first token
        past = self.model.empty_cache(1) if state.past is None or c == 0 else truncate(state.past, c)
        feed = np.asarray([tokens[c:]], dtype=np.int64)
        drafted: list[int] = []
        probs: list[Tensor] = []
        greedy = params.temperature < _GREEDY_EPS
        while True:
            logits, past = self.model.step(feed, past)
            self.calls += 1
            last = _last_logits(logits)
            if self.vocab_size is not None and last.shape[-1] > self.vocab_size:
                raise ConfigError(
                    f"the draft model's vocabulary ({last.shape[-1]}) is larger than the target's ({self.vocab_size}); "
                    "the drafter must share the target's tokenizer"
                )
            if greedy and params.repetition_penalty == 1.0:  # the argmax: no distribution to build
                token = int(last.argmax(dim=-1))
            else:
                seen = [tokens + drafted] if params.repetition_penalty != 1.0 else None
                q = processed_probs(last, [params], seen)  # (1, V')
                token = int(q.argmax(dim=-1)) if greedy else int(random_sample(q, [d.generator])[0])
                if not greedy:
                    probs.append(q[0])
            drafted.append(token)
            if len(drafted) == d.num_tokens:
                break
            feed = np.asarray([[token]], dtype=np.int64)
        state.tokens = tokens + drafted[:-1]  # the last draft's K/V was never computed
        state.past = past
        return Draft(token_ids=drafted, probs=torch.stack(probs) if probs else None)


def _artifact_bytes(path: str | os.PathLike[str]) -> int:
    p = Path(path)
    data = p.with_name(p.name + ".data")
    return p.stat().st_size + (data.stat().st_size if data.exists() else 0)


def make_ort_drafter(config: SpeculativeConfig, target: OrtGenerator, vocab_size: int | None) -> Drafter:
    """The drafter ``config`` describes on the ONNX path (a draft model must be an exported decoder)."""
    from kiln.backends.onnx.generator import OrtGenerator

    if config.method == "ngram":
        return NgramDrafter(min_n=config.prompt_lookup_min, max_n=config.prompt_lookup_max)
    model = config.draft_model
    if isinstance(model, OrtGenerator) or (
        isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx")
    ):
        return OrtDraftModelDrafter(model, vocab_size=vocab_size)  # type: ignore[arg-type]
    raise ConfigError(
        f"on the ONNX path the draft model is its own exported decoder: pass the path of "
        f"export_onnx(kiln.compile(draft, ...), 'draft.onnx', kv_cache=True) (or an OrtGenerator over it), "
        f"not {type(model).__name__} {model!r}"
    )


def default_cost(config: SpeculativeConfig, target: OrtGenerator, drafter: Drafter) -> float:
    """c, one draft token's cost over a target step: the config's, 0.02 for prompt lookup, else the artifacts' size ratio."""
    if config.draft_cost is not None:
        return float(config.draft_cost)
    if isinstance(drafter, OrtDraftModelDrafter):
        return min(_artifact_bytes(drafter.model.path) / max(_artifact_bytes(target.path), 1), 1.0)
    return 0.02


def sampling_params(
    do_sample: bool, temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int
) -> SamplingParams:
    """``OrtGenerator.generate``'s arguments as the runtime's :class:`SamplingParams` (the same filters)."""
    if not do_sample:
        return SamplingParams(temperature=0.0, max_tokens=max(max_new_tokens, 1), ignore_eos=True)
    return SamplingParams(
        temperature=temperature,
        top_k=top_k or 0,
        top_p=1.0 if top_p is None else top_p,
        max_tokens=max(max_new_tokens, 1),
        ignore_eos=True,
    )


def empty_stats() -> dict[str, float]:
    """The counters :func:`speculative_generate` keeps (the engine's names)."""
    return dict(
        spec_steps=0,
        draft_tokens=0,
        accepted_tokens=0,
        spec_rejections=0,
        target_calls=0,
        draft_calls=0,
        generated_tokens=0,
        acceptance_rate=0.0,
        alpha=0.0,
        accepted_tokens_per_step=0.0,
    )


def speculative_generate(
    target: OrtGenerator,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    drafter: Drafter,
    policy: SpeculationPolicy,
    params: SamplingParams,
    generator: torch.Generator | None,
    eos_token_id: int | None,
    request_id: str,
    stats: dict[str, float],
) -> tuple[list[int], RequestMetrics]:
    """One sequence's new tokens (at most ``max_new_tokens``, ending at EOS if it comes) and its metrics."""
    request = Request(request_id=request_id, prompt_token_ids=list(prompt), sampling_params=params)
    metrics = request.metrics
    out = request.output_token_ids
    past = target.empty_cache(1)
    feed = [list(prompt)]  # the tokens the cache lacks: the prompt, then the last token and the drafts
    try:
        while len(out) < max_new_tokens and (eos_token_id is None or not out or out[-1] != eos_token_id):
            drafts: list[int] = []
            probs: Tensor | None = None
            step = int(stats["target_calls"])
            room = max_new_tokens - len(out) - 1  # a step yields up to k + 1 tokens
            k = min(policy.num_drafts(request_id, step), room)  # drafts ride along with the prompt too
            if k > 0:
                draft = drafter.propose(
                    [DraftRequest(request=request, num_tokens=k, generator=generator)]
                ).get(request_id)
                if draft is not None:
                    drafts, probs = list(draft.token_ids[:k]), draft.probs
                    feed[0] = feed[0] + drafts
            cached = past[0].shape[2]
            # one call scores the last token and every draft: logits (1, T, V), the cache grows by T
            logits, past = target.step(np.asarray(feed, dtype=np.int64), past)
            stats["target_calls"] += 1
            rows = torch.from_numpy(
                np.ascontiguousarray(logits[0, -(len(drafts) + 1) :, :], dtype=np.float32)
            )
            seen = [request.all_token_ids] if params.repetition_penalty != 1.0 else None
            tokens = verify(rows, [drafts], [probs], [params], [generator], seen)[0]
            accepted = len(tokens) - 1
            # roll the rejected drafts back: keep the known tokens and the accepted drafts
            past = truncate(past, cached + len(feed[0]) - len(drafts) + accepted)
            if drafts:
                record_verification(metrics, stats, len(drafts), accepted)
                policy.observe(request_id, len(drafts), accepted, step)
            tokens = tokens[: max_new_tokens - len(out)]
            if eos_token_id is not None and eos_token_id in tokens:
                tokens = tokens[: tokens.index(eos_token_id) + 1]
            out.extend(tokens)
            feed = [[out[-1]]]
    finally:
        drafter.on_finished(request_id)
        policy.forget(request_id)
    stats["generated_tokens"] += len(out)
    return list(out), metrics


def finish_stats(stats: dict[str, float], drafter: Drafter, calls_before: int) -> None:
    """Fill in the derived figures (acceptance rate, alpha, accepted tokens per step)."""
    if isinstance(drafter, OrtDraftModelDrafter):
        stats["draft_calls"] = drafter.calls - calls_before
    derive_rates(stats)


__all__ = [
    "OrtDraftModelDrafter",
    "default_cost",
    "empty_stats",
    "finish_stats",
    "make_ort_drafter",
    "sampling_params",
    "speculative_generate",
    "truncate",
]
