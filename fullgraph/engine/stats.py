"""Engine statistics: cumulative counters, the snapshot /metrics reads, and the server's
periodic log line (throughput, running / waiting requests, KV usage), as vLLM prints it."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0


@dataclass(slots=True)
class EngineStats:
    """Cumulative counters, kept by the engine."""
    prompt_tokens: int = 0           # admitted
    prefilled_tokens: int = 0        # prompts whose first token was sampled (vLLM's count)
    generation_tokens: int = 0
    steps: int = 0
    finished_requests: int = 0
    stopped_requests: int = 0        # of the finished: on a stop (eos, token or string)
    aborted_requests: int = 0
    # speculative decoding (vLLM's counters): verified rows that had drafts, their draft
    # tokens, and of them accepted; acceptance rate = accepted / draft tokens, mean
    # accepted length = 1 + accepted / drafts
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0


@dataclass(slots=True, frozen=True)
class EngineSnapshot:
    """Engine state after the last step, published by the engine thread for /metrics:
    readers never touch the live engine."""
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_free_blocks: int = 0
    num_blocks: int = 0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    finished_requests: int = 0
    stopped_requests: int = 0
    aborted_requests: int = 0
    num_graph_steps: int = 0
    num_eager_fallbacks: int = 0
    # vision encoder (multimodal models): graph replays, and images run eagerly (too large)
    num_encoder_graph_replays: int = 0
    num_encoder_eager_images: int = 0
    num_preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    step_errors: int = 0
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0

    @property
    def idle(self) -> bool:
        return self.num_running == 0 and self.num_waiting == 0


class StatLogger:
    """Every `interval` seconds, while the engine works (and once more when it has gone idle),
    one INFO line of throughput since the last line and the engine's state now."""

    def __init__(self, interval: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.last = EngineSnapshot()
        self.last_time = clock()
        self.quiet = True                # the last line logged showed an idle engine

    def seconds_to_next(self) -> float | None:
        """How long an idle loop may wait before `observe` has a line to log (None: it has
        none until work arrives)."""
        if self.quiet:
            return None
        return max(0.0, self.last_time + self.interval - self.clock())

    def observe(self, snap: EngineSnapshot) -> str | None:
        """Log (and return) the line if one is due."""
        now = self.clock()
        elapsed = now - self.last_time
        if elapsed < self.interval:
            return None
        last = self.last
        prompt = (snap.prefilled_tokens - last.prefilled_tokens) / elapsed
        generation = (snap.generation_tokens - last.generation_tokens) / elapsed
        queries = snap.prefix_queries - last.prefix_queries
        hits = (snap.prefix_hits - last.prefix_hits) / queries if queries else 0.0
        self.last, self.last_time = snap, now
        nothing = prompt == 0 and generation == 0 and snap.idle
        if nothing and self.quiet:
            return None
        self.quiet = nothing
        line = (f"Avg prompt throughput: {prompt:.1f} tokens/s, Avg generation throughput: "
                f"{generation:.1f} tokens/s, Running: {snap.num_running} reqs, Waiting: "
                f"{snap.num_waiting} reqs, KV cache usage: {100 * snap.kv_usage:.1f}%, "
                f"Prefix cache hit rate: {100 * hits:.1f}%")
        logger.info(line)
        return line
