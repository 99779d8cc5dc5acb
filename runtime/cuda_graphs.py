"""CUDA graphs for the runtime's steps, and the step graph's launch-ready form.

Batch-1 decode of a 1B model is about a millisecond of GPU work per token, spread over
hundreds of small kernels; launched one by one from Python the launches take longer than
the kernels. vLLM's answer (Kwon et al. 2023, after the CUDA-graph decoding of
FasterTransformer) is kept here: a decode step, where every sequence computes exactly
one token, has shapes that depend only on the batch size, so the step graph is captured
once per *bucket* of batch sizes (1, 2, 4, 8, ..., ``max_num_seqs``) over static input
buffers and replayed. A batch of ``b`` sequences runs in the smallest bucket ``B >= b``;
the ``B - b`` padding rows compute a dummy token at position 0 whose key and value go to
a reserved *scratch block* that no sequence owns (``seq_len`` 1 over it, so they read
what they wrote and stay finite), and only the first ``b`` rows of logits are returned.
The block table has a fixed width, the most blocks a sequence can hold.

Steps with prefill chunks (or prefix-cache hits) get *mixed* buckets of (tokens,
sequences): padding tokens belong to no sequence and write nothing, and attention runs
its prefill kernel sized for the bucket's token count, so prompt processing, too, costs a
graph replay instead of hundreds of Python launches. A mixed step may ask several rows of
logits of a sequence (speculative verification scores its k drafts and the token before
them): the bucket then also has a logits count, a power of two up to ``max_num_logits``;
those buckets are captured at their first use, since which ones occur depends on the
drafts.

The graphs run the launch-ready step graph of ``kiln.runtime.step_inputs`` (attention told
the longest query by the host, so nothing synchronizes inside a capture), and their static
inputs live in one pinned :class:`~kiln.runtime.step_inputs.StagingBuffer`, uploaded in one
copy per step.

On the CPU the same buffers, padding and slicing run without capture
(:meth:`StepGraphs.run` with ``capture=False``), so tests check the padding path against
unpadded steps; only ``torch.cuda.graph`` itself needs a GPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from kiln.errors import CapacityError, ConfigError
from kiln.runtime.step_inputs import MAX_QUERY_LEN, DeviceFeed, StagingBuffer, apply_feed

# ------------------------------------------------------------------ step graphs

#: Mixed steps of at most this many sequences are filled by a Python loop (numpy's per-call cost
#: makes the vectorized fill slower for a few sequences, faster for many).
_LOOP_FILL_MAX = 4


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes with a graph: powers of two below ``max_num_seqs``, and ``max_num_seqs``."""
    if max_num_seqs < 1:
        raise ConfigError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    out, b = [], 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    return [*out, max_num_seqs]


def token_buckets(max_num_tokens: int, smallest: int = 16, step: int = 256) -> list[int]:
    """Token counts with a mixed-step graph: powers of two from ``smallest`` up to ``step``, then
    multiples of ``step`` (padding wastes at most ``step`` tokens of a long step), and ``max_num_tokens``."""
    if max_num_tokens < 1:
        raise ConfigError(f"max_num_tokens must be >= 1, got {max_num_tokens}")
    out, t = [], smallest
    while t < min(max_num_tokens, step):
        out.append(t)
        t *= 2
    t = step
    while t < max_num_tokens:
        out.append(t)
        t += step
    return [*out, max_num_tokens]


class StepLike(Protocol):
    """What a graph needs of one sequence's step (``kiln.runtime.model_runner.SequenceStep``)."""

    token_ids: Sequence[int]  # the tokens computed now, at positions start_position, start_position + 1, ...
    start_position: int  # tokens of the sequence already cached
    block_ids: Sequence[int]  # the sequence's block table
    num_logits: int  # logits wanted for the last num_logits tokens (decode buckets serve 1)


Key = tuple[int, int, int]  # (tokens, sequences, logits rows) of a bucket


class StepGraphs:
    """Steps on static padded buffers, captured as one CUDA graph per bucket (or run as is).

    Two kinds of bucket:

    - *decode* ``(B, B)``: every sequence computes one token. Padding rows own a dummy
      token written to the scratch block (``seq_len`` 1 over it), so attention runs the
      split-K decode kernel on every row (``max_query_len`` 1).
    - *mixed* ``(T, S, L)``, when ``max_num_tokens`` is given: any step of at most ``T``
      tokens over at most ``S`` sequences (prefill chunks, prefix-cache hits, decodes,
      speculative verification) asking for at most ``L`` rows of logits in all (``L = S``
      when each asks one; else a power of two up to ``max_num_logits``). Padding tokens
      belong to no sequence and write nothing (slot -1); padding sequences own no token;
      padding logits rows read token 0 and are dropped. Attention runs the prefill kernel
      sized for ``T`` query rows.

    Args:
        decode_step / mixed_step: ``step(*inputs)`` with inputs in ``input_names`` order,
            returning logits (1, S, V) (or a tuple whose first element they are).
        input_names: the step's inputs (the specialized step graph's, ``max_query_len`` last).
        constants: values of inputs that are not metadata (KV caches and scales, model constants).
        max_num_seqs: the most sequences of a step; buckets from :func:`batch_buckets`.
        max_num_tokens: the most tokens of a mixed step (None: decode graphs only).
        max_num_logits: the most rows of logits of a mixed step (default ``max_num_seqs``:
            one per sequence; speculative decoding asks ``k + 1`` per verified sequence).
        max_blocks: the block-table width: the most blocks one sequence can own.
        block_size: tokens per block.
        scratch_block: a block no sequence owns, written by decode padding rows.
        num_blocks: blocks the sequences may own (the warm-up for autotuning reads them).
        device: where the step runs.
        capture: capture CUDA graphs (needs a CUDA device); False runs the step directly
            on the same padded static buffers (the CPU test path, or eager debugging).
    """

    def __init__(
        self,
        decode_step: Callable[..., object],
        mixed_step: Callable[..., object],
        input_names: Sequence[str],
        constants: dict[str, object],
        *,
        max_num_seqs: int,
        max_num_tokens: int | None,
        max_blocks: int,
        block_size: int,
        scratch_block: int,
        num_blocks: int,
        device: torch.device,
        capture: bool,
        max_num_logits: int | None = None,
    ) -> None:
        if capture and device.type != "cuda":
            raise ConfigError(f"CUDA graphs need a CUDA device, the model is on {device}")
        if max_blocks < 1 or block_size < 1:
            raise ConfigError(f"max_blocks and block_size must be >= 1, got {max_blocks} and {block_size}")
        self.decode_step, self.mixed_step = decode_step, mixed_step
        self.input_names = tuple(input_names)
        self.seq_buckets = batch_buckets(max_num_seqs)
        self.token_buckets = token_buckets(max_num_tokens) if max_num_tokens is not None else []
        self.max_seqs = max_num_seqs
        self.max_tokens = max(max_num_seqs, max_num_tokens or 0)
        if max_num_logits is not None and max_num_logits < 1:
            raise ConfigError(f"max_num_logits must be >= 1, got {max_num_logits}")
        self.max_logits = max(max_num_seqs, min(max_num_logits or 0, self.max_tokens))
        self.logits_buckets = batch_buckets(self.max_logits)
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.num_blocks = num_blocks
        self.device = device
        self.capture = capture
        t, n = self.max_tokens, self.max_seqs
        self.buffer = StagingBuffer(
            {
                # one spare column: no bucket's (1, tokens) view is the whole row, so all views share one stride
                # relation (a compiled step would otherwise guard on stride == size and recompile for the largest)
                "input_ids": (torch.int64, (1, t + 1)),
                "position_ids": (torch.int64, (1, t + 1)),
                "slot_mapping": (torch.int64, (t,)),
                "logits_indices": (torch.int64, (self.max_logits,)),
                "seq_lens": (torch.int32, (n,)),
                "query_start_loc": (torch.int32, (n + 1,)),
                "feed_tok": (torch.int64, (4, t)),  # tokens fed from the last step's results (DeviceFeed.fill) ...
                "feed_seq": (torch.int64, (2, n)),  # ... and the sequences they belong to (see run)
                "block_tables": (torch.int32, (n, max_blocks)),  # last: a step uploads only its rows
            },
            device,
        )
        self._table_offset = self.buffer.offsets["block_tables"]
        self._constants = constants
        self._input_lists: dict[tuple[bool, Key], list[object]] = {}  # each bucket's inputs, views of the buffer
        self._graphs: dict[tuple[bool, Key], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = None
        self._logits: Tensor | None = None  # (max_logits, V): the graphs' logits
        self._num_fed = (0, 0)  # tokens and sequences of the filled step fed from the last step's results

    # -- buckets -------------------------------------------------------------------------------

    @property
    def keys(self) -> list[tuple[bool, Key]]:
        """The buckets captured at start-up: ``(is_decode, (tokens, sequences, logits))``, one row of logits per
        sequence (buckets of several rows per sequence are captured at their first use)."""
        out = [(True, (b, b, b)) for b in self.seq_buckets]
        out += [(False, (t, s, s)) for t in self.token_buckets for s in self.seq_buckets if s <= t]
        return out

    def key_for(self, steps: Sequence[StepLike]) -> tuple[bool, Key] | None:
        """The smallest bucket that runs ``steps``, or None (too many tokens, sequences, blocks or logits rows)."""
        num_seqs = len(steps)
        if not 0 < num_seqs <= self.max_seqs:
            return None
        tokens = logits = 0
        for s in steps:
            if len(s.block_ids) > self.max_blocks:
                return None
            tokens += len(s.token_ids)
            logits += s.num_logits
        seqs = _smallest(self.seq_buckets, num_seqs)
        assert seqs is not None
        if tokens == num_seqs:
            return True, (seqs, seqs, seqs)
        t = _smallest(self.token_buckets, tokens)
        if t is None:
            return None
        if logits == num_seqs:
            return False, (t, seqs, seqs)
        rows = _smallest(self.logits_buckets, max(logits, seqs))
        return None if rows is None or rows > t else (False, (t, seqs, rows))

    def supports(self, steps: Sequence[StepLike]) -> bool:
        """Whether a bucket runs ``steps``."""
        return self.key_for(steps) is not None

    # -- inputs --------------------------------------------------------------------------------

    def _inputs(self, key: tuple[bool, Key]) -> list[object]:
        cached = self._input_lists.get(key)  # the views of a bucket never change
        if cached is not None:
            return cached
        decode, (t, s, rows) = key
        d = self.buffer.device_views
        views: dict[str, object] = {
            "input_ids": d["input_ids"][:, :t],
            "position_ids": d["position_ids"][:, :t],
            "slot_mapping": d["slot_mapping"][:t],
            "logits_indices": d["logits_indices"][:rows],
            "seq_lens": d["seq_lens"][:s],
            "query_start_loc": d["query_start_loc"][: s + 1],
            "block_tables": d["block_tables"][:s],
            MAX_QUERY_LEN: 1 if decode else t,
            **self._constants,
        }
        missing = [name for name in self.input_names if name not in views]
        if missing:
            raise ConfigError(f"the step graphs have inputs they cannot fill: {missing}")
        self._input_lists[key] = [views[name] for name in self.input_names]
        return self._input_lists[key]

    def fill(self, steps: Sequence[StepLike], feed: DeviceFeed | None = None,
             key: tuple[bool, Key] | None = None) -> tuple[bool, Key]:
        """Write ``steps`` (padded to their bucket) into the static inputs and upload them; returns the bucket.

        ``feed``: the tokens to take from the last step's results on the device (see :meth:`run`).
        ``key``: the bucket, when the caller already asked :meth:`key_for`.
        """
        key = key or self.key_for(steps)
        if key is None:
            raise ConfigError(
                f"{len(steps)} sequences of {sum(len(s.token_ids) for s in steps)} tokens do not fit the step graphs "
                f"(at most {self.max_seqs} sequences, {self.max_tokens} tokens, {self.max_blocks} blocks each, "
                f"{self.max_logits} rows of logits)"
            )
        h = self.buffer.next_host()
        decode, (t, s, rows) = key
        if decode:
            self._fill_decode(steps, s)
        else:
            self._fill_mixed(steps, t, s, rows)
        self._num_fed = (0, 0)
        if feed is not None:
            self._num_fed = feed.fill(h["query_start_loc"], h["feed_tok"], h["feed_seq"])
        self.buffer.upload(self._table_offset + s * self.max_blocks * 4)
        return key

    def _fill_decode(self, steps: Sequence[StepLike], bucket: int) -> None:
        h, bs = self.buffer.host, self.block_size
        ids, pos, slots, lens, tables = h["input_ids"][0], h["position_ids"][0], h["slot_mapping"], h["seq_lens"], \
            h["block_tables"]  # fmt: skip
        for i, s in enumerate(steps):
            p = s.start_position
            blocks = s.block_ids
            if p // bs >= len(blocks):
                raise CapacityError(f"sequence {i}: position {p} does not fit its {len(blocks)} blocks of {bs}")
            ids[i] = s.token_ids[0]
            pos[i] = p
            slots[i] = blocks[p // bs] * bs + p % bs
            lens[i] = p + 1
            tables[i, : len(blocks)] = blocks
        b = len(steps)  # padding rows: a dummy token at position 0 of the scratch block
        ids[b:bucket] = 0
        pos[b:bucket] = 0
        slots[b:bucket] = self.scratch_block * bs
        lens[b:bucket] = 1
        tables[b:bucket, 0] = self.scratch_block
        h["query_start_loc"][: bucket + 1] = np.arange(bucket + 1)
        h["logits_indices"][:bucket] = np.arange(bucket)

    def _fill_mixed(self, steps: Sequence[StepLike], tokens: int, seqs: int, rows: int) -> None:
        if len(steps) <= _LOOP_FILL_MAX:
            t, r = self._fill_mixed_loop(steps)
        else:
            t, r = self._fill_mixed_vectorized(steps)
        h, b = self.buffer.host, len(steps)
        h["input_ids"][0, t:tokens] = 0  # padding tokens: no sequence owns them, they write nothing
        h["position_ids"][0, t:tokens] = 0
        h["slot_mapping"][t:tokens] = -1
        h["seq_lens"][b:seqs] = 0  # padding sequences: no token, nothing cached
        h["query_start_loc"][b + 1 : seqs + 1] = t
        h["logits_indices"][r:rows] = 0  # padding rows of logits: token 0's, dropped

    def _fill_mixed_loop(self, steps: Sequence[StepLike]) -> tuple[int, int]:
        """The real sequences of a mixed step, one at a time; returns (tokens, logits rows) written."""
        h, bs = self.buffer.host, self.block_size
        ids, pos, slots, lens, tables = h["input_ids"][0], h["position_ids"][0], h["slot_mapping"], h["seq_lens"], \
            h["block_tables"]  # fmt: skip
        qsl, last = h["query_start_loc"], h["logits_indices"]
        t = r = 0
        qsl[0] = 0
        for i, s in enumerate(steps):
            n, p0 = len(s.token_ids), s.start_position
            end = p0 + n
            if n == 0 or end > len(s.block_ids) * bs:
                raise CapacityError(f"sequence {i}: {end} tokens do not fit its {len(s.block_ids)} blocks of {bs}")
            tables[i, : len(s.block_ids)] = s.block_ids
            p = np.arange(p0, end)
            ids[t : t + n] = s.token_ids
            pos[t : t + n] = p
            slots[t : t + n] = tables[i, p // bs].astype(np.int64) * bs + p % bs
            lens[i] = end
            t += n
            qsl[i + 1] = t
            last[r : r + s.num_logits] = np.arange(t - s.num_logits, t)
            r += s.num_logits
        return t, r

    def _fill_mixed_vectorized(self, steps: Sequence[StepLike]) -> tuple[int, int]:
        """As :meth:`_fill_mixed_loop`, the per-token arrays computed for every sequence at once."""
        h, bs = self.buffer.host, self.block_size
        ids, pos, slots, lens, tables = h["input_ids"][0], h["position_ids"][0], h["slot_mapping"], h["seq_lens"], \
            h["block_tables"]  # fmt: skip
        qsl, last = h["query_start_loc"], h["logits_indices"]
        b = len(steps)
        n = np.fromiter((len(s.token_ids) for s in steps), np.int64, count=b)  # (b,) tokens of each sequence
        p0 = np.fromiter((s.start_position for s in steps), np.int64, count=b)
        nl = np.fromiter((s.num_logits for s in steps), np.int64, count=b)
        width = np.fromiter((len(s.block_ids) for s in steps), np.int64, count=b)
        end = p0 + n
        bad = np.flatnonzero((n == 0) | (end > width * bs))
        if bad.size:
            i = int(bad[0])
            raise CapacityError(f"sequence {i}: {end[i]} tokens do not fit its {width[i]} blocks of {bs}")
        cum = np.cumsum(n)
        t = int(cum[-1])
        for i, s in enumerate(steps):
            tables[i, : width[i]] = s.block_ids
        ids[:t] = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in steps), np.int64, count=t)
        seq = np.repeat(np.arange(b), n)  # (t,) the sequence of each token
        p = np.arange(t) - np.repeat(cum - n, n) + np.repeat(p0, n)  # (t,) each token's position
        pos[:t] = p
        slots[:t] = tables[seq, p // bs].astype(np.int64) * bs + p % bs
        lens[:b] = end
        qsl[0] = 0
        qsl[1 : b + 1] = cum
        r = int(nl.sum())
        last[:r] = np.repeat(cum - nl, nl) + np.arange(r) - np.repeat(np.cumsum(nl) - nl, nl)  # last nl tokens each
        return t, r

    # -- running -------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, steps: Sequence[StepLike], feed: DeviceFeed | None = None,
            key: tuple[bool, Key] | None = None) -> Tensor:
        """Logits (sum of num_logits, V) of one step, in the model's dtype (a view: read it before the next run).

        ``feed``: input tokens copied on the device from the last step's results, which the host
        has not seen yet (asynchronous scheduling; :class:`~kiln.runtime.step_inputs.DeviceFeed`).
        """
        key = self.fill(steps, feed, key)
        if self._num_fed[0]:
            d, (nt, ns) = self.buffer.device_views, self._num_fed
            apply_feed(d, feed, d["feed_tok"][:, :nt], d["feed_seq"][:, :ns], self.block_size)  # type: ignore[arg-type]
        rows = sum(s.num_logits for s in steps)
        if not self.capture:
            return _logits(self._step(key)(*self._inputs(key)))[:rows]
        if key not in self._graphs:  # a bucket of several logits rows per sequence, met for the first time
            self._capture(key)
        graph, out = self._graphs[key]
        graph.replay()
        return out[:rows]

    def _step(self, key: tuple[bool, Key]) -> Callable[..., object]:
        return self.decode_step if key[0] else self.mixed_step

    @torch.no_grad()
    def capture_all(self, *, decode_only: bool = False) -> None:
        """Capture every bucket now, the largest first (all share one memory pool).

        The warm-up runs before each capture (Triton autotuning happens there) read real
        blocks over long contexts so that kernels are tuned for real work; they write only
        the scratch block (decode) or nothing (mixed).
        """
        if not self.capture:
            return
        keys = [k for k in self.keys if not (decode_only and not k[0])]
        for key in sorted(keys, key=lambda k: (k[1][0], k[1][1], k[0]), reverse=True):
            if key not in self._graphs:
                self.buffer.next_host()
                self._fill_warmup(key)
                decode, (t, s, _) = key
                self.buffer.upload(self._table_offset + s * self.max_blocks * 4)
                self._capture(key)

    def _fill_warmup(self, key: tuple[bool, Key]) -> None:
        decode, (t, s, _) = key
        h, bs = self.buffer.host, self.block_size
        blocks = max(1, min(self.max_blocks, self.num_blocks))
        h["block_tables"][:s, :blocks] = np.arange(blocks)
        if decode:  # every row: the longest context over real blocks, its one write to the scratch block
            h["input_ids"][0, :s] = 0
            h["position_ids"][0, :s] = blocks * bs - 1
            h["slot_mapping"][:s] = self.scratch_block * bs
            h["seq_lens"][:s] = blocks * bs
            h["query_start_loc"][: s + 1] = np.arange(s + 1)
            h["logits_indices"][:s] = np.arange(s)
        else:  # one sequence owns every token, attends over real blocks, writes nothing
            q = min(t, blocks * bs)
            h["input_ids"][0, :t] = 0
            h["position_ids"][0, :t] = np.arange(t) % (blocks * bs)
            h["slot_mapping"][:t] = -1
            h["seq_lens"][:s] = 0
            h["seq_lens"][0] = blocks * bs
            h["query_start_loc"][0] = 0
            h["query_start_loc"][1 : s + 1] = q
            h["logits_indices"][:s] = q - 1

    def _capture(self, key: tuple[bool, Key]) -> None:
        inputs, step = self._inputs(key), self._step(key)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up: Triton autotuning, cuBLAS handles, torch.compile
            for _ in range(2):
                step(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        if self._logits is None:  # one output buffer for every graph: each copies its rows into it
            probe = _logits(step(*inputs))
            self._logits = torch.empty(self.max_logits, probe.shape[-1], dtype=probe.dtype, device=self.device)
            del probe
        rows = self._logits[: key[1][2]]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            rows.copy_(_logits(step(*inputs)))
        self._graphs[key] = (graph, rows)

    @property
    def captured(self) -> list[tuple[bool, Key]]:
        """Buckets captured so far."""
        return sorted(self._graphs)


def _smallest(buckets: Sequence[int], n: int) -> int | None:
    for b in buckets:
        if b >= n:
            return b
    return None


def _logits(out: object) -> Tensor:
    logits = out[0] if isinstance(out, (list, tuple)) else out
    return logits[0]  # type: ignore[index]  # (S, V)


__all__ = ["StepGraphs", "batch_buckets", "token_buckets"]
