"""Prompt-lookup speculation without a host round trip per step (asynchronous speculative decoding).

In lockstep speculation the host must see each step's verified tokens before it can draft,
schedule and launch the next step, so all of its Python work adds to the GPU's time. For
prompt lookup (``SpeculativeConfig(method="ngram")``), everything the
next step needs can be made on the device instead, as vLLM v1 does for asynchronous
scheduling: after each step one kernel (:func:`spec_advance`)

1. verifies the step's drafts against the target's token per row (its argmax, or a draw
   from it for a sampling request): the longest matching prefix, then the target's own token,
2. appends the accepted tokens to the request's token history kept on the device,
3. looks up the next drafts there (the same n-gram rule as
   :class:`kiln.runtime.drafters.NgramDrafter`), and
4. writes the next step's input tokens: the new last token, then ``k`` drafts.

The host schedules the next step before it knows how many drafts were accepted: it counts
every draft as accepted (an upper bound, which is what blocks are allocated for), and the
runner's feed (:class:`kiln.runtime.step_inputs.DeviceFeed`) moves the fed tokens'
positions, slots and sequence lengths back on the device by the rejections the previous
step counted. The host learns the tokens one step later (one device-to-host copy per step)
and takes back its over-count then, exactly as lockstep verification does.

The host chooses how many drafts a request verifies (the policy's ``k``, capped by what it
may still generate); where the lookup found fewer, the rest are padding that verification
never accepts (their positions are rolled back like any rejected draft), so a step's shape
never depends on the device's results. A request whose lookups keep finding nothing
verifies no drafts until one does. Sampling requests verify by the same comparison against a
draw from the target per position, which is exact speculative sampling for point-mass drafts
(:func:`row_tokens`); requests needing logprobs or a repetition penalty run the batch in lockstep.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from kiln.errors import ConfigError
from kiln.runtime.drafters import NgramDrafter
from kiln.runtime.request import Request, SamplingParams
from kiln.runtime.sampler import _GREEDY_EPS, greedy_argmax, sample, to_device
from kiln.runtime.scheduler import PLACEHOLDER
from kiln.runtime.scheduler_output import HostCopy, ModelRunnerOutput, SchedulerOutput
from kiln.runtime.speculative import SpeculationPolicy, derive_rates, record_verification
from kiln.runtime.step_inputs import DeviceFeed

#: Columns of :func:`spec_advance`'s host-bound result after the ``k + 1`` tokens.
NUM_OUT, DRAFTED, ROLLBACK, NEXT_REAL = 0, 1, 2, 3
#: The longest n-gram the device-side lookup searches (``SpeculativeConfig.prompt_lookup_max`` at most this).
MAX_DEVICE_NGRAM = 3
#: After this many lookups in a row found no draft, a request's steps verify none (no padding) until one does.
_DRY_STEPS = 2
#: Columns of the per-sequence step description (``info``) that :func:`spec_advance` reads.
SLOT, FIRST_ROW, NUM_VERIFIED, DRAFT_ROW, NUM_REAL = 0, 1, 2, 3, 4


class DeviceHistory:
    """Per-request token histories on the device, for :func:`spec_advance`.

    A request gets a slot when it first samples in asynchronous speculative mode; its known
    tokens are uploaded once then, and every later token is appended on the device.
    """

    def __init__(self, num_slots: int, max_len: int, num_drafts: int, device: torch.device) -> None:
        self.num_drafts = num_drafts
        # int32 token ids: half the memory of int64 (slots x max_model_len can be large for long contexts)
        self.tokens = torch.zeros(num_slots, max_len + num_drafts + 1, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(num_slots, dtype=torch.int64, device=device)
        #: per slot, the real drafts (not padding) of the lookup's last proposal
        self.real = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.device = device
        self._free = list(range(num_slots - 1, -1, -1))
        self.slots: dict[str, int] = {}

    def slot(self, request_id: str, tokens: list[int]) -> int:
        """The request's slot; a new one is filled with ``tokens`` (the request's known tokens)."""
        s = self.slots.get(request_id)
        if s is not None:
            return s
        if not self._free:
            raise RuntimeError("no free token-history slot for asynchronous speculation (more live requests "
                               "than slots)")  # fmt: skip
        s = self.slots[request_id] = self._free.pop()
        t = torch.tensor(tokens, dtype=torch.int32)
        if self.device.type == "cuda":
            t = t.pin_memory()
        self.tokens[s, : len(tokens)].copy_(t, non_blocking=True)
        self.lengths[s] = len(tokens)
        self.real[s] = 0
        return s

    def release(self, request_id: str) -> None:
        s = self.slots.pop(request_id, None)
        if s is not None:
            self._free.append(s)

    def clear(self) -> None:
        for rid in list(self.slots):
            self.release(rid)


def spec_advance(
    best: Tensor, input_ids: Tensor, info: Tensor, history: DeviceHistory, min_n: int, max_n: int
) -> tuple[Tensor, Tensor]:
    """Verify, append, look up and feed, for every sequence of a step (see the module docstring).

    ``best`` (rows,): the target's argmax per logits row; ``input_ids`` (T,): the step's tokens;
    ``info`` (S, 5) int64: per sequence its history slot (-1: it sampled nothing), its first
    logits row, how many drafts it verified, the token row of its first draft, and how many
    of them are real (-1: as many as the device's last lookup proposed; the rest are padding).
    Returns ``(result, nxt)``. result (S, k + 5): the tokens made (the first ``num_out``), then
    num_out, the real drafts verified, the positions to roll back and the real drafts in ``nxt``.
    nxt (S, k + 1): the next step's input tokens (the new last token, then k drafts). The
    histories advance in place.
    """
    if best.device.type == "cuda":
        from kiln.backends.triton.spec_kernels import spec_advance_triton

        return spec_advance_triton(best, input_ids, info, history, min_n, max_n)
    return spec_advance_reference(best, input_ids, info, history, min_n, max_n)


def spec_advance_reference(
    best: Tensor, input_ids: Tensor, info: Tensor, history: DeviceHistory, min_n: int, max_n: int
) -> tuple[Tensor, Tensor]:
    """:func:`spec_advance` one sequence at a time in plain Python (the CPU path and the kernels' reference)."""
    k = history.num_drafts
    result = torch.zeros(info.shape[0], k + 5, dtype=torch.int64)
    nxt = torch.zeros(info.shape[0], k + 1, dtype=torch.int64)
    lookup = NgramDrafter(min_n=min_n, max_n=max_n).lookup
    best_l, ids_l = best.tolist(), input_ids.tolist()
    for i, (slot, r0, kd, d0, given) in enumerate(info.tolist()):
        if slot < 0:
            continue
        real = min(kd, given if given >= 0 else int(history.real[slot]))
        drafts = ids_l[d0 : d0 + kd]
        a = 0
        while a < real and drafts[a] == best_l[r0 + a]:
            a += 1
        made = [*drafts[:a], best_l[r0 + a]]
        length = int(history.lengths[slot])
        history.tokens[slot, length : length + a + 1] = torch.tensor(made)
        length += a + 1
        history.lengths[slot] = length
        proposal = lookup(history.tokens[slot, :length].tolist(), k)
        history.real[slot] = len(proposal)
        result[i, : a + 1] = torch.tensor(made)
        result[i, k + 1 + NUM_OUT] = a + 1
        result[i, k + 1 + DRAFTED] = real
        result[i, k + 1 + ROLLBACK] = kd - a
        result[i, k + 1 + NEXT_REAL] = len(proposal)
        nxt[i, 0] = made[-1]
        nxt[i, 1 : 1 + len(proposal)] = torch.tensor(proposal, dtype=torch.int64)
    dev = best.device
    return result.to(dev), nxt.to(dev)


def row_tokens(logits: Tensor, params: list[tuple[SamplingParams, torch.Generator | None]] | None,
               positions: Tensor | None = None) -> Tensor:  # fmt: skip
    """The token each logits row verifies with: its argmax, or a draw from its processed distribution.

    Prompt-lookup drafts are point masses (q = 1 on the drafted token), so exact speculative
    sampling needs no draft distribution: accepting draft ``d`` with probability
    ``min(1, p(d) / q(d)) = p(d)`` and otherwise resampling from ``max(0, p - q)`` normalized
    (``p`` without ``d``) is the same as drawing ``x ~ p`` at each position and keeping the
    draft while ``x == d``: the first ``x`` that differs is the correction, distributed as
    ``p`` conditioned on ``x != d``, and when every draft is kept the last row's draw is the
    bonus token. So the greedy comparison of :func:`spec_advance` verifies sampled rows too,
    exactly, on the device. ``positions`` (rows,): the position of the token each row predicts;
    a seeded request's draw there is keyed on it (:func:`kiln.runtime.sampler.keyed_exponential`),
    so its tokens are the ones it samples without speculation.
    """
    if params is None or all(p.temperature < _GREEDY_EPS for p, _ in params):
        return greedy_argmax(logits)
    return sample(logits, [p for p, _ in params], [g for _, g in params], positions=positions).token_ids


class SpecPending:
    """An asynchronous speculative step's results, still on the device: a ModelRunnerOutput to come.

    ``result`` (S, k + 5) and ``nxt`` (S, k + 1) as :func:`spec_advance` returns them; ``rows``
    maps each sampling request to its row. A non-blocking copy of ``result`` to pinned host
    memory starts at once; :meth:`result` waits for it.
    """

    def __init__(self, scheduler_output: SchedulerOutput, rows: dict[str, int], verified: dict[str, int],
                 result: Tensor, nxt: Tensor, num_drafts: int) -> None:  # fmt: skip
        self.scheduler_output = scheduler_output
        self.rows = rows
        self.verified = verified  # request id -> drafts it verified (padding included)
        self.tokens = nxt  # the next step's input tokens per row (the runner's feed)
        self.rollback = result[:, num_drafts + 1 + ROLLBACK]
        self.k = num_drafts
        self._host = HostCopy(result)
        self.next_real: dict[str, int] = {}  # request id -> real drafts its lookup found for the next step
        self.counts: dict[
            str, tuple[int, int]
        ] = {}  # request id -> (real drafts verified, accepted), after result()

    def result(self) -> ModelRunnerOutput:
        """Wait for the tokens; the step's ModelRunnerOutput (``counts`` is filled too)."""
        values, k = self._host.values(), self.k
        sampled = {}
        for rid, r in self.rows.items():
            row = values[r]
            n = row[k + 1 + NUM_OUT]
            sampled[rid] = row[:n]
            if self.verified.get(rid):
                self.counts[rid] = (row[k + 1 + DRAFTED], n - 1)
            self.next_real[rid] = row[k + 1 + NEXT_REAL]
        return ModelRunnerOutput(sampled_token_ids=sampled)

    def record(self, seqs: Mapping[str, Any], stats: dict[str, float], policy: SpeculationPolicy) -> None:
        """After :meth:`result`: count each verification with a real draft on its request (``seqs``: the
        engine's live sequences by request id, each with a ``request``), in ``stats`` and in the policy
        (a request whose lookup found nothing ran a plain decode step)."""
        step = int(stats["steps"])
        for rid, (drafted, accepted) in self.counts.items():
            seq = seqs.get(rid)
            if drafted > 0 and seq is not None:
                record_verification(seq.request.metrics, stats, drafted, accepted)
                policy.observe(rid, drafted, accepted, step)
        derive_rates(stats)


class AsyncSpeculation:
    """The engine's asynchronous prompt-lookup speculation: device histories, step descriptions, feeds.

    Args:
        num_drafts: k, drafts per request and step (the policy may ask fewer).
        min_n, max_n: the n-gram sizes of the lookup (at most 3).
        max_num_seqs: the engine's running requests at most (histories are kept for twice as many).
        max_model_len: the longest request.
        device: the target model's device.
    """

    def __init__(self, *, num_drafts: int, min_n: int, max_n: int, max_num_seqs: int, max_model_len: int,
                 device: torch.device) -> None:  # fmt: skip
        if max_n > MAX_DEVICE_NGRAM:
            raise ConfigError(
                f"asynchronous prompt lookup searches n-grams of at most 3 tokens, got prompt_lookup_max={max_n}: "
                "lower it or pass async_scheduling=False"
            )
        self.k, self.min_n, self.max_n = num_drafts, min_n, max_n
        self.history = DeviceHistory(2 * max_num_seqs, max_model_len, num_drafts, device)
        self.host_lookup = NgramDrafter(min_n=min_n, max_n=max_n)
        self.dry: dict[str, int] = {}  # request id -> lookups in a row (as last seen) that found nothing

    def observe(self, done: SpecPending) -> None:
        """After ``done.result()``: note whose lookups keep finding nothing (they stop paying for padding)."""
        for rid, n in done.next_real.items():
            if n:
                self.dry.pop(rid, None)
            else:
                self.dry[rid] = self.dry.get(rid, 0) + 1

    def propose(self, running: list[Request], num_pending: dict[str, int], policy: SpeculationPolicy, step: int,
                max_model_len: int, num_pending_min: dict[str, int] | None = None) -> None:  # fmt: skip
        """Set the next step's ``spec_token_ids`` of every decoding request in ``running`` that speculates.

        ``num_pending`` / ``num_pending_min``: per request, the most / fewest tokens its steps in flight
        make (the scheduler's). The most bounds the context (blocks); the fewest bounds ``max_tokens``,
        so a request near its end keeps verifying a full ``k`` (tokens past ``max_tokens`` are dropped).
        """
        for request in running:
            rid = request.request_id
            p = num_pending.get(rid, 0)
            if (
                not request.sampling_params.speculative
                or request.num_computed_tokens != request.num_tokens + p - 1
            ):
                continue  # opted out, or still prefilling
            params = request.sampling_params
            p_min = (num_pending_min or num_pending).get(rid, 0)
            room = min(params.max_tokens - request.num_output_tokens - p_min, max_model_len - request.num_tokens - p) - 1
            if p and self.dry.get(request.request_id, 0) >= _DRY_STEPS:
                continue  # its lookups found nothing lately: a plain decode step (the device keeps looking)
            request.spec_token_ids = self.drafts(
                request, min(policy.num_drafts(request.request_id, step), room), p
            )

    def drafts(self, request: Request, k: int, pending: int) -> list[int]:
        """The next step's drafts of a decoding request: placeholders filled on the device while its
        tokens are pending, else the host's own lookup (its tokens are all known)."""
        if k <= 0:
            return []
        if pending:
            return [PLACEHOLDER] * k
        return self.host_lookup.lookup(request.all_token_ids, k)

    def describe(
        self, so: SchedulerOutput, steps: list, requests: list[Request], prev: SpecPending | None
    ) -> tuple[list[list[int]], DeviceFeed | None, dict[str, int], dict[str, int]]:
        """Per sequence of the step ``so``: the ``info`` rows of :func:`spec_advance`, the feed from ``prev``,
        the rows of the sampling requests, and the drafts each verifies."""
        info: list[list[int]] = []
        sources, counts = [-1] * len(steps), [0] * len(steps)
        rows: dict[str, int] = {}
        verified: dict[str, int] = {}
        spec = so.scheduled_spec_decode_tokens
        sample = {d.request_id: d.sample for d in (*so.scheduled_new_reqs, *so.scheduled_cached_reqs)}
        row = tok = 0
        for i, (step, request) in enumerate(zip(steps, requests, strict=True)):
            rid, n = request.request_id, len(step.token_ids)
            drafts = spec.get(rid, ())
            if step.token_ids[0] == PLACEHOLDER:
                if prev is None or rid not in prev.rows:
                    raise RuntimeError(f"request {rid!r} has a pending token that no step in flight made")
                sources[i], counts[i] = prev.rows[rid], n
            slot = -1
            if sample[rid]:
                slot = self.history.slot(rid, request.all_token_ids)
                rows[rid] = i
                verified[rid] = len(drafts)
            real = -1 if drafts and drafts[0] == PLACEHOLDER else len(drafts)
            info.append([slot, row, len(drafts), tok + n - len(drafts), real])
            row += step.num_logits
            tok += n
        feed = None
        if any(s >= 0 for s in sources):
            assert prev is not None
            feed = DeviceFeed(prev.tokens, sources, counts, prev.rollback)
        return info, feed, rows, verified

    def advance(self, so: SchedulerOutput, logits: Tensor, input_ids: Tensor, info: list[list[int]],
                rows: dict[str, int], verified: dict[str, int],
                params: list[tuple[SamplingParams, torch.Generator | None]] | None = None,
                positions: Tensor | None = None) -> SpecPending:  # fmt: skip
        """Verify the launched step on the device and make the next step's inputs (nothing waits).

        ``params``: per logits row, the sampling parameters and generator of its request (None:
        every row greedy). A sampled row's token is a draw from the target's processed
        distribution there (:func:`row_tokens`), keyed on ``positions`` for seeded requests.
        """
        best = row_tokens(logits, params, positions)
        info_t = to_device(info, logits.device, torch.int64)
        result, nxt = spec_advance(best, input_ids, info_t, self.history, self.min_n, self.max_n)
        return SpecPending(so, rows, verified, result, nxt, self.k)

    def release(self, request_id: str) -> None:
        self.history.release(request_id)
        self.dry.pop(request_id, None)

    def clear(self) -> None:
        """Forget every history (the engine ran a lockstep step: the next asynchronous one uploads afresh)."""
        self.history.clear()


__all__ = [
    "MAX_DEVICE_NGRAM",
    "AsyncSpeculation",
    "DeviceHistory",
    "SpecPending",
    "row_tokens",
    "spec_advance",
    "spec_advance_reference",
]
