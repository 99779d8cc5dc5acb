"""Continuous batching under a token budget: vLLM v1's scheduler, kept small.

Orca (Yu et al. 2022) batches at the granularity of iterations; vLLM (Kwon et al. 2023)
bounds each iteration by KV memory, and vLLM v1 drops the prefill / decode phases: every
request simply has ``num_computed_tokens`` catching up with its tokens, and each step gives
each request some tokens out of one budget (``max_num_batched_tokens``):

1. Running requests first, in admission order: each gets ``min(remaining, budget)``
   tokens, 1 for a decode, a chunk for a long prompt (chunked prefill), 1 + drafts with
   speculative decoding. When the KV pool cannot hold them, the most recently admitted
   running request is *preempted by recomputation*: its blocks are freed,
   ``num_computed_tokens`` goes back to 0 and it returns to the head of the queue, keeping
   the tokens it generated (the recompute covers prompt + output; the prefix cache often
   makes it cheap).
2. Then waiting requests, first come first served, while the budget, ``max_num_seqs`` and
   free blocks allow; a prefix-cache hit counts as already computed. Nothing is admitted
   in a step that preempted.

``update_from_output`` applies what the model sampled: appends tokens, takes back rejected
drafts, checks max_tokens / EOS / stop token ids, publishes newly computed full blocks to
the prefix cache, frees finished requests. Stop *strings* need text, so the engine checks
them (``kiln.runtime.stop``) and calls :meth:`Scheduler.finish_request`.

Asynchronous scheduling (vLLM v1's ``async_scheduling``): after :meth:`Scheduler.mark_pending`
the tokens a step samples count as *pending*, known to exist but not yet to the host, so
the next step can be scheduled (and launched) before this one's output is applied. A
pending token enters the next step as :data:`PLACEHOLDER`, which the runner fills from the
device; a request whose pending tokens certainly reach ``max_tokens`` is not scheduled again (with
asynchronous speculation a step makes 1 to k + 1 tokens: blocks are reserved for the most, and
``max_tokens`` stops scheduling on the fewest, ``num_pending_min``), and
one that turns out to have stopped (EOS) has its extra step's output ignored.

The scheduler never touches tensors; see ``scheduler_output`` for what the runner gets.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kiln.errors import CapacityError, ConfigError
from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.request import Request, RequestStatus
from kiln.runtime.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    StepOutput,
)

#: The token id standing for a pending token (sampled on the device, not yet on the host).
PLACEHOLDER = -1


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits of continuous batching. Derive variants with ``dataclasses.replace``."""

    num_blocks: int  # KV blocks in the cache (the engine sizes it from kv_cache_memory)
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 256  # running requests at most
    max_num_batched_tokens: int = 2048  # token budget of one step, over all requests
    max_model_len: int = 2048  # prompt + max_tokens of one request at most
    enable_chunked_prefill: bool = True  # split prompts longer than the remaining budget across steps
    enable_prefix_caching: bool = True  # reuse the KV of cached full blocks (and allow pins)
    long_prefill_token_threshold: int = 0  # > 0: at most this many tokens per request per step

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"SchedulerConfig.{name} must be an int >= 1, got {value!r}")
        if self.long_prefill_token_threshold < 0:
            raise ConfigError(
                f"SchedulerConfig.long_prefill_token_threshold must be >= 0 (0 is off), "
                f"got {self.long_prefill_token_threshold}"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"without chunked prefill a whole prompt must fit one step: max_num_batched_tokens "
                f"({self.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len}); "
                "raise it or enable_chunked_prefill=True"
            )


class Scheduler:
    """Decides, every step, which requests compute which tokens. See the module docstring."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.kv_cache_manager = KVCacheManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.waiting: deque[Request] = deque()  # FCFS; preempted requests go back to the head
        self.running: list[Request] = []  # in admission order; the last is preempted first
        self._finished_ids: set[str] = set()  # finished since the last schedule(), for the runner
        self._pending_outputs: list[StepOutput] = []  # finished inside schedule(), reported next update
        self.num_pending: dict[str, int] = {}  # request id -> sampled tokens not yet applied (mark_pending)
        #: request id -> the fewest tokens its steps in flight make (one each): with asynchronous speculation
        #: num_pending counts every draft accepted (the most), which bounds memory; this bounds max_tokens
        self.num_pending_min: dict[str, int] = {}

    # -- requests in and out ----------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request; raises ConfigError / CapacityError (and changes nothing) if it cannot run."""
        cfg, rid = self.config, request.request_id
        if rid in self.requests:
            raise ConfigError(f"request id {rid!r} is already in use by an unfinished request")
        if request.status is not RequestStatus.WAITING or request.output_token_ids or request.num_computed_tokens:
            raise ConfigError(f"request {rid!r} is not fresh (status {request.status.value}); create a new Request")
        if not request.prompt_token_ids:
            raise ConfigError(f"request {rid!r} has an empty prompt; give at least one token")
        if min(request.prompt_token_ids) < 0:
            raise ConfigError(f"request {rid!r} has negative token ids in its prompt")
        p, m = request.num_prompt_tokens, request.sampling_params.max_tokens
        if p > cfg.max_model_len:
            raise CapacityError(
                f"request {rid!r}: the prompt has {p} tokens, more than max_model_len={cfg.max_model_len}; "
                "shorten the prompt"
            )
        if p + m > cfg.max_model_len:
            raise CapacityError(
                f"request {rid!r}: prompt ({p} tokens) + max_tokens ({m}) = {p + m} exceeds "
                f"max_model_len={cfg.max_model_len}; lower max_tokens to at most {cfg.max_model_len - p}"
            )
        need = self.kv_cache_manager.num_blocks_for(p + m)
        if need > cfg.num_blocks:
            raise CapacityError(
                f"request {rid!r}: {p + m} tokens need {need} KV blocks of {cfg.block_size} tokens, but the "
                f"cache has {cfg.num_blocks}; lower max_tokens or give the KV cache more memory"
            )
        self.requests[rid] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request wherever it is and free its blocks. False if it is unknown or finished."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(
        self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> bool:
        """End a request from outside (abort, or a stop string the engine found). False if not unfinished."""
        if not status.is_finished:
            raise ConfigError(f"finish_request needs a finished status, got {status}")
        request = self.requests.get(request_id)
        if request is None:
            return False
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, status, stop_reason)
        return True

    def _finish(self, request: Request, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        # the caller has taken it out of running / waiting
        request.status = status
        request.stop_reason = stop_reason
        request.spec_token_ids = []
        request.metrics.finished_time = time.monotonic()
        self.kv_cache_manager.free(request)
        self.num_pending.pop(request.request_id, None)
        self.num_pending_min.pop(request.request_id, None)
        del self.requests[request.request_id]
        self._finished_ids.add(request.request_id)

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.metrics.num_preemptions += 1
        self.waiting.appendleft(request)

    # -- one step ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens; advances each scheduled request's ``num_computed_tokens``."""
        cfg, kv = self.config, self.kv_cache_manager
        budget = cfg.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        spec: dict[str, list[int]] = {}
        new_block_ids: dict[str, list[int]] = {}
        scheduled_running: list[Request] = []
        scheduled_new: list[Request] = []
        preempted: set[str] = set()

        # 1. running requests, oldest first; preempt the newest when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            drafts = self._drafts(request) if request.spec_token_ids else []
            pending = self.num_pending.get(request.request_id, 0)
            if pending and (
                request.num_output_tokens + self.num_pending_min.get(request.request_id, 0)
                >= request.sampling_params.max_tokens
                or request.num_tokens + pending >= cfg.max_model_len
            ):
                i += 1  # its pending tokens finish it (or may fill its context)
                continue
            n = request.num_tokens + pending + len(drafts) - request.num_computed_tokens
            if cfg.long_prefill_token_threshold:
                n = min(n, cfg.long_prefill_token_threshold)
            n = min(n, budget)
            if n <= 0:
                i += 1
                continue
            base = request.num_tokens + pending - request.num_computed_tokens  # tokens before the drafts
            while (blocks := kv.allocate_slots(request, n)) is None:
                sure = self._drafts(request, fewest=False) if drafts else []
                if n > base + len(sure):  # drafts that count only if earlier ones are rejected: not worth a preemption
                    drafts, n = sure, base + len(sure)
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is request:
                    break
            if blocks is None:
                break
            new_block_ids[request.request_id] = [b.block_id for b in blocks]
            num_drafts = n - (request.num_tokens + pending - request.num_computed_tokens)
            if num_drafts > 0:
                spec[request.request_id] = drafts[:num_drafts]
            scheduled_running.append(request)
            num_scheduled[request.request_id] = n
            budget -= n
            i += 1

        # 2. waiting requests, first come first served
        while not preempted and self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            request = self.waiting[0]
            hit_blocks, num_hit = kv.get_computed_blocks(request)
            n = request.num_tokens - num_hit
            if cfg.long_prefill_token_threshold:
                n = min(n, cfg.long_prefill_token_threshold)
            if n > budget:
                if not cfg.enable_chunked_prefill:
                    break
                n = budget
            if kv.allocate_slots(request, n, num_hit, hit_blocks) is None:
                if self.running:
                    break  # wait for running requests to free blocks
                # nothing runs, yet the blocks are short: pins hold them, it cannot run until released
                self.waiting.popleft()
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                self._pending_outputs.append(StepOutput(
                    request_id=request.request_id, new_token_ids=[], finish_reason="abort"
                ))
                continue
            self.waiting.popleft()
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.monotonic()
                request.metrics.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            self.running.append(request)
            scheduled_new.append(request)
            num_scheduled[request.request_id] = n
            budget -= n

        # 3. describe the step, then let num_computed_tokens run ahead by what was scheduled
        new_data = [
            NewRequestData(
                request_id=r.request_id,
                prompt_token_ids=list(r.prompt_token_ids),
                output_token_ids=list(r.output_token_ids),
                block_ids=kv.get_block_ids(r.request_id),
                num_computed_tokens=r.num_computed_tokens,
                new_token_ids=r.token_slice(r.num_computed_tokens, r.num_computed_tokens + num_scheduled[r.request_id]),
                sample=r.num_computed_tokens + num_scheduled[r.request_id] >= r.num_tokens,
                sampling_params=r.sampling_params,
            )
            for r in scheduled_new
        ]
        cached_data = []
        for r in scheduled_running:
            rid, n, start = r.request_id, num_scheduled[r.request_id], r.num_computed_tokens
            drafts = spec.get(rid, [])
            tokens = r.token_slice(start, start + n - len(drafts))
            if len(tokens) < n - len(drafts):  # pending tokens: the runner takes them from the device
                tokens += [PLACEHOLDER] * (n - len(drafts) - len(tokens))
            cached_data.append(CachedRequestData(
                request_id=rid,
                new_block_ids=new_block_ids[rid],
                num_computed_tokens=start,
                new_token_ids=tokens + drafts,
                sample=start + n >= r.num_tokens + self.num_pending.get(rid, 0),
            ))
        for r in scheduled_running + scheduled_new:
            r.num_computed_tokens += num_scheduled[r.request_id]
            r.spec_token_ids = []  # the drafter proposes afresh after verification
        finished, self._finished_ids = self._finished_ids, set()
        return SchedulerOutput(
            scheduled_new_reqs=new_data,
            scheduled_cached_reqs=cached_data,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            scheduled_spec_decode_tokens=spec,
            preempted_req_ids=preempted,
            finished_req_ids=finished,
            block_size=cfg.block_size,
        )

    def _drafts(self, request: Request, *, fewest: bool = True) -> list[int]:
        """The request's draft tokens worth verifying: a step yields at most drafts + 1 tokens.

        Pending tokens (asynchronous speculation) count as many as their steps may make against the
        context, and as few (``fewest``) or as many against ``max_tokens``: with the fewest, drafts may
        run past ``max_tokens`` (what lands there is dropped), so the scheduler takes them back before
        it would preempt anyone for their blocks.
        """
        rid = request.request_id
        made = self.num_pending_min.get(rid, 0) if fewest else self.num_pending.get(rid, 0)
        room = min(
            request.sampling_params.max_tokens - request.num_output_tokens - made,
            self.config.max_model_len - request.num_tokens - self.num_pending.get(rid, 0),
        )
        return request.spec_token_ids[: max(room - 1, 0)]

    def mark_pending(self, scheduler_output: SchedulerOutput) -> None:
        """Count the tokens ``scheduler_output``'s step samples as pending until its ``update_from_output``.

        Call it right after :meth:`schedule` to schedule the next step before applying this
        one's output (asynchronous scheduling). A request verifying ``k`` drafts counts ``k + 1``
        pending tokens, all its drafts accepted (asynchronous speculation): an upper bound, so
        blocks are allocated for it, and its ``update_from_output`` takes back what was rejected.
        """
        spec = scheduler_output.scheduled_spec_decode_tokens
        for d in (*scheduler_output.scheduled_new_reqs, *scheduler_output.scheduled_cached_reqs):
            if d.sample:
                made = 1 + len(spec.get(d.request_id, ()))
                self.num_pending[d.request_id] = self.num_pending.get(d.request_id, 0) + made
                self.num_pending_min[d.request_id] = self.num_pending_min.get(d.request_id, 0) + 1

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_output: ModelRunnerOutput | Mapping[str, Sequence[int]]
    ) -> list[StepOutput]:
        """Apply the sampled tokens of the step ``scheduler_output`` described; what changed per request.

        ``model_output`` is a :class:`ModelRunnerOutput` or just ``{request id: sampled token ids}``.
        Call it after every ``schedule()``, even an empty one: it also reports requests
        that ``schedule()`` had to abort.
        """
        if isinstance(model_output, ModelRunnerOutput):
            sampled, logprobs = model_output.sampled_token_ids, model_output.logprobs
        else:
            sampled, logprobs = model_output, None
        for d in (*scheduler_output.scheduled_new_reqs, *scheduler_output.scheduled_cached_reqs):
            if d.sample and not sampled.get(d.request_id) and d.request_id in self.requests:
                raise RuntimeError(
                    f"the model output has no token for request {d.request_id!r}, whose step reached its "
                    "last token (sample=True); the runner must sample every such request"
                )
        outputs, self._pending_outputs = self._pending_outputs, []
        finished_any = False
        sampling = {
            d.request_id for d in (*scheduler_output.scheduled_new_reqs, *scheduler_output.scheduled_cached_reqs)
            if d.sample
        }  # fmt: skip
        spec = scheduler_output.scheduled_spec_decode_tokens
        for rid in scheduler_output.num_scheduled_tokens:
            drafts = spec.get(rid, ())
            if rid in sampling and rid in self.num_pending:  # its pending tokens arrive
                self.num_pending[rid] -= 1 + len(drafts)
                self.num_pending_min[rid] -= 1
                if self.num_pending[rid] <= 0:
                    del self.num_pending[rid]
                if self.num_pending_min[rid] <= 0:
                    del self.num_pending_min[rid]
            request = self.requests.get(rid)
            if request is None or request.is_finished:
                continue  # finished or aborted since it was scheduled
            # (a PREEMPTED request was preempted while this step's tokens were in flight: it keeps the tokens,
            # and its num_computed_tokens already went back to 0)
            generated = list(sampled.get(rid, ()))
            if drafts and request.status is not RequestStatus.PREEMPTED:
                # give back the rejected drafts: generated = accepted drafts + 1
                request.num_computed_tokens -= len(drafts) + 1 - max(len(generated), 1)
            new_ids: list[int] = []
            new_lps = [] if request.sampling_params.logprobs is not None else None
            status = None
            if rid in sampling:  # the step reached the request's last token: not a prefill chunk short of it
                lps = logprobs.get(rid) if logprobs is not None else None
                for j, token in enumerate(generated):
                    self._append(request, token, lps[j] if lps is not None else None)
                    new_ids.append(token)
                    if new_lps is not None and lps is not None:
                        new_lps.append(lps[j])
                    status = self._check_stop(request, token)
                    if status is not None:
                        break
            self.kv_cache_manager.cache_blocks(request, request.num_computed_tokens)
            if status is not None:
                if request.status is RequestStatus.PREEMPTED:  # preempted while its token was in flight
                    self.waiting.remove(request)
                self._finish(request, status, request.stop_reason)
                finished_any = True
            if new_ids or status is not None:
                outputs.append(StepOutput(
                    request_id=rid,
                    new_token_ids=new_ids,
                    new_logprobs=new_lps,
                    finish_reason=status.finish_reason if status is not None else None,
                    stop_reason=request.stop_reason,
                    num_cached_tokens=request.metrics.num_cached_tokens,
                ))
        if finished_any:
            self.running = [r for r in self.running if not r.is_finished]
        return outputs

    def _append(self, request: Request, token: int, logprobs: object) -> None:
        now = time.monotonic()
        request.output_token_ids.append(token)
        if logprobs is not None and request.sampling_params.logprobs is not None:
            request.output_logprobs.append(logprobs)  # type: ignore[arg-type]
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        request.metrics.last_token_time = now

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if not params.ignore_eos and token == request.eos_token_id:
            return RequestStatus.FINISHED_STOPPED
        if token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # -- introspection ----------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)


__all__ = ["Scheduler", "SchedulerConfig"]
