"""The engine: ``kiln.LLM``, the user-facing generation API.

It wires vLLM's split (Kwon et al. 2023) together: the :class:`Scheduler` decides which
tokens of which requests run each step (continuous batching, chunked prefill, prefix
caching, preemption), the :class:`ModelRunner` runs kiln's compiled step graph over the
paged KV cache, the sampler picks tokens, and the engine detokenizes and applies stop
strings. ``generate`` runs a list of prompts to completion, ``stream`` yields outputs as
tokens arrive, and ``add_request`` / ``step`` serve a custom loop.

With ``speculative=SpeculativeConfig(...)`` a drafter proposes tokens after each step for
the requests that allow it (``SamplingParams.speculative``); the next step verifies them
with exact rejection sampling (``kiln.runtime.speculative``), inside the same batch as
requests that do not speculate.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from kiln.errors import ConfigError
from kiln.pipeline import INDUCTOR_FUSES
from kiln.runtime.drafters import Drafter
from kiln.runtime.fanout import Fanout
from kiln.runtime.launcher import Launcher, _Launched, _Sequence
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.request import Request, RequestOutput, RequestStatus, SamplingParams
from kiln.runtime.sampler import make_generator
from kiln.runtime.scheduler import Scheduler, SchedulerConfig
from kiln.runtime.scheduler_output import ModelRunnerOutput, PendingOutput, SchedulerOutput
from kiln.runtime.spec_async import MAX_DEVICE_NGRAM, AsyncSpeculation, SpecPending
from kiln.runtime.speculative import SpeculationPolicy, SpeculativeConfig
from kiln.runtime.speculator import Speculator
from kiln.runtime.text import Prompt, detokenize, load_tokenizer, tokenize_prompt


def _default_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 256 * 2**20


class LLM:
    """Generate text with a compiled model over a paged KV cache.

    Args:
        model: a ``torch.nn.Module`` (kiln or Hugging Face causal LM), a Hugging Face-format
            folder, or a kiln preset name.
        tokenizer: a ``transformers`` tokenizer or a path; by default the model folder's
            ``tokenizer.json`` when there is one. Without one, prompts are token-id lists.
        max_num_seqs: running requests at most.
        max_num_batched_tokens: the token budget of one step.
        max_model_len: prompt + output tokens of one request at most (default: the model's
            context length, capped by the cache).
        kv_cache_memory: bytes for the KV cache (default: 256 MiB on the CPU, half the free
            memory on a GPU); or give ``num_blocks``.
        block_size: tokens per KV block.
        enable_prefix_caching: reuse the KV of identical prompt prefixes across requests.
        enable_chunked_prefill: split long prompts across steps.
        device, dtype: where and in which precision to run a model given by name or path.
        speculative: speculative decoding (``kiln.runtime.speculative.SpeculativeConfig``):
            prompt lookup or a draft model; the output distribution is unchanged. ``stats``
            then also counts ``spec_steps``, ``draft_tokens``, ``accepted_tokens`` and
            ``spec_rejections`` (verifications that rejected a draft), and derives
            ``acceptance_rate`` (accepted / drafted), ``alpha`` (per-token acceptance:
            accepted / (accepted + rejections)) and ``accepted_tokens_per_step``.
        cuda_graphs: replay CUDA graphs for the steps, captured at start-up for buckets of
            sequences (1, 2, 4, ... ``max_num_seqs``) and tokens (16, 32, ...
            ``max_num_batched_tokens``) (``kiln.runtime.cuda_graphs``); default: on when the
            model runs on a GPU. With ``speculative``, verification steps (k + 1 rows of
            logits per sequence) replay graphs captured at their first use, and a draft
            model's steps replay graphs of their own.
        enforce_eager: launch every step op by op (no CUDA graphs, no ``torch_compile``).
        torch_compile: fuse the decode graph's pointwise operations with ``torch.compile``
            (inductor) before capturing it; costs a compile at start-up (tens of seconds for
            a 1B model), needs ``cuda_graphs``. A string picks inductor's mode
            (``kiln.runtime.model_runner.COMPILE_MODES``): ``"max-autotune-no-cudagraphs"``
            also times Triton GEMM templates against cuBLAS for each linear.
        async_scheduling: schedule and launch each step before the last one's tokens reach
            the host (they feed the next step on the device), so the host's work overlaps
            the device's; outputs arrive one step later. Default: on a GPU, without
            ``speculative`` or with prompt lookup (``method="ngram"`` with ``prompt_lookup_max <= 3``,
            whose drafts are then made and verified on the device: ``kiln.runtime.spec_async``). Steps run synchronously
            while a request asks for logprobs or a repetition penalty (both need every token on
            the host).
        kv_cache_dtype: ``"auto"`` (the model's dtype), ``"int8"`` (a scale per token and KV
            head), ``"fp8"`` (e4m3, static per-layer k/v scales of 1.0, as vLLM without
            checkpoint scales), a ``kiln.QuantSpec``, or a KV-cache-only ``kiln.QuantConfig``
            (calibrated static fp8 scales); see ``kiln.passes.kv_cache``. A quantized cache holds
            about 2x (bf16 model) or 4x (fp32) the blocks in ``kv_cache_memory``.
        tensor_parallel_size: shard the model over this many ranks (``kiln.parallel.worker``:
            one process per rank, NCCL on GPUs, Gloo on CPUs); each rank keeps the KV cache of
            its own heads, ``kv_cache_memory`` is per rank. Scheduling and sampling stay here.
        pipeline_parallel_size: split the step graph into this many stages, one per rank
            (``kiln.runtime.pipeline_runner``); each rank keeps the KV cache of its stage's
            layers, a step's sequences flow through the stages as micro-batches. Combines
            with ``tensor_parallel_size`` (``tp * pp`` ranks).
        compile_config: the step graph's ``kiln.CompileConfig`` (``kv_cache=True``), e.g. to disable
            a pass: ``CompileConfig(kv_cache=True, disable=("merge-parallel-linears",))`` keeps
            the graph reading the model's own weight tensors, as training the model between
            generations needs (default: ``CompileConfig(kv_cache=True)``). Under tensor or
            pipeline parallelism every rank compiles it with its ``parallel`` set, e.g.
            ``CompileConfig(quant=kiln.QuantConfig.preset("w4a16-g128"))`` shards the quantized
            model (its codes, scales and zero points split with the weights).
    """

    def __init__(
        self,
        model: torch.nn.Module | str | os.PathLike[str],
        *,
        tokenizer: Any = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 1024,
        max_model_len: int | None = None,
        kv_cache_memory: int | None = None,
        num_blocks: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        speculative: SpeculativeConfig | None = None,
        cuda_graphs: bool | None = None,
        enforce_eager: bool = False,
        torch_compile: bool | str = False,
        async_scheduling: bool | None = None,
        kv_cache_dtype: str | Any = "auto",
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        compile_config: Any = None,
    ) -> None:
        if speculative is not None and not isinstance(speculative, SpeculativeConfig):
            raise ConfigError(
                f"speculative must be a SpeculativeConfig or None, got {type(speculative).__name__}"
            )
        source = None
        if not isinstance(model, torch.nn.Module):
            from kiln.models import load_model

            source = model
            model = load_model(str(model), dtype=dtype or torch.float32, device=device)
        model = model.eval()
        self.model = model
        self.tokenizer = load_tokenizer(tokenizer, source)
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        if enforce_eager and (cuda_graphs or torch_compile):
            raise ConfigError(
                "enforce_eager=True runs without CUDA graphs and torch_compile; do not ask for them too"
            )
        if cuda_graphs and dev.type != "cuda":
            raise ConfigError(f"cuda_graphs=True needs a CUDA device; the model runs on {dev}")
        for name, size in (
            ("tensor_parallel_size", tensor_parallel_size),
            ("pipeline_parallel_size", pipeline_parallel_size),
        ):
            if not isinstance(size, int) or size < 1:
                raise ConfigError(f"{name} must be a positive int, got {size!r}")
        ranks = tensor_parallel_size * pipeline_parallel_size
        if cuda_graphs and ranks > 1:
            raise ConfigError(
                "CUDA graphs under tensor or pipeline parallelism are not implemented yet: leave cuda_graphs unset"
            )
        use_graphs = (dev.type == "cuda" and ranks == 1) if cuda_graphs is None else bool(cuda_graphs)
        if torch_compile and not use_graphs:
            raise ConfigError(
                "torch_compile=True compiles the CUDA-graph decode step: it needs cuda_graphs on a GPU"
            )
        if async_scheduling and speculative is not None and speculative.method != "ngram":
            raise ConfigError(
                "async_scheduling combines with prompt-lookup speculation (method='ngram') only: a draft model's "
                "drafts need the verified tokens on the host; leave it unset"
            )
        if async_scheduling and ranks > 1:
            raise ConfigError(
                "async_scheduling feeds tokens on one device; tensor and pipeline ranks take them from the host"
            )
        if num_blocks is None and kv_cache_memory is None:
            kv_cache_memory = _default_memory(dev)
        if compile_config is not None and ranks > 1 and compile_config.parallel is not None:
            raise ConfigError("compile_config.parallel is set by tensor_parallel_size and pipeline_parallel_size; "
                              "leave it None")  # fmt: skip
        if ranks > 1:  # one process per rank, each with its shard (or stage) and its heads' (layers') cache
            from kiln.parallel.worker import ParallelModelRunner

            self.runner = ParallelModelRunner(
                model, tensor_parallel_size=tensor_parallel_size, block_size=block_size, num_blocks=num_blocks,
                kv_cache_memory=kv_cache_memory, device=dev, kv_cache_dtype=kv_cache_dtype,
                pipeline_parallel_size=pipeline_parallel_size, compile_config=compile_config,
            )  # fmt: skip
        else:
            if torch_compile and use_graphs and not enforce_eager:
                # inductor fuses norms, RoPE and SwiGLU with their neighbours itself; opaque kiln ops would stop that
                from kiln.compile import CompileConfig

                base = compile_config or CompileConfig(kv_cache=True)
                compile_config = dataclasses.replace(base, disable=(*base.disable, *INDUCTOR_FUSES))
            self.runner = ModelRunner(
                model, block_size=block_size, num_blocks=num_blocks, kv_cache_memory=kv_cache_memory, device=dev,
                kv_cache_dtype=kv_cache_dtype, compile_config=compile_config,
            )  # fmt: skip
        config = getattr(model, "config", None)
        context = (
            getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        )
        capacity = self.runner.num_blocks * block_size
        self.max_model_len = int(max_model_len or min(context, capacity))
        eos = getattr(config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is None and self.tokenizer is not None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_token_id: int | None = eos
        feeds = isinstance(self.runner, ModelRunner)  # its steps can take tokens from the device
        if async_scheduling and not feeds:
            raise ConfigError(
                f"async_scheduling needs a runner that feeds tokens on the device, not {type(self.runner).__name__}"
            )
        #: whether steps are scheduled before the previous step's tokens reach the host
        ngram = speculative is not None and speculative.method == "ngram"
        # the device-side lookup searches n-grams of at most 3 tokens: longer ones default to lockstep
        device_lookup = ngram and speculative.prompt_lookup_max <= MAX_DEVICE_NGRAM  # type: ignore[union-attr]
        self.async_scheduling = (dev.type == "cuda" and (speculative is None or device_lookup) and feeds) \
            if async_scheduling is None else bool(async_scheduling)  # fmt: skip
        #: asynchronous prompt-lookup speculation (``kiln.runtime.spec_async``): drafts made on the device
        self._spec_async: AsyncSpeculation | None = None
        if self.async_scheduling and ngram:
            assert speculative is not None
            self._spec_async = AsyncSpeculation(
                num_drafts=speculative.num_speculative_tokens, min_n=speculative.prompt_lookup_min,
                max_n=speculative.prompt_lookup_max, max_num_seqs=max_num_seqs, max_model_len=self.max_model_len,
                device=dev,
            )  # fmt: skip
        self._inflight: PendingOutput | SpecPending | None = None  # the launched step whose tokens have not been applied
        self._lookahead: _Launched | None = None  # speculative: the next lockstep step, launched before this one's text
        self._sync_ids: set[str] = set()  # requests whose sampling needs every token on the host
        self._fanout = Fanout()  # requests with SamplingParams.n > 1: their completions' requests
        self.cuda_graphs = use_graphs and not enforce_eager  # whether pure-decode steps replay CUDA graphs
        graph_args: dict[str, Any] | None = None  # enable_cuda_graphs' arguments, for the drafter's runner too
        if self.cuda_graphs:
            graph_args = dict(
                max_num_seqs=max_num_seqs,
                max_model_len=self.max_model_len,
                max_num_tokens=max_num_batched_tokens,
                torch_compile=torch_compile,
            )
            spec_rows = (
                max_num_seqs * (speculative.num_speculative_tokens + 1) if speculative is not None else None
            )
            self.runner.enable_cuda_graphs(
                **graph_args, max_num_logits=spec_rows
            )  # verification: k + 1 rows each
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_blocks=self.runner.num_blocks,
                block_size=block_size,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=self.max_model_len,
                enable_chunked_prefill=enable_chunked_prefill,
                enable_prefix_caching=enable_prefix_caching,
            )
        )
        self._seqs: dict[str, _Sequence] = {}
        self._ids = itertools.count()
        self.stats: dict[str, float] = {
            "steps": 0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "scheduled_tokens": 0,
        }
        self.speculative = speculative
        #: drafting and verification when ``speculative`` is set (``kiln.runtime.speculator``)
        self.speculator: Speculator | None = None
        if speculative is not None:
            k = speculative.num_speculative_tokens
            self.speculator = Speculator(
                speculative, model, self.stats, block_size=block_size,
                num_blocks=self.runner.num_blocks + max_num_seqs * -(-k // block_size),
                vocab_size=getattr(config, "vocab_size", None), device=dev, dtype=dtype, cuda_graphs=graph_args,
            )  # fmt: skip
        self.drafter: Drafter | None = self.speculator.drafter if self.speculator else None
        self.policy: SpeculationPolicy | None = self.speculator.policy if self.speculator else None
        #: runs the scheduled steps and samples them (``kiln.runtime.launcher``)
        self._launcher = Launcher(self.runner, self._seqs, self.speculator, self._spec_async)

    # -- requests -------------------------------------------------------------------------

    def _tokenize(self, prompt: Prompt) -> tuple[list[int], str | None]:
        return tokenize_prompt(prompt, self.tokenizer, getattr(getattr(self.model, "config", None), "vocab_size", None))

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> str:
        """Queue a prompt; returns its request id. Raises (changing nothing) when the request cannot run.

        With ``params.n > 1`` the prompt runs as ``n`` requests (``kiln.runtime.fanout``) reported
        as one output with ``n`` completions.
        """
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"params must be kiln.SamplingParams, got {type(params).__name__}")
        ids, text = self._tokenize(prompt)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        engine_ids = [rid] if params.n == 1 else [Fanout.child_id(rid, i) for i in range(params.n)]
        if any(self._in_flight(r) for r in [rid, *engine_ids]):  # its old tokens would land on the new one
            raise ConfigError(
                f"request id {rid!r} was aborted while a step for it is still running; "
                "call step() once more or use another id"
            )
        if rid in self._fanout.parents or rid in self._fanout.children or any(r in self._seqs for r in engine_ids):
            raise ConfigError(f"request id {rid!r} is already running (or names a completion of one)")
        if params.n == 1:
            self._add(rid, ids, text, params, cache_salt)
            return rid
        hold = self.scheduler.kv_cache_manager.enable_prefix_caching  # the others reuse completion 0's prompt
        self._fanout.submit(rid, params, self._add, self._abort, hold=hold, token_ids=ids, text=text,
                            cache_salt=cache_salt)  # fmt: skip
        return rid

    def _prefilling(self, request_id: str) -> bool:
        """Whether a request has no token applied yet (its prompt's full blocks are cached when its first
        step's output is applied: asynchronously, a step after scheduling it)."""
        seq = self._seqs.get(request_id)
        return seq is not None and seq.request.num_output_tokens == 0

    def _add(self, rid: str, ids: list[int], text: str | None, params: SamplingParams, cache_salt: str | None) -> None:
        request = Request(
            request_id=rid,
            prompt_token_ids=ids,
            sampling_params=params,
            eos_token_id=self.eos_token_id,
            cache_salt=cache_salt,
        )
        self.scheduler.add_request(request)
        gen = make_generator(params.seed, self.runner.device) if params.seed is not None else None
        self._seqs[rid] = _Sequence(request=request, prompt=text, generator=gen)
        if params.logprobs is not None or params.repetition_penalty != 1.0:
            self._sync_ids.add(rid)  # needs every token on the host (a penalty: every token before each draft)
        self.stats["prompt_tokens"] += len(ids)

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request (every completion of it); its blocks are freed at once. False if it is unknown or finished."""
        if request_id in self._fanout.children:
            raise ConfigError(f"{request_id!r} is one completion of {self._fanout.children[request_id][0]!r}: "
                              "abort that request (all its completions)")  # fmt: skip
        return self._abort(request_id)

    def _abort(self, request_id: str) -> bool:
        if request_id in self._fanout.parents:
            aborted = [self._abort(c) for c in self._fanout.ids_of(request_id)]
            self._fanout.forget(request_id)
            return any(aborted)
        self._forget_drafts(request_id)
        self._seqs.pop(request_id, None)
        self._sync_ids.discard(request_id)
        return self.scheduler.abort_request(request_id)

    def _forget_drafts(self, request_id: str) -> None:
        if self.speculator is not None:
            self.speculator.forget(request_id)
        if self._spec_async is not None:
            self._spec_async.release(request_id)

    def pin_prefix(self, prompt: Prompt, *, cache_salt: str | None = None) -> Any:
        """Keep the KV of ``prompt`` (e.g. a document many questions follow) cached until released.

        Its full blocks are computed by the first request that starts with it and are never
        evicted while pinned; returns a handle for :meth:`release`.
        """
        ids, _ = self._tokenize(prompt)
        return self.scheduler.kv_cache_manager.pin_prefix(ids, salt=cache_salt)

    def release(self, handle: Any) -> None:
        """Release a pin from :meth:`pin_prefix`; its blocks become evictable (still cached)."""
        self.scheduler.kv_cache_manager.release(handle)

    def close(self) -> None:
        """Stop the worker processes of tensor- and pipeline-parallel ranks (nothing to do on one device)."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._fanout.held)

    # -- one step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return an output for every request that changed."""
        return self._step(snapshots=True)

    def _step(self, *, snapshots: bool) -> list[RequestOutput]:
        """One step; outputs of every changed request (``snapshots``) or of the finished ones only."""
        if self._fanout.held:
            self._fanout.release(self._prefilling, self._add)
        if self.async_scheduling and not self._sync_ids:
            changed = self._async_step()
        else:
            changed = []
            if self._inflight is not None:  # drain: apply the launched step before running in lockstep
                prev, self._inflight = self._inflight, None
                changed += self._apply(prev)
            if self._spec_async is not None:  # histories go stale in lockstep: uploaded afresh when it ends
                self._spec_async.clear()
            launched, self._lookahead = self._lookahead, None
            if launched is None:
                launched = self._launcher.launch_lockstep(self._schedule())
            changed += self.scheduler.update_from_output(launched.scheduler_output, self._launcher.collect(launched))
            if self.drafter is not None and self.scheduler.has_unfinished_requests():
                # Speculative steps run in lockstep (the next drafts need this step's tokens). Draft and
                # launch the next step now, and detokenize this one's tokens while it runs.
                self._propose()
                self._lookahead = self._launcher.launch_lockstep(self._schedule())
        results: dict[str, RequestOutput] = {}  # by request id: a parent's last merge holds every completion's news
        for delta in changed:
            seq = self._seqs.get(delta.request_id)
            if seq is None:
                continue
            self.stats["generated_tokens"] += len(delta.new_token_ids)
            if snapshots or seq.request.is_finished or seq.request.sampling_params.stop:
                self._detokenize(seq)  # (generate() needs no text before the end, unless stop strings check it)
            if snapshots or seq.request.is_finished:
                merged = self._fanout.merge(seq.request.to_output(text=seq.text, prompt=seq.prompt), snapshots)
                if merged is not None:  # (a completion's output waits for its siblings unless snapshots)
                    results.pop(merged.request_id, None)
                    results[merged.request_id] = merged
            if seq.request.is_finished:
                del self._seqs[delta.request_id]
                self._sync_ids.discard(delta.request_id)
                self._forget_drafts(delta.request_id)
        if self._lookahead is None and not (self._spec_async is not None and self.async_scheduling
                                            and not self._sync_ids):  # asynchronous drafts: _propose_async
            self._propose()
        return list(results.values())

    def _in_flight(self, request_id: str) -> bool:
        """Whether a launched, not yet applied step computes for ``request_id``."""
        return any(
            p is not None and request_id in p.scheduler_output.num_scheduled_tokens
            for p in (self._inflight, self._lookahead)
        )

    def _schedule(self) -> SchedulerOutput:
        """Schedule a step; tell the drafter (speculative steps run in lockstep) whom it preempted or finished."""
        so = self.scheduler.schedule()
        self.stats["steps"] += 1
        self.stats["scheduled_tokens"] += so.total_num_scheduled_tokens
        if self.speculator is not None:
            for rid in so.preempted_req_ids:
                self.speculator.on_preempted(rid)
                if self._spec_async is not None:  # re-admitted, it uploads its tokens again
                    self._spec_async.release(rid)
            for rid in so.finished_req_ids:
                self._forget_drafts(rid)
        return so

    def _propose(self) -> None:
        """Draft the next step's tokens (speculative decoding)."""
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self._seqs, self.max_model_len)

    def _async_step(self) -> list:
        """Schedule and launch a step, then apply the previous one's tokens while it runs.

        With asynchronous prompt lookup the step's drafts are placeholders made on the device
        (``kiln.runtime.spec_async``), verified there after it.
        """
        changed = []
        if self._lookahead is not None:  # a lockstep step launched ahead: apply it first
            launched, self._lookahead = self._lookahead, None
            changed += self.scheduler.update_from_output(launched.scheduler_output, self._launcher.collect(launched))
        if self._spec_async is not None:
            self._propose_async()
        so = self._schedule()
        prev, self._inflight = self._inflight, None
        if so.total_num_scheduled_tokens:
            if self._spec_async is not None:
                self._inflight = self._launcher.launch_spec(so, prev if isinstance(prev, SpecPending) else None)
            else:
                self._inflight = self._launcher.launch(so, prev)  # type: ignore[arg-type]
            self.scheduler.mark_pending(so)
        if prev is not None:
            changed += self._apply(prev)
        if self._inflight is None:  # nothing launched: apply the empty step now (it may report aborts)
            changed += self.scheduler.update_from_output(so, ModelRunnerOutput(sampled_token_ids={}))
        return changed

    def _propose_async(self) -> None:
        """Drafts for the next asynchronous step: placeholders (made on the device) or the host's lookup."""
        assert self._spec_async is not None and self.speculator is not None
        limit = self.speculator.config.disable_by_batch_size
        if limit is not None and len(self.scheduler.running) > limit:
            return  # a batch this large is no longer memory-bound: plain decode steps
        self._spec_async.propose(self.scheduler.running, self.scheduler.num_pending, self.speculator.policy,
                                 int(self.stats["steps"]), self.max_model_len,
                                 self.scheduler.num_pending_min)  # fmt: skip

    def _apply(self, prev: PendingOutput | SpecPending) -> list:
        """Apply a launched asynchronous step's tokens (and, speculative, its acceptance counts)."""
        out = self.scheduler.update_from_output(prev.scheduler_output, prev.result())
        if isinstance(prev, SpecPending) and self.speculator is not None and self._spec_async is not None:
            self._spec_async.observe(prev)
            prev.record(self._seqs, self.stats, self.speculator.policy)
        return out

    def _detokenize(self, seq: _Sequence) -> None:
        """Extend ``seq.text`` with its new tokens' text (``kiln.runtime.text``); end it at a stop string."""
        match = detokenize(seq, self.tokenizer)
        if match is not None and not seq.request.is_finished:
            self.scheduler.finish_request(seq.request.request_id, RequestStatus.FINISHED_STOPPED, match.stop)

    # -- whole prompts ---------------------------------------------------------------------

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield a :class:`RequestOutput` snapshot every time one of ``prompts`` gains tokens or finishes."""
        ids = self._add_all(prompts, params)
        pending = set(ids)
        while pending:
            for out in self.step():
                if out.request_id in pending:
                    if out.finished:
                        pending.discard(out.request_id)
                    yield out

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run ``prompts`` to completion; outputs in prompt order."""
        ids = self._add_all(prompts, params)
        final: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm, unit="req") as bar:
            for out in self.stream_ids(ids):
                final[out.request_id] = out
                bar.update(1)
        return [final[i] for i in ids]

    def stream_ids(self, ids: Sequence[str]) -> Iterator[RequestOutput]:
        """Yield each of the queued requests ``ids`` once, when it finishes."""
        pending = set(ids)
        while pending:
            for out in self._step(snapshots=False):
                if out.request_id in pending:
                    pending.discard(out.request_id)
                    yield out

    def _add_all(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[str]:
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if isinstance(params, Sequence):
            if len(params) != len(prompts):
                raise ConfigError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
            plist = list(params)
        else:
            plist = [params or SamplingParams()] * len(prompts)
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, plist, strict=True):
                ids.append(self.add_request(prompt, p))
        except Exception:
            for rid in ids:  # all or nothing: the engine keeps serving what it had
                self.abort_request(rid)
                self._seqs.pop(rid, None)
            raise
        return ids


__all__ = ["LLM"]
