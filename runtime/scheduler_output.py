"""The boundaries around the scheduler: what it tells the model runner, and what comes back.

As in vLLM v1 (Kwon et al. 2023), the scheduler never touches tensors. Each step it emits
a :class:`SchedulerOutput` that says, per request, which tokens to run and where their
keys and values go; the model runner turns that into ``input_ids``, ``position_ids``,
slot mapping, block tables and sequence lengths, runs the model, samples, and hands back a
:class:`ModelRunnerOutput`; the scheduler's ``update_from_output`` turns it into
:class:`StepOutput` deltas. One step is in flight at a time.

For every scheduled request (new or cached) the runner needs exactly::

    tokens    = data.new_token_ids                       # this step's inputs, in order
    positions = data.num_computed_tokens + arange(len(tokens))
    slots     = block_table[positions // block_size] * block_size + positions % block_size
    seq_len   = data.num_computed_tokens + len(tokens)   # attend over the cache up to here
    sample    = data.sample                              # logits of the last token(s) wanted?

A request's block table is ``NewRequestData.block_ids`` when it arrives and grows by
``CachedRequestData.new_block_ids`` each later step; the runner drops it when the id
appears in ``preempted_req_ids`` or ``finished_req_ids``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kiln.runtime.request import FinishReason, SamplingParams, TokenLogprobs


@dataclass(frozen=True, kw_only=True)
class NewRequestData:
    """A request the runner has not seen, or sees again after a preemption: build its state from this."""

    request_id: str  # the request's id
    prompt_token_ids: list[int]  # the prompt (repetition penalty counts these)
    output_token_ids: list[int]  # tokens generated before a preemption (empty when new); recomputed too
    block_ids: list[int]  # the whole block table; prefix-cache hit blocks first
    num_computed_tokens: int  # tokens already in the cache (a prefix hit): the first new token's position
    new_token_ids: list[int]  # this step's inputs: (prompt + output)[num_computed : num_computed + n]
    sample: bool  # True when this step reaches the last known token: sample from its logits
    sampling_params: SamplingParams  # how to sample this request


@dataclass(frozen=True, kw_only=True)
class CachedRequestData:
    """A request the runner already holds, scheduled again: the next chunk, a decode step, or drafts."""

    request_id: str  # the request's id
    new_block_ids: list[int]  # blocks appended to its block table this step (often empty)
    num_computed_tokens: int  # tokens already in the cache: the position of new_token_ids[0]
    new_token_ids: list[int]  # this step's inputs: the next prompt chunk, or the last sampled token + drafts;
    # with asynchronous scheduling the last token may still be pending (scheduler.PLACEHOLDER)
    sample: bool  # True when this step reaches the last known token: sample from its logits


@dataclass(frozen=True, kw_only=True)
class SchedulerOutput:
    """One step's work. Token counts include draft tokens; every list is a fresh copy."""

    scheduled_new_reqs: list[NewRequestData]  # admitted this step (new or resumed after preemption)
    scheduled_cached_reqs: list[CachedRequestData]  # running requests continuing, in admission order
    num_scheduled_tokens: dict[str, int]  # request id -> tokens computed this step (len(new_token_ids))
    total_num_scheduled_tokens: int  # sum of num_scheduled_tokens: the flattened token axis length
    scheduled_spec_decode_tokens: dict[str, list[int]]  # request id -> draft tokens ending its new_token_ids
    preempted_req_ids: set[str]  # preempted this step: drop their state and blocks (they come back as new)
    finished_req_ids: set[str]  # finished or aborted since the last step: drop their state
    block_size: int  # tokens per KV block, for slot mapping

    @property
    def num_reqs(self) -> int:
        return len(self.scheduled_new_reqs) + len(self.scheduled_cached_reqs)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(frozen=True, kw_only=True)
class ModelRunnerOutput:
    """What the runner sampled. Requests with ``sample=False`` may be absent (their tokens are ignored)."""

    sampled_token_ids: Mapping[str, Sequence[int]]  # id -> [token], or accepted drafts + 1 with speculation
    logprobs: Mapping[str, Sequence[TokenLogprobs]] | None = None  # id -> one entry per sampled token


class HostCopy:
    """A device tensor's copy to pinned host memory, started at once (non-blocking); :meth:`values` waits for it."""

    def __init__(self, tensor: Any) -> None:
        import torch

        self._event = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor

    def values(self) -> list:
        """The tensor as (nested) Python lists, once the copy is done."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


class PendingOutput:
    """A step's sampled tokens still on the device (asynchronous scheduling): a ModelRunnerOutput to come.

    ``tokens`` (N,) holds one sampled token per row; ``rows`` maps each sampling request to
    its row. A non-blocking copy to pinned host memory starts at once; :meth:`result` waits
    for it. The next step may read ``tokens`` on the device before that (the runner's feed).
    """

    def __init__(self, scheduler_output: SchedulerOutput, rows: Mapping[str, int], tokens: Any) -> None:
        self.scheduler_output = scheduler_output  # the step that sampled them
        self.rows = dict(rows)  # request id -> row of tokens
        self.tokens = tokens  # (N,) int64 on the device
        self._host = HostCopy(tokens)

    def result(self) -> ModelRunnerOutput:
        """Wait for the tokens; the step's ModelRunnerOutput."""
        values = self._host.values()
        return ModelRunnerOutput(sampled_token_ids={rid: [values[r]] for rid, r in self.rows.items()})


@dataclass(frozen=True, kw_only=True)
class StepOutput:
    """What one step did to one request: new tokens and, at the end, why it finished."""

    request_id: str  # the request's id
    new_token_ids: list[int]  # tokens appended this step (possibly empty when it finished otherwise)
    new_logprobs: list[TokenLogprobs] | None = None  # one per new token, when asked
    finish_reason: FinishReason | None = None  # None while it keeps going
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_cached_tokens: int = field(default=0)  # prompt tokens served by the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


__all__ = ["CachedRequestData", "HostCopy", "ModelRunnerOutput", "NewRequestData", "PendingOutput", "SchedulerOutput", "StepOutput"]
