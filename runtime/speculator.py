"""The engine's speculative side: drafting before a step, exact verification after it, and the counts.

``kiln.LLM(speculative=SpeculativeConfig(...))`` owns one :class:`Speculator`. Before each
lockstep step it asks the drafter (prompt lookup or a draft model, ``kiln.runtime.drafters``)
for up to ``k`` tokens per decoding request that allows speculation, ``k`` chosen per request
by the :class:`SpeculationPolicy` (adaptive to the measured acceptance, capped by what the
request may still generate). After the step, the target's ``k + 1`` rows of logits per drafted
request go through exact rejection sampling (Leviathan et al. 2023, Chen et al. 2023;
``kiln.runtime.speculative.verify``), and the acceptance counts land on the request's metrics,
the engine's ``stats`` and the policy.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from kiln.runtime.drafters import Drafter, DraftRequest
from kiln.runtime.request import Request
from kiln.runtime.sampler import compute_logprobs
from kiln.runtime.speculative import (
    SpeculationPolicy,
    SpeculativeConfig,
    default_draft_cost,
    derive_rates,
    make_drafter,
    record_verification,
    verify,
)

if TYPE_CHECKING:
    from kiln.runtime.launcher import _Sequence


class Speculator:
    """Drafter, policy and acceptance counts of one engine (see the module docstring).

    Args:
        config: the engine's ``SpeculativeConfig``.
        model: the target model (its cost sets the policy's default draft cost ratio).
        stats: the engine's stats dict; the speculative counters are added to it and kept up to date.
        drafter_args: ``make_drafter``'s keyword arguments (cache geometry, device, CUDA-graph settings).
    """

    def __init__(self, config: SpeculativeConfig, model: torch.nn.Module, stats: dict[str, float],
                 **drafter_args: Any) -> None:  # fmt: skip
        self.config = config
        self.drafter: Drafter = make_drafter(config, **drafter_args)
        self.policy = SpeculationPolicy(
            config.num_speculative_tokens, default_draft_cost(config, model, self.drafter), config.adaptive
        )
        self.stats = stats
        stats.update(spec_steps=0, draft_tokens=0, accepted_tokens=0, spec_rejections=0, acceptance_rate=0.0,
                     alpha=0.0, accepted_tokens_per_step=0.0)  # fmt: skip

    def forget(self, request_id: str) -> None:
        """A request finished or was aborted: drop its drafter state and its acceptance history."""
        self.drafter.on_finished(request_id)
        self.policy.forget(request_id)

    def on_preempted(self, request_id: str) -> None:
        self.drafter.on_preempted(request_id)

    def propose(self, running: Sequence[Request], seqs: dict[str, _Sequence], max_model_len: int) -> None:
        """Draft the next step's tokens of every decoding request in ``running`` that may speculate."""
        cfg = self.config
        if cfg.disable_by_batch_size is not None and len(running) > cfg.disable_by_batch_size:
            return
        step = int(self.stats["steps"])
        batch = []
        for request in running:
            if (
                not request.sampling_params.speculative
                or request.num_computed_tokens != request.num_tokens - 1
            ):
                continue  # opted out, or still prefilling
            room = min(request.sampling_params.max_tokens - request.num_output_tokens,
                       max_model_len - request.num_tokens) - 1  # a step yields drafts + 1 tokens  # fmt: skip
            k = min(self.policy.num_drafts(request.request_id, step), room)
            if k > 0:
                batch.append(
                    DraftRequest(request=request, num_tokens=k, generator=seqs[request.request_id].generator)
                )
        if not batch:
            return
        for d in batch:
            seqs[d.request.request_id].draft_probs = None
        for rid, draft in self.drafter.propose(batch).items():
            seq = seqs[rid]
            seq.request.spec_token_ids = list(draft.token_ids)
            seq.draft_probs = draft.probs

    def verify(
        self,
        logits: torch.Tensor,
        spec: list[tuple[int, _Sequence, list[int]]],
        sampled: dict[str, list[int]],
        logprobs: dict[str, list],
        live: dict[str, _Sequence],
    ) -> None:
        """Rejection-sample the drafted requests' rows of ``logits``; record the tokens each yields.

        ``spec``: (first logits row, sequence, drafts) per drafted request. The tokens go to
        ``sampled`` (and their logprobs, where asked, to ``logprobs``); requests no longer in
        ``live`` (aborted while their step ran) are not reported to the policy.
        """
        rows = [r + j for r, _, d in spec for j in range(len(d) + 1)]
        seqs = [s for _, s, _ in spec]
        drafts = [d for _, _, d in spec]
        params = [s.request.sampling_params for s in seqs]
        if len(rows) == logits.shape[0]:  # every row verifies, in order (rows ascend)
            rows_logits = logits
        else:
            rows_logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
        penalized = any(p.repetition_penalty != 1.0 for p in params)
        generated = verify(
            rows_logits, drafts,
            [s.draft_probs[: len(d)] if s.draft_probs is not None else None for s, d in zip(seqs, drafts, strict=True)],
            params, [s.generator for s in seqs], [s.request.all_token_ids for s in seqs] if penalized else None,
            [s.request.num_tokens for s in seqs],
        )  # fmt: skip
        step = int(self.stats["steps"])
        for seq, d, tokens in zip(seqs, drafts, generated, strict=True):
            rid, accepted = seq.request.request_id, len(tokens) - 1
            sampled[rid] = tokens
            seq.draft_probs = None
            record_verification(seq.request.metrics, self.stats, len(d), accepted)
            if rid in live:  # not aborted while its step ran
                self.policy.observe(rid, len(d), accepted, step)
        derive_rates(self.stats)
        if any(
            p.logprobs is not None for p in params
        ):  # each token's logprobs come from the row that chose it
            starts = itertools.accumulate(
                (len(d) + 1 for d in drafts[:-1]), initial=0
            )  # first rows in rows_logits
            used = [start + j for start, t in zip(starts, generated, strict=True) for j in range(len(t))]
            flat_params = [p for p, t in zip(params, generated, strict=True) for _ in t]
            lp = compute_logprobs(
                rows_logits.index_select(0, torch.tensor(used, device=logits.device)),
                torch.tensor([x for t in generated for x in t], device=logits.device),
                flat_params,
            )
            entries = iter(lp.to_dicts([p.logprobs for p in flat_params]) if lp is not None else [])
            for seq, p, t in zip(seqs, params, generated, strict=True):
                got = [next(entries) for _ in t]
                if p.logprobs is not None:
                    logprobs[seq.request.request_id] = got


__all__ = ["Speculator"]
