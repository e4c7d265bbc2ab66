"""Block pool bookkeeping on CPU: exact block ids, reference counts, prefix hits, free-queue order."""

from __future__ import annotations

import pytest

from llmctl.runtime.block_manager import BlockManager
from llmctl.runtime.sampling_params import SamplingParams
from llmctl.runtime.sequence import Sequence


def seq(tokens, name="s") -> Sequence:
    return Sequence(name, list(tokens), SamplingParams())


def compute(bm: BlockManager, s: Sequence, n: int) -> None:
    """What the engine does for a step: allocate, compute n tokens, cache the full blocks."""
    assert bm.can_allocate(s, n)
    bm.allocate(s, n)
    s.num_computed_tokens += n
    bm.cache_full_blocks(s)


def test_allocate_takes_blocks_in_order_and_free_returns_them_tail_first():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(10), "a")
    compute(bm, a, 10)
    assert a.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 5
    b = seq(range(100, 105), "b")
    compute(bm, b, 5)
    assert b.block_table == [3, 4]
    bm.free(a)
    # a's blocks come back tail first: 2, 1, 0 at the back of the queue, after the never-used 5, 6, 7
    assert list(bm.free_queue) == [5, 6, 7, 2, 1, 0]
    assert a.block_table == [] and a.num_computed_tokens == 0


def test_append_grows_the_table_only_at_block_boundaries():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(range(3))
    compute(bm, s, 3)
    assert s.block_table == [0]
    s.append_token(99)
    compute(bm, s, 1)  # token 4 fills block 0
    assert s.block_table == [0]
    s.append_token(98)
    compute(bm, s, 1)  # token 5 needs block 1
    assert s.block_table == [0, 1]


def test_prefix_cache_reuses_full_blocks_and_counts_references():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(list(range(10)), "a")
    compute(bm, a, 10)  # blocks 0, 1 full and hashed; block 2 holds 2 tokens
    b = seq(list(range(8)) + [50, 51, 52], "b")
    assert bm.cached_prefix(b) == [0, 1]
    assert bm.can_allocate(b, 3)
    bm.allocate(b, 3)
    assert b.block_table == [0, 1, 3]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert [bm.blocks[i].ref_count for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in (0, 1, 2)] == [1, 1, 0]
    bm.free(b)
    assert bm.num_free_blocks == 10


def test_prefix_never_covers_the_whole_prompt():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(range(8), "a")
    compute(bm, a, 8)
    b = seq(range(8), "b")  # identical: the last token must still be computed to get logits
    assert bm.cached_prefix(b) == [0]


def test_freed_blocks_stay_cached_until_reused_and_eviction_drops_the_hash():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq(range(9), "a")
    compute(bm, a, 9)
    bm.free(a)
    assert list(bm.free_queue) == [2, 1, 0]
    again = seq(range(9), "again")
    assert bm.cached_prefix(again) == [0, 1]  # a's blocks are free but still hold its tokens
    # A different request takes blocks from the front of the queue: 2, then 1, evicting block 1's hash.
    c = seq(range(50, 55), "c")
    compute(bm, c, 5)
    assert c.block_table == [2, 1]
    assert bm.cached_prefix(again) == [0]


def test_can_allocate_counts_idle_cached_blocks_against_the_free_pool():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq(range(9), "a")
    compute(bm, a, 9)
    bm.free(a)
    b = seq(list(range(8)) + [7, 7, 7, 7, 7], "b")  # reuses blocks 0, 1, needs 2 more: only 1 left
    assert not bm.can_allocate(b, 5)
    assert b.block_table == []
    assert bm.can_allocate(seq(list(range(8)) + [1], "c"), 1)


def test_allocate_without_room_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(range(12))
    assert not bm.can_allocate(s, 12)
    with pytest.raises(RuntimeError):
        bm.allocate(s, 12)


def test_hash_collision_is_not_a_hit():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3], "a")
    compute(bm, a, 3)
    block = bm.blocks[a.block_table[0]]
    block.tokens = (9, 9)  # as if another token run had produced the same hash
    assert bm.cached_prefix(seq([1, 2, 3], "b")) == []


def test_prefix_caching_off_shares_nothing():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    a = seq(range(9), "a")
    compute(bm, a, 9)
    b = seq(range(9), "b")
    compute(bm, b, 9)
    assert set(a.block_table).isdisjoint(b.block_table)


def test_bad_pool_is_a_value_error():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=16)


def salted(tokens, salt, name="s") -> Sequence:
    return Sequence(name, list(tokens), SamplingParams(), cache_salt=salt)


def test_a_cache_salt_roots_a_chain_of_its_own():
    bm = BlockManager(num_blocks=12, block_size=4)
    compute(bm, seq(range(9), "plain"), 9)  # blocks 0, 1 indexed, 2 partial
    first = salted(range(9), "tenant-1", "first")
    assert bm.cached_prefix(first) == []
    compute(bm, first, 9)
    assert first.block_table == [3, 4, 5] and first.num_cached_tokens == 0
    again = salted(range(9), "tenant-1", "again")
    assert bm.cached_prefix(again) == [3, 4]
    assert bm.cached_prefix(salted(range(9), "tenant-2")) == []
    assert bm.cached_prefix(seq(range(9), "plain-again")) == [0, 1]


def test_an_engineered_hash_collision_cannot_poison_a_prefix(monkeypatch):
    """A hash that ignores each block's first token makes [9, 2, 3, 4] collide with [1, 2, 3, 4]. An attacker's
    second block, computed after the colliding first one, must not be served after the victim's real first
    block, although its tokens and its parent's hash are what the victim's chain expects."""
    import llmctl.runtime.block_manager as block_manager

    monkeypatch.setattr(block_manager, "block_hash", lambda parent, tokens: hash((parent, tokens[1:])))
    bm = BlockManager(num_blocks=12, block_size=4)
    shared = [5, 6, 7, 8]
    attacker = seq([9, 2, 3, 4] + shared + [0], "attacker")
    compute(bm, attacker, 9)
    assert attacker.block_table == [0, 1, 2]
    owner = seq([1, 2, 3, 4, 7, 7, 7, 7, 0], "owner")
    assert bm.cached_prefix(owner) == []  # the collision is found out at the first block
    compute(bm, owner, 9)
    assert owner.block_table == [3, 4, 5]
    victim = seq([1, 2, 3, 4] + shared + [0], "victim")
    assert bm.cached_prefix(victim) == [3]  # the owner's first block, never the attacker's second


def test_a_duplicate_block_keeps_the_blocks_after_it_reachable():
    """Two requests compute the same prefix at once; the one that is behind fills its first block second, so
    it is a duplicate, but its next blocks are indexed first: they must still be found after the other's."""
    bm = BlockManager(num_blocks=12, block_size=4)
    prefix = list(range(12))
    a, b = seq(prefix + [50], "a"), seq(prefix + [60], "b")
    for s in (a, b):
        bm.allocate(s, 13)
    a.num_computed_tokens = 4
    bm.cache_full_blocks(a)  # a's block 0 is indexed
    b.num_computed_tokens = 13
    bm.cache_full_blocks(b)  # b's block 0 duplicates it; b's blocks 1 and 2 are indexed
    a.num_computed_tokens = 13
    bm.cache_full_blocks(a)  # a's blocks 1 and 2 duplicate b's
    assert a.block_table == [0, 1, 2, 3] and b.block_table == [4, 5, 6, 7]
    assert bm.cached_prefix(seq(prefix + [70], "c")) == [0, 5, 6]


@pytest.mark.parametrize("caching", [True, False])
def test_blocks_before_a_window_are_handed_back_once(caching):
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=caching)
    a = seq(range(13), "a")
    compute(bm, a, 13)  # blocks 0..3, the last one partial
    assert a.block_table == [0, 1, 2, 3] and bm.num_free_blocks == 4
    bm.release_before(a, 9)  # the next queries see positions 9 on: blocks 0 and 1 hold only 0..7
    assert a.num_released_blocks == 2 and bm.num_free_blocks == 6
    assert list(bm.free_queue)[-2:] == [0, 1]
    bm.release_before(a, 9)  # nothing twice
    assert a.num_released_blocks == 2 and bm.num_free_blocks == 6
    bm.release_before(a, 100)
    # With caching, block 2 stays: block 3 (partial, not indexed) will link to it when it is full.
    assert a.num_released_blocks == (2 if caching else 4)
    bm.free(a)
    assert bm.num_free_blocks == 8 and all(b.ref_count == 0 for b in bm.blocks)
    assert a.num_released_blocks == 0 and a.block_table == []


def test_a_released_block_still_serves_another_sequences_prefix():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(12), "a")
    compute(bm, a, 12)
    bm.release_before(a, 8)  # blocks 0, 1 back in the pool, their hashes kept
    b = seq(range(13), "b")
    assert bm.cached_prefix(b) == [0, 1, 2]
