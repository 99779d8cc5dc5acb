"""Requests, their sampling parameters and their outputs.

The runtime's one idea, after vLLM v1 (Kwon et al. 2023, "Efficient Memory Management for
Large Language Model Serving with PagedAttention"): a :class:`Request` knows its tokens
(prompt + generated) and ``num_computed_tokens``, how many of them already have keys and
values in the KV cache. Every step the scheduler lets ``num_computed_tokens`` catch up
with the token count. A prefix-cache hit starts it above zero, chunked prefill catches up
in several steps, decode adds one token per step, speculative decoding adds the draft
tokens and then takes back the rejected ones, preemption resets it to zero.

:class:`SamplingParams` is the user's frozen, validated description of how to pick tokens;
:class:`RequestOutput` / :class:`CompletionOutput` are what the engine returns.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from kiln.errors import ConfigError

if TYPE_CHECKING:
    from kiln.runtime.kv_cache_manager import BlockHash

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick the next tokens of one request (vLLM's names and meanings).

    ``temperature=0`` is greedy decoding. Filters apply in Hugging Face's order:
    repetition penalty, temperature, top-k, top-p, min-p. ``stop`` and
    ``stop_token_ids`` accept a single value or any sequence and are stored as tuples.
    """

    n: int = 1  # completions per prompt (child requests sharing the prompt; completion i seeds with seed + i)
    temperature: float = 1.0  # >= 0; 0 picks the argmax (greedy)
    top_p: float = 1.0  # nucleus: smallest set of tokens whose probability reaches top_p, in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 keeps all
    min_p: float = 0.0  # drop tokens less likely than min_p * p(most likely), in [0, 1]
    repetition_penalty: float = 1.0  # > 0; HF-style over prompt + output tokens; 1 is off
    max_tokens: int = 16  # >= 1 tokens to generate at most (finish_reason "length")
    seed: int | None = None  # per-request RNG seed: same seed, same tokens, whatever the batch
    stop: Sequence[str] = ()  # strings that end generation (checked by the engine on the text)
    stop_token_ids: Sequence[int] = ()  # token ids that end generation (besides EOS)
    ignore_eos: bool = False  # keep generating after the EOS token
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob plus the top k
    speculative: bool = True  # let the engine's drafter (if any) speculate; the distribution is the same either way

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "must be an int >= 1 (completions per prompt)")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a number >= 0 (0 means greedy)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1] (1 keeps every token)")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an int >= 1, or 0 / -1 to keep every token")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1] (0 is off)")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 is off, > 1 discourages repeats)")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an int >= 1")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an int or None")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise bad("logprobs", "must be None or an int >= 0 (how many top tokens to return)")
        if not isinstance(self.speculative, bool):
            raise bad("speculative", "must be True or False")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "must be a non-empty string or a sequence of non-empty strings")
        object.__setattr__(self, "stop", stop)
        ids = (self.stop_token_ids,) if _is_int(self.stop_token_ids) else tuple(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in ids):
            raise bad("stop_token_ids", "must be non-negative token ids")
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self) -> bool:
        """Whether tokens are the argmax (temperature 0)."""
        return self.temperature == 0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # rejects NaN


class RequestStatus(enum.Enum):
    """Where a request is in its life. Finished statuses map to a finish reason."""

    WAITING = "waiting"  # queued, holds no blocks
    RUNNING = "running"  # admitted, holds blocks, scheduled every step
    PREEMPTED = "preempted"  # evicted for memory, back in the queue, will recompute
    FINISHED_STOPPED = "finished_stopped"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or max_model_len reached
    FINISHED_ABORTED = "finished_aborted"  # cancelled, or could not get KV blocks

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS: dict[RequestStatus, FinishReason] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(frozen=True)
class Logprob:
    """One token's log-probability under the model (raw logits, before any filter)."""

    logprob: float  # natural log of the probability
    rank: int  # 1 for the most likely token


#: Per generated position: the sampled token and the top-k, token id -> Logprob.
TokenLogprobs = dict[int, Logprob]


@dataclass(kw_only=True)
class RequestMetrics:
    """Timings (``time.monotonic()`` seconds) and counters of one request."""

    arrival_time: float  # when the request was created
    first_scheduled_time: float | None = None  # first admitted by the scheduler
    first_token_time: float | None = None  # first output token appended (TTFT = this - arrival)
    last_token_time: float | None = None  # latest output token appended
    finished_time: float | None = None  # finished, for any reason
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0  # times evicted and recomputed
    num_draft_tokens: int = 0  # speculative decoding: draft tokens the target verified
    num_accepted_tokens: int = 0  # ... of which it accepted
    num_spec_steps: int = 0  # ... in this many verification steps (each also yields one token of its own)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens (None before any draft was verified)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def accepted_tokens_per_step(self) -> float | None:
        """Tokens a verification step yielded on average: accepted drafts + 1 (None before one ran)."""
        return (self.num_accepted_tokens + self.num_spec_steps) / self.num_spec_steps if self.num_spec_steps else None


@dataclass(kw_only=True, eq=False)
class Request:
    """One generation request as the scheduler sees it (identity, not value, equality)."""

    request_id: str  # unique among unfinished requests
    prompt_token_ids: list[int]  # the prompt, tokenized
    sampling_params: SamplingParams = field(default_factory=SamplingParams)  # how to pick tokens
    eos_token_id: int | None = None  # the tokenizer's EOS (stops unless ignore_eos)
    cache_salt: str | None = None  # isolates prefix-cache sharing: only equal salts share blocks
    arrival_time: float = field(default_factory=time.monotonic)  # FCFS order and TTFT origin
    status: RequestStatus = RequestStatus.WAITING  # set by the scheduler
    output_token_ids: list[int] = field(default_factory=list)  # generated so far (kept on preemption)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)  # per output token if asked
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (or being computed this step)
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens to verify next step
    stop_reason: int | str | None = None  # the stop token id or stop string that finished it
    block_hashes: list[BlockHash] = field(default_factory=list)  # chained hashes of full blocks
    metrics: RequestMetrics = field(init=False)  # timings; created from arrival_time

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the output: every token known so far (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """``all_token_ids[start:stop]`` without building the whole list."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p : stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - p]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens: prompt + output. The last one's KV is computed by the next step."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        """Known tokens plus the draft tokens waiting to be verified."""
        return self.num_tokens + len(self.spec_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def to_output(self, *, text: str = "", prompt: str | None = None) -> RequestOutput:
        """A snapshot of this request as a :class:`RequestOutput` (lists and metrics are copied)."""
        logprobs = list(self.output_logprobs) if self.sampling_params.logprobs is not None else None
        return RequestOutput(
            request_id=self.request_id,
            prompt=prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=[
                CompletionOutput(
                    index=0,
                    token_ids=list(self.output_token_ids),
                    text=text,
                    finish_reason=self.status.finish_reason,
                    stop_reason=self.stop_reason,
                    logprobs=logprobs,
                )
            ],
            finished=self.is_finished,
            metrics=dataclasses.replace(self.metrics),
        )


@dataclass(kw_only=True)
class CompletionOutput:
    """One completion of a prompt."""

    index: int = 0  # which completion of the prompt (0 .. n - 1)
    token_ids: list[int]  # generated token ids
    text: str = ""  # detokenized output, filled by the engine (stop string excluded)
    finish_reason: FinishReason | None = None  # None while generating
    stop_reason: int | str | None = None  # the stop token id or stop string, if one stopped it
    logprobs: list[TokenLogprobs] | None = None  # per token, if SamplingParams.logprobs was set

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        """Sum of the sampled tokens' logprobs (None without logprobs)."""
        if self.logprobs is None:
            return None
        return sum(lp[t].logprob for t, lp in zip(self.token_ids, self.logprobs, strict=False))


@dataclass(kw_only=True)
class RequestOutput:
    """What the engine returns for one request (a snapshot while streaming, final when finished)."""

    request_id: str  # the request's id
    prompt: str | None = None  # the prompt text, when it was given as text
    prompt_token_ids: list[int]  # the tokenized prompt
    outputs: list[CompletionOutput]  # SamplingParams.n completions of the prompt, by index
    finished: bool  # whether every completion has finished
    metrics: RequestMetrics | None = None  # timings and counters

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens the prefix cache served at first admission."""
        return self.metrics.num_cached_tokens if self.metrics is not None else 0


__all__ = [
    "CompletionOutput",
    "FinishReason",
    "Logprob",
    "Request",
    "RequestMetrics",
    "RequestOutput",
    "RequestStatus",
    "SamplingParams",
    "TokenLogprobs",
]
