"""Continuous batching with chunked prefill and preemption by recompute.

Each step has a token budget (`max_num_batched_tokens`). Running requests go first, in
arrival order: a decode takes one token, an unfinished prefill takes the next chunk that
fits. Then waiting requests are admitted first come, first served while the budget,
`max_num_seqs` and the KV pool allow, starting from their cached prefix. When a running
request needs a block and none is free, the most recently admitted running request is
preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed (its generated tokens become part of its prompt; prefix caching often makes
that cheap).

With async scheduling a step is scheduled while the previous one still runs: a request's
`num_pending` tokens (sampled by the launched step) count as known, so a decoding request
is scheduled for its next position at once, and its input token comes from the device.

With speculative decoding a decoding request is scheduled for its last token plus the
drafts the drafter proposed for it (`Request.spec_token_ids`, as many as the budget and its
max_tokens leave room for; with async scheduling and its last step in flight, placeholders
that the device fills, its `num_pending` counting every draft of that step as accepted and
`num_computed_tokens` rolled back when the results land), and every chunk that draws a
token gets KV slots for `num_speculative_tokens` positions more: the drafter writes its own
K/V there while it proposes the next step's drafts (worker/spec_decode/proposer.py).
Neither is worth a preemption: where the pool cannot hold them the request runs its plain
chunk, and drafts only as far as its blocks reach.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

from fullgraph.config import SchedulerConfig
from fullgraph.engine.kv_cache import KVCacheManager
from fullgraph.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)

PREEMPTION_WARNING_INTERVAL_S = 10.0   # at most one preemption warning this often


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int                  # drafts included
    spec_token_ids: list[int] = field(default_factory=list)   # the chunk's last tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so a token is sampled."""
        r = self.request
        known = self.num_new_tokens - len(self.spec_token_ids)
        return r.num_computed_tokens + known == r.num_tokens + r.num_pending


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._last_warning = -math.inf

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            # (a speculative step in flight counts all its drafts in `num_pending`, but may
            # emit one token: its request goes on, the row wasted if it did finish)
            if (req.num_output_tokens + min(req.num_pending, 1) >= req.max_tokens
                    or (req.num_pending and req.waits_for_output)):
                i += 1          # its last token is in flight (it finishes when that lands),
                continue        # or its next step needs that token on the host
            if req.followers and req.num_computed_tokens == req.num_prompt_tokens - 1:
                self._fork(req)
            n = self._capped(req, min(req.num_tokens + req.num_pending
                                      - req.num_computed_tokens, budget))
            if n == 0:
                i += 1          # a leader at its fork point whose followers wait for room
                continue
            spec = self._drafts(req, n, budget)
            if not self.kv.allocate_slots(req, n + len(spec) + self._lookahead(req, n + len(spec))):
                spec = []         # drafts and lookahead are worth no preemption
            while not self.kv.allocate_slots(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n + len(spec), spec))
                budget -= n + len(spec)
                i += 1
                continue
            break                       # `req` itself was preempted: nothing after it is left

        # Admit new work only when nothing had to be preempted this step, first come first
        # served: a sample of an n > 1 request whose first sample is still prefilling the
        # shared prompt waits (and what came after it), then finds the prompt cached, or is
        # forked by the first (`_fork`: a model with state, no prefix cache).
        while (not out.preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            if req.waits_for_leader:
                break
            hits = self.kv.get_computed_blocks(req)
            num_cached = len(hits) * self.kv.block_size
            n = self._capped(req, min(req.num_tokens - num_cached, budget))
            ahead = (self._lookahead(req, num_cached - req.num_computed_tokens + n)
                     if num_cached + n == req.num_tokens else 0)
            if not (self.kv.allocate_slots(req, n + ahead, hits)
                    or ahead and self.kv.allocate_slots(req, n, hits)):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_cached
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_cached
                req.first_scheduled_time = time.monotonic()   # kept through preemptions
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        return out

    @staticmethod
    def _capped(req: Request, n: int) -> int:
        """A leader with followers to fork stops before its last prompt token."""
        if req.followers:
            return min(n, req.num_prompt_tokens - 1 - req.num_computed_tokens)
        return n

    def _fork(self, leader: Request) -> None:
        """The leader has computed all of its prompt but the last token: each follower still
        waiting takes its blocks and state there (`KVCacheManager.fork`) and runs from the
        last prompt token on, as a sample after a prefix-cache hit does; one that finds no
        room is let go, to compute the prompt itself."""
        for f in leader.followers:
            f.leader = None
            if (f.status == RequestStatus.WAITING
                    and len(self.running) < self.config.max_num_seqs
                    and self.kv.fork(f, leader, leader.num_computed_tokens)):
                self.waiting.remove(f)
                f.status = RequestStatus.RUNNING
                f.first_scheduled_time = time.monotonic()
                self.running.append(f)
        leader.followers = []

    def _drafts(self, req: Request, n: int, budget: int) -> list[int]:
        """The drafts a decoding request runs with this step: those proposed for it, as
        many as fit the budget and leave its last token within max_tokens. With its previous
        step in flight (async scheduling) they are still on the device: placeholders (-1),
        as many as the room if that step emits one token; the device keeps those the
        tokens it did emit leave room for (worker/spec_decode/steps.py)."""
        if n != 1:
            return []
        if req.num_pending:
            room = min(self.config.num_speculative_tokens, budget - 1,
                       req.max_tokens - req.num_output_tokens - 2)
            return [-1] * max(room, 0)
        room = min(budget - 1, req.max_tokens - req.num_output_tokens - 1)
        return req.spec_token_ids[:max(room, 0)]

    def _lookahead(self, req: Request, n: int) -> int:
        """KV slots past a sampling chunk of `n` tokens (drafts included) for the drafter's
        decode steps: one per draft after the first, as many drafts as the request's
        max_tokens leaves room for after this step's token, within max_model_len."""
        k = self.config.num_speculative_tokens
        if not k or req.num_computed_tokens + n < req.num_tokens + req.num_pending:
            return 0
        return max(0, min(k - 1, req.max_tokens - req.num_output_tokens - 2,
                          self.config.max_model_len - req.num_computed_tokens - n))

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_pending = 0            # an in-flight sample is dropped; recompute redraws it
        req.spec_token_ids = []
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
        now = time.monotonic()
        if now - self._last_warning >= PREEMPTION_WARNING_INTERVAL_S:
            self._last_warning = now
            logger.warning(
                "request %s was preempted: the KV cache ran out of blocks, so it will be "
                "recomputed (%d preemptions so far). This costs throughput: give the cache more "
                "blocks (gpu_memory_utilization on CUDA, num_gpu_blocks_override on any "
                "device) or lower max_num_seqs.", req.request_id, self.num_preemptions)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request and free its blocks."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        self.kv.free(req)
