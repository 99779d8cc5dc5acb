"""The KV block pool: fixed-size blocks, reference counts, an LRU free queue, the prefix cache.

PagedAttention (Kwon et al. 2023) stores each sequence's keys and values in fixed-size
blocks that need not be contiguous, so memory is allocated a block at a time and blocks
can be shared. This module owns the blocks' bookkeeping (never tensors), after vLLM v1's
``BlockPool``:

- ``ref_cnt`` counts the users of a block: running requests and pins. A block with
  ``ref_cnt == 0`` is *free* and sits in the free queue; the invariant is
  "in the free queue if and only if ``ref_cnt == 0``".
- A full block whose tokens are known gets a ``block_hash`` and an entry in the cached
  map (hash -> block). Freeing it keeps the hash, so a later request with the same prefix
  finds it (a prefix-cache hit, cf. SGLang's RadixAttention, Zheng et al. 2024) and
  ``touch`` takes it back out of the free queue.
- The free queue is ordered for eviction: allocation pops from the head. Cached blocks are
  appended at the tail, a request's blocks in reverse order so that the tail of a sequence
  (least likely to be shared) is evicted before its head. Blocks without a hash hold
  nothing reusable and go to the head, so they are reused before any cached block is
  evicted (vLLM appends them at the tail too; putting them first keeps more of the cache).
- Evicting a cached block drops its hash from the map.
- A pin is one more reference: a pinned block is never free, so never evicted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from kiln.errors import CapacityError

if TYPE_CHECKING:
    from kiln.runtime.kv_cache_manager import BlockHash


class KVCacheBlock:
    """One block of KV slots: ``block_size`` consecutive token positions of one sequence."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "pin_cnt", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id  # index into the KV cache tensors' block axis
        self.ref_cnt = 0  # users: requests whose block table holds it, plus pins
        self.block_hash: BlockHash | None = None  # set while the block is in the prefix cache
        self.pin_cnt = 0  # how many of ref_cnt are pins
        self.prev_free: KVCacheBlock | None = None  # free-queue links, None when not free
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash is not None else None
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, pins={self.pin_cnt}, hash={h})"


class FreeBlockQueue:
    """Free blocks as a doubly linked list between two sentinels: O(1) at both ends and in the middle.

    The head is evicted first. ``remove`` is what makes a prefix-cache hit cheap: a free
    cached block is taken out of the middle of the queue.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock] = ()) -> None:
        self._head = KVCacheBlock(-1)  # sentinels, never handed out
        self._tail = KVCacheBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free_blocks = 0
        for b in blocks:
            self.append(b)

    def popleft(self) -> KVCacheBlock:
        first = self._head.next_free
        if first is self._tail or first is None:
            raise CapacityError("no free KV block left")
        self.remove(first)
        return first

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise RuntimeError(f"{block} is not in the free queue")
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        """Put ``block`` at the tail: evicted last."""
        last = self._tail.prev_free
        assert last is not None
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free_blocks += 1

    def appendleft(self, block: KVCacheBlock) -> None:
        """Put ``block`` at the head: reused first."""
        first = self._head.next_free
        assert first is not None
        self._head.next_free, block.prev_free = block, self._head
        block.next_free, first.prev_free = first, block
        self.num_free_blocks += 1

    def __iter__(self):  # head (evicted first) to tail
        b = self._head.next_free
        while b is not None and b is not self._tail:
            yield b
            b = b.next_free

    def __len__(self) -> int:
        return self.num_free_blocks


class BlockPool:
    """Allocation, reference counting, prefix-cache map and eviction of ``num_blocks`` KV blocks."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise CapacityError(f"the KV cache needs at least 1 block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}
        self.num_pinned_blocks = 0  # blocks with at least one pin

    # -- allocation -------------------------------------------------------------------------

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take ``num_blocks`` blocks from the head of the free queue (evicting cached ones), ref 1 each."""
        if num_blocks > self.num_free_blocks:
            raise CapacityError(f"asked for {num_blocks} KV blocks, {self.num_free_blocks} are free")
        out = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            self._evict(block)
            assert block.ref_cnt == 0, block
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Add a reference to each block (a prefix-cache hit), taking free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop a reference from each block; blocks reaching 0 become free in the given eviction order.

        Callers pass a request's blocks in reverse, so its last blocks are evicted first.
        """
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self.free_block_queue.appendleft(block)
                else:
                    self.free_block_queue.append(block)

    # -- pins -------------------------------------------------------------------------------

    def pin(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Hold one more reference on each block so it is never evicted."""
        for block in blocks:
            self.touch((block,))
            block.pin_cnt += 1
            if block.pin_cnt == 1:
                self.num_pinned_blocks += 1

    def unpin(self, blocks: Sequence[KVCacheBlock]) -> None:
        """Drop a pin from each block; unreferenced blocks become free (cached, evictable)."""
        for block in blocks:
            if block.pin_cnt <= 0:
                raise RuntimeError(f"unpin of a block that is not pinned: {block}")
            block.pin_cnt -= 1
            if block.pin_cnt == 0:
                self.num_pinned_blocks -= 1
        self.free_blocks(reversed(blocks))

    # -- prefix cache -----------------------------------------------------------------------

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        """The cached block holding the tokens ``block_hash`` stands for, if any."""
        return self.cached_block_hash_to_block.get(block_hash)

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> bool:
        """Enter a full, computed block in the prefix cache. False if another block already has the hash."""
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self.cached_block_hash_to_block:
            return False  # a duplicate (two requests computed the same prefix): keep the first
        block.block_hash = block_hash
        self.cached_block_hash_to_block[block_hash] = block
        return True

    def cache_full_blocks(
        self, blocks: Sequence[KVCacheBlock], block_hashes: Sequence[BlockHash], num_cached_blocks: int,
        num_full_blocks: int,
    ) -> list[KVCacheBlock]:
        """Cache ``blocks[num_cached_blocks:num_full_blocks]`` under their hashes; returns those newly cached."""
        newly = []
        for i in range(num_cached_blocks, num_full_blocks):
            if self.cache_block(blocks[i], block_hashes[i]):
                newly.append(blocks[i])
        return newly

    def _evict(self, block: KVCacheBlock) -> None:
        h = block.block_hash
        if h is None:
            return
        if self.cached_block_hash_to_block.get(h) is block:
            del self.cached_block_hash_to_block[h]
        block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash, so nothing hits any more. Refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        return True

    # -- accounting -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody references: free outright or cached and evictable."""
        return self.free_block_queue.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached_block_hash_to_block)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests or pins, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_blocks


__all__ = ["BlockPool", "FreeBlockQueue", "KVCacheBlock"]
