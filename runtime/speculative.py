"""Speculative decoding: its configuration, exact verification, and when to speculate.

A cheap drafter proposes k tokens; the target scores all k + 1 positions in one step
(the step graph's ``logits_indices`` asks for the last k + 1 rows of the sequence) and
keeps the longest accepted prefix plus one token of its own, so a step yields 1 to k + 1
tokens at the price of about one target step.

- :func:`rejection_sample`: speculative sampling (Leviathan et al. 2023, "Fast Inference
  from Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large
  Language Model Decoding with Speculative Sampling"). Draft token ``x ~ q`` is accepted
  with probability ``min(1, p(x) / q(x))``; the first rejected one is replaced by a draw
  from ``norm(max(0, p - q))``; when all are accepted a bonus token is drawn from ``p``.
  Every generated token is then distributed exactly as the target's ``p``. ``p`` and ``q``
  are the *processed* distributions (:func:`processed_probs`: repetition penalty,
  temperature, top-k, top-p, min-p, in the sampler's order), so filters apply identically
  to draft and target. A greedy request's ``p`` is the one-hot argmax: a draft is accepted
  iff it is the target's argmax. A deterministic drafter's ``q`` is a point mass.
- The drafters (:mod:`kiln.runtime.drafters`): prompt lookup (:class:`NgramDrafter`) and a
  smaller model (:class:`DraftModelDrafter`); :func:`make_drafter` builds the one a config asks for.
- :class:`SpeculationPolicy`: how many tokens to draft per request (see its docstring).

The scheduler already schedules ``request.spec_token_ids`` after the last sampled token and
rolls ``num_computed_tokens`` back over rejected drafts; the engine glues the rest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from kiln.errors import ConfigError
from kiln.runtime.drafters import Drafter, DraftModelDrafter, NgramDrafter
from kiln.runtime.request import RequestMetrics, SamplingParams
from kiln.runtime.sampler import _GREEDY_EPS, processed_probs, random_sample

# The adaptive policy's running acceptance estimate (see SpeculationPolicy).
_PRIOR_ALPHA = 0.6  # optimistic start: speculate until evidence says otherwise
_PRIOR_WEIGHT = 1.0  # ... worth this many observed draft tokens
_DECAY = 0.95  # per engine step: old observations fade, so an idle request drifts back to the prior and re-probes


@dataclass(frozen=True, kw_only=True)
class SpeculativeConfig:
    """Speculative decoding for :class:`kiln.LLM`. Derive variants with ``dataclasses.replace``.

    The output distribution is the target's whatever the settings: they change speed only.
    """

    method: Literal["ngram", "draft_model"]  # prompt lookup, or a smaller draft model
    num_speculative_tokens: int = 4  # k: draft tokens per step at most
    prompt_lookup_min: int = 1  # ngram: shortest suffix n-gram to match
    prompt_lookup_max: int = 3  # ngram: longest suffix n-gram to match (tried first)
    draft_model: nn.Module | str | os.PathLike[str] | None = None  # draft_model: module, HF folder or preset
    draft_num_blocks: int | None = None  # draft model's KV blocks (default: the target's + k per running request)
    adaptive: bool = True  # adapt k per request to its acceptance (SpeculationPolicy); False: always k
    draft_cost: float | None = None  # c, one draft token's cost over one target step (default: 0.02 ngram, param ratio)
    disable_by_batch_size: int | None = 32  # no drafts while more requests than this run (None: never)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"SpeculativeConfig.{name} {rule}, got {getattr(self, name)!r}")

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if self.method not in ("ngram", "draft_model"):
            raise bad("method", "must be 'ngram' or 'draft_model'")
        if not is_int(self.num_speculative_tokens) or self.num_speculative_tokens < 1:
            raise bad("num_speculative_tokens", "must be an int >= 1")
        if not is_int(self.prompt_lookup_min) or self.prompt_lookup_min < 1:
            raise bad("prompt_lookup_min", "must be an int >= 1")
        if not is_int(self.prompt_lookup_max) or self.prompt_lookup_max < self.prompt_lookup_min:
            raise bad("prompt_lookup_max", f"must be an int >= prompt_lookup_min ({self.prompt_lookup_min})")
        if (self.method == "draft_model") != (self.draft_model is not None):
            raise bad("draft_model", "must be given exactly when method='draft_model'")
        if self.draft_num_blocks is not None and (not is_int(self.draft_num_blocks) or self.draft_num_blocks < 1):
            raise bad("draft_num_blocks", "must be None or an int >= 1")
        if not isinstance(self.adaptive, bool):
            raise bad("adaptive", "must be True or False")
        if self.draft_cost is not None and (not isinstance(self.draft_cost, (int, float)) or not self.draft_cost >= 0):
            raise bad("draft_cost", "must be None or a number >= 0")
        if self.disable_by_batch_size is not None and (
            not is_int(self.disable_by_batch_size) or self.disable_by_batch_size < 1
        ):
            raise bad("disable_by_batch_size", "must be None or an int >= 1")


# -- distributions and verification --------------------------------------------------------


def rejection_sample(
    target_probs: Tensor,
    draft_token_ids: Tensor,
    num_drafts: Tensor,
    draft_probs: Tensor,
    greedy: Tensor | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Verify a batch of drafts exactly; returns ``(tokens (N, K+1), num_accepted (N,))``.

    Args:
        target_probs: (N, K+1, V) the target's processed distribution at each draft
            position and one past the last (the bonus).
        draft_token_ids: (N, K) int64 drafts; entries at or past ``num_drafts[i]`` are ignored.
        num_drafts: (N,) int64 in [0, K]: row i's drafts.
        draft_probs: (N, K, V) the distribution each draft was drawn from (one-hot for a
            deterministic drafter).
        greedy: (N,) bool rows that draw no random numbers: the target's ``p`` is one-hot, so
            a draft is kept iff it is the argmax, and the next token is the argmax.
        generators: per row, its ``torch.Generator`` or None for the global one.

    Row i yields ``tokens[i, : num_accepted[i] + 1]``: the accepted drafts, then a token drawn
    from the residual ``max(0, p - q)`` at the first rejection, or from ``p`` after the last
    draft. The rest is -1.
    """
    n, k1, v = target_probs.shape
    k = k1 - 1
    device = target_probs.device
    if draft_token_ids.shape != (n, k) or draft_probs.shape != (n, k, v) or num_drafts.shape != (n,):
        raise ValueError(
            f"shapes disagree: target {tuple(target_probs.shape)}, drafts {tuple(draft_token_ids.shape)}, "
            f"draft probs {tuple(draft_probs.shape)}, num_drafts {tuple(num_drafts.shape)}"
        )
    greedy = torch.zeros(n, dtype=torch.bool, device=device) if greedy is None else greedy.to(device)
    gens = list(generators) if generators is not None else [None] * n
    pos = torch.arange(k, device=device)
    valid = pos.unsqueeze(0) < num_drafts.unsqueeze(1)  # (N, K)
    ids = draft_token_ids.clamp(0, v - 1) * valid  # padding reads token 0, then is masked
    p_x = target_probs[:, :k].gather(2, ids.unsqueeze(2)).squeeze(2)  # (N, K)
    q_x = draft_probs.gather(2, ids.unsqueeze(2)).squeeze(2)  # (N, K)
    u = torch.rand(n, k, device=device)  # unseeded rows share the global generator
    for i, g in enumerate(gens):
        if g is not None and k:
            u[i] = torch.rand(k, generator=g, device=g.device).to(device)
    u = u.masked_fill(greedy.unsqueeze(1), 0.0)
    accept = (u * q_x < p_x) & valid  # P(u < p/q) = min(1, p/q)
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # (N,) leading accepted drafts
    rows = torch.arange(n, device=device)
    p_next = target_probs[rows, num_accepted]  # (N, V)
    if k:
        residual = (p_next - draft_probs[rows, num_accepted.clamp(max=k - 1)]).clamp_min(0)
    else:
        residual = p_next
    use_residual = (num_accepted < num_drafts) & (residual.sum(dim=-1) > 0)  # all-zero only through rounding
    dist = torch.where(use_residual.unsqueeze(1), residual, p_next)  # unnormalized is fine for the race
    final = random_sample(dist, [None if greedy[i] else g for i, g in enumerate(gens)])
    final = torch.where(greedy, p_next.argmax(dim=-1), final)
    tokens = torch.full((n, k + 1), -1, dtype=torch.long, device=device)
    tokens[:, :k] = torch.where(pos.unsqueeze(0) < num_accepted.unsqueeze(1), draft_token_ids, -1)
    tokens[rows, num_accepted] = final
    return tokens, num_accepted


def _keep_matching(drafts: Sequence[Sequence[int]], tokens: list[int]) -> list[list[int]]:
    """Per request, its leading drafts equal to the target's token at their row, then the target's next token
    (``tokens``: one per row, ``len(drafts[i]) + 1`` rows per request)."""
    out, row = [], 0
    for d in drafts:
        a = next((j for j, t in enumerate(d) if t != tokens[row + j]), len(d))
        out.append(list(d[:a]) + [tokens[row + a]])
        row += len(d) + 1
    return out


def verify(
    logits: Tensor,
    drafts: Sequence[Sequence[int]],
    draft_probs: Sequence[Tensor | None],
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    token_ids: Sequence[Sequence[int]] | None = None,
    positions: Sequence[int] | None = None,
) -> list[list[int]]:
    """Verify the drafts of several requests from the target's logits; the tokens each yields.

    ``logits`` holds ``len(drafts[i]) + 1`` rows per request, in order: the target's logits
    after the last known token and after each draft. ``draft_probs[i]`` is (k_i, V') with
    V' <= V (None: a deterministic drafter). ``token_ids[i]`` (prompt + output) is needed only
    for rows with a repetition penalty. ``positions[i]``: the position of the token request
    i's first row predicts (its known tokens).

    When every drafter is deterministic (prompt lookup: ``q`` a point mass), exact speculative
    sampling is a draw ``x ~ p`` per row, keeping the drafts while they equal it (see
    :func:`kiln.runtime.spec_async.row_tokens`); a seeded request's draws are keyed on
    ``positions``, so it yields the tokens it samples without speculation. Otherwise
    :func:`rejection_sample` (``generators`` per request).
    """
    counts = [len(d) for d in drafts]
    n, kmax, v = len(drafts), max(counts, default=0), logits.shape[-1]
    if logits.shape[0] != sum(counts) + n:
        raise ValueError(f"{logits.shape[0]} rows of logits for drafts needing {sum(counts) + n}")
    if all(p.temperature < _GREEDY_EPS and p.repetition_penalty == 1.0 for p in params):  # the common fast path
        return _keep_matching(drafts, logits.argmax(dim=-1).tolist())
    device = logits.device
    row_params = [p for p, c in zip(params, counts, strict=True) for _ in range(c + 1)]
    seen = None
    if token_ids is not None and any(p.repetition_penalty != 1.0 for p in params):
        seen = [list(t) + list(d[:j]) for t, d in zip(token_ids, drafts, strict=True) for j in range(len(d) + 1)]
    flat = processed_probs(logits, row_params, seen)  # (sum k_i + 1, V)
    if all(q is None for q in draft_probs):  # point-mass drafts: compare them with a draw per row
        seeds = [p.seed if positions is not None and p.temperature >= _GREEDY_EPS else None for p in row_params]
        at = [positions[i] + j for i, c in enumerate(counts) for j in range(c + 1)] if positions is not None else None
        return _keep_matching(drafts, random_sample(flat, seeds=seeds, positions=at).tolist())  # greedy rows: one-hot
    req = torch.tensor([i for i, c in enumerate(counts) for _ in range(c + 1)], device=device)
    pos = torch.tensor([j for c in counts for j in range(c + 1)], device=device)
    target = torch.zeros(n, kmax + 1, v, device=device)
    target[req, pos] = flat
    draft_ids = torch.zeros(n, kmax, dtype=torch.long, device=device)
    q = torch.zeros(n, kmax, v, device=device)
    for i, (d, probs) in enumerate(zip(drafts, draft_probs, strict=True)):
        if not d:
            continue
        ids = torch.tensor(d, dtype=torch.long, device=device)
        draft_ids[i, : len(d)] = ids
        if probs is None:
            q[i, torch.arange(len(d), device=device), ids] = 1.0
        else:
            q[i, : len(d), : probs.shape[-1]] = probs[: len(d)].to(device)
    greedy = torch.tensor([p.temperature < _GREEDY_EPS for p in params], device=device)
    tokens, accepted = rejection_sample(
        target, draft_ids, torch.tensor(counts, device=device), q, greedy, generators
    )
    return [row[: a + 1] for row, a in zip(tokens.tolist(), accepted.tolist(), strict=True)]


def make_drafter(config: SpeculativeConfig, *, block_size: int, num_blocks: int, vocab_size: int | None,
                 device: torch.device, dtype: torch.dtype | None, cuda_graphs: dict[str, object] | None = None
                 ) -> Drafter:
    """The drafter ``config`` describes, its cache sized to ``num_blocks`` unless the config says otherwise;
    ``cuda_graphs``: ``enable_cuda_graphs`` arguments for a draft model's runner (None: op by op)."""
    if config.method == "ngram":
        return NgramDrafter(min_n=config.prompt_lookup_min, max_n=config.prompt_lookup_max)
    return DraftModelDrafter(
        config.draft_model,  # type: ignore[arg-type]
        block_size=block_size, num_blocks=config.draft_num_blocks or num_blocks,
        vocab_size=vocab_size, device=device, dtype=dtype, cuda_graphs=cuda_graphs,
    )


# -- when to speculate --------------------------------------------------------------------------


def expected_speedup(alpha: float, k: int, cost: float) -> float:
    """Leviathan et al.'s ideal speedup ``(1 - a^(k+1)) / ((1 - a)(k c + 1))`` of k drafts at acceptance ``a``."""
    return sum(alpha**i for i in range(k + 1)) / (k * cost + 1)


class SpeculationPolicy:
    """How many tokens to draft for each request this step.

    Per request it keeps a running estimate ``a`` of the probability that one draft token
    is accepted: each verification of k drafts with m accepted counts m successes and,
    if m < k, one failure (drafts after the first rejection are never judged); counts
    decay by ``_DECAY`` per engine step and start from a prior of ``_PRIOR_ALPHA`` worth
    ``_PRIOR_WEIGHT`` tokens. It drafts the k in [0, k_max] maximizing the ideal speedup
    :func:`expected_speedup` ``(a, k, c)`` for the drafter's cost ratio ``c``. Low
    acceptance lowers k; below ``a ~ c`` no k pays and the request stops drafting (k = 0)
    until its evidence has decayed toward the prior, when it probes again. With
    ``adaptive=False`` it always drafts k_max. The engine additionally drafts nothing
    while more than ``disable_by_batch_size`` requests run: verification is cheap only
    while decode is memory-bound, and at a large batch the k extra tokens per sequence
    cost about as much target compute as they save.
    """

    def __init__(self, max_tokens: int, cost: float, adaptive: bool = True) -> None:
        self.max_tokens, self.cost, self.adaptive = max_tokens, cost, adaptive
        self._counts: dict[str, tuple[float, float, int]] = {}  # id -> (accepted, judged, step of last update)

    def alpha(self, request_id: str, step: int) -> float:
        """The running per-token acceptance estimate."""
        acc, judged, last = self._counts.get(request_id, (0.0, 0.0, step))
        decay = _DECAY ** (step - last)
        return (acc * decay + _PRIOR_ALPHA * _PRIOR_WEIGHT) / (judged * decay + _PRIOR_WEIGHT)

    def num_drafts(self, request_id: str, step: int) -> int:
        """Draft tokens for this request now (0: do not speculate)."""
        if not self.adaptive:
            return self.max_tokens
        a = self.alpha(request_id, step)
        best, best_k = 1.0, 0
        for k in range(1, self.max_tokens + 1):
            s = expected_speedup(a, k, self.cost)
            if s > best + 1e-9:
                best, best_k = s, k
        return best_k

    def observe(self, request_id: str, num_drafts: int, num_accepted: int, step: int) -> None:
        """Record a verification: ``num_accepted`` of ``num_drafts`` drafts kept."""
        acc, judged, last = self._counts.get(request_id, (0.0, 0.0, step))
        decay = _DECAY ** (step - last)
        judged_now = num_accepted + (1 if num_accepted < num_drafts else 0)
        self._counts[request_id] = (acc * decay + num_accepted, judged * decay + judged_now, step)

    def forget(self, request_id: str) -> None:
        self._counts.pop(request_id, None)


def default_draft_cost(config: SpeculativeConfig, target: nn.Module, drafter: Drafter) -> float:
    """c when the config gives none: 0.02 for prompt lookup, else draft / target parameters."""
    if config.draft_cost is not None:
        return float(config.draft_cost)
    if isinstance(drafter, DraftModelDrafter):
        ratio = sum(p.numel() for p in drafter.model.parameters()) / max(sum(p.numel() for p in target.parameters()), 1)
        return float(min(ratio, 1.0))
    return 0.02


def record_verification(metrics: RequestMetrics, stats: dict[str, float], num_drafts: int, accepted: int) -> None:
    """Count one verification of ``num_drafts`` drafts, ``accepted`` of them kept, on a request and in ``stats``."""
    metrics.num_draft_tokens += num_drafts
    metrics.num_accepted_tokens += accepted
    metrics.num_spec_steps += 1
    stats["spec_steps"] += 1
    stats["draft_tokens"] += num_drafts
    stats["accepted_tokens"] += accepted
    stats["spec_rejections"] += accepted < num_drafts


def derive_rates(stats: dict[str, float]) -> None:
    """Fill in ``stats``' derived figures: acceptance rate, alpha, accepted tokens per verify step."""
    s = stats
    s["acceptance_rate"] = s["accepted_tokens"] / max(s["draft_tokens"], 1)
    s["alpha"] = s["accepted_tokens"] / max(s["accepted_tokens"] + s["spec_rejections"], 1)
    s["accepted_tokens_per_step"] = (s["accepted_tokens"] + s["spec_steps"]) / max(s["spec_steps"], 1)


__all__ = [
    "SpeculationPolicy",
    "SpeculativeConfig",
    "default_draft_cost",
    "derive_rates",
    "expected_speedup",
    "make_drafter",
    "record_verification",
    "rejection_sample",
    "verify",
]
