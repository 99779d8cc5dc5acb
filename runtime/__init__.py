"""kiln.runtime: serving a compiled model (vLLM's split, kept small).

- ``request``: :class:`Request`, :class:`SamplingParams`, :class:`RequestOutput`.
- ``block_pool`` / ``kv_cache_manager``: paged KV blocks, ref counts, prefix caching by
  chained block hashes, LRU eviction, pins (PagedAttention, Kwon et al. 2023).
- ``scheduler`` / ``scheduler_output``: continuous batching under a token budget,
  chunked prefill, preemption by recomputation; never touches tensors.
- ``sampler``: pure sampling functions; ``stop``: stop strings on detokenized text.
- ``model_runner``: the compiled step graph over the block caches (tensors only).
- ``engine``: :class:`LLM`, the user-facing API tying them together.
"""

from kiln.runtime.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock
from kiln.runtime.engine import LLM
from kiln.runtime.kv_cache_manager import (
    BlockHash,
    KVCacheManager,
    PinHandle,
    PrefixCacheStats,
    hash_block_sequence,
    hash_block_tokens,
)
from kiln.runtime.model_runner import ModelRunner, SequenceStep  # noqa: I001  (after the pieces it uses)
from kiln.runtime.request import (
    CompletionOutput,
    FinishReason,
    Logprob,
    Request,
    RequestMetrics,
    RequestOutput,
    RequestStatus,
    SamplingParams,
    TokenLogprobs,
)
from kiln.runtime.sampler import LogprobsTensors, SamplerOutput, make_generator, sample
from kiln.runtime.scheduler import Scheduler, SchedulerConfig
from kiln.runtime.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    StepOutput,
)
from kiln.runtime.speculative import SpeculativeConfig
from kiln.runtime.stop import StopMatch, find_stop_string

__all__ = [
    "LLM",
    "ModelRunner",
    "SequenceStep",
    "SpeculativeConfig",
    "BlockHash",
    "BlockPool",
    "CachedRequestData",
    "CompletionOutput",
    "FinishReason",
    "FreeBlockQueue",
    "KVCacheBlock",
    "KVCacheManager",
    "Logprob",
    "LogprobsTensors",
    "ModelRunnerOutput",
    "NewRequestData",
    "PinHandle",
    "PrefixCacheStats",
    "Request",
    "RequestMetrics",
    "RequestOutput",
    "RequestStatus",
    "SamplerOutput",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "StepOutput",
    "StopMatch",
    "TokenLogprobs",
    "find_stop_string",
    "hash_block_sequence",
    "hash_block_tokens",
    "make_generator",
    "sample",
]
