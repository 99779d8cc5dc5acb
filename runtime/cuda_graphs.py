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
graph replay instead of hundreds of Python launches.

Two pieces make the step graph capturable:

- :func:`specialize_attention` swaps every ``kiln::paged_attention`` for
  ``kiln_runtime::paged_attention``, the same computation told the longest query length
  by the host (a trailing ``max_query_len`` input). The CUDA kernel then needs no
  device-to-host copy to choose decode or prefill, which a graph capture forbids (and
  which costs an eager step one synchronization per layer).
- :class:`StagingBuffer`: every integer input of a step lives in one pinned host buffer
  and moves to the device in one copy.

On the CPU the same buffers, padding and slicing run without capture
(:meth:`StepGraphs.run` with ``capture=False``), so tests check the padding path against
unpadded steps; only ``torch.cuda.graph`` itself needs a GPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.fx import GraphModule

from kiln.errors import CapacityError, ConfigError
from kiln.ops import paged_attention_reference

PAGED = torch.ops.kiln.paged_attention.default


# ------------------------------------------------------------------ the launch-ready attention op


@torch.library.custom_op("kiln_runtime::paged_attention", mutates_args=("kv_cache", "kv_scales"))
def paged_attention_known(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float | None,
    kv_scales: Tensor | None,
    max_query_len: int,
) -> Tensor:
    """``kiln::paged_attention`` with the longest query length (``max_query_len``) known on the host.

    The result is the reference's; ``max_query_len`` only spares the CUDA kernel its
    device-to-host copy (1 means an all-decode batch whose every token belongs to a sequence).
    """
    extra = (kv_scales,) if kv_scales is not None else ()
    return paged_attention_reference(
        q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, scale, *extra
    )


@paged_attention_known.register_fake
def _paged_attention_known_fake(q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, scale,
                                kv_scales, max_query_len):  # type: ignore[no-untyped-def]
    return torch.empty_like(q)


@torch.library.register_kernel("kiln_runtime::paged_attention", "cuda")
def _paged_attention_known_cuda(q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, scale,
                                kv_scales, max_query_len):  # type: ignore[no-untyped-def]
    from kiln.backends.triton.paged_attention import paged_attention

    extra = (kv_scales,) if kv_scales is not None else ()
    return paged_attention(q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, scale, *extra,
                           max_query_len=max_query_len)


KNOWN = torch.ops.kiln_runtime.paged_attention.default
MAX_QUERY_LEN = "max_query_len"
_FORWARDED = ("q", "k", "v", "kv_cache", "slot_mapping", "block_tables", "seq_lens", "query_start_loc", "scale",
              "kv_scales")  # kiln::paged_attention's arguments, in order


def specialize_attention(gm: GraphModule) -> GraphModule:
    """A copy of the step graph whose paged attention takes ``max_query_len`` as a last input.

    The copy shares ``gm``'s parameters (no weight is copied) and leaves ``gm`` untouched.
    Its inputs are ``gm``'s followed by ``max_query_len`` (a Python int).
    """
    graph = copy.deepcopy(gm.graph)
    nodes = [n for n in graph.nodes if n.target == PAGED]
    if not nodes:
        raise ConfigError("the step graph has no kiln::paged_attention: compile it with CompileConfig(kv_cache=True)")
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        mql = graph.placeholder(MAX_QUERY_LEN)
    mql.meta["val"] = 1
    for node in nodes:
        if len(node.args) > len(_FORWARDED) or set(node.kwargs) - set(_FORWARDED):
            raise ConfigError(
                f"{node.name}: kiln::paged_attention has arguments this runtime does not forward "
                f"({len(node.args)} positional, kwargs {sorted(node.kwargs)}); update kiln.runtime.cuda_graphs"
            )
        args = list(node.args) + [None] * (len(_FORWARDED) - len(node.args))
        for i, name in enumerate(_FORWARDED):
            if name in node.kwargs:
                args[i] = node.kwargs[name]
        with graph.inserting_before(node):
            new = graph.call_function(KNOWN, (*args, mql))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    out = GraphModule(gm, graph)
    out.meta.update(gm.meta)
    return out


# ------------------------------------------------------------------ one copy per step


class StagingBuffer:
    """Integer arrays packed into one pinned host buffer, copied to the device in one transfer.

    ``fields`` maps a name to ``(dtype, shape)``; each field gets a numpy view of the host
    buffer (:attr:`host`) and a tensor view of the device buffer (:attr:`device_views`), at
    the same 8-byte aligned offset. :meth:`upload` copies the first ``nbytes`` (default:
    all). Two host buffers alternate (:meth:`next_host`), so the host can fill the next
    step while the last upload waits in the stream behind the running step. On the CPU the
    device views are the host memory itself and nothing is copied.
    """

    def __init__(self, fields: dict[str, tuple[torch.dtype, tuple[int, ...]]], device: torch.device) -> None:
        self.device = device
        self.offsets: dict[str, int] = {}
        sizes: dict[str, int] = {}
        end = 0
        for name, (dtype, shape) in fields.items():
            self.offsets[name] = end
            sizes[name] = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            end += -(-sizes[name] // 8) * 8
        self.nbytes = max(end, 8)
        on_gpu = device.type == "cuda"
        hosts = [torch.zeros(self.nbytes, dtype=torch.uint8, pin_memory=on_gpu) for _ in range(2 if on_gpu else 1)]
        self._dev = torch.zeros(self.nbytes, dtype=torch.uint8, device=device) if on_gpu else hosts[0]
        self._hosts = hosts
        self._views: list[dict[str, np.ndarray]] = []
        for h in hosts:
            raw = h.numpy()
            self._views.append({
                name: raw[self.offsets[name] : self.offsets[name] + sizes[name]].view(_NUMPY[dtype]).reshape(shape)
                for name, (dtype, shape) in fields.items()
            })  # fmt: skip
        self.device_views: dict[str, Tensor] = {
            name: self._dev[self.offsets[name] : self.offsets[name] + sizes[name]].view(dtype).view(shape)
            for name, (dtype, shape) in fields.items()
        }
        self._current = 0
        self._copied: list[torch.cuda.Event | None] = [None] * len(hosts)

    @property
    def host(self) -> dict[str, np.ndarray]:
        """Numpy views of the current host buffer."""
        return self._views[self._current]

    def next_host(self) -> dict[str, np.ndarray]:
        """Switch to the other host buffer, once its last upload has read it; returns its views.

        Its contents are those of two fills ago: rewrite every field a step reads.
        """
        self._current = (self._current + 1) % len(self._hosts)
        event = self._copied[self._current]
        if event is not None:
            event.synchronize()
            self._copied[self._current] = None
        return self.host

    def upload(self, nbytes: int | None = None) -> None:
        """Copy the current host buffer's first ``nbytes`` to the device (asynchronously, on the current stream)."""
        if self._dev is self._hosts[0]:
            return
        n = self.nbytes if nbytes is None else nbytes
        self._dev[:n].copy_(self._hosts[self._current][:n], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copied[self._current] = event


_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.uint8: np.uint8, torch.float32: np.float32}


def stage(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, Tensor]:
    """Tensors on ``device`` holding ``arrays`` (int64 / int32 numpy arrays), moved in one copy."""
    if device.type != "cuda":
        return {k: torch.from_numpy(a) for k, a in arrays.items()}
    sizes = {k: -(-a.nbytes // 8) * 8 for k, a in arrays.items()}
    host = torch.empty(max(sum(sizes.values()), 8), dtype=torch.uint8, pin_memory=True)
    raw = host.numpy()
    offsets, off = {}, 0
    for k, a in arrays.items():
        offsets[k] = off
        raw[off : off + a.nbytes] = a.reshape(-1).view(np.uint8)
        off += sizes[k]
    dev = host.to(device, non_blocking=True)
    dtypes = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}
    return {k: dev[offsets[k] : offsets[k] + a.nbytes].view(dtypes[a.dtype]).view(a.shape) for k, a in arrays.items()}


# ------------------------------------------------------------------ step graphs


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
    num_logits: int  # logits wanted (graphs serve 1)


Key = tuple[int, int]  # (tokens, sequences) of a bucket; tokens == sequences and DECODE marks a decode graph


class StepGraphs:
    """Steps on static padded buffers, captured as one CUDA graph per bucket (or run as is).

    Two kinds of bucket:

    - *decode* ``(B, B)``: every sequence computes one token. Padding rows own a dummy
      token written to the scratch block (``seq_len`` 1 over it), so attention runs the
      split-K decode kernel on every row (``max_query_len`` 1).
    - *mixed* ``(T, S)``, when ``max_num_tokens`` is given: any step of at most ``T`` tokens
      over at most ``S`` sequences (prefill chunks, prefix-cache hits, decodes), each asking
      for one row of logits. Padding tokens belong to no sequence and write nothing (slot
      -1); padding sequences own no token. Attention runs the prefill kernel sized for ``T``
      query rows.

    Args:
        decode_step / mixed_step: ``step(*inputs)`` with inputs in ``input_names`` order,
            returning logits (1, S, V) (or a tuple whose first element they are).
        input_names: the step's inputs (the specialized step graph's, ``max_query_len`` last).
        constants: values of inputs that are not metadata (KV caches and scales, model constants).
        max_num_seqs: the most sequences of a step; buckets from :func:`batch_buckets`.
        max_num_tokens: the most tokens of a mixed step (None: decode graphs only).
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
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.num_blocks = num_blocks
        self.device = device
        self.capture = capture
        t, n = self.max_tokens, self.max_seqs
        self.buffer = StagingBuffer(
            {
                "input_ids": (torch.int64, (1, t)),
                "position_ids": (torch.int64, (1, t)),
                "slot_mapping": (torch.int64, (t,)),
                "logits_indices": (torch.int64, (n,)),
                "seq_lens": (torch.int32, (n,)),
                "query_start_loc": (torch.int32, (n + 1,)),
                "feed_src": (torch.int64, (n,)),  # rows of the last step's tokens ...
                "feed_dst": (torch.int64, (t,)),  # ... that become these input tokens (see run)
                "block_tables": (torch.int32, (n, max_blocks)),  # last: a step uploads only its rows
            },
            device,
        )
        self._table_offset = self.buffer.offsets["block_tables"]
        self._constants = constants
        self._graphs: dict[tuple[bool, Key], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = None
        self._logits: Tensor | None = None  # (max_num_seqs, V): the graphs' logits
        self._num_fed = 0  # tokens of the filled step fed from the last step's output

    # -- buckets -------------------------------------------------------------------------------

    @property
    def keys(self) -> list[tuple[bool, Key]]:
        """Every bucket: ``(is_decode, (tokens, sequences))``."""
        out = [(True, (b, b)) for b in self.seq_buckets]
        out += [(False, (t, s)) for t in self.token_buckets for s in self.seq_buckets if s <= t]
        return out

    def key_for(self, steps: Sequence[StepLike]) -> tuple[bool, Key] | None:
        """The smallest bucket that runs ``steps``, or None (too many tokens, sequences or blocks; several logits)."""
        num_seqs = len(steps)
        if not 0 < num_seqs <= self.max_seqs:
            return None
        tokens = 0
        for s in steps:
            if s.num_logits != 1 or len(s.block_ids) > self.max_blocks:
                return None
            tokens += len(s.token_ids)
        seqs = _smallest(self.seq_buckets, num_seqs)
        assert seqs is not None
        if tokens == num_seqs:
            return True, (seqs, seqs)
        t = _smallest(self.token_buckets, tokens)
        return None if t is None else (False, (t, seqs))

    def supports(self, steps: Sequence[StepLike]) -> bool:
        """Whether a bucket runs ``steps``."""
        return self.key_for(steps) is not None

    # -- inputs --------------------------------------------------------------------------------

    def _inputs(self, key: tuple[bool, Key]) -> list[object]:
        decode, (t, s) = key
        d = self.buffer.device_views
        views: dict[str, object] = {
            "input_ids": d["input_ids"][:, :t],
            "position_ids": d["position_ids"][:, :t],
            "slot_mapping": d["slot_mapping"][:t],
            "logits_indices": d["logits_indices"][:s],
            "seq_lens": d["seq_lens"][:s],
            "query_start_loc": d["query_start_loc"][: s + 1],
            "block_tables": d["block_tables"][:s],
            MAX_QUERY_LEN: 1 if decode else t,
            **self._constants,
        }
        missing = [name for name in self.input_names if name not in views]
        if missing:
            raise ConfigError(f"the step graphs have inputs they cannot fill: {missing}")
        return [views[name] for name in self.input_names]

    def fill(self, steps: Sequence[StepLike], sources: Sequence[int] | None = None) -> tuple[bool, Key]:
        """Write ``steps`` (padded to their bucket) into the static inputs and upload them; returns the bucket.

        ``sources[i] >= 0`` marks sequence ``i``'s first token as fed from row ``sources[i]``
        of the last step's tokens (see :meth:`run`).
        """
        key = self.key_for(steps)
        if key is None:
            raise ConfigError(
                f"{len(steps)} sequences of {sum(len(s.token_ids) for s in steps)} tokens do not fit the step graphs "
                f"(at most {self.max_seqs} sequences, {self.max_tokens} tokens, {self.max_blocks} blocks each, "
                "one row of logits each)"
            )
        h = self.buffer.next_host()
        decode, (t, s) = key
        if decode:
            self._fill_decode(steps, s)
        else:
            self._fill_mixed(steps, t, s)
        self._num_fed = 0
        if sources is not None:
            starts = h["query_start_loc"]
            for i, src in enumerate(sources):
                if src >= 0:
                    h["feed_src"][self._num_fed] = src
                    h["feed_dst"][self._num_fed] = starts[i]
                    self._num_fed += 1
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

    def _fill_mixed(self, steps: Sequence[StepLike], tokens: int, seqs: int) -> None:
        h, bs = self.buffer.host, self.block_size
        ids, pos, slots, lens, tables = h["input_ids"][0], h["position_ids"][0], h["slot_mapping"], h["seq_lens"], \
            h["block_tables"]  # fmt: skip
        qsl, last = h["query_start_loc"], h["logits_indices"]
        t = 0
        qsl[0] = 0
        for i, s in enumerate(steps):
            n, p0 = len(s.token_ids), s.start_position
            end = p0 + n
            if n == 0 or end > len(s.block_ids) * bs:
                raise CapacityError(f"sequence {i}: {end} tokens do not fit its {len(s.block_ids)} blocks of {bs}")
            blocks = np.asarray(s.block_ids, dtype=np.int64)
            p = np.arange(p0, end)
            ids[t : t + n] = s.token_ids
            pos[t : t + n] = p
            slots[t : t + n] = blocks[p // bs] * bs + p % bs
            tables[i, : len(blocks)] = blocks
            lens[i] = end
            t += n
            qsl[i + 1] = t
            last[i] = t - 1
        ids[t:tokens] = 0  # padding tokens: no sequence owns them, they write nothing
        pos[t:tokens] = 0
        slots[t:tokens] = -1
        b = len(steps)  # padding sequences: no token, nothing cached
        lens[b:seqs] = 0
        qsl[b + 1 : seqs + 1] = t
        last[b:seqs] = 0

    # -- running -------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, steps: Sequence[StepLike], feed: tuple[Tensor, Sequence[int]] | None = None) -> Tensor:
        """Logits (len(steps), V) of one step, in the model's dtype (a view: read it before the next run).

        ``feed = (tokens, sources)``: sequence ``i``'s first input token is ``tokens[sources[i]]``
        where ``sources[i] >= 0``, copied on the device (a token sampled by the last step that
        the host has not seen yet: asynchronous scheduling).
        """
        key = self.fill(steps, feed[1] if feed is not None else None)
        if self._num_fed:
            d, k = self.buffer.device_views, self._num_fed
            d["input_ids"][0].index_copy_(0, d["feed_dst"][:k], feed[0].index_select(0, d["feed_src"][:k]))  # type: ignore[index]
        if not self.capture:
            return _logits(self._step(key)(*self._inputs(key)))[: len(steps)]
        if key not in self._graphs:
            self._capture(key)
        graph, out = self._graphs[key]
        graph.replay()
        return out[: len(steps)]

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
                decode, (t, s) = key
                self.buffer.upload(self._table_offset + s * self.max_blocks * 4)
                self._capture(key)

    def _fill_warmup(self, key: tuple[bool, Key]) -> None:
        decode, (t, s) = key
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
            self._logits = torch.empty(self.max_seqs, probe.shape[-1], dtype=probe.dtype, device=self.device)
            del probe
        rows = self._logits[: key[1][1]]
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


__all__ = [
    "MAX_QUERY_LEN",
    "StepGraphs",
    "StagingBuffer",
    "batch_buckets",
    "paged_attention_known",
    "specialize_attention",
    "stage",
    "token_buckets",
]
