import hashlib
import random

import pytest

from kiln.errors import CapacityError
from kiln.runtime import BlockHash, BlockPool, FreeBlockQueue, KVCacheBlock


def h(i: int) -> BlockHash:
    return BlockHash(hashlib.sha256(str(i).encode()).digest())


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_block_queue]


def test_free_queue_removes_from_the_middle_in_constant_links() -> None:
    blocks = [KVCacheBlock(i) for i in range(6)]
    q = FreeBlockQueue(blocks)
    order = list(range(6))
    rng = random.Random(0)
    for _ in range(4):
        victim = rng.choice(order)
        q.remove(blocks[victim])
        order.remove(victim)
        assert [b.block_id for b in q] == order and len(q) == len(order)
    removed = [i for i in range(6) if i not in order]
    q.append(blocks[removed[0]])
    q.appendleft(blocks[removed[1]])
    assert [b.block_id for b in q] == [removed[1], *order, removed[0]] and len(q) == 4
    with pytest.raises(RuntimeError, match="not in the free queue"):
        q.remove(KVCacheBlock(99))


def test_ref_counts_through_allocate_touch_and_free() -> None:
    pool = BlockPool(8)
    a = pool.get_new_blocks(3)
    assert [b.ref_cnt for b in a] == [1, 1, 1] and pool.num_free_blocks == 5
    assert pool.usage == pytest.approx(3 / 8)
    pool.touch(a[:2])  # a second request shares two of them
    assert [b.ref_cnt for b in a] == [2, 2, 1]
    pool.free_blocks(reversed(a))
    assert [b.ref_cnt for b in a] == [1, 1, 0] and pool.num_free_blocks == 6
    pool.free_blocks(reversed(a[:2]))
    assert pool.num_free_blocks == 8 and pool.usage == 0.0
    with pytest.raises(RuntimeError, match="double free"):
        pool.free_blocks(a[:1])
    with pytest.raises(CapacityError, match="9 KV blocks, 8 are free"):
        pool.get_new_blocks(9)


def test_lru_eviction_order_tail_of_a_sequence_first_and_uncached_before_cached() -> None:
    pool = BlockPool(8)
    seq_a = pool.get_new_blocks(3)  # blocks 0, 1, 2
    seq_b = pool.get_new_blocks(3)  # blocks 3, 4, 5
    pool.cache_full_blocks(seq_a, [h(0), h(1), h(2)], 0, 3)
    pool.cache_full_blocks(seq_b, [h(10), h(11)], 0, 2)  # b's last block is partial: not cached
    pool.free_blocks(reversed(seq_a))  # a finishes first
    pool.free_blocks(reversed(seq_b))
    # head: never-used 6, 7 behind b's uncached block 5; then a's blocks tail-first, then b's
    assert free_ids(pool)[0] == 5
    assert free_ids(pool)[1:] == [6, 7, 2, 1, 0, 4, 3]
    got = pool.get_new_blocks(5)
    assert [b.block_id for b in got] == [5, 6, 7, 2, 1]
    # evicted cached blocks lost their hash; the rest are still found
    assert got[3].block_hash is None and pool.get_cached_block(h(2)) is None
    assert pool.get_cached_block(h(1)) is None and pool.get_cached_block(h(0)) is seq_a[0]
    assert pool.num_cached_blocks == 3


def test_touch_takes_a_free_cached_block_out_of_the_middle_and_refreshes_it() -> None:
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    pool.cache_full_blocks(blocks, [h(i) for i in range(4)], 0, 4)
    pool.free_blocks(reversed(blocks))
    assert free_ids(pool) == [3, 2, 1, 0]
    hit = pool.get_cached_block(h(2))
    pool.touch([hit])
    assert hit.ref_cnt == 1 and free_ids(pool) == [3, 1, 0]
    pool.free_blocks([hit])  # used again: now the most recently used
    assert free_ids(pool) == [3, 1, 0, 2]


def test_pinned_blocks_survive_eviction_pressure_until_unpinned() -> None:
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [h(0), h(1)], 0, 2)
    pool.pin(blocks)
    pool.free_blocks(reversed(blocks))  # the request is done; the pin holds them
    assert [b.ref_cnt for b in blocks] == [1, 1] and pool.num_free_blocks == 4 and pool.num_pinned_blocks == 2
    for _ in range(3):  # repeated pressure: take everything there is, give it back
        got = pool.get_new_blocks(pool.num_free_blocks)
        assert not {b.block_id for b in got} & {0, 1}
        pool.free_blocks(got)
    assert pool.get_cached_block(h(0)) is blocks[0] and pool.get_cached_block(h(1)) is blocks[1]
    pool.unpin(blocks)
    assert pool.num_free_blocks == 6 and pool.num_pinned_blocks == 0
    got = pool.get_new_blocks(6)
    assert pool.get_cached_block(h(0)) is None and pool.num_cached_blocks == 0
    with pytest.raises(RuntimeError, match="not pinned"):
        pool.unpin(got[:1])


def test_duplicate_hash_keeps_the_first_block_and_reset_needs_an_idle_pool() -> None:
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(1), pool.get_new_blocks(1)
    assert pool.cache_full_blocks(a, [h(0)], 0, 1) == a
    assert pool.cache_full_blocks(b, [h(0)], 0, 1) == []  # computed twice: the second stays uncached
    assert b[0].block_hash is None and pool.get_cached_block(h(0)) is a[0]
    assert not pool.reset_prefix_cache()  # blocks in use
    pool.free_blocks(a + b)
    assert pool.reset_prefix_cache() and pool.num_cached_blocks == 0 and a[0].block_hash is None
    assert not BlockPool(2, enable_caching=False).cache_full_blocks(a, [h(5)], 0, 1)
    with pytest.raises(CapacityError):
        BlockPool(0)
