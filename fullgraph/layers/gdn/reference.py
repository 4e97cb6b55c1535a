"""The gated delta rule in pure torch, over packed lanes, on the recurrent state pool.

Per lane, from its state S (`[num_v_heads, head_k_dim, head_v_dim]`, see state.py), token t:
    S = S * exp(g_t);  S = S + k_t (beta_t (v_t - k_t S));  o_t = q_t S
with q, k l2-normalized (use_qk_l2norm_in_kernel) and q scaled by head_k_dim^-0.5; query/key
heads serve num_v_heads / num_k_heads consecutive value heads (transformers' repeat_interleave,
fla's i_hv // (HV // H)). Two forms, each transformers' torch fallback op for op
(`torch_recurrent_gated_delta_rule`, `torch_chunk_gated_delta_rule`) so float32 runs match it:
- recurrent: token by token, all lanes at once (decode; max_query_len steps);
- chunked: every 64-token chunk's intra-chunk work batched over all chunks of all lanes, then
  a scan over the chunks in order carrying each lane's state.
Neither reads a device value on the host nor varies its op sequence with the data (the chunk
map is an input), so both run inside CUDA graphs and the CPU fake graphs; the chunked one is
also the CUDA fallback without fla.

Inputs (T tokens, lane r owning rows query_start_loc[r] .. query_start_loc[r + 1]):
q, k `[T, num_k_heads, head_k_dim]`, v `[T, num_v_heads, head_v_dim]`, g `[T, num_v_heads]`
(log decay, float32), beta `[T, num_v_heads]` (gating.gdn_gating). Output `[T, num_v_heads,
head_v_dim]` in q's dtype; rows of no lane are zeros. Each lane's final state is written to its
slot of `state_pool` (in place), or where `write_slots` / `final_slots` say (speculative
decoding's state per position, state.py).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fullgraph.layers.gdn.gating import l2norm
from fullgraph.layers.gdn.metadata import CHUNK_SIZE, chunk_metadata
from fullgraph.layers.gdn.state import gather_states


def normalize_inputs(q, k, v, g, beta, chunked: bool) -> tuple[torch.Tensor, ...]:
    """float32 inputs with heads expanded, q/k normalized, q scaled: row by row (every op
    is elementwise or a reduction over one head's row)."""
    num_v_heads = v.shape[1]
    if q.shape[1] != num_v_heads:
        q = q.repeat_interleave(num_v_heads // q.shape[1], dim=1)
        k = k.repeat_interleave(num_v_heads // k.shape[1], dim=1)
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    q, k = l2norm(q), l2norm(k)
    # The two fallbacks scale differently (a multiply, a divide): rounding-level, but kept.
    q = q * q.shape[-1] ** -0.5 if chunked else q / (q.shape[-1] ** 0.5)
    return q, k, v, g, beta


def _prepare(q, k, v, g, beta, chunked: bool):
    """`normalize_inputs`, with one zero row appended (row T): the no-op token that padding
    positions gather (decay exp(0) = 1, no update)."""
    return tuple(torch.cat([x, x.new_zeros((1,) + x.shape[1:])])
                 for x in normalize_inputs(q, k, v, g, beta, chunked))


def recurrent_gated_delta_rule_ref(q, k, v, g, beta, state_pool: torch.Tensor,
                                   state_slots: torch.Tensor,
                                   query_start_loc: torch.Tensor | None,
                                   has_initial_state: torch.Tensor | None,
                                   max_query_len: int = 1,
                                   write_slots: torch.Tensor | None = None) -> torch.Tensor:
    """Token by token. query_start_loc None: one token per lane (decode, T == R). Otherwise
    `[R + 1]` and no lane may own more than `max_query_len` tokens (a host int fixing the loop).
    `write_slots` `[R, >= max_query_len]`: the state after each step j goes to column j (a
    lane's state stays as it is after its last row), instead of the final state to the lane's
    own slot."""
    T, dtype = q.shape[0], q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, chunked=False)
    slots = state_slots.long()
    state = gather_states(state_pool, slots, has_initial_state).float()
    lanes = torch.arange(slots.shape[0], device=q.device)
    if query_start_loc is None:
        starts, ends = lanes, lanes + 1
    else:
        qsl = query_start_loc.long()
        starts, ends = qsl[:-1], qsl[1:]
    out = torch.zeros_like(v)                                    # [T + 1, HV, V]
    for step in range(max_query_len):
        t = starts + step
        t = torch.where(t < ends, t, T)                          # finished lanes: the no-op row
        o_t, state = _token_update(q[t], k[t], v[t], g[t], beta[t], state)
        out.index_copy_(0, t, o_t)
        if write_slots is not None:
            state_pool.index_copy_(0, write_slots[:, step].long(), state.to(state_pool.dtype))
    if write_slots is None:
        state_pool.index_copy_(0, slots, state.to(state_pool.dtype))
    return out[:T].to(dtype)


def _token_update(q_t, k_t, v_t, g_t, beta_t, state: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per lane on prepared rows: (output, the new state)."""
    state = state * g_t.exp()[..., None, None]
    kv_mem = (state * k_t.unsqueeze(-1)).sum(dim=-2)
    delta = (v_t - kv_mem) * beta_t.unsqueeze(-1)
    state = state + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
    return (state * q_t.unsqueeze(-1)).sum(dim=-2), state


def recurrent_step_ref(q, k, v, g, beta, state: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per lane (row r lane r's) from the lanes' states `[R, HV, K, V]` float32,
    outside any pool: (output `[R, HV, V]` in q's dtype, the new states)."""
    dtype = q.dtype
    q, k, v, g, beta = normalize_inputs(q, k, v, g, beta, chunked=False)
    o, state = _token_update(q, k, v, g, beta, state)
    return o.to(dtype), state


def chunk_gated_delta_rule_ref(q, k, v, g, beta, state_pool: torch.Tensor,
                               state_slots: torch.Tensor, query_start_loc: torch.Tensor,
                               has_initial_state: torch.Tensor | None,
                               chunk_indices: torch.Tensor | None = None,
                               chunk_size: int = CHUNK_SIZE,
                               final_slots: torch.Tensor | None = None,
                               initial_states: torch.Tensor | None = None) -> torch.Tensor:
    """Chunked. chunk_indices `[C, 2]` (metadata.py: exact or padded) fixes the work; None
    derives it from query_start_loc on the host (eager only: a device read). `final_slots`
    `[R]`: where the final states go (default: `state_slots`); `initial_states` `[R, HV, K,
    V]` float32: the lanes' states as already gathered (`gather_states`; consumed)."""
    T, dtype, dev = q.shape[0], q.dtype, q.device
    if chunk_indices is None:
        qsl_host = np.asarray(query_start_loc.cpu())
        chunk_indices = torch.from_numpy(chunk_metadata(qsl_host, chunk_size)[0]).to(dev)
    q, k, v, g, beta = _prepare(q, k, v, g, beta, chunked=True)
    qsl = query_start_loc.long()
    seq, within = chunk_indices.long().unbind(1)
    tok = (qsl[seq] + within * chunk_size)[:, None] + torch.arange(chunk_size, device=dev)
    tok = torch.where(tok < qsl[seq + 1][:, None], tok, T)    # past the lane's end: no-op row

    terms = chunk_terms(q, k, v, g, beta, tok, chunk_size)
    slots = state_slots.long()
    states = (gather_states(state_pool, slots, has_initial_state).float()
              if initial_states is None else initial_states)
    out = chunk_scan(terms, seq, states)
    dest = slots if final_slots is None else final_slots.long()
    state_pool.index_copy_(0, dest, states.to(state_pool.dtype))
    o = torch.zeros_like(v)                                      # [T + 1, HV, V]
    o.index_copy_(0, tok.reshape(-1), out.transpose(1, 2).reshape(-1, *o.shape[1:]))
    return o[:T].to(dtype)


ChunkTerms = tuple[torch.Tensor, ...]


def chunk_terms(q, k, v, g, beta, tok: torch.Tensor, chunk_size: int,
                exp: Callable[[torch.Tensor], torch.Tensor] = torch.exp) -> ChunkTerms:
    """Every chunk's intra-chunk work, batched over chunks and heads. q .. beta: prepared
    rows (`_prepare`), tok `[C, chunk_size]` the row of each chunk position (the no-op row
    past a lane's end). Returns (query, intra, new_values, k_cumdecay, key, chunk_decay) for
    the scan, each `[C, HV, ...]`. `exp`: the exponential (the batch-invariant mode passes
    activation.scalar_path's)."""
    def by_chunk(x):    # [T + 1, HV, ...] -> [C, HV, chunk_size, ...]
        return x[tok].transpose(1, 2)

    query, key, value, beta, decay = (by_chunk(x) for x in (q, k, v, beta, g))
    # From here on transformers' torch_chunk_gated_delta_rule, batch dims (chunk, head).
    v_beta = value * beta.unsqueeze(-1)
    k_beta = key * beta.unsqueeze(-1)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    cum_decay = decay.cumsum(dim=-1)
    pairwise = (cum_decay.unsqueeze(-1) - cum_decay.unsqueeze(-2)).masked_fill(upper, float("-inf"))
    pairwise = exp(pairwise)
    ut_system = (k_beta @ key.transpose(-1, -2)) * pairwise
    intra = (query @ key.transpose(-1, -2)) * pairwise
    decayed_k_beta = k_beta * exp(cum_decay).unsqueeze(-1)
    new_values = torch.linalg.solve_triangular(ut_system, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(ut_system, decayed_k_beta, upper=False,
                                               unitriangular=True)
    query = query * exp(cum_decay).unsqueeze(-1)
    key = key * exp(cum_decay[..., -1:] - cum_decay).unsqueeze(-1)
    chunk_decay = exp(cum_decay[..., -1])[..., None, None]
    return query, intra, new_values, k_cumdecay, key, chunk_decay


def chunk_scan(terms: ChunkTerms, lanes: torch.Tensor, states: torch.Tensor,
               commit: torch.Tensor | None = None,
               chunk_states: torch.Tensor | None = None) -> torch.Tensor:
    """The scan over `chunk_terms`: chunks in order, each reading its lane's state (`lanes`
    `[C]`, rows of `states` `[R, HV, K, V]` float32, updated in place) and replacing it. A
    lane's chunks are consecutive, and padding chunks (all no-op tokens) leave the state as
    it is. `commit` `[C]` bool: replace the state only after the chunks it marks (the
    batch-invariant mode's complete chunks); None: after every chunk. `chunk_states` `[C, HV,
    K, V]`: also gets each chunk's new state (committed or not). Returns the chunks' outputs
    `[C, HV, chunk_size, V]`."""
    query, intra, new_values, k_cumdecay, key, chunk_decay = terms
    out = torch.empty_like(new_values)
    for i in range(lanes.shape[0]):
        lane = lanes[i:i + 1]
        state = states.index_select(0, lane)[0]
        v_new = new_values[i] - k_cumdecay[i] @ state
        out[i] = query[i] @ state + intra[i] @ v_new
        new_state = state * chunk_decay[i] + key[i].transpose(-1, -2) @ v_new
        if chunk_states is not None:
            chunk_states[i] = new_state
        if commit is not None:
            new_state = torch.where(commit[i], new_state, state)
        states.index_copy_(0, lane, new_state[None])
    return out
