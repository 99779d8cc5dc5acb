"""The KV cache manager: block tables per request, prefix caching by chained block hashes, pins.

After vLLM v1's ``KVCacheManager`` (Kwon et al. 2023, PagedAttention; automatic prefix
caching): a request's KV lives in a list of blocks (its *block table*). Each *full* block
is named by a chained hash, ``hash(parent_hash, token ids of the block, extra keys)``, so
a hash stands for the whole prefix up to the end of its block; equal hashes mean equal
prefixes, which is what lets a new request reuse another's blocks (the hash-chain
equivalent of SGLang's radix tree, Zheng et al. 2024, RadixAttention). Hashes are SHA-256
over a fixed byte serialization, never Python's ``hash()``, so they are stable across
processes and runs. The manager remembers the hashes of the last ``HASH_MEMO_ENTRIES`` prompts it
hashed (keyed by salt and first block) and hands them to a request whose tokens start the same
way, so the questions after one document do not digest it again each time.

Life of a request's blocks, driven by the scheduler:

1. ``get_computed_blocks(request)`` finds the longest cached block-aligned prefix of the
   request's tokens, never the whole sequence: at least the last token is recomputed so
   the step produces logits to sample from.
2. ``allocate_slots(request, n, ...)`` takes references on those hit blocks and allocates
   new blocks for the ``n`` tokens computed this step, or returns None when the pool is
   short (the scheduler then preempts or waits).
3. ``cache_blocks(request, num_computed_tokens)``, called once a step has run, enters the
   newly completed full blocks in the prefix cache: a block is found by others only after
   its KV has been written.
4. ``free(request)`` drops the request's references; cached blocks stay findable until
   evicted (least recently used first).

Pinning (``pin_prefix`` / ``release``) is how an application keeps a stable context, such
as a document many questions will follow, computed once and resident: see
:meth:`KVCacheManager.pin_prefix`.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NewType

from kiln.errors import CapacityError, ConfigError
from kiln.runtime.block_pool import BlockPool, KVCacheBlock
from kiln.runtime.request import Request

#: A full block's chained SHA-256 digest: names the whole prefix up to the end of the block.
BlockHash = NewType("BlockHash", bytes)

#: Extra inputs to a block's hash beyond its tokens (a cache salt, an adapter id, ...).
ExtraKeys = tuple[str | bytes | int, ...]

_ROOT_PARENT = hashlib.sha256(b"kiln.block_hash.v1").digest()  # parent of a sequence's first block
#: Prompts whose block hashes the manager keeps to hand to later requests that start with the same
#: tokens (see :meth:`KVCacheManager.update_block_hashes`); least recently used dropped first.
HASH_MEMO_ENTRIES = 64


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: ExtraKeys = ()
) -> BlockHash:
    """SHA-256 of (parent hash, the block's token ids, extra keys) in a fixed length-prefixed encoding."""
    h = hashlib.sha256(parent_hash if parent_hash is not None else _ROOT_PARENT)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    h.update(struct.pack("<I", len(extra_keys)))
    for key in extra_keys:
        if isinstance(key, bytes):
            tag, raw = b"b", key
        elif isinstance(key, str):
            tag, raw = b"s", key.encode("utf-8")
        elif isinstance(key, int) and not isinstance(key, bool):
            tag, raw = b"i", str(key).encode("ascii")
        else:
            raise TypeError(f"block hash extra keys are str, bytes or int, got {type(key).__name__}")
        h.update(tag + struct.pack("<I", len(raw)) + raw)
    return BlockHash(h.digest())


def hash_block_sequence(
    token_ids: Sequence[int], block_size: int, *, salt: str | None = None, first_block: int = 0,
    parent_hash: BlockHash | None = None,
) -> list[BlockHash]:
    """Chained hashes of the full blocks of ``token_ids``.

    ``token_ids`` may start at block ``first_block`` of a sequence, continuing the chain
    from ``parent_hash`` (the hash of block ``first_block - 1``). The salt enters block 0's
    hash only; the chain carries it to every later block.
    """
    out: list[BlockHash] = []
    parent = parent_hash
    n = len(token_ids) // block_size
    if first_block == 0 and salt is not None and n:  # block 0 carries the salt: the general encoding
        parent = hash_block_tokens(parent, token_ids[:block_size], (salt,))
        out.append(parent)
    # The other blocks: hash_block_tokens' bytes (length, int64 tokens, no extra keys), packed once for all.
    body = token_ids[len(out) * block_size : n * block_size]
    raw = struct.pack(f"<{len(body)}q", *body)  # 2.5x faster than numpy's conversion of a list
    head, tail, step = struct.pack("<I", block_size), struct.pack("<I", 0), 8 * block_size
    sha256, append = hashlib.sha256, out.append  # one digest call per block: this runs for every prompt block
    prev = parent if parent is not None else _ROOT_PARENT
    for j in range(0, (n - len(out)) * step, step):
        prev = sha256(b"".join((prev, head, raw[j : j + step], tail))).digest()  # a BlockHash (NewType: no call)
        append(prev)
    return out


@dataclass
class PrefixCacheStats:
    """Cumulative prefix-cache lookups, counted in tokens (as vLLM reports them)."""

    requests: int = 0  # lookups (one per admission, re-admissions after preemption included)
    queries: int = 0  # tokens looked up
    hits: int = 0  # tokens found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass(frozen=True, eq=False)
class PinHandle:
    """An application's pin on a prefix; give it back to :meth:`KVCacheManager.release`."""

    pin_id: int  # unique per manager
    num_tokens: int  # tokens covered: the prefix's full blocks (a partial last block is not pinned)
    block_hashes: tuple[BlockHash, ...] = field(repr=False)  # hashes of the pinned blocks, in order


@dataclass(eq=False)
class _Pin:
    handle: PinHandle
    blocks: list[KVCacheBlock | None]  # the pinned block per position, None while not yet computed


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Block tables, prefix caching and pins over one :class:`BlockPool`. Never touches tensors."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}  # block table per request id
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks of each request already cached
        self.stats = PrefixCacheStats()
        self._pins: dict[int, _Pin] = {}
        self._pending: dict[BlockHash, list[tuple[int, int]]] = {}  # hash -> [(pin id, block index)]
        self._pin_ids = itertools.count()
        # (salt, first block's tokens) -> (a prompt, its full blocks' hashes) of the latest request hashed
        self._hash_memo: OrderedDict[tuple, tuple[list[int], list[BlockHash]]] = OrderedDict()

    # -- the request's path -----------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of ``request``'s tokens: (blocks, tokens), leaving >= 1 token to compute.

        The blocks are not referenced yet: pass them to :meth:`allocate_slots` right away.
        Statistics count the lookup when that admission succeeds.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size  # keep the last token to compute
        hashes = request.block_hashes
        if len(hashes) < max_blocks:  # a remembered prompt's hashes first, as far as the tokens agree
            self._hashes_from_memo(request, max_blocks)
        blocks: list[KVCacheBlock] = []
        # Hashes not remembered are made as the lookup goes, in doubling chunks: a miss stops it, and the blocks
        # past the miss are hashed when they are cached (after the step, off the time to first token).
        chunk = 8
        lookup = self.block_pool.cached_block_hash_to_block.get  # get_cached_block, without a call per block
        while len(blocks) < max_blocks:
            if len(hashes) <= len(blocks):
                self.update_block_hashes(request, upto=min(max_blocks, len(blocks) + chunk))
                chunk *= 2
            found = list(map(lookup, hashes[len(blocks) : max_blocks]))
            if None in found:  # (a block has no __eq__: the test compares identity, in C)
                blocks += found[: found.index(None)]
                break
            blocks += found
        return blocks, len(blocks) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, num_new_computed_tokens: int = 0,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
    ) -> list[KVCacheBlock] | None:
        """Give ``request`` slots for ``num_new_tokens`` more tokens; the new blocks, or None if short.

        ``new_computed_blocks`` / ``num_new_computed_tokens`` are a prefix-cache hit from
        :meth:`get_computed_blocks` (only at admission); they sit before the new tokens.
        On None nothing changed.
        """
        if num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
        req_blocks = self.req_to_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + num_new_computed_tokens
        num_required = _cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = max(num_required - len(req_blocks) - len(new_computed_blocks), 0)
        # free cached hit blocks leave the free queue when touched: they count against it too
        num_free_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_free_hits > self.block_pool.num_free_blocks:
            return None
        if not req_blocks and self.enable_prefix_caching:  # an admission: count the lookup
            self.stats.requests += 1
            self.stats.queries += request.num_tokens
            self.stats.hits += num_new_computed_tokens
        if new_computed_blocks:
            if req_blocks:
                raise RuntimeError(f"request {request.request_id} got prefix-cache blocks after admission")
            self.block_pool.touch(new_computed_blocks)
            req_blocks.extend(new_computed_blocks)
            self.num_cached_blocks[request.request_id] = len(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        req_blocks.extend(new_blocks)
        self.req_to_blocks[request.request_id] = req_blocks
        return new_blocks

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Enter ``request``'s full blocks up to ``num_computed_tokens`` (KV written) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        num_full = min(num_computed_tokens, request.num_tokens) // self.block_size
        num_cached = self.num_cached_blocks.get(rid, 0)
        if num_full <= num_cached:
            return
        hashes = self.update_block_hashes(request)
        newly = self.block_pool.cache_full_blocks(self.req_to_blocks[rid], hashes, num_cached, num_full)
        self.num_cached_blocks[rid] = num_full
        for block in newly:
            self._pin_if_pending(block)

    def free(self, request: Request) -> None:
        """Drop ``request``'s references; its last blocks become the first to evict."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table as block ids (a new list)."""
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def update_block_hashes(self, request: Request, upto: int | None = None) -> list[BlockHash]:
        """Extend ``request.block_hashes`` to cover its full blocks (tokens only ever append), or its first
        ``upto`` blocks if fewer."""
        hashes = request.block_hashes
        num_full = request.num_tokens // self.block_size
        if upto is not None:
            num_full = min(num_full, upto)
        if len(hashes) < num_full and self.enable_prefix_caching:
            self._hashes_from_memo(request, num_full)
        if len(hashes) < num_full:
            start = len(hashes)
            tokens = request.token_slice(start * self.block_size, num_full * self.block_size)
            parent = hashes[-1] if hashes else None
            hashes.extend(
                hash_block_sequence(
                    tokens, self.block_size, salt=request.cache_salt, first_block=start, parent_hash=parent
                )
            )
            if self.enable_prefix_caching:
                self._remember_hashes(request)
        return hashes

    def _memo_key(self, request: Request) -> tuple:
        return (request.cache_salt, tuple(request.token_slice(0, self.block_size)))

    def _hashes_from_memo(self, request: Request, num_full: int) -> None:
        """Extend ``request.block_hashes`` toward ``num_full`` with a remembered sequence's hashes, as far as its
        tokens equal the request's: the same tokens and salt have the same hashes, so no digest is computed
        for them. Many requests after one document (a shared prefix) hash it once, not once each."""
        bs, hashes = self.block_size, request.block_hashes
        key = self._memo_key(request)
        entry = self._hash_memo.get(key)
        if entry is None:
            return
        tokens, known = entry
        start, end = len(hashes), min(num_full, len(known))
        if start >= end or (start and hashes[start - 1] != known[start - 1]):  # the chains parted before start
            return
        self._hash_memo.move_to_end(key)
        # The most blocks from start on whose tokens are equal, by bisection: blocks [start, lo) are known equal and
        # the answer lies in [lo, hi]. Each step compares only the stretch past lo, so a lookup compares about the
        # range's tokens once in all, whether the sequences part (a question after a document) or not.
        lo, hi = start, end
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if request.token_slice(lo * bs, mid * bs) == tokens[lo * bs : mid * bs]:
                lo = mid
            else:
                hi = mid - 1
        hashes.extend(known[start:lo])

    def _remember_hashes(self, request: Request) -> None:
        """Keep the hashes of ``request``'s prompt blocks for later requests that start with the same tokens.

        Prompts only: the entry holds the prompt list itself (never changed after arrival), not a copy, and a
        decoding request's new blocks leave it alone, so remembering costs O(1) a block once the prompt is hashed.
        """
        n = min(len(request.block_hashes), request.num_prompt_tokens // self.block_size)
        if n == 0:
            return
        key = self._memo_key(request)
        hashes = request.block_hashes
        entry = self._hash_memo.get(key)
        if entry is not None and len(entry[1]) >= n and entry[1][n - 1] == hashes[n - 1]:
            self._hash_memo.move_to_end(key)  # already known: this prompt's blocks are a prefix of the remembered
            return
        self._hash_memo[key] = (request.prompt_token_ids, hashes[:n])
        self._hash_memo.move_to_end(key)
        while len(self._hash_memo) > HASH_MEMO_ENTRIES:
            self._hash_memo.popitem(last=False)

    # -- pins -------------------------------------------------------------------------------

    def pin_prefix(self, token_ids: Sequence[int], *, salt: str | None = None) -> PinHandle:
        """Keep the KV of a stable prefix resident until :meth:`release`; returns the handle.

        Only whole blocks are pinned: the first ``len(token_ids) // block_size`` blocks.
        Blocks of the prefix already cached are pinned at once. The rest are registered as
        an *intent*: the first request that computes them (any request whose tokens start
        with this prefix, under the same ``salt``) publishes its blocks to the cache after
        the step, and those blocks are pinned then. So the usual pattern is: pin, then send
        the first request; every later request with the prefix hits it, however much cache
        pressure comes in between. :meth:`num_pinned_tokens` says how much is resident.

        A pinned block holds one reference, so it is neither free nor evictable; pinning
        the same prefix twice shares the blocks (two references). Raises ConfigError
        without prefix caching or for a prefix shorter than a block, CapacityError when the
        pins would need more blocks than the pool has.
        """
        if not self.enable_prefix_caching:
            raise ConfigError("pin_prefix needs enable_prefix_caching=True")
        hashes = hash_block_sequence(list(token_ids), self.block_size, salt=salt)
        if not hashes:
            raise ConfigError(
                f"a prefix of {len(token_ids)} tokens is shorter than one block ({self.block_size} tokens): "
                "nothing to pin"
            )
        reserved = self.num_pinned_blocks + len(self._pending)
        needed = sum(1 for h in hashes if not self._is_reserved(h))
        if reserved + needed > self.block_pool.num_blocks:
            raise CapacityError(
                f"pinning {len(hashes)} blocks would reserve {reserved + needed} of the "
                f"{self.block_pool.num_blocks} KV blocks; release other pins or enlarge the cache"
            )
        handle = PinHandle(next(self._pin_ids), len(hashes) * self.block_size, tuple(hashes))
        pin = _Pin(handle, [None] * len(hashes))
        self._pins[handle.pin_id] = pin
        for i, h in enumerate(hashes):
            block = self.block_pool.get_cached_block(h)
            if block is not None:
                self.block_pool.pin((block,))
                pin.blocks[i] = block
            else:
                self._pending.setdefault(h, []).append((handle.pin_id, i))
        return handle

    def release(self, handle: PinHandle) -> None:
        """Drop the pin; its blocks stay cached but become evictable (prefix tail first)."""
        pin = self._pins.pop(handle.pin_id, None)
        if pin is None or pin.handle is not handle:
            raise ConfigError(f"pin {handle.pin_id} is unknown or already released")
        for i, block in enumerate(pin.blocks):
            if block is None:
                waiters = self._pending[handle.block_hashes[i]]
                waiters.remove((handle.pin_id, i))
                if not waiters:
                    del self._pending[handle.block_hashes[i]]
        self.block_pool.unpin([b for b in pin.blocks if b is not None])

    def num_pinned_tokens(self, handle: PinHandle) -> int:
        """Tokens of the pinned prefix resident now, from its start (usable by a prefix hit)."""
        pin = self._pins.get(handle.pin_id)
        if pin is None:
            return 0
        n = next((i for i, b in enumerate(pin.blocks) if b is None), len(pin.blocks))
        return n * self.block_size

    @property
    def num_pinned_blocks(self) -> int:
        return self.block_pool.num_pinned_blocks

    def _is_reserved(self, h: BlockHash) -> bool:
        block = self.block_pool.get_cached_block(h)
        return h in self._pending or (block is not None and block.pin_cnt > 0)

    def _pin_if_pending(self, block: KVCacheBlock) -> None:
        assert block.block_hash is not None
        for pin_id, i in self._pending.pop(block.block_hash, ()):
            self.block_pool.pin((block,))
            self._pins[pin_id].blocks[i] = block

    # -- accounting -------------------------------------------------------------------------

    def reset_prefix_cache(self) -> bool:
        """Forget all cached blocks (e.g. after new weights). False, doing nothing, while blocks are in use.

        Requests and pins hold blocks: finish the requests and release the pins first.
        Pending pin intents survive and catch the next computation of their prefix.
        """
        return self.block_pool.reset_prefix_cache()

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return _cdiv(num_tokens, self.block_size)

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks that a new allocation can take (free or cached-and-evictable)."""
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests or pins."""
        return self.block_pool.usage

    def check_invariants(self, requests: Iterable[Request] = ()) -> None:
        """Assert the bookkeeping is consistent (for tests): refs = table entries + pins, free iff ref 0."""
        refs = [0] * self.num_blocks
        for blocks in self.req_to_blocks.values():
            for b in blocks:
                refs[b.block_id] += 1
        assert self.num_pinned_blocks == sum(1 for b in self.block_pool.blocks if b.pin_cnt > 0)
        for block in self.block_pool.blocks:
            assert block.ref_cnt == refs[block.block_id] + block.pin_cnt, block
            assert block.ref_cnt >= 0 and block.pin_cnt >= 0, block
        free = {b.block_id for b in self.block_pool.free_block_queue}
        assert len(free) == self.num_free_blocks
        assert free == {b.block_id for b in self.block_pool.blocks if b.ref_cnt == 0}
        for h, block in self.block_pool.cached_block_hash_to_block.items():
            assert block.block_hash == h
        for pin in self._pins.values():
            for i, b in enumerate(pin.blocks):
                assert b is None or (b.pin_cnt > 0 and b.block_hash == pin.handle.block_hashes[i])
        for h in self._pending:
            assert self.block_pool.get_cached_block(h) is None
        for r in requests:
            assert len(self.req_to_blocks.get(r.request_id, ())) * self.block_size >= r.num_computed_tokens


__all__ = [
    "BlockHash",
    "ExtraKeys",
    "KVCacheManager",
    "PinHandle",
    "PrefixCacheStats",
    "hash_block_sequence",
    "hash_block_tokens",
]
