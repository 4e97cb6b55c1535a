"""The gated delta rule on the device: fla's Triton kernels on CUDA, the torch reference
elsewhere (a CPU, or CUDA without the optional `gpu` extra, fla-core).

fla (fla-core 0.6.0) takes the packed lanes as one batch row with `cu_seqlens`, and initial /
final states as `[N, HV, K, V]` float32 per sequence, not slot-indexed: so the lanes' states are
gathered from the pool before the call and the final states scattered back after it. Both
steps, like fla's kernels, are free of host syncs:
- chunked (prefill and mixed steps): `chunk_indices` comes from the host (metadata.py); fla
  would otherwise derive it with a GPU->CPU sync. `chunk_offsets` fla derives on the device
  from `cu_seqlens` (no sync; the top-level function takes no argument for it). That
  derivation is memoized by *tensor identity* (fla's `tensor_cache`), which would hand a later
  step, or a graph captured after a warmup on the same tensor object, a stale result: each
  call passes a new view of `query_start_loc`, so nothing is ever looked up across calls.
- decode (one token per lane): fused_recurrent with the lanes as the batch dim, no cu_seqlens.
fla computes the l2 norms of q and k itself (use_qk_l2norm_in_kernel), and the query-head
expansion (i_hv // (HV // H), what repeat_interleave does). Its chunked output leaves rows of
no lane unwritten: they are zeroed here, since garbage there could be NaN and would flow
through the padding rows of later layers into the KV cache's null block.

fla autotunes its kernels on first use (a host sync): run each shape once before capturing or
before checking for syncs. Inputs, outputs, pools: reference.py and state.py.
"""
from __future__ import annotations

import torch

from fullgraph.layers.gdn.metadata import CHUNK_SIZE
from fullgraph.layers.gdn.reference import (chunk_gated_delta_rule_ref,
                                            recurrent_gated_delta_rule_ref,
                                            recurrent_step_ref)
from fullgraph.layers.gdn.state import gather_states


def fla_gated_delta_rule(device: torch.device):
    """fla's `fla.ops.gated_delta_rule` module, or None off CUDA or without fla installed."""
    if device.type != "cuda":
        return None
    try:
        from fla.ops import gated_delta_rule     # the optional `gpu` extra (fla-core)
    except ImportError:
        return None
    return gated_delta_rule


def chunk_gated_delta_rule(q, k, v, g, beta, state_pool: torch.Tensor,
                           state_slots: torch.Tensor, query_start_loc: torch.Tensor,
                           has_initial_state: torch.Tensor | None,
                           chunk_indices: torch.Tensor, chunk_size: int = CHUNK_SIZE,
                           use_fla: bool = True, final_slots: torch.Tensor | None = None,
                           initial_states: torch.Tensor | None = None) -> torch.Tensor:
    """Packed lanes of any lengths (chunked prefill, mixed steps). chunk_indices `[C, 2]` int
    on the device: metadata.chunk_metadata or, for a captured graph, padded_chunk_indices.
    Returns `[T, num_v_heads, head_v_dim]` in q's dtype; writes the final states (to
    `final_slots` where given; `initial_states`: the lanes' states, already gathered)."""
    fla = fla_gated_delta_rule(q.device) if use_fla else None
    if fla is None:
        return chunk_gated_delta_rule_ref(q, k, v, g, beta, state_pool, state_slots,
                                          query_start_loc, has_initial_state, chunk_indices,
                                          chunk_size, final_slots, initial_states)
    slots = state_slots.long()
    h0 = (gather_states(state_pool, slots, has_initial_state) if initial_states is None
          else initial_states)
    o, ht = fla.chunk_gated_delta_rule(
        q=q[None], k=k[None], v=v[None], g=g[None], beta=beta[None], initial_state=h0,
        output_final_state=True, use_qk_l2norm_in_kernel=True,
        cu_seqlens=query_start_loc[:],       # a new object per call: see the module docstring
        chunk_indices=chunk_indices, chunk_size=chunk_size)
    state_pool.index_copy_(0, slots if final_slots is None else final_slots.long(),
                           ht.to(state_pool.dtype))
    owned = torch.arange(q.shape[0], device=q.device) < query_start_loc[-1]
    return torch.where(owned[:, None, None], o[0], 0).to(q.dtype)


def decode_gated_delta_rule(q, k, v, g, beta, state_pool: torch.Tensor,
                            state_slots: torch.Tensor, has_initial_state: torch.Tensor | None,
                            use_fla: bool = True) -> torch.Tensor:
    """One token per lane (decode): q, k `[R, num_k_heads, head_k_dim]`, row r lane r's;
    has_initial_state None: every lane continues its state. Returns `[R, num_v_heads,
    head_v_dim]` in q's dtype; writes the final states."""
    fla = fla_gated_delta_rule(q.device) if use_fla else None
    if fla is None:
        return recurrent_gated_delta_rule_ref(q, k, v, g, beta, state_pool, state_slots, None,
                                              has_initial_state)
    slots = state_slots.long()
    h0 = gather_states(state_pool, slots, has_initial_state)
    # by keyword: fused_recurrent's positional order differs from chunk's (g, gk, gv, beta)
    o, ht = fla.fused_recurrent_gated_delta_rule(
        q=q[:, None], k=k[:, None], v=v[:, None], g=g[:, None], beta=beta[:, None],
        initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    state_pool.index_copy_(0, slots, ht.to(state_pool.dtype))
    return o[:, 0].to(q.dtype)


def speculative_gated_delta_rule(q, k, v, g, beta, state_pool: torch.Tensor,
                                 state_slots: torch.Tensor, write_slots: torch.Tensor,
                                 query_start_loc: torch.Tensor,
                                 has_initial_state: torch.Tensor,
                                 chunk_indices: torch.Tensor | None,
                                 max_query_len: int | None, use_fla: bool = True
                                 ) -> torch.Tensor:
    """The rule with a state per position (speculative decoding, state.py): the lanes read
    their states from `state_slots`; `write_slots` `[R, m]` column j < m - 1 gets the state
    after the lane's row min(j, L - 1), column m - 1 after its last row.

    `max_query_len`: every lane's row count, where the step is uniform with at most m rows a
    lane (a verify step: m; a decode step: 1): every row then runs token by token, each
    state written as it comes. None (steps with prompt chunks): the chunked rule gives the
    outputs and the last rows' states, and the first m - 1 rows run again token by token for
    theirs (a lane shorter than that reads a no-op row past its end). The states are gathered
    once before anything is written: a lane's read slot is one of its write slots. Returns `[T, num_v_heads, head_v_dim]` in q's dtype."""
    fla = fla_gated_delta_rule(q.device) if use_fla else None
    m = write_slots.shape[1]
    steps = m - 1 if max_query_len is None else max_query_len
    h0 = gather_states(state_pool, state_slots.long(), has_initial_state).float()
    qsl = query_start_loc.long()
    starts, ends = qsl[:-1], qsl[1:]
    t_all = q.shape[0]
    out = q.new_zeros(t_all + 1, v.shape[1], v.shape[2])        # row T: rows of no lane
    inputs = [q, k, v, g, beta]
    if max_query_len is None:                   # row T: the no-op token (no decay, no update)
        inputs = [torch.cat([x, x.new_zeros(1, *x.shape[1:])]) for x in inputs]
    h = h0
    for j in range(steps):
        t = starts + j
        if max_query_len is None:
            t = torch.where(t < ends, t, t_all)     # a lane past its last row: the no-op row
        if fla is None:
            o, h = recurrent_step_ref(*(x[t] for x in inputs), h)
        else:
            o, h = fla.fused_recurrent_gated_delta_rule(
                *(x[t][:, None] for x in inputs[:3]), g=inputs[3][t][:, None],
                beta=inputs[4][t][:, None], initial_state=h, output_final_state=True,
                use_qk_l2norm_in_kernel=True)
            o = o[:, 0]
        if max_query_len is not None:
            out.index_copy_(0, t, o.to(out.dtype))
        state_pool.index_copy_(0, write_slots[:, j].long(), h.to(state_pool.dtype))
    if max_query_len is not None:
        return out[:t_all]
    return chunk_gated_delta_rule(q, k, v, g, beta, state_pool, state_slots, query_start_loc,
                                  has_initial_state, chunk_indices, use_fla=use_fla,
                                  final_slots=write_slots[:, -1], initial_states=h0)
