"""Prompt logprobs (vLLM's `prompt_logprobs`): the logprob of every prompt token given the
tokens before it, with the top-N alternatives.

The logits at position p score token p + 1, so a request's prompt of P tokens needs the
hidden states of positions 0 .. P-2, which its prefill chunks compute. A step holding such
positions runs eagerly (a graph keeps no per-token hidden states; the feature serves
scoring, not decoding speed); afterwards the logits of just those rows are computed, in
slices that bound the [rows, vocab] workspace, and their logprobs go to the host with the
step's samples. A request recomputed after a preemption skips the positions it already has.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fullgraph.worker.sampler import prompt_logprobs

ROWS_PER_SLICE = 256     # logits rows computed at once: [256, vocab] float32 is ~150 MB


@dataclass(frozen=True, slots=True)
class PromptLogprobRows:
    """One request's prompt positions in a step."""
    row: int                  # the request's row in the step
    token_rows: list[int]     # indices into the step's packed tokens
    next_token_ids: list[int]  # the prompt token each position scores
    num_logprobs: int


def plan(chunks: Sequence) -> list[PromptLogprobRows]:
    """The step's prompt positions whose logprobs are still owed (host only)."""
    out, offset = [], 0
    for row, c in enumerate(chunks):
        req = c.request
        n = req.sampling_params.prompt_logprobs
        done, have = req.num_computed_tokens, len(req.prompt_logprobs or ()) - 1
        lo, hi = max(done, have), min(done + c.num_new_tokens, len(req.prompt_token_ids) - 1)
        if n is not None and lo < hi:
            out.append(PromptLogprobRows(row, list(range(offset + lo - done, offset + hi - done)),
                                         req.prompt_token_ids[lo + 1:hi + 1], n))
        offset += c.num_new_tokens
    return out


def compute(model, hidden: torch.Tensor, rows: list[PromptLogprobRows]
            ) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """row -> (logprobs [P, 1+N], token ids [P, 1+N], ranks [P]) on the host: the prompt
    token's logprob first, then the top N. Synchronizes (eager steps only)."""
    out = {}
    weight = model.lm_head.weight
    for r in rows:
        index = torch.tensor(r.token_rows, device=hidden.device)
        next_ids = torch.tensor(r.next_token_ids, device=hidden.device)
        parts = []
        for lo in range(0, len(r.token_rows), ROWS_PER_SLICE):
            h = hidden.index_select(0, index[lo:lo + ROWS_PER_SLICE])
            logits = torch.empty(h.shape[0], weight.shape[0], dtype=h.dtype, device=h.device)
            model.compute_logits(h, out=logits)
            parts.append(prompt_logprobs(logits, next_ids[lo:lo + ROWS_PER_SLICE],
                                         r.num_logprobs))
        out[r.row] = tuple(torch.cat([p[i] for p in parts]).cpu().numpy() for i in range(3))
    return out
