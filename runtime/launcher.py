"""Launching a step: a scheduler's step becomes a runner call, and its logits become tokens.

The engine (``kiln.runtime.engine``) decides *when* a step runs (lockstep, or asynchronously
one step ahead as vLLM's async scheduling does); the :class:`Launcher` does the running: it
turns a :class:`SchedulerOutput` into the runner's per-sequence steps, launches them, and
samples (or, for speculative rows, verifies) the logits. Asynchronous launches return a
:class:`PendingOutput` whose tokens stay on the device and feed the next step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kiln.runtime.model_runner import SequenceStep
from kiln.runtime.request import Request, SamplingParams
from kiln.runtime.sampler import _GREEDY_EPS, sample, to_device
from kiln.runtime.scheduler import PLACEHOLDER
from kiln.runtime.scheduler_output import ModelRunnerOutput, PendingOutput, SchedulerOutput
from kiln.runtime.spec_async import SpecPending

if TYPE_CHECKING:
    from kiln.runtime.spec_async import AsyncSpeculation
    from kiln.runtime.speculator import Speculator

_GREEDY_ROW = (SamplingParams(temperature=0.0), None)  # a logits row nothing samples from


@dataclass
class _Launched:
    """A lockstep step on its way: what :meth:`Launcher.collect` needs to sample and verify it."""

    scheduler_output: SchedulerOutput  # the step the scheduler made
    logits: torch.Tensor | None  # (rows, V) on the device, still being computed (None: nothing ran)
    wanted: list  # (first logits row, sequence) of rows to sample
    spec: list  # (first logits row, sequence, drafts) to verify


@dataclass
class _Sequence:
    """The engine's side of one request: what the runner and the detokenizer need."""

    request: Request  # the scheduler's request (its token lists are the truth)
    prompt: str | None  # the prompt text, when given as text
    block_ids: list[int] = field(default_factory=list)  # block table, grown as the scheduler allocates
    generator: torch.Generator | None = None  # per-request RNG when a seed is given
    text: str = ""  # detokenized output so far
    prefix_offset: int = 0  # incremental detokenization: tokens before this are settled text ...
    read_offset: int = 0  # ... and text up to this token has been emitted
    draft_probs: torch.Tensor | None = None  # q of the drafts in request.spec_token_ids (None: point masses)


class Launcher:
    """Runs scheduled steps on a runner and samples their logits (see the module docstring).

    ``seqs`` is the engine's live table of requests (shared, not copied); ``speculator`` verifies
    drafted rows in lockstep, ``spec_async`` drafts and verifies on the device.
    """

    def __init__(self, runner: Any, seqs: dict[str, _Sequence], speculator: Speculator | None,
                 spec_async: AsyncSpeculation | None) -> None:  # fmt: skip
        self.runner = runner
        self.seqs = seqs
        self.speculator = speculator
        self.spec_async = spec_async

    def steps(
        self, so: SchedulerOutput
    ) -> tuple[list[SequenceStep], list[tuple[int, _Sequence]], list[tuple[int, _Sequence, list[int]]]]:
        """The runner's steps for ``so``; the rows to sample and the rows (with drafts) to verify."""
        steps: list[SequenceStep] = []
        wanted: list[tuple[int, _Sequence]] = []  # (first logits row, sequence) of rows to sample
        spec: list[tuple[int, _Sequence, list[int]]] = []  # (first logits row, sequence, drafts) to verify
        num_rows = 0
        for new in so.scheduled_new_reqs:
            seq = self.seqs[new.request_id]
            seq.block_ids = list(new.block_ids)
            steps.append(SequenceStep(list(new.new_token_ids), new.num_computed_tokens, seq.block_ids))
            if new.sample:
                wanted.append((num_rows, seq))
            num_rows += 1
        for cached in so.scheduled_cached_reqs:
            seq = self.seqs[cached.request_id]
            seq.block_ids.extend(cached.new_block_ids)
            drafts = so.scheduled_spec_decode_tokens.get(cached.request_id, [])
            steps.append(
                SequenceStep(
                    list(cached.new_token_ids),
                    cached.num_computed_tokens,
                    seq.block_ids,
                    num_logits=len(drafts) + 1,
                )
            )
            if drafts:
                spec.append((num_rows, seq, list(drafts)))
            elif cached.sample:
                wanted.append((num_rows, seq))
            num_rows += len(drafts) + 1
        return steps, wanted, spec

    @staticmethod
    def picked(logits: torch.Tensor, wanted: list[tuple[int, _Sequence]]) -> torch.Tensor:
        """The rows of ``logits`` to sample."""
        if len(wanted) < logits.shape[0] or wanted[-1][0] != len(wanted) - 1:  # not simply every row in order
            return logits.index_select(0, to_device([i for i, _ in wanted], logits.device))
        return logits

    def launch(self, so: SchedulerOutput, prev: PendingOutput | None) -> PendingOutput:
        """Run and sample ``so`` without waiting for the device; pending tokens come from ``prev`` on the device."""
        steps, wanted, spec = self.steps(so)
        if spec:
            raise RuntimeError("asynchronous steps do not verify drafts")
        feed = None
        rids = [d.request_id for d in (*so.scheduled_new_reqs, *so.scheduled_cached_reqs)]
        sources = [-1] * len(steps)
        for i, (rid, step) in enumerate(zip(rids, steps, strict=True)):
            if step.token_ids[0] == PLACEHOLDER:
                if prev is None or rid not in prev.rows:
                    raise RuntimeError(f"request {rid!r} has a pending token that no step in flight sampled")
                sources[i] = prev.rows[rid]
        if prev is not None and any(src >= 0 for src in sources):
            feed = (prev.tokens, sources)
        logits = self.runner.execute(steps, feed)  # (rows, V)
        seqs = [s for _, s in wanted]
        if not seqs:
            return PendingOutput(so, {}, torch.empty(0, dtype=torch.long, device=logits.device))
        positions = [steps[r].start_position + len(steps[r].token_ids) for r, _ in wanted]  # one row a step
        out = sample(self.picked(logits, wanted), [s.request.sampling_params for s in seqs],
                     [s.generator for s in seqs], positions=positions)  # fmt: skip
        return PendingOutput(so, {s.request.request_id: k for k, s in enumerate(seqs)}, out.token_ids)

    def launch_lockstep(self, so: SchedulerOutput) -> _Launched:
        """Launch ``so``'s step (nothing waits for the device yet)."""
        steps, wanted, spec = self.steps(so)
        logits = self.runner.execute(steps) if steps else None  # (rows, V): one per sequence, k + 1 per draft
        return _Launched(so, logits, wanted, spec)

    def collect(self, launched: _Launched) -> ModelRunnerOutput:
        """Sample and verify a launched lockstep step: its tokens on the host."""
        logits, wanted, spec = launched.logits, launched.wanted, launched.spec
        if logits is None:
            return ModelRunnerOutput(sampled_token_ids={})
        sampled: dict[str, list[int]] = {}
        logprobs: dict[str, list] = {}
        if wanted:
            seqs = [s for _, s in wanted]
            picked = self.picked(logits, wanted)
            out = sample(
                picked,
                [s.request.sampling_params for s in seqs],
                [s.generator for s in seqs],
                [s.request.output_token_ids for s in seqs],
                [s.request.prompt_token_ids for s in seqs],
                positions=[s.request.num_tokens for s in seqs],  # lockstep: every earlier token is known
            )
            sampled.update(
                (s.request.request_id, [t]) for s, t in zip(seqs, out.token_ids.tolist(), strict=True)
            )
            if out.logprobs is not None:
                entries = out.logprobs.to_dicts([s.request.sampling_params.logprobs for s in seqs])
                logprobs.update(
                    (s.request.request_id, [e]) for s, e in zip(seqs, entries, strict=True) if e is not None
                )
        if spec:
            assert self.speculator is not None
            self.speculator.verify(logits, spec, sampled, logprobs, self.seqs)
        return ModelRunnerOutput(sampled_token_ids=sampled, logprobs=logprobs or None)

    def launch_spec(self, so: SchedulerOutput, prev: SpecPending | None) -> SpecPending:
        """Launch an asynchronous speculative step and its device-side verification (nothing waits)."""
        assert self.spec_async is not None
        steps, _, _ = self.steps(so)
        requests = [self.seqs[d.request_id].request for d in (*so.scheduled_new_reqs, *so.scheduled_cached_reqs)]
        info, feed, rows, verified = self.spec_async.describe(so, steps, requests, prev)
        logits = self.runner.execute(steps, feed)
        params = None  # per logits row (None: all greedy): sampled rows verify with a draw from the target
        if any(r.sampling_params.temperature >= _GREEDY_EPS and r.request_id in rows for r in requests):
            # only rows that sample draw (and use the generator): a prefill chunk's row is discarded
            params = [(r.sampling_params, self.seqs[r.request_id].generator) if r.request_id in rows else _GREEDY_ROW
                      for step, r in zip(steps, requests, strict=True) for _ in range(step.num_logits)]  # fmt: skip
        positions = self.runner.logits_positions(logits.shape[0]) if params is not None else None
        return self.spec_async.advance(so, logits, self.runner.last_input_ids, info, rows, verified, params,
                                        positions)  # fmt: skip
