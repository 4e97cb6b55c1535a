"""The gated delta rule with chunks at absolute positions: the batch-invariant mode's form.

The chunked rule's result for a token depends on where its chunk starts (the step's cut), and
decode's recurrent form differs from both (docs/batch_invariance.md, section 3). Here a
lane's state is committed only at multiples of `KernelPolicy.gdn_chunk`; the rule's inputs
of the tokens since the last boundary (the tail, fewer than a chunk) are kept per state slot
and run again with the new ones, so prefill in one call, prefill cut anywhere and
token-by-token decode give the same bits (section 6.7).

`aligned_chunk_gated_delta_rule` runs all lanes of a step at once, on the state pools (the
committed state in the recurrent pool, the tail in one pool per input): what
models/qwen3_next.py's Gated DeltaNet layers run in the mode, prefill, mixed and decode steps
alike (tests/test_batch_invariant.py drives one lane through it, cut anywhere).

Like reference.py it reads no device value on the host and its op sequence depends on the
shapes only, so it runs inside the CPU fake graphs. On the GPU the chunks run in one Triton
kernel (fused_aligned.py) over the same tables, with the same tails.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from fullgraph.layers.activation import scalar_path
from fullgraph.layers.gdn import fused_aligned
from fullgraph.layers.gdn.reference import chunk_scan, chunk_terms, normalize_inputs
from fullgraph.layers.gdn.state import gather_states
from fullgraph.layers.policy import KernelPolicy

# The rule's inputs a tail keeps, in this order (one pool each; g float32 like gating.py's).
TAIL_INPUTS = ("q", "k", "v", "g", "beta")

# exp's vectorized and scalar CPU formulas may differ in the last bit, and which elements take
# which depends on the tensor's size and thread split (layers/activation.py)
_exp = partial(scalar_path, torch.exp)


def aligned_chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   g: torch.Tensor, beta: torch.Tensor,
                                   state_pool: torch.Tensor,
                                   tail_pools: Sequence[torch.Tensor],
                                   state_slots: torch.Tensor, query_start_loc: torch.Tensor,
                                   seq_lens: torch.Tensor, has_initial_state: torch.Tensor,
                                   policy: KernelPolicy,
                                   max_query_len: int | None = None,
                                   write_slots: torch.Tensor | None = None) -> torch.Tensor:
    """The gated delta rule for packed lanes with chunks at absolute multiples of
    `policy.gdn_chunk` (C); updates the pools in place.

    Inputs as reference.py's (q, k `[T, HK, DK]`, v `[T, HV, DV]`, g, beta `[T, HV]`; lane r
    owns rows query_start_loc[r] .. query_start_loc[r + 1]); seq_lens `[R]` the lane's tokens
    after this step, so seq_len - query_len is where the step starts. `state_pool`
    `[slots, HV, DK, DV]` float32 holds each slot's state at its last boundary, `tail_pools`
    (q, k, v, g, beta: `[slots, C - 1, ...]`) the inputs of the tokens after it.

    Per lane: its tail (start % C tokens, none for a lane that starts now, whatever its slot
    holds) and its new tokens form chunks that begin at absolute boundaries, run from the
    committed state; complete chunks commit their state, the last partial chunk only gives
    outputs and becomes the new tail. A row of a chunk depends on the rows before it only
    (absent later rows are no-op tokens that enter its sums as exact zeros), and every chunk
    goes through the same ops of fixed shape: a token's bits depend neither on the step's
    cut nor on the other lanes. `max_query_len`: a bound on any lane's new tokens, where the
    step's shape gives one (1 for a decode step), which bounds the work. Returns
    `[T, HV, DV]` in q's dtype (rows of no lane zero).

    `write_slots` `[R, m]` (speculative decoding, state.py): slot j < m - 1 of each lane's
    group gets the committed state and tail after the lane's row min(j, L - 1), slot m - 1
    after its last row, instead of the lane's own slot. The first m - 1 rows cross at most
    one boundary (m - 1 <= C), so their committed state is the lane's initial one or the
    state after its first chunk.
    """
    chunk = policy.gdn_chunk
    width = chunk - 1                               # tail rows per slot
    t, r, dev = q.shape[0], state_slots.shape[0], q.device
    slots = state_slots.long()
    qsl = query_start_loc.long()
    lens = qsl[1:] - qsl[:-1]
    start = (seq_lens.long() - lens).clamp(min=0)   # padding lanes may have seq_len 0
    n_tail = torch.where(has_initial_state & (lens > 0), start % chunk, 0)
    total = n_tail + lens                           # the lane's rows from its boundary
    # Per input one table: the step's rows, every lane's tail rows, then a zero row (the
    # no-op token: decay exp(0) = 1, no update).
    tables = [torch.cat([x, pool.index_select(0, slots).reshape(r * width, *x.shape[1:])
                         .to(x.dtype), x.new_zeros(1, *x.shape[1:])])
              for x, pool in zip((q, k, v, g, beta), tail_pools)]
    noop = t + r * width

    def source(lane: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The table row of lane-relative position p (counted from the boundary)."""
        n = n_tail[lane]
        row = torch.where(p < n, t + lane * width + p, qsl[lane] + p - n)
        return torch.where(p < total[lane], row, noop)

    lanes = torch.arange(r, device=dev)[:, None]

    def commit_tails(kept_total: torch.Tensor, dest: torch.Tensor) -> None:
        """The new tails: each lane's rows after its last complete chunk (of the rows
        kept)."""
        rows = source(lanes, kept_total[:, None] // chunk * chunk
                      + torch.arange(width, device=dev))
        for table, pool in zip(tables, tail_pools):
            pool.index_copy_(0, dest, table[rows].to(pool.dtype))

    dest = write_slots.long() if write_slots is not None else None
    m = dest.shape[1] if dest is not None else 0
    if m - 1 > chunk:
        raise ValueError(f"{m} state slots a request need a chunk of at least {m - 1}")

    def kept_total(j: int) -> torch.Tensor:
        """Rows from the boundary that write slot j keeps: the lane's first min(j + 1, L)
        new rows, all of them for the last slot."""
        return total if j == m - 1 else n_tail + lens.clamp(max=j + 1)

    kernel = fused_aligned.supported(q, q.shape[-1], v.shape[-1])
    if q.is_cuda and not kernel:
        raise ValueError(f"the batch-invariant GDN kernel needs Triton and head dims that "
                         f"are powers of two >= 16 (got {q.shape[-1]}, {v.shape[-1]})")
    if kernel:
        # the GPU: the same chunks in one kernel (fused_aligned.py), around the same tails
        out = q.new_zeros(t, *v.shape[1:])
        fused_aligned.aligned_rule(tables, t, qsl[:-1], n_tail, total, slots,
                                   has_initial_state, state_pool, chunk, out, dest)
        for j in range(m):
            commit_tails(kept_total(j), dest[:, j])
        if dest is None:
            commit_tails(total, slots)
        return out

    # The chunk map: every lane's chunks in order, to a capacity fixed by the shapes;
    # chunks past the last are empty.
    counts = (total + chunk - 1) // chunk
    ends = counts.cumsum(0)
    capacity = aligned_chunk_capacity(t, r, chunk, max_query_len)
    index = torch.arange(capacity, device=dev)
    lane = torch.searchsorted(ends, index, right=True)
    real = lane < r
    lane = lane.clamp(max=r - 1)
    within = index - (ends[lane] - counts[lane])
    pos = within[:, None] * chunk + torch.arange(chunk, device=dev)
    tok = torch.where(real[:, None], source(lane[:, None], pos), noop)
    complete = real & ((within + 1) * chunk <= total[lane])

    terms = chunk_terms(*normalize_inputs(*tables, chunked=True), tok, chunk, exp=_exp)
    states = gather_states(state_pool, slots, has_initial_state).float()
    initial = states.clone() if write_slots is not None else None
    per_chunk = (states.new_empty(capacity, *states.shape[1:]) if write_slots is not None
                 else None)
    out = chunk_scan(terms, lane, states, commit=complete, chunk_states=per_chunk)

    if write_slots is None:
        state_pool.index_copy_(0, slots, states.to(state_pool.dtype))
        commit_tails(total, slots)
    else:
        after_first = per_chunk[(ends - counts).clamp(max=capacity - 1)]
        for j in range(m):
            kept = kept_total(j)
            crossed = (kept >= chunk).view(-1, 1, 1, 1)
            committed = states if j == m - 1 else torch.where(crossed, after_first, initial)
            state_pool.index_copy_(0, dest[:, j], committed.to(state_pool.dtype))
            commit_tails(kept, dest[:, j])

    o = out.new_zeros(noop + 1, out.shape[1], out.shape[3])             # [rows, HV, DV]
    o.index_copy_(0, tok.reshape(-1), out.transpose(1, 2).reshape(-1, *o.shape[1:]))
    return o[:t].to(q.dtype)


def aligned_chunk_capacity(num_tokens: int, num_lanes: int, chunk: int,
                   max_query_len: int | None = None) -> int:
    """The most chunks a step can have from its shape: a lane of n >= 1 new tokens after a
    tail of at most C - 1 has at most 1 + (n + C - 2) // C chunks, and at most min(R, T)
    lanes have tokens."""
    active = min(num_lanes, num_tokens)
    bound = active + (num_tokens + active * (chunk - 2)) // chunk
    if max_query_len is not None:
        bound = min(bound, active * (1 + (max_query_len + chunk - 2) // chunk))
    return max(1, bound)
