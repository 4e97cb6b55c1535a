"""Sampling: greedy, temperature, top-k, top-p, and logprobs, with no host synchronization.

Random draws are a counter-based hash of (request seed, position of the sampled token,
vocabulary id), turned into Gumbel noise: a request's sample depends only on its own seed,
position and logits, never on which other requests share the batch or where it sits in it,
and a recomputed (preempted) request draws the same token again. It runs inside a CUDA
graph as plain tensor ops, over rows in chunks of `SAMPLE_CHUNK_ROWS`: the general path's
[rows x vocab] intermediates (sort, hash noise) then take a bounded workspace whatever the
batch size, which is what a captured graph's memory is made of.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fullgraph.layers.argmax import argmax_rows

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B          # < 2**31, so products of 32-bit values stay inside int64
_GOLDEN = 0x9E3779B1
# Each int64 intermediate of the hash is rows x vocab x 8 bytes (19 MB at 16 rows of a 152k
# vocabulary). With 32 rows the captured graphs' pool was 0.516 GiB, with 16 0.453 GiB
# (Qwen3-0.6B, default capture sizes, H100 and H200: docs/benchmarks.md).
SAMPLE_CHUNK_ROWS = 16


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _MUL) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] floats in (0, 1), a pure function of (seed, position, vocab id)."""
    positions = positions.to(torch.int64)
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
    positions: torch.Tensor        # [R] int32/int64, position of the token being sampled
    all_greedy: bool
    any_top_k_top_p: bool
    num_logprobs: int              # max top-N asked for in the batch; -1 = none

    @property
    def greedy_only(self) -> bool:
        """Argmax is all this step needs (the model graph's own output)."""
        return self.all_greedy and self.num_logprobs < 0

    def rows(self, lo: int, hi: int) -> "SamplingTensors":
        return dataclasses.replace(
            self, temperature=self.temperature[lo:hi], top_k=self.top_k[lo:hi],
            top_p=self.top_p[lo:hi], seeds=self.seeds[lo:hi], positions=self.positions[lo:hi])


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
    """logits: [R, V] in the model's dtype (argmax over them equals argmax over float32)."""
    if t.greedy_only:
        return SamplerOutput(argmax_rows(logits))
    n = logits.shape[0]
    parts = [_sample_rows(logits[lo:lo + SAMPLE_CHUNK_ROWS].float(),
                          t.rows(lo, lo + SAMPLE_CHUNK_ROWS))
             for lo in range(0, n, SAMPLE_CHUNK_ROWS)]
    if len(parts) == 1:
        return parts[0]
    fields = [f.name for f in dataclasses.fields(SamplerOutput)]
    return SamplerOutput(**{f: None if getattr(parts[0], f) is None
                            else torch.cat([getattr(p, f) for p in parts]) for f in fields})


def _sample_rows(logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
    """logits: [r, V] float32."""
    greedy = argmax_rows(logits)
    if t.all_greedy:
        token_ids = greedy
    else:
        temp = torch.where(t.temperature > 0, t.temperature, torch.ones_like(t.temperature))
        scaled = logits / temp[:, None]
        if t.any_top_k_top_p:
            scaled = apply_top_k_top_p(scaled, t.top_k, t.top_p)
        gumbel = -torch.log(-torch.log(uniform_noise(t.seeds, t.positions, logits.shape[-1])))
        sampled = argmax_rows(scaled + gumbel)
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
