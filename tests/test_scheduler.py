"""Continuous batching, chunked prefill, preemption (no model needed)."""
from __future__ import annotations

from fullgraph.config import SchedulerConfig
from fullgraph.engine.kv_cache import KVCacheManager
from fullgraph.engine.request import Request, RequestStatus
from fullgraph.engine.scheduler import Scheduler
from fullgraph.sampling_params import SamplingParams


def make(n_prompt, rid, start=None):
    start = 1000 * sum(map(ord, rid)) if start is None else start
    return Request(rid, list(range(start, start + n_prompt)), SamplingParams(), seed=0,
                   max_tokens=100)


def run_step(sched, out, token=7):
    """What the engine does after a step: advance computed tokens, append samples."""
    for s in out.scheduled:
        sampled = s.samples
        s.request.num_computed_tokens += s.num_new_tokens
        sched.kv.cache_full_blocks(s.request)
        if sampled:
            s.request.append_token(token)


def test_decode_and_prefill_chunks_share_a_step():
    kv = KVCacheManager(64, 4, True)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=10), kv)
    a, b = make(6, "a"), make(20, "b")
    s.add(a)
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 6)]
    run_step(s, out)
    s.add(b)
    out = s.schedule()
    # a decodes one token, b gets the rest of the budget as a prefill chunk
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 9)]
    assert out.scheduled[0].samples and not out.scheduled[1].samples
    run_step(s, out)
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 9)]
    run_step(s, out)
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 2)]
    assert out.scheduled[1].samples


def test_max_num_seqs_limits_admission_fcfs():
    kv = KVCacheManager(64, 4, True)
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100), kv)
    reqs = [make(3, f"r{i}") for i in range(4)]
    for r in reqs:
        s.add(r)
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["r0", "r1"]
    assert [r.request_id for r in s.waiting] == ["r2", "r3"]
    run_step(s, out)
    s.finish(reqs[0])
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["r1", "r2"]


def test_preemption_frees_the_newest_request_and_requeues_it_first():
    kv = KVCacheManager(5, 4, True)            # 4 usable blocks = 16 slots
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv)
    a, b = make(8, "a"), make(8, "b")
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert len(out.scheduled) == 2 and kv.pool.num_free == 0
    run_step(s, out)
    out = s.schedule()                         # a needs a 3rd block: b is preempted
    assert [x.request.request_id for x in out.scheduled] == ["a"]
    assert out.preempted == [b]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0 and not b.block_ids
    assert s.waiting[0] is b and b.num_preemptions == 1
    # the preempted request is recomputed with its generated token as part of its prompt
    run_step(s, out)
    s.finish(a)
    out = s.schedule()
    assert out.scheduled[0].request is b
    assert b.num_computed_tokens + out.scheduled[0].num_new_tokens == b.num_tokens == 9


def test_request_that_preempts_itself_when_alone_in_a_full_pool():
    kv = KVCacheManager(3, 4, False)           # 2 usable blocks
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64), kv)
    a = make(8, "a")
    s.add(a)
    run_step(s, s.schedule())
    out = s.schedule()                         # needs a 3rd block; it is the only one running
    assert out.scheduled == [] and out.preempted == [a]


def test_prefix_hit_skips_cached_tokens():
    kv = KVCacheManager(32, 4, True)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv)
    a = make(13, "a", start=1)
    s.add(a)
    run_step(s, s.schedule())
    b = make(13, "b", start=1)
    s.add(b)
    out = s.schedule()
    new = {x.request.request_id: x.num_new_tokens for x in out.scheduled}
    assert new["b"] == 1 and b.num_cached_tokens == 12
    assert b.block_ids[:3] == a.block_ids[:3]
