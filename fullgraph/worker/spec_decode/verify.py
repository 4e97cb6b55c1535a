"""Host bookkeeping of a speculative step: which hidden rows the target scores for each
request, and after verification which positions each request keeps for the drafter.

Every request of the step gets k + 1 scored rows, so verification is one uniform
[requests, k + 1] batch (rejection.py): a chunk ending with d drafts scores its last d + 1
tokens; a chunk with none (a prompt's last chunk, a decode without drafts) scores its last
token and repeats it, with -1 drafts that are never accepted, so it draws exactly one token.
A chunk that draws nothing (a prompt chunk short of its end) is scored the same way and its
result dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fullgraph.worker.spec_decode.proposer import KeptRows


@dataclass(frozen=True, slots=True)
class VerifyPlan:
    rows: np.ndarray          # [R, k + 1] int64: hidden rows scored per request
    drafts: np.ndarray        # [R, k] int64: each request's drafts, -1 padded
    positions: np.ndarray     # [R] int64: the position of the token scored slot 0 predicts
    starts: list[int]         # each chunk's first row in the step
    num_drafts: list[int]     # drafts each chunk ends with


def verify_plan(chunks: Sequence, k: int) -> VerifyPlan:
    r = len(chunks)
    rows = np.zeros((r, k + 1), np.int64)
    drafts = np.full((r, k), -1, np.int64)
    positions = np.zeros(r, np.int64)
    starts, num_drafts, row = [], [], 0
    for i, c in enumerate(chunks):
        spec = list(c.spec_token_ids)
        d, n = len(spec), c.num_new_tokens
        last_known = row + n - 1 - d                 # the row whose next token is draft 1
        rows[i] = np.minimum(last_known + np.arange(k + 1), last_known + d)
        drafts[i, :d] = spec
        positions[i] = c.request.num_computed_tokens + n - d
        starts.append(row)
        num_drafts.append(d)
        row += n
    return VerifyPlan(rows, drafts, positions, starts, num_drafts)


def kept_rows(chunks: Sequence, plan: VerifyPlan, tokens: np.ndarray,
              num_accepted: np.ndarray, k: int, block_size: int
              ) -> tuple[list[KeptRows], list[int]]:
    """(what the drafter runs over for each chunk, how many tokens each chunk emits).
    `tokens` [R, k + 1] and `num_accepted` [R] are the verification's, on the host. Drafts
    are asked for as many as the request's max_tokens leaves room for next step, and as its
    blocks hold the drafter's decode positions (the scheduler's lookahead, when the pool
    had room for it)."""
    kept, emitted = [], []
    for i, c in enumerate(chunks):
        req, n, d = c.request, c.num_new_tokens, plan.num_drafts[i]
        start = req.num_computed_tokens
        if c.samples:
            a = int(num_accepted[i])
            new = [int(t) for t in tokens[i, :a + 1]]
            known = n - d                            # the chunk's tokens before its drafts
            rows = list(range(plan.starts[i], plan.starts[i] + known + a))
            next_tokens = list(req.all_token_ids[start + 1:start + known]) + new
            left = req.max_tokens - req.num_output_tokens - len(new)
            room = len(req.block_ids) * block_size - (start + len(rows) - 1)
            kept.append(KeptRows(req.block_ids, start, rows, next_tokens,
                                 max(0, min(k, left - 1, room))))
            emitted.append(len(new))
        else:                                        # a prompt chunk: its next tokens are known
            rows = list(range(plan.starts[i], plan.starts[i] + n))
            kept.append(KeptRows(req.block_ids, start, rows,
                                 list(req.all_token_ids[start + 1:start + n + 1]), 0))
            emitted.append(0)
    return kept, emitted
