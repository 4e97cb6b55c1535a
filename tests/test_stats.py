"""The operator's view: the periodic stats line and the preemption warning."""
from __future__ import annotations

import logging

import pytest

from fullgraph.config import SchedulerConfig
from fullgraph.engine.kv_cache import KVCacheManager
from fullgraph.engine.request import Request
from fullgraph.engine.scheduler import Scheduler
from fullgraph.engine.stats import EngineSnapshot, StatLogger
from fullgraph.sampling_params import SamplingParams


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def records():
    """Records of the `fullgraph` logger (which does not propagate to the root logger)."""
    got: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = got.append
    log = logging.getLogger("fullgraph")
    log.addHandler(handler)
    yield got
    log.removeHandler(handler)


def test_stats_line_every_interval_while_busy_and_once_when_idle(records):
    clock = Clock()
    stats = StatLogger(interval=10.0, clock=clock)
    assert stats.seconds_to_next() is None          # idle from the start: nothing to report
    busy = EngineSnapshot(num_running=3, num_waiting=2, kv_usage=0.25, prefilled_tokens=500,
                          generation_tokens=200, prefix_queries=400, prefix_hits=100)
    clock.now += 5
    assert stats.observe(busy) is None              # not due yet
    clock.now += 5
    line = stats.observe(busy)
    assert line == ("Avg prompt throughput: 50.0 tokens/s, Avg generation throughput: 20.0 "
                    "tokens/s, Running: 3 reqs, Waiting: 2 reqs, KV cache usage: 25.0%, "
                    "Prefix cache hit rate: 25.0%")
    assert records and records[-1].levelno == logging.INFO and records[-1].getMessage() == line
    assert stats.seconds_to_next() == 10.0
    done = EngineSnapshot(prefilled_tokens=500, generation_tokens=300, prefix_queries=400,
                          prefix_hits=100)
    clock.now += 10
    assert "Avg generation throughput: 10.0 tokens/s, Running: 0 reqs" in stats.observe(done)
    clock.now += 10
    assert stats.observe(done).startswith("Avg prompt throughput: 0.0 tokens/s, Avg "
                                          "generation throughput: 0.0 tokens/s, Running: 0")
    clock.now += 10
    assert stats.observe(done) is None              # idle twice: the line is not repeated
    assert stats.seconds_to_next() is None


def test_preemption_logs_a_warning_with_the_count(records):
    kv = KVCacheManager(5, 4, True)                 # 4 usable blocks of 4 tokens
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv)
    a, b = (Request(rid, list(range(8)), SamplingParams(), seed=0, max_tokens=100)
            for rid in ("a", "b"))
    s.add(a)
    s.add(b)
    out = s.schedule()
    for x in out.scheduled:
        x.request.num_computed_tokens += x.num_new_tokens
        x.request.append_token(1)
    assert not records
    out = s.schedule()                              # a needs a third block: b is preempted
    assert out.preempted == [b]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "request b was preempted" in warnings[0].getMessage()
    assert "1 preemptions so far" in warnings[0].getMessage()
