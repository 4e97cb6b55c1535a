"""The gated delta rule with chunks at absolute positions: the batch-invariant mode's form.

The chunked rule's result for a token depends on where its chunk starts (the step's cut), and
decode's recurrent form differs from both (docs/batch_invariance.md, section 3). Here a
lane's state is committed only at multiples of `KernelPolicy.gdn_chunk`; the tokens since the
last boundary are run again with the new ones, so prefill in one call, prefill cut anywhere
and token-by-token decode give the same bits. Op level so far: the hybrid models do not call
it yet (the plan's step 2: a tail state tensor per slot, docs/batch_invariance.md, 6.7).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fullgraph.layers.gdn.reference import chunk_gated_delta_rule_ref
from fullgraph.layers.policy import KernelPolicy


@dataclass(slots=True)
class GDNLaneState:
    """One lane's gated-delta-rule state in the mode: the recurrent state at its last
    absolute chunk boundary (position a multiple of `gdn_chunk`), and the rule's inputs
    (q, k, v, g, beta) of the tokens after it, fewer than a chunk."""
    committed: torch.Tensor                   # [HV, DK, DV] float32
    tail: tuple[torch.Tensor, ...]            # per input, [n < chunk, ...]


def aligned_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             g: torch.Tensor, beta: torch.Tensor, lane: GDNLaneState,
                             policy: KernelPolicy) -> tuple[torch.Tensor, GDNLaneState]:
    """The gated delta rule for one lane's new tokens, with the same bits however the
    sequence was cut into steps (prefill chunks of any size, decode tokens).

    The chunked form's result for a token depends on where its chunk starts, and decode's
    recurrent form differs from both (measured). Here chunks start at absolute multiples of
    `gdn_chunk`: the tail tokens since the last boundary are run again with the new ones,
    from the committed state; complete chunks commit a new state, a partial last chunk only
    gives its tokens' outputs (a row of a chunk depends on the rows before it only, and the
    absent later rows enter its sums as exact zeros). Inputs as
    layers/gdn/reference.py's for one lane; returns (outputs of the new tokens, new lane
    state)."""
    chunk = policy.gdn_chunk
    seq = [torch.cat([old, new]) for old, new in zip(lane.tail, (q, k, v, g, beta))]
    n_tail, total = lane.tail[0].shape[0], seq[0].shape[0]
    full = total // chunk * chunk
    one = torch.ones(1, dtype=torch.bool, device=q.device)
    slot = torch.ones(1, dtype=torch.long, device=q.device)

    def run(lo: int, hi: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = torch.stack([torch.zeros_like(state), state])
        qsl = torch.tensor([0, hi - lo], device=q.device)
        out = chunk_gated_delta_rule_ref(*(x[lo:hi] for x in seq), pool, slot, qsl, one,
                                         chunk_size=chunk)
        return out, pool[1]

    outs, committed = [], lane.committed
    if full:
        out, committed = run(0, full, committed)
        outs.append(out)
    if total > full:
        out, _ = run(full, total, committed)            # a partial chunk commits nothing
        outs.append(out)
    return (torch.cat(outs)[n_tail:],
            GDNLaneState(committed, tuple(x[full:] for x in seq)))


def empty_lane(num_v_heads: int, head_k_dim: int, head_v_dim: int, num_k_heads: int,
               dtype: torch.dtype = torch.float32, device=None) -> GDNLaneState:
    """A lane before its first token: a zero state and no tail (g and the state float32, as
    layers/gdn/gating.py and state.py keep them)."""
    def zeros(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dt, device=device)
    return GDNLaneState(zeros(num_v_heads, head_k_dim, head_v_dim, dt=torch.float32),
                        (zeros(0, num_k_heads, head_k_dim), zeros(0, num_k_heads, head_k_dim),
                         zeros(0, num_v_heads, head_v_dim),
                         zeros(0, num_v_heads, dt=torch.float32), zeros(0, num_v_heads)))
