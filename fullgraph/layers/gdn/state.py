"""The per-request state pools of a Gated DeltaNet layer, and reading a batch's states.

A request keeps two states per GDN layer between steps, each in a preallocated pool indexed by
the request's state slot (slot 0 is the null slot: padding lanes read and write it, so its
contents are garbage and no real request may use it):

- conv state pool `[num_slots, kernel_size - 1, conv_dim]`, the activations' dtype: the last
  kernel_size - 1 inputs of the depthwise causal conv (the pre-conv `in_proj_qkv` rows), oldest
  first, row-major per token so a token's row is contiguous like the packed input `[T, conv_dim]`.
  (vLLM keeps the same memory order and views it as [num_slots, conv_dim, kernel_size - 1];
  transformers keeps kernel_size inputs as [batch, conv_dim, kernel_size], whose last
  kernel_size - 1 columns are this state transposed.)
- recurrent state pool `[num_slots, num_v_heads, head_k_dim, head_v_dim]` float32: the delta
  rule's S, transformers' and fla's layout (fla's default `state_v_first=False`); a token reads
  it as o = q @ S.

A batch names its lanes' slots in `state_slots` [R] (int64; int32 costs a cast per call) and
says in `has_initial_state` [R] (bool) which lanes continue a saved state (a decode, or a
prefill continued from an earlier chunk); the others start from zeros, whatever their slot
holds. Each real lane has its own slot; only the null slot may repeat (which
padding lane's write lands there is then unspecified).

Speculative decoding runs a request's last token and its drafts in one step, and the drafts
the verification rejects must not stay in the states. There each request owns a group of
m = k + 1 consecutive slots (1 + g m .. g m + m for group g; engine/kv_cache.py hands them
out), and a step writes to the lane's group (`write_slots`, `slot_groups`): slot j < m - 1
the states after the lane's row min(j, L - 1), slot m - 1 after its last row (a step whose
lanes have at most n < m rows writes slots 0 .. n - 1 only: no later one can be kept). The
host then reads slot min(kept, m) - 1 of the group next step, kept being the rows the step
kept (the last token and the accepted drafts; a prompt chunk's every row): a rollback is a
choice of slot, no copy and no recompute, for m states per request. vLLM keeps its
Mamba-style states per speculative position the same way.
"""
from __future__ import annotations

import torch

NULL_SLOT = 0


def gather_states(pool: torch.Tensor, state_slots: torch.Tensor,
                  has_initial_state: torch.Tensor | None) -> torch.Tensor:
    """The lanes' states `[R, *pool.shape[1:]]` (a copy), zeros where `has_initial_state` is
    False (or None: every lane continues its state)."""
    states = pool.index_select(0, state_slots)
    if has_initial_state is None:
        return states
    mask = has_initial_state.view(-1, *([1] * (states.dim() - 1)))
    # torch.where, not a multiply: a slot never written (or the null slot) may hold NaN.
    return torch.where(mask, states, 0)


def slot_groups(state_slots: torch.Tensor, slots_per_request: int) -> torch.Tensor:
    """`[R, m]`: the slot group of each lane's slot (padding lanes, slot 0: the null slot
    throughout). On the device, from the step's `state_slots` alone."""
    m = slots_per_request
    first = (state_slots - 1).clamp(min=0) // m * m + 1
    group = first[:, None] + torch.arange(m, device=state_slots.device)
    return torch.where(state_slots[:, None] > 0, group, 0)
