"""Speculative decoding: drafters, exact verification, and when to speculate.

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
- :class:`NgramDrafter`: prompt lookup decoding (Saxena 2023; Yang et al. 2023, "Inference
  with Reference"): match the request's last n tokens (n from ``max_n`` down to
  ``min_n``) earlier in its own tokens and propose what followed. No model.
- :class:`DraftModelDrafter`: a smaller model with its own compiled step graph, paged cache
  and block allocator, running k steps (greedy or sampled with the request's params). It
  keeps its cache in sync by remembering which tokens its cache holds and shrinking that to
  the prefix the request still agrees with (rejected drafts' KV is overwritten, not copied).
- :class:`SpeculationPolicy`: how many tokens to draft per request (see its docstring).

The scheduler already schedules ``request.spec_token_ids`` after the last sampled token and
rolls ``num_computed_tokens`` back over rejected drafts; the engine glues the rest.
"""

from __future__ import annotations

import abc
import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.errors import ConfigError
from kiln.runtime.request import Request, SamplingParams
from kiln.runtime.sampler import (
    _GREEDY_EPS,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k_top_p,
    random_sample,
)

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


def processed_probs(logits: Tensor, params: Sequence[SamplingParams], seen: Sequence[Sequence[int]] | None = None
                    ) -> Tensor:
    """The distribution :func:`kiln.runtime.sampler.sample` draws row i from, (N, V) fp32.

    Repetition penalty (over ``seen[i]``: prompt + output + drafts before this position),
    temperature, top-k, top-p, min-p; a greedy row (temperature 0) is the one-hot argmax of
    its penalized logits, as the sampler picks it.
    """
    n, v = logits.shape
    if len(params) != n:
        raise ValueError(f"{n} rows of logits but {len(params)} SamplingParams")
    device = logits.device
    x = logits.float()
    penalty = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in penalty):
        if seen is None:
            raise ValueError("repetition_penalty needs the seen token ids of every row")
        x = apply_repetition_penalty(x, torch.tensor(penalty), [seen[i] if penalty[i] != 1.0 else [] for i in range(n)])
    greedy = [p.temperature < _GREEDY_EPS for p in params]
    onehot = F.one_hot(x.argmax(dim=-1), v).float()  # (N, V)
    if all(greedy):
        return onehot
    temps = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)], device=device)
    y = x / temps.unsqueeze(1)
    top_k = [p.top_k if p.top_k > 0 else v for p in params]
    top_p = [p.top_p for p in params]
    if any(k < v for k in top_k) or any(q < 1.0 for q in top_p):
        y = apply_top_k_top_p(
            y,
            torch.tensor(top_k, device=device) if any(k < v for k in top_k) else None,
            torch.tensor(top_p, device=device) if any(q < 1.0 for q in top_p) else None,
        )
    if any(p.min_p > 0 for p in params):
        y = apply_min_p(y, torch.tensor([p.min_p for p in params], device=device))
    return torch.where(torch.tensor(greedy, device=device).unsqueeze(1), onehot, y.softmax(dim=-1))


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


def verify(
    logits: Tensor,
    drafts: Sequence[Sequence[int]],
    draft_probs: Sequence[Tensor | None],
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    token_ids: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Verify the drafts of several requests from the target's logits; the tokens each yields.

    ``logits`` holds ``len(drafts[i]) + 1`` rows per request, in order: the target's logits
    after the last known token and after each draft. ``draft_probs[i]`` is (k_i, V') with
    V' <= V (None: a deterministic drafter). ``token_ids[i]`` (prompt + output) is needed only
    for rows with a repetition penalty.
    """
    counts = [len(d) for d in drafts]
    n, kmax, v = len(drafts), max(counts, default=0), logits.shape[-1]
    if logits.shape[0] != sum(counts) + n:
        raise ValueError(f"{logits.shape[0]} rows of logits for drafts needing {sum(counts) + n}")
    if all(p.temperature < _GREEDY_EPS and p.repetition_penalty == 1.0 for p in params):  # the common fast path
        best, out, row = logits.argmax(dim=-1).tolist(), [], 0
        for d in drafts:
            a = next((j for j, t in enumerate(d) if t != best[row + j]), len(d))  # the leading matches
            out.append(list(d[:a]) + [best[row + a]])
            row += len(d) + 1
        return out
    device = logits.device
    row_params = [p for p, c in zip(params, counts, strict=True) for _ in range(c + 1)]
    seen = None
    if token_ids is not None and any(p.repetition_penalty != 1.0 for p in params):
        seen = [list(t) + list(d[:j]) for t, d in zip(token_ids, drafts, strict=True) for j in range(len(d) + 1)]
    flat = processed_probs(logits, row_params, seen)  # (sum k_i + 1, V)
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


# -- drafters ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DraftRequest:
    """What a drafter is asked for one request."""

    request: Request  # its tokens (prompt + output) and sampling params
    num_tokens: int  # draft this many tokens at most (>= 1)
    generator: torch.Generator | None = None  # the request's generator, for sampled drafts


@dataclass(frozen=True, kw_only=True)
class Draft:
    """One request's proposal."""

    token_ids: list[int]  # the draft tokens, in order (at least one)
    probs: Tensor | None = None  # (len(token_ids), V' <= V) q each was drawn from; None: a point mass


class Drafter(abc.ABC):
    """Proposes draft tokens for requests. Stateful drafters drop a request on the hooks."""

    @abc.abstractmethod
    def propose(self, batch: Sequence[DraftRequest]) -> dict[str, Draft]:
        """Drafts for some of ``batch`` (a request without a proposal is simply absent)."""

    def on_finished(self, request_id: str) -> None:  # noqa: B027  (optional hook)
        """The request finished or was aborted: forget it."""

    def on_preempted(self, request_id: str) -> None:
        """The request was preempted (it comes back later with the same tokens)."""
        self.on_finished(request_id)


class NgramDrafter(Drafter):
    """Prompt lookup: continue the latest earlier occurrence of the request's last n-gram.

    n runs from ``max_n`` down to ``min_n``; the first n with a match wins. Among matches,
    the latest one followed by a full ``k`` tokens is preferred (recent context predicts
    best), else the latest one. Proposals are deterministic: ``q`` is a point mass.

    :meth:`lookup` searches a token list from scratch; :meth:`propose` keeps, per request, the
    start positions of each of its n-grams and adds only the tokens that arrived since the last
    step, so a proposal costs O(new tokens), not O(context), on the host's critical path.
    """

    def __init__(self, *, min_n: int = 1, max_n: int = 3) -> None:
        if not 1 <= min_n <= max_n:
            raise ConfigError(f"NgramDrafter needs 1 <= min_n <= max_n, got {min_n} and {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._index: dict[str, _NgramIndex] = {}

    def propose(self, batch: Sequence[DraftRequest]) -> dict[str, Draft]:
        out = {}
        for d in batch:
            index = self._index.get(d.request.request_id)
            if index is None:
                index = self._index[d.request.request_id] = _NgramIndex(self.min_n, self.max_n)
            ids = index.lookup(d.request, d.num_tokens)
            if ids:
                out[d.request.request_id] = Draft(token_ids=ids)
        return out

    def on_finished(self, request_id: str) -> None:
        self._index.pop(request_id, None)

    def on_preempted(self, request_id: str) -> None:
        pass  # its tokens stay as they were: the index stays valid

    def lookup(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed an earlier occurrence of ``tokens``' last n-gram."""
        arr = np.asarray(tokens, dtype=np.int64)
        length = len(arr)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(arr[: length - 1], n)  # starts 0 .. L-1-n
            hits = np.flatnonzero((windows == arr[length - n :]).all(axis=1))
            if hits.size:
                full = hits[hits <= length - n - k]
                start = int(full[-1] if full.size else hits[-1]) + n
                return arr[start : start + k].tolist()
        return []


class _NgramIndex:
    """The start positions of every n-gram (``min_n <= n <= max_n``) of one request's tokens, ascending."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []  # the tokens indexed so far (a request's tokens only grow)
        self.starts: dict[tuple[int, ...], list[int]] = {}  # n-gram -> where it starts

    def _extend(self, request: Request) -> None:
        old, length = len(self.tokens), request.num_tokens
        if old and (old > length or request.token_slice(old - 1, old) != self.tokens[-1:]):
            self.tokens, self.starts = [], {}  # not the tokens indexed before: start over
            old = 0
        self.tokens += request.token_slice(old, length)
        toks = self.tokens
        for end in range(old, length):  # every n-gram that ends at a new token
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                self.starts.setdefault(tuple(toks[end - n + 1 : end + 1]), []).append(end - n + 1)

    def lookup(self, request: Request, k: int) -> list[int]:
        """As :meth:`NgramDrafter.lookup` over the request's tokens."""
        self._extend(request)
        toks, length = self.tokens, len(self.tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            starts = self.starts.get(tuple(toks[length - n :]), [])
            last = bisect.bisect_right(starts, length - 1 - n)  # earlier occurrences: not the suffix itself
            if last:
                full = bisect.bisect_right(starts, length - n - k, hi=last)
                start = starts[(full if full else last) - 1] + n
                return toks[start : start + k]
        return []


@dataclass
class _DraftState:
    block_ids: list[int] = field(default_factory=list)  # the drafter's block table for this request
    tokens: list[int] = field(default_factory=list)  # the tokens whose KV its cache holds, by position
    num_known: int = 0  # tokens[:num_known] were the request's own tokens, so they never change


class DraftModelDrafter(Drafter):
    """A smaller model drafting k tokens per request, with its own step graph and paged cache.

    Each :meth:`propose` is k batched steps of the draft model: first every request catches
    up on the tokens its cache lacks (the prompt at first, then the last accepted drafts
    and the target's own token) and drafts token 1; then each further step feeds the
    previous draft. Tokens are drawn from the request's processed distribution (greedy
    requests take the argmax), whose rows are returned as ``q`` for verification.

    The drafts stay on the device until the last of the k steps: each step takes its input
    tokens from the previous step's picks on the device (the runner's ``feed``), so the
    host waits once per :meth:`propose`, not once per draft token (a request with a
    repetition penalty needs its drafts on the host each step, and then waits each step).
    With ``cuda_graphs`` the draft model's steps replay CUDA graphs like the target's
    (:meth:`kiln.runtime.model_runner.ModelRunner.enable_cuda_graphs`).
    """

    def __init__(
        self,
        model: nn.Module | str | os.PathLike[str],
        *,
        block_size: int,
        num_blocks: int,
        vocab_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cuda_graphs: dict[str, object] | None = None,
    ) -> None:
        """``vocab_size``: the target's, to check; a smaller draft vocabulary has probability 0 above it.
        ``cuda_graphs``: keyword arguments of ``ModelRunner.enable_cuda_graphs`` for the draft model's runner
        (None: its steps run op by op)."""
        from kiln.runtime.model_runner import ModelRunner

        if not isinstance(model, nn.Module):
            from kiln.models import load_model

            model = load_model(str(model), dtype=dtype or torch.float32, device=device)
        self.model = model.eval()
        self.runner = ModelRunner(self.model, block_size=block_size, num_blocks=num_blocks, device=device)
        if cuda_graphs is not None:
            self.runner.enable_cuda_graphs(**cuda_graphs)  # type: ignore[arg-type]
        draft_vocab = int(getattr(getattr(self.model, "config", None), "vocab_size", 0) or 0)
        if vocab_size is not None and draft_vocab > vocab_size:
            raise ConfigError(
                f"the draft model's vocabulary ({draft_vocab}) is larger than the target's ({vocab_size}); "
                "the drafter must share the target's tokenizer"
            )
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack of free block ids
        self._states: dict[str, _DraftState] = {}

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def on_finished(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None:
            self._free.extend(reversed(state.block_ids))

    def _reserve(self, state: _DraftState, num_positions: int) -> bool:
        need = -(-num_positions // self.block_size) - len(state.block_ids)
        if need > len(self._free):
            return False
        for _ in range(max(need, 0)):
            state.block_ids.append(self._free.pop())
        return True

    @torch.no_grad()
    def propose(self, batch: Sequence[DraftRequest]) -> dict[str, Draft]:
        from kiln.runtime.model_runner import SequenceStep

        jobs: list[tuple[DraftRequest, _DraftState, list[int]]] = []
        steps: list[SequenceStep] = []
        for d in batch:
            rid, tokens = d.request.request_id, d.request.all_token_ids
            state = self._states.setdefault(rid, _DraftState())
            c = state.num_known  # shrink the cached tokens to the prefix the request agrees with
            while c < min(len(state.tokens), len(tokens)) and state.tokens[c] == tokens[c]:
                c += 1
            c = min(c, len(tokens) - 1)  # the last token's logits draft the first token
            if not self._reserve(state, len(tokens) + d.num_tokens - 1):
                continue  # the draft cache is full: no proposal this step (always correct)
            del state.tokens[c:]
            state.num_known = c
            jobs.append((d, state, tokens))
            steps.append(SequenceStep(tokens[c:], c, state.block_ids))
        if not jobs:
            return {}
        drafted: list[list[int]] = [[] for _ in jobs]  # filled on the host at the end (or each step, see above)
        probs: list[list[Tensor]] = [[] for _ in jobs]
        picked: list[tuple[list[int], Tensor]] = []  # (active jobs, their picks (len(active),) on the device)
        on_host = any(d.request.sampling_params.repetition_penalty != 1.0 for d, _, _ in jobs)
        active = list(range(len(jobs)))
        logits = self.runner.execute(steps)  # (len(active), V')
        for j in range(max(d.num_tokens for d, _, _ in jobs)):
            params = [jobs[i][0].request.sampling_params for i in active]
            greedy = [p.temperature < _GREEDY_EPS for p in params]
            if all(greedy) and not on_host:
                picks = logits.argmax(dim=-1)  # the greedy draft; q is a point mass
            else:
                seen = [jobs[i][2] + drafted[i] for i in active] if on_host else None
                q = processed_probs(logits, params, seen)  # (len(active), V')
                picks = q.argmax(dim=-1)
                if not all(greedy):
                    gens = [None if g else jobs[i][0].generator for i, g in zip(active, greedy, strict=True)]
                    sampled = random_sample(q, gens)
                    picks = torch.where(torch.tensor(greedy, device=q.device), picks, sampled)
                    for row, (i, g) in enumerate(zip(active, greedy, strict=True)):
                        if not g:
                            probs[i].append(q[row])
            if on_host:
                for i, t in zip(active, picks.tolist(), strict=True):
                    drafted[i].append(t)
            else:
                picked.append((active, picks))
            done = j + 1
            nxt = [(row, i) for row, i in enumerate(active) if done < jobs[i][0].num_tokens]
            if not nxt:
                break
            active = [i for _, i in nxt]
            if on_host:
                logits = self.runner.execute([
                    SequenceStep([drafted[i][-1]], len(jobs[i][2]) + j, jobs[i][1].block_ids) for i in active
                ])
            else:  # the input token is this step's pick, copied on the device
                logits = self.runner.execute(
                    [SequenceStep([0], len(jobs[i][2]) + j, jobs[i][1].block_ids) for i in active],
                    (picks, [row for row, _ in nxt]),
                )
        if picked:  # the one wait of this proposal
            flat = torch.cat([p for _, p in picked]).tolist()
            at = 0
            for rows, _ in picked:
                for i in rows:
                    drafted[i].append(flat[at])
                    at += 1
        out = {}
        for (d, state, tokens), ids, ps in zip(jobs, drafted, probs, strict=True):
            state.tokens = tokens + ids[:-1]  # the last draft's KV was never computed
            state.num_known = len(tokens)
            out[d.request.request_id] = Draft(token_ids=ids, probs=torch.stack(ps) if ps else None)
        return out


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


__all__ = [
    "DraftModelDrafter",
    "Draft",
    "DraftRequest",
    "Drafter",
    "NgramDrafter",
    "SpeculationPolicy",
    "SpeculativeConfig",
    "default_draft_cost",
    "expected_speedup",
    "make_drafter",
    "processed_probs",
    "rejection_sample",
    "verify",
]
