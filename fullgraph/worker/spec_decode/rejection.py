"""Verifying draft tokens: which of a request's k drafts the target accepts, and the token
after them, so that the output follows the target's distribution exactly.

Per request the target scored k + 1 positions: the k drafts (slot j's logits predict the
token at slot j) and one more. Rows are independent and every shape is fixed by (requests,
k, vocabulary), with no host synchronization, so a CUDA graph can hold this.

* Greedy rows (temperature < GREEDY_EPS): draft j is accepted while it equals the target's
  argmax at slot j; the first mismatch is replaced by that argmax, and when all k match the
  argmax at slot k follows (the bonus token). Exactly what k + 1 greedy steps would give.
* Sampled rows (standard speculative sampling, Leviathan et al. / Chen et al.): with p_j the
  target's distribution at slot j (the sampler's: temperature, min_p, top-k, top-p of the
  already processed logits) and q_j the distribution draft j was drawn from, draft x_j is
  accepted with probability min(1, p_j(x_j) / q_j(x_j)); the first rejected slot draws from
  max(p_j - q_j, 0), renormalized; after k acceptances the bonus token draws from p_k. Each
  emitted token then has the target's distribution given the tokens before it. A drafter
  that picks its token deterministically (argmax) passes `draft_probs=None`: q_j is then
  one-hot.

Random numbers are worker/sampler.py's counter-based hash of (seed, position, id), so a
request's outcome depends only on its own seed, positions and logits. Three streams keep the
draws independent, as the rule needs: the residual and bonus draws use the sampler's own
Gumbel noise at the token's position; the accept test and the drafter's draws use seeds
with a stream id XORed into their high 32 bits (`stream_seeds`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fullgraph.worker.sampler import (GREEDY_EPS, SamplingTensors, filter_thresholds,
                                      gumbel_noise, uniform_noise)

CHUNK_ROWS = 64                 # rows of [rows, V] float32 workspace at a time
ACCEPT_STREAM = 0x2545F491      # the accept test's uniforms
DRAFT_STREAM = 0x61C88647       # the drafter's Gumbel noise


@dataclass(slots=True)
class RejectionOutput:
    token_ids: torch.Tensor        # [R, k + 1] int64: accepted drafts, then one more; -1 after
    num_accepted: torch.Tensor     # [R] int64 drafts accepted (the row emits this + 1 tokens)


def stream_seeds(seeds: torch.Tensor, stream: int) -> torch.Tensor:
    """Seeds of an independent stream of the same hash (`stream` < 2**31)."""
    return seeds.to(torch.int64) ^ (stream << 32)


def draft_gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int
                       ) -> torch.Tensor:
    """[R, V] the noise a drafter draws its token at `positions` with (Gumbel-max over its
    scaled logits): independent of the target's residual draw at the same position."""
    return gumbel_noise(stream_seeds(seeds, DRAFT_STREAM), positions, vocab_size)


def accept_uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[R] float32 in (0, 1): the accept test's draw for the draft at `positions`."""
    return uniform_noise(stream_seeds(seeds, ACCEPT_STREAM), positions, 1)[:, 0]


def target_log_weights(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """[N, V] float32: the unnormalized log-probabilities the sampler draws from for rows of
    processed logits (temperature, then min_p / top-k / top-p when the step filters: -inf
    outside the kept set). One [N, V] buffer, filtered in place by chunks of rows: the
    filter's sort and its indices take [CHUNK_ROWS, V] at a time."""
    s = logits.to(torch.float32, copy=True)
    s.div_(torch.where(t.temperature >= GREEDY_EPS, t.temperature, 1.0)[:, None])  # `scale`
    if t.any_top_k_top_p:
        for lo in range(0, s.shape[0], CHUNK_ROWS):
            rows = slice(lo, lo + CHUNK_ROWS)
            part = s[rows]
            thr = filter_thresholds(part, t.top_k[rows], t.top_p[rows],
                                    None if t.min_p is None else t.min_p[rows])
            part.masked_fill_(~(part >= thr[:, None]), float("-inf"))
    return s


def _logsumexp(s: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of [R, k, V], by chunks of rows (bounded workspace)."""
    per = max(1, CHUNK_ROWS // max(1, s.shape[1]))
    return torch.cat([torch.logsumexp(s[lo:lo + per], dim=-1)
                      for lo in range(0, s.shape[0], per)])


def target_probs(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """[N, V] float32: the distribution the sampler draws from (`target_log_weights`)."""
    return torch.softmax(target_log_weights(logits, t), dim=-1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(p - q, 0), unnormalized (a Gumbel-max draw does not need the sum). Where rounding
    leaves nothing (p == q: then no draft is ever rejected) it is p."""
    r = (p - q).clamp(min=0.0)
    return torch.where(r.sum(-1, keepdim=True) > 0, r, p)


def _per_slot(t: SamplingTensors, slots: int) -> SamplingTensors:
    """The requests' parameters repeated for each of their `slots` positions (rows r * slots
    + j), positions advanced by j."""
    rep = {f: None if getattr(t, f) is None else getattr(t, f).repeat_interleave(slots)
           for f in ("temperature", "top_k", "top_p", "seeds", "min_p")}
    offsets = torch.arange(slots, device=t.positions.device)
    rep["positions"] = (t.positions.long()[:, None] + offsets).reshape(-1)
    return SamplingTensors(**rep, all_greedy=t.all_greedy, any_top_k_top_p=t.any_top_k_top_p,
                           num_logprobs=-1)


def rejection_sample(draft_token_ids: torch.Tensor, target_logits: torch.Tensor,
                     t: SamplingTensors, draft_probs: torch.Tensor | None = None
                     ) -> RejectionOutput:
    """draft_token_ids [R, k] (-1: no draft there; a row's drafts are leading, so such a
    row emits its first -1 slot's draw); target_logits [R, k + 1, V] (processed: penalties,
    bans and biases already applied, as the sampler's step 2 would); `t` per request, its positions
    the position of the token slot 0 predicts; draft_probs [R, k, V] the distributions the
    drafts were drawn from (None: a deterministic drafter).

    Only the accept tests need every slot (p at the draft); the one draw a request makes, at
    its first rejected slot or the bonus slot, reads that slot's row alone, so the [R, k + 1,
    V] buffers are the scaled logits and their normalizer (a verify graph at the largest
    request count holds every such buffer)."""
    r, k = draft_token_ids.shape
    v = target_logits.shape[-1]
    argmax = target_logits.argmax(-1)                              # [R, k + 1]
    slot = torch.arange(k + 1, device=argmax.device)[None, :]
    if t.all_greedy:
        # a draft is accepted where it is the argmax (a -1 never is), so the row emits the
        # argmax at every slot up to its first rejection, that one included (fewer kernels
        # in a greedy verify graph than the general path below, same tokens)
        n = (draft_token_ids == argmax[:, :k]).long().cumprod(-1).sum(-1)
        return RejectionOutput(torch.where(slot <= n[:, None], argmax, -1), n)
    valid = draft_token_ids >= 0                   # -1: no draft (a row that draws one token)
    drafts = draft_token_ids.long().clamp(min=0)
    per_slot = _per_slot(t, k + 1)
    s = target_log_weights(target_logits.reshape(-1, v), per_slot).view(r, k + 1, v)
    if draft_probs is None:                        # q one-hot at the draft
        lse = _logsumexp(s[:, :k])
        p_x = (s[:, :k].gather(-1, drafts[..., None])[..., 0] - lse).exp()
        q_x = valid.float()
    else:
        p_x = torch.softmax(s[:, :k], -1).gather(-1, drafts[..., None])[..., 0]
        q_x = draft_probs.float().gather(-1, drafts[..., None])[..., 0] * valid
    u = accept_uniforms(per_slot.seeds, per_slot.positions).view(r, k + 1)[:, :k]
    sampled = t.temperature >= GREEDY_EPS
    accept = torch.where(sampled[:, None], (u * q_x < p_x) & valid,
                         (drafts == argmax[:, :k]) & valid)
    n = accept.long().cumprod(-1).sum(-1)                          # leading accepts
    rows = torch.arange(r, device=drafts.device)
    # the draw at slot n from max(p - q, 0): the rejected draft's slot (q its draft's
    # distribution) or the bonus slot (q = 0); greedy rows take the argmax there
    at = n.clamp(max=k - 1)
    has = (n < k) & valid[rows, at]
    if draft_probs is None:
        q_n = torch.zeros(r, v, device=s.device).scatter_(1, drafts[rows, at][:, None], 1.0)
    else:
        q_n = draft_probs[rows, at].float()
    residual = residual_distribution(torch.softmax(s[rows, n], -1), q_n * has[:, None])
    noise = gumbel_noise(t.seeds, t.positions.long() + n, v)
    next_ids = torch.where(sampled, (residual.log() + noise).argmax(-1), argmax[rows, n])
    padded = torch.cat([drafts, drafts.new_zeros(r, 1)], dim=1)
    tokens = torch.where(slot < n[:, None], padded,
                         torch.where(slot == n[:, None], next_ids[:, None], -1))
    return RejectionOutput(tokens, n)
