"""The step graph's launch-ready form and its inputs: no synchronization, one copy per step.

- :func:`specialize_attention` swaps every ``kiln::paged_attention`` of the runtime's step
  graph for ``kiln_runtime::paged_attention``, the same computation told the longest query
  length by the host (a trailing ``max_query_len`` input). The CUDA kernel then needs no
  device-to-host copy to choose its decode or prefill path, which a CUDA-graph capture
  forbids and which would cost every eager step one synchronization per layer.
- :class:`StagingBuffer` / :func:`stage`: a step's integer inputs packed into pinned host
  memory and moved to the device in one asynchronous copy (vLLM's persistent input batch).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.fx import GraphModule

from kiln.errors import ConfigError
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


# ------------------------------------------------------------------ tokens fed on the device


@dataclass
class DeviceFeed:
    """Input tokens a step takes from the last step's results on the device (the runner's ``feed``).

    ``tokens`` (R, W) int64 on the device: row ``j`` holds the input tokens made for the
    last step's sequence ``j`` (asynchronous decoding: W = 1, the token it sampled;
    asynchronous speculation: the new last token, then the drafts). ``sources[i]``: the row
    feeding this step's sequence ``i`` (-1: none); its first ``counts[i]`` tokens (default
    1) come from that row. ``rollback`` (R,), when given: positions the host counted for
    row ``j``'s sequence that the device did not keep (rejected drafts), by which the fed
    sequences' positions, slots and lengths are moved back on the device.
    """

    tokens: Tensor
    sources: Sequence[int]
    counts: Sequence[int] | None = None
    rollback: Tensor | None = None

    def fill(self, starts: Sequence[int], tok: np.ndarray, seq: np.ndarray) -> tuple[int, int]:
        """Write the fed tokens' (destination row, flat source, source row, destination sequence) into
        ``tok`` (4, T) and the fed sequences' (sequence, source row) into ``seq`` (2, S); returns the counts.

        ``starts[i]``: the first token row of this step's sequence ``i``.
        """
        width = self.tokens.shape[1] if self.tokens.dim() == 2 else 1
        cols: list[tuple[int, int, int, int]] = []
        rows: list[tuple[int, int]] = []
        for i, j in enumerate(self.sources):
            if j < 0:
                continue
            s0 = int(starts[i])
            for c in range(self.counts[i] if self.counts is not None else 1):
                cols.append((s0 + c, j * width + c, j, i))
            rows.append((i, j))
        if cols:
            tok[:, : len(cols)] = np.array(cols, dtype=np.int64).T
            seq[:, : len(rows)] = np.array(rows, dtype=np.int64).T
        return len(cols), len(rows)


def as_feed(feed: DeviceFeed | tuple[Tensor, Sequence[int]] | None) -> DeviceFeed | None:
    """A :class:`DeviceFeed` from the runner's ``feed`` argument (``(tokens, sources)``: one token per source)."""
    if feed is None or isinstance(feed, DeviceFeed):
        return feed
    tokens, sources = feed
    return DeviceFeed(tokens.reshape(-1, 1), list(sources))


def apply_feed(views: dict[str, Tensor], feed: DeviceFeed, tok: Tensor, seq: Tensor, block_size: int) -> None:
    """Write the fed tokens into a step's device inputs; roll their positions back by ``feed.rollback``.

    ``tok`` (4, n) / ``seq`` (2, m): :meth:`DeviceFeed.fill`'s arrays on the device. ``views``: the
    step's ``input_ids`` (1, T), ``position_ids`` (1, T), ``slot_mapping``, ``seq_lens`` and ``block_tables``.
    """
    if tok.device.type == "cuda":  # one launch instead of a dozen
        from kiln.backends.triton.spec_kernels import apply_feed_triton

        apply_feed_triton(views, feed, tok, seq, block_size)
        return
    apply_feed_reference(views, feed, tok, seq, block_size)


def apply_feed_reference(views: dict[str, Tensor], feed: DeviceFeed, tok: Tensor, seq: Tensor, block_size: int) -> None:
    """:func:`apply_feed` in torch operations (the CPU path and the kernel's reference)."""
    dst = tok[0]
    views["input_ids"][0].index_copy_(0, dst, feed.tokens.reshape(-1).index_select(0, tok[1]))
    if feed.rollback is None:
        return
    back = feed.rollback.to(torch.int64)
    positions = views["position_ids"][0]
    pos = positions.index_select(0, dst) - back.index_select(0, tok[2])
    positions.index_copy_(0, dst, pos)
    blocks = views["block_tables"][tok[3], pos // block_size].to(torch.int64)
    views["slot_mapping"].index_copy_(0, dst, blocks * block_size + pos % block_size)
    lens = views["seq_lens"]
    lens.index_copy_(0, seq[0], lens.index_select(0, seq[0]) - back.index_select(0, seq[1]).to(lens.dtype))

__all__ = ["MAX_QUERY_LEN", "DeviceFeed", "StagingBuffer", "apply_feed", "apply_feed_reference", "as_feed", "paged_attention_known", "specialize_attention", "stage"]
