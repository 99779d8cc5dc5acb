import hashlib
import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.errors import CapacityError, ConfigError
from kiln.runtime import KVCacheManager, Request, hash_block_sequence, hash_block_tokens

BS = 4


def tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 1000) for _ in range(n)]


def computed(kv: KVCacheManager, rid: str, prompt: list[int], salt: str | None = None) -> Request:
    """A request whose whole prompt has been run: blocks allocated, KV 'written', full blocks cached."""
    r = Request(request_id=rid, prompt_token_ids=prompt, cache_salt=salt)
    blocks, hit = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, r.num_tokens - hit, hit, blocks) is not None
    r.num_computed_tokens = r.num_tokens
    kv.cache_blocks(r, r.num_computed_tokens)
    return r


def test_block_hash_is_sha256_of_a_fixed_serialization() -> None:
    root = hashlib.sha256(b"kiln.block_hash.v1").digest()
    want = hashlib.sha256(root + struct.pack("<I3q", 3, 11, 12, 13) + struct.pack("<I", 0)).digest()
    assert hash_block_tokens(None, [11, 12, 13]) == want  # stable across processes: no hash()
    salted = hashlib.sha256(
        root + struct.pack("<I3q", 3, 11, 12, 13) + struct.pack("<I", 1) + b"s" + struct.pack("<I", 4) + b"salt"
    ).digest()
    assert hash_block_tokens(None, [11, 12, 13], ("salt",)) == salted


def test_chained_hashes_differ_with_parent_and_salt_and_agree_otherwise() -> None:
    t = tokens(12)
    a = hash_block_sequence(t, BS)
    assert len(a) == 3 and len(set(a)) == 3
    assert hash_block_sequence(t + [1, 2], BS) == a  # the partial block is not hashed
    assert hash_block_sequence(t[:8], BS) == a[:2]  # a prefix shares its hashes
    other_parent = hash_block_sequence(tokens(4, seed=1) + t[4:], BS)
    assert other_parent[1] != a[1] and other_parent[2] != a[2]  # same tokens, different prefix
    s1, s2 = hash_block_sequence(t, BS, salt="alice"), hash_block_sequence(t, BS, salt="bob")
    assert all(x != y for x, y in zip(s1, s2, strict=True)) and all(x != y for x, y in zip(s1, a, strict=True))
    assert hash_block_sequence(t[8:], BS, first_block=2, parent_hash=a[1]) == a[2:]
    chained, parent = [], None  # the packed fast path is hash_block_tokens' encoding, block after block
    for i in range(0, 12, BS):
        parent = hash_block_tokens(parent, t[i : i + BS])
        chained.append(parent)
    assert a == chained
    assert hash_block_sequence(np.asarray(t, dtype=np.int32), BS) == a  # numpy token ids hash alike
    assert hash_block_tokens(None, [1], (7,)) != hash_block_tokens(None, [1], ("7",))
    with pytest.raises(TypeError):
        hash_block_tokens(None, [1], (1.5,))  # type: ignore[arg-type]


def test_prefix_hit_returns_cached_blocks_block_aligned_never_the_whole_prompt() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    doc = tokens(10)
    a = computed(kv, "a", doc)  # 2 full blocks cached, 1 partial
    assert kv.block_pool.num_cached_blocks == 2
    b = Request(request_id="b", prompt_token_ids=doc[:9] + [7, 7, 7])
    blocks, hit = kv.get_computed_blocks(b)
    assert hit == 8 and blocks == kv.req_to_blocks["a"][:2]
    # the prompt is exactly the cached blocks: the last block is left to compute (logits needed)
    c = Request(request_id="c", prompt_token_ids=doc[:8])
    blocks, hit = kv.get_computed_blocks(c)
    assert hit == 4 and blocks == kv.req_to_blocks["a"][:1]
    # after `a` is freed its blocks are still found, and allocation takes them back out of the free queue
    kv.free(a)
    blocks, hit = kv.get_computed_blocks(b)
    free_before = kv.num_free_blocks
    new = kv.allocate_slots(b, b.num_tokens - hit, hit, blocks)
    assert new is not None and len(new) == 1  # 12 tokens: 2 hit blocks + 1 new
    assert kv.get_block_ids("b")[:2] == [blk.block_id for blk in blocks]
    assert all(blk.ref_cnt == 1 for blk in blocks) and kv.num_free_blocks == free_before - 3
    assert kv.stats.hits == 8 + 0 and kv.stats.queries == 10 + 12 and kv.stats.requests == 2
    kv.check_invariants()


def test_blocks_are_published_only_once_computed_and_salts_isolate() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    doc = tokens(12)
    a = Request(request_id="a", prompt_token_ids=doc)
    assert kv.allocate_slots(a, 12) is not None
    a.num_computed_tokens = 12  # scheduled, not yet run
    assert kv.get_computed_blocks(Request(request_id="x", prompt_token_ids=doc + [1]))[1] == 0
    kv.cache_blocks(a, 8)  # the step ran its first 8 tokens
    assert kv.get_computed_blocks(Request(request_id="x", prompt_token_ids=doc + [1]))[1] == 8
    kv.cache_blocks(a, 12)
    assert kv.get_computed_blocks(Request(request_id="x", prompt_token_ids=doc + [1]))[1] == 12
    salted = Request(request_id="y", prompt_token_ids=doc + [1], cache_salt="tenant-2")
    assert kv.get_computed_blocks(salted) == ([], 0)
    off = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    computed(off, "a", doc)
    assert off.get_computed_blocks(Request(request_id="x", prompt_token_ids=doc + [1])) == ([], 0)


def test_allocate_slots_returns_none_and_changes_nothing_when_short() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = Request(request_id="a", prompt_token_ids=tokens(6))
    assert len(kv.allocate_slots(a, 6)) == 2
    a.num_computed_tokens = 6
    assert kv.allocate_slots(a, 2) == []  # still fits its second block
    a.num_computed_tokens = 8
    b = Request(request_id="b", prompt_token_ids=tokens(9, seed=3))
    assert kv.allocate_slots(b, 9) is None  # needs 3, 2 free
    assert "b" not in kv.req_to_blocks and kv.num_free_blocks == 2
    assert len(kv.allocate_slots(b, 5)) == 2  # a chunk fits
    assert kv.usage == 1.0
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 4 and kv.req_to_blocks == {}
    kv.check_invariants()


def test_lru_eviction_under_pressure_prefers_old_and_tail_blocks() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    old, new = tokens(12, seed=1), tokens(12, seed=2)
    kv.free(computed(kv, "old", old))
    kv.free(computed(kv, "new", new))
    filler = Request(request_id="f", prompt_token_ids=tokens(8, seed=9))
    kv.allocate_slots(filler, 8)  # takes 2 blocks: old's last two
    assert kv.get_computed_blocks(Request(request_id="q", prompt_token_ids=old + [0]))[1] == 4
    assert kv.get_computed_blocks(Request(request_id="q", prompt_token_ids=new + [0]))[1] == 12


def test_pin_before_compute_registers_intent_and_survives_pressure() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    doc = tokens(10)
    handle = kv.pin_prefix(doc)
    assert handle.num_tokens == 8 and kv.num_pinned_tokens(handle) == 0  # nothing computed yet
    a = computed(kv, "a", doc + [5, 6])  # the first request with the document computes it
    assert kv.num_pinned_tokens(handle) == 8 and kv.num_pinned_blocks == 2
    kv.free(a)
    assert kv.num_free_blocks == 6  # the pin holds the two document blocks
    for i in range(3):  # heavy traffic: every free block is taken and given back
        r = Request(request_id=f"p{i}", prompt_token_ids=tokens(24, seed=10 + i))
        assert kv.allocate_slots(r, 24) is not None
        kv.free(r)
    q = Request(request_id="q", prompt_token_ids=doc + [9, 9, 9])
    blocks, hit = kv.get_computed_blocks(q)
    assert hit == 8 and [b.block_id for b in blocks] == [b.block_id for b in kv._pins[handle.pin_id].blocks]
    kv.check_invariants()
    kv.release(handle)
    assert kv.num_free_blocks == 8 and kv.num_pinned_tokens(handle) == 0
    r = Request(request_id="r", prompt_token_ids=tokens(32, seed=99))
    kv.allocate_slots(r, 32)  # takes every block: the released document is evicted
    assert kv.get_computed_blocks(q)[1] == 0
    with pytest.raises(ConfigError, match="already released"):
        kv.release(handle)


def test_pin_of_a_cached_prefix_is_immediate_and_pins_share_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    doc = tokens(8)
    kv.free(computed(kv, "a", doc, salt="s"))
    assert kv.num_pinned_tokens(kv.pin_prefix(doc)) == 0  # another salt: not the same blocks
    h1 = kv.pin_prefix(doc, salt="s")
    h2 = kv.pin_prefix(doc, salt="s")
    assert kv.num_pinned_tokens(h1) == kv.num_pinned_tokens(h2) == 8
    assert [b.ref_cnt for b in kv._pins[h1.pin_id].blocks] == [2, 2]
    kv.release(h1)
    assert kv.num_pinned_tokens(h2) == 8 and kv.num_free_blocks == 6
    kv.check_invariants()
    assert not kv.reset_prefix_cache()  # a pin holds blocks
    kv.release(h2)
    assert kv.reset_prefix_cache()
    assert kv.get_computed_blocks(Request(request_id="b", prompt_token_ids=doc + [1], cache_salt="s"))[1] == 0


def test_pin_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="enable_prefix_caching=True"):
        KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=False).pin_prefix(tokens(8))
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    with pytest.raises(ConfigError, match="shorter than one block"):
        kv.pin_prefix([1, 2, 3])
    kv.pin_prefix(tokens(12))
    with pytest.raises(CapacityError, match="would reserve 5 of the 4 KV blocks"):
        kv.pin_prefix(tokens(8, seed=5))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 2**40), max_size=70), st.sampled_from([1, 4, 16]), st.sampled_from([None, "salt"]),
       st.booleans())
def test_sequence_hashes_equal_the_chain_of_block_hashes(tokens, block_size, salt, continued) -> None:
    # hash_block_sequence packs the tokens once; each digest must equal hash_block_tokens' for its block
    first, parent = (2, hash_block_tokens(None, [7, 8])) if continued else (0, None)
    got = hash_block_sequence(tokens, block_size, salt=salt, first_block=first, parent_hash=parent)
    want = []
    for j in range(len(tokens) // block_size):
        extra = (salt,) if (first + j == 0 and salt is not None) else ()
        parent = hash_block_tokens(parent, tokens[j * block_size : (j + 1) * block_size], extra)
        want.append(parent)
    assert got == want


@pytest.mark.parametrize("salt", [None, "s"])
def test_lookup_hashes_only_up_to_the_first_miss_and_caching_completes_the_chain(salt: str | None) -> None:
    # 40 full blocks: a miss costs one chunk of hashes before the step; the rest wait for cache_blocks
    kv = KVCacheManager(num_blocks=200, block_size=BS)
    prompt = tokens(40 * BS + 1)
    cold = Request(request_id="cold", prompt_token_ids=prompt, cache_salt=salt)
    assert kv.get_computed_blocks(cold) == ([], 0)
    assert 1 <= len(cold.block_hashes) <= 8
    assert kv.allocate_slots(cold, cold.num_tokens) is not None
    cold.num_computed_tokens = cold.num_tokens
    kv.cache_blocks(cold, cold.num_computed_tokens)
    assert cold.block_hashes == hash_block_sequence(prompt, BS, salt=salt)  # the chain is whole and right
    # a request sharing 25 blocks: found block by block through the doubling chunks, stopping at the miss
    warm = Request(request_id="warm", prompt_token_ids=prompt[: 25 * BS] + tokens(20 * BS, seed=5), cache_salt=salt)
    blocks, hit = kv.get_computed_blocks(warm)
    assert hit == 25 * BS and [b.block_id for b in blocks] == kv.get_block_ids("cold")[:25]
    assert 26 <= len(warm.block_hashes) < 45
    assert warm.block_hashes == hash_block_sequence(warm.all_token_ids, BS, salt=salt)[: len(warm.block_hashes)]


def _count_hashed_blocks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch the manager's hashing to count the blocks it digests (one list entry per call)."""
    import kiln.runtime.kv_cache_manager as km

    counts: list[int] = []
    real = km.hash_block_sequence

    def counting(token_ids, block_size, **kw):  # type: ignore[no-untyped-def]
        counts.append(len(token_ids) // block_size)
        return real(token_ids, block_size, **kw)

    monkeypatch.setattr(km, "hash_block_sequence", counting)
    return counts


@pytest.mark.parametrize("salt", [None, "s"])
def test_requests_after_one_document_reuse_its_hashes_and_get_the_same_chain(monkeypatch, salt) -> None:  # type: ignore[no-untyped-def]
    counts = _count_hashed_blocks(monkeypatch)
    kv = KVCacheManager(num_blocks=400, block_size=BS)
    doc = tokens(30 * BS, seed=1)
    computed(kv, "first", doc + tokens(3 * BS, seed=2), salt)
    # the whole document, parts of it (the bisection for the first unequal block ends near either side), less than a
    # block; longest first (the memo keeps the latest prompt: a shorter share leaves only its part remembered)
    for i, cut in enumerate((30 * BS, 29 * BS + BS - 1, 17 * BS + 2, 2 * BS + 1, 1 * BS, 5)):
        counts.clear()
        r = Request(request_id=f"q{i}", prompt_token_ids=doc[:cut] + tokens(3 * BS + 1, seed=10 + i), cache_salt=salt)
        blocks, hit = kv.get_computed_blocks(r)
        assert hit == (cut // BS) * BS and len(blocks) == cut // BS
        # only the blocks past the shared tokens are digested (at most the question's 3 full blocks before the
        # step; without the remembered hashes the lookup digests the document's blocks too)
        assert sum(counts) <= 3, counts
        assert kv.allocate_slots(r, r.num_tokens - hit, hit, blocks) is not None
        r.num_computed_tokens = r.num_tokens
        kv.cache_blocks(r, r.num_computed_tokens)
        assert r.block_hashes == hash_block_sequence(r.all_token_ids, BS, salt=salt)  # equal to a fresh chain
        kv.free(r)


def test_remembered_hashes_are_keyed_by_salt_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import kiln.runtime.kv_cache_manager as km

    counts = _count_hashed_blocks(monkeypatch)
    kv = KVCacheManager(num_blocks=400, block_size=BS)
    doc = tokens(12 * BS, seed=3)
    computed(kv, "a", doc + [7], salt="a")
    counts.clear()
    other = Request(request_id="b", prompt_token_ids=doc + [7], cache_salt="b")  # same tokens, another salt
    assert kv.get_computed_blocks(other) == ([], 0)
    assert sum(counts) >= 1 and other.block_hashes[0] == hash_block_sequence(doc[:BS], BS, salt="b")[0]
    monkeypatch.setattr(km, "HASH_MEMO_ENTRIES", 3)
    for i in range(6):
        computed(kv, f"n{i}", tokens(4 * BS + 1, seed=100 + i))
    assert len(kv._hash_memo) == 3
    # with prefix caching off nothing is hashed or remembered
    off = KVCacheManager(num_blocks=50, block_size=BS, enable_prefix_caching=False)
    counts.clear()
    computed(off, "x", doc + [7])
    assert counts == [] and not off._hash_memo


def test_remembered_hashes_continue_only_the_chain_they_belong_to() -> None:
    # r is hashed to block 2 (as a chunked lookup leaves it); a starts like r, parts at block 1 and rejoins r's
    # tokens at blocks 2-3; the memo now holds a's chain, whose blocks 2-3 have r's tokens but another parent
    kv = KVCacheManager(num_blocks=32, block_size=2)
    r = Request(request_id="r", prompt_token_ids=[1, 1, 9, 9, 3, 3, 4, 4])
    kv.update_block_hashes(r, upto=2)
    a = Request(request_id="a", prompt_token_ids=[1, 1, 2, 2, 3, 3, 4, 4])
    kv.update_block_hashes(a)
    kv.update_block_hashes(r)
    assert r.block_hashes == hash_block_sequence(r.all_token_ids, 2)
    assert a.block_hashes == hash_block_sequence(a.all_token_ids, 2)


def test_a_decoding_request_leaves_the_remembered_prompt_alone() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    prompt = tokens(5 * BS + 2, seed=4)
    r = computed(kv, "r", prompt)
    ((kept_tokens, kept_hashes),) = kv._hash_memo.values()
    assert kept_tokens is r.prompt_token_ids and len(kept_hashes) == 5  # the prompt itself, not a copy
    for t in range(3 * BS):  # decode across three block boundaries
        r.output_token_ids.append(t)
        assert kv.allocate_slots(r, 1) is not None
        r.num_computed_tokens += 1
        kv.cache_blocks(r, r.num_computed_tokens)
    ((kept_tokens, kept_hashes),) = kv._hash_memo.values()
    assert kept_tokens is r.prompt_token_ids and len(kept_hashes) == 5
    assert r.block_hashes == hash_block_sequence(r.all_token_ids, BS)  # the request's own chain is whole
