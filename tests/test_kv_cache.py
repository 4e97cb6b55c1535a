"""Block pool and prefix cache."""
from __future__ import annotations

import pytest

from fullgraph.engine.kv_cache import BlockPool, KVCacheManager
from fullgraph.engine.request import Request
from fullgraph.sampling_params import SamplingParams


def make_req(ids, rid="r"):
    return Request(rid, list(ids), SamplingParams(), seed=0, max_tokens=16)


def test_null_block_is_never_allocated():
    pool = BlockPool(5)
    assert pool.num_free == 4
    ids = pool.allocate(4)
    assert sorted(ids) == [1, 2, 3, 4] and 0 not in ids
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_release_returns_blocks_and_ref_counts_shared_blocks():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.touch([ids[0]])                   # a second owner
    pool.release(ids)
    assert pool.num_free == 2              # ids[0] still owned once
    pool.release([ids[0]])
    assert pool.num_free == 3


def test_allocate_slots_and_free():
    kv = KVCacheManager(num_blocks=9, block_size=4, enable_prefix_caching=True)
    req = make_req(range(10))
    assert kv.allocate_slots(req, 10)
    assert len(req.block_ids) == 3
    req.num_computed_tokens = 10
    assert kv.allocate_slots(req, 2)        # fits in block 3
    assert len(req.block_ids) == 3
    assert kv.allocate_slots(req, 3)        # needs a 4th block
    assert len(req.block_ids) == 4
    assert not kv.allocate_slots(req, 100)  # nothing changes when it cannot fit
    assert len(req.block_ids) == 4
    kv.free(req)
    assert kv.pool.num_free == 8 and req.block_ids == []


def test_prefix_hits_are_full_blocks_and_leave_one_token():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = make_req(range(12), "a")
    assert kv.get_computed_blocks(a) == []
    kv.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    kv.cache_full_blocks(a)
    # identical prompt: at most 11 tokens may come from the cache -> 2 full blocks
    b = make_req(range(12), "b")
    assert kv.get_computed_blocks(b) == a.block_ids[:2]
    # longer prompt sharing 12 tokens: all 3 blocks
    c = make_req(list(range(12)) + [99, 98], "c")
    assert kv.get_computed_blocks(c) == a.block_ids[:3]
    # same tokens in block 1 but a different block 0: no hit at all (chained hashes)
    d = make_req([7, 7, 7, 7] + list(range(4, 12)) + [1], "d")
    assert kv.get_computed_blocks(d) == []


def test_hit_is_verified_against_tokens():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    a = make_req([1, 2, 3])
    kv.allocate_slots(a, 3)
    a.num_computed_tokens = 3
    kv.cache_full_blocks(a)
    block = a.block_ids[0]
    # forge a colliding hash with other tokens: the lookup must refuse it
    kv.pool.block_key[block] = (None, (5, 6))
    b = make_req([1, 2, 3], "b")
    assert kv.get_computed_blocks(b) == []


def test_cached_free_blocks_are_reused_then_evicted():
    kv = KVCacheManager(num_blocks=5, block_size=2, enable_prefix_caching=True)
    a = make_req([1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    kv.cache_full_blocks(a)
    kv.free(a)
    assert kv.pool.num_free == 4 and len(kv.pool.cached) == 2
    b = make_req([1, 2, 3, 4, 9], "b")
    hits = kv.get_computed_blocks(b)
    assert len(hits) == 2
    assert kv.allocate_slots(b, 1, hits)
    assert kv.pool.num_free == 4 - 3
    # filling the pool evicts the remaining cached-free entries
    c = make_req(list(range(20, 22)), "c")
    assert kv.allocate_slots(c, 2)
    assert kv.pool.num_free == 0


def test_usage():
    kv = KVCacheManager(num_blocks=5, block_size=4, enable_prefix_caching=False)
    assert kv.usage == 0.0
    r = make_req(range(8))
    kv.allocate_slots(r, 8)
    assert kv.usage == 0.5


def test_fork_shares_full_blocks_and_copies_the_partial_block_and_state():
    kv = KVCacheManager(16, 4, False, num_state_slots=4)
    parent, child, other = (make_req(range(11), rid) for rid in "pco")
    assert kv.allocate_slots(parent, 10)                   # 10 of 11 tokens: 3 blocks
    parent.num_computed_tokens = 10
    assert kv.fork(child, parent, 10)
    assert child.block_ids[:2] == parent.block_ids[:2]     # two full blocks shared
    assert child.block_ids[2] not in parent.block_ids      # the partial one, a copy
    assert child.num_computed_tokens == 10 and child.state_slot not in (0, parent.state_slot)
    assert kv.pool.ref_cnt[parent.block_ids[0]] == 2
    blocks, slots = kv.take_copies()
    assert blocks == [(parent.block_ids[2], child.block_ids[2])]
    assert slots == [(parent.state_slot, child.state_slot)]
    assert kv.take_copies() == ([], [])
    # a fork undone before its step ran (the child preempted) copies nothing
    assert kv.fork(other, parent, 10)
    kv.free(other)
    assert kv.take_copies() == ([], [])
    for req in (child, parent):
        kv.free(req)
    assert kv.pool.num_free == kv.num_usable_blocks and kv.state_slots.num_free == 4
