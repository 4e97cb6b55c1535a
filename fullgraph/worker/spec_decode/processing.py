"""The sampler's logits processing on a speculative step's scored rows (eager steps only).

Row j of a request predicts the token after its last known token and drafts 1..j, so it is
processed as plain decoding would process that position after accepting those drafts: bans,
logit_bias, allowed tokens and min_tokens at the row's own position, penalties counting the
drafts before it as generated, a bad word of several tokens banned after the history that
precedes the row. The emitted tokens then count for later penalties.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fullgraph.worker.inputs import ScheduledChunk
from fullgraph.worker.sampler import (SamplingState, multi_token_bad_words, process_logits,
                                      update_counts, word_bans)
from fullgraph.worker.spec_decode.verify import VerifyPlan


def process_rows(logits: torch.Tensor, drafts: torch.Tensor, state: SamplingState,
                 state_slots: torch.Tensor, positions: torch.Tensor, penalties: bool
                 ) -> torch.Tensor:
    """logits `[R (k + 1), V]` of the scored rows, drafts `[R, k]` (-1: none), each
    request's sampler state slot and slot-0 position `[R]`: the processed logits."""
    r, k = drafts.shape
    dev = logits.device
    row_positions = (positions[:, None] + torch.arange(k + 1, device=dev)).reshape(-1)
    v, before = logits.shape[1], None
    if penalties:            # [R, k + 1, V]: row j counts drafts 1..j (-1: none)
        before = torch.zeros(r, k + 1, v, dtype=torch.int32, device=dev)
        for j in range(1, k + 1):
            d = drafts[:, :j]
            before[:, j].scatter_add_(1, d.clamp(min=0), (d >= 0).to(torch.int32))
        before = before.view(r * (k + 1), v)
    return process_logits(logits, state, state_slots.repeat_interleave(k + 1), row_positions,
                          before)


def ban_words(scored: torch.Tensor, chunks: Sequence[ScheduledChunk], plan: VerifyPlan
              ) -> None:
    """Bad words of several tokens (vLLM's rule: the last token is banned right after the
    rest), in place: row j of a request gets the bans of its output and drafts 1..j (the
    host knows both: such steps run eagerly)."""
    q = plan.drafts.shape[1] + 1
    rows, tokens = [], []
    for i, c in enumerate(chunks):
        params = c.request.sampling_params
        if not c.samples or not multi_token_bad_words(params):
            continue
        history = list(c.request.output_token_ids)
        for j in range(q):
            if j:
                if plan.drafts[i, j - 1] < 0:
                    break
                history.append(int(plan.drafts[i, j - 1]))
            banned = word_bans(params, history)
            rows += [i * q + j] * len(banned)
            tokens += banned
    if rows:
        dev = scored.device
        scored[torch.tensor(rows, device=dev), torch.tensor(tokens, device=dev)] = \
            float("-inf")


def count_emitted(state: SamplingState, slots: torch.Tensor, tokens: torch.Tensor,
                  emitted: list[int]) -> None:
    """Add each request's emitted tokens (`tokens` `[R, k + 1]`, the first `emitted[r]`) to
    its slot's output counts."""
    counted = torch.tensor(emitted, device=slots.device)
    for j in range(tokens.shape[1]):
        update_counts(state, torch.where(counted > j, slots, -1), tokens[:, j].clamp(min=0))
