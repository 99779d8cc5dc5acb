"""Drafters for speculative decoding: they propose the tokens the target then verifies.

- :class:`NgramDrafter`: prompt lookup decoding (Saxena 2023; Yang et al. 2023, "Inference
  with Reference"): match the request's last n tokens (n from ``max_n`` down to
  ``min_n``) earlier in its own tokens and propose what followed. No model.
- :class:`DraftModelDrafter`: a smaller model with its own compiled step graph, paged cache
  and block allocator, running k steps (greedy or sampled with the request's params). It
  keeps its cache in sync by remembering which tokens its cache holds and shrinking that to
  the prefix the request still agrees with (rejected drafts' KV is overwritten, not copied).

Verification, the config and the policy live in :mod:`kiln.runtime.speculative`.
"""

from __future__ import annotations

import abc
import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from kiln.errors import ConfigError
from kiln.runtime.request import Request
from kiln.runtime.sampler import _GREEDY_EPS, processed_probs, random_sample


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
        toks, starts = self.tokens, self.starts
        for n in range(self.min_n, self.max_n + 1):  # every n-gram that ends at a new token, by start
            first = max(old - n + 1, 0)
            # tuples without per-gram slicing; the slices' lengths differ only when no n-gram fits (zip stops)
            grams = zip(*(toks[first + j : length - n + 1 + j] for j in range(n)), strict=False)
            for start, gram in enumerate(grams, first):
                starts.setdefault(gram, []).append(start)  # ascending per n-gram (one n per tuple length)

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
        drafted: list[list[int]] = [
            [] for _ in jobs
        ]  # filled on the host at the end (or each step, see above)
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
                logits = self.runner.execute(
                    [
                        SequenceStep([drafted[i][-1]], len(jobs[i][2]) + j, jobs[i][1].block_ids)
                        for i in active
                    ]
                )
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


__all__ = ["Draft", "DraftModelDrafter", "DraftRequest", "Drafter", "NgramDrafter"]
