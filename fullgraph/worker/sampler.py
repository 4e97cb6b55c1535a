"""Sampling: greedy, temperature, top-k, top-p, and logprobs, with no host synchronization.

Random draws are a counter-based hash of (request seed, position of the sampled token,
vocabulary id), turned into Gumbel noise: a request's sample depends only on its own seed,
position and logits, never on which other requests share the batch or where it sits in it,
and a recomputed (preempted) request draws the same token again. It runs inside a CUDA
graph as plain tensor ops.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B          # < 2**31, so products of 32-bit values stay inside int64
_GOLDEN = 0x9E3779B1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] floats in (0, 1), a pure function of (seed, position, vocab id)."""
    h = _mix32((seeds & _M32) ^ _mix32(((seeds >> 32) & _M32) ^ _mix32(positions & _M32)))
    v = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    x = _mix32((h[:, None] + v[None, :] * _GOLDEN) & _M32)
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


@dataclass(slots=True)
class SamplingTensors:
    temperature: torch.Tensor      # [R] float32, 0 = greedy
    top_k: torch.Tensor            # [R] int32, vocab size = off
    top_p: torch.Tensor            # [R] float32, 1 = off
    seeds: torch.Tensor            # [R] int64
    positions: torch.Tensor        # [R] int64, position of the token being sampled
    all_greedy: bool
    any_top_k_top_p: bool
    num_logprobs: int              # max top-N asked for in the batch; -1 = none


class SamplerKind(enum.Enum):
    """The sampler variants a graph is captured with (a captured graph cannot branch)."""
    GREEDY = "greedy"     # argmax only: every request greedy, none asks for logprobs
    GENERAL = "general"   # temperature, top-k/top-p, Gumbel draws and top-N logprobs

    @staticmethod
    def of(t: SamplingTensors) -> "SamplerKind":
        greedy = t.all_greedy and t.num_logprobs < 0
        return SamplerKind.GREEDY if greedy else SamplerKind.GENERAL

    def configure(self, t: SamplingTensors, max_logprobs: int) -> SamplingTensors:
        if self is SamplerKind.GREEDY:
            return dataclasses.replace(t, all_greedy=True, any_top_k_top_p=False, num_logprobs=-1)
        return dataclasses.replace(t, all_greedy=False, any_top_k_top_p=True,
                                   num_logprobs=max_logprobs)


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor                  # [R] int64
    logprobs: torch.Tensor | None = None     # [R, 1 + N]: sampled token's, then top-N
    logprob_token_ids: torch.Tensor | None = None
    ranks: torch.Tensor | None = None        # [R] rank of the sampled token


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    drop = ranks[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # top-p over the top-k renormalized distribution; the most likely token always stays
    drop |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample(logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
    """logits: [R, V] float32."""
    greedy = logits.argmax(dim=-1)
    if t.all_greedy:
        token_ids = greedy
    else:
        temp = torch.where(t.temperature > 0, t.temperature, torch.ones_like(t.temperature))
        scaled = logits / temp[:, None]
        if t.any_top_k_top_p:
            scaled = apply_top_k_top_p(scaled, t.top_k, t.top_p)
        gumbel = -torch.log(-torch.log(uniform_noise(t.seeds, t.positions, logits.shape[-1])))
        sampled = (scaled + gumbel).argmax(dim=-1)
        token_ids = torch.where(t.temperature > 0, sampled, greedy)
    out = SamplerOutput(token_ids)
    if t.num_logprobs >= 0:
        logp = logits.log_softmax(dim=-1)
        chosen = logp.gather(-1, token_ids[:, None])
        out.ranks = (logp > chosen).sum(dim=-1) + 1
        if t.num_logprobs > 0:
            top_lp, top_ids = logp.topk(t.num_logprobs, dim=-1)
            out.logprobs = torch.cat([chosen, top_lp], dim=-1)
            out.logprob_token_ids = torch.cat([token_ids[:, None], top_ids], dim=-1)
        else:
            out.logprobs, out.logprob_token_ids = chosen, token_ids[:, None]
    return out
