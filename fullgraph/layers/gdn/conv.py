"""The depthwise causal conv (with SiLU) of a Gated DeltaNet layer over packed lanes.

Every lane's new tokens are convolved as the continuation of its saved inputs (the conv state,
see state.py) or of zeros, and the lane's last kernel_size - 1 inputs are written back to its
slot. Pure torch, no host reads of device values and a shape-only op sequence, so the same code
runs eagerly on a CPU, inside a CUDA graph and inside the CPU fake graphs (whose replays rerun
recorded ops on new tensor contents). Work per step is kernel_size gathers of [T, conv_dim].

Each output is computed as sum_j x[t - (K-1) + j] * weight[:, j] (+ bias) in float32, then the
activation, then a cast to x's dtype: F.conv1d's terms in one rounding (transformers rounds the
conv output to the weight dtype before the SiLU; at float32 the two agree to rounding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fullgraph.layers.activation import elementwise
from fullgraph.layers.gdn.state import gather_states


def _activate(y: torch.Tensor, activation: str | None,
              batch_invariant: bool = False) -> torch.Tensor:
    if activation in ("silu", "swish"):
        # the scalar formula for every element in the mode (layers/activation.py)
        return elementwise(F.silu, y, batch_invariant)
    if activation is None:
        return y
    raise ValueError(f"unsupported conv activation {activation!r}")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  conv_state_pool: torch.Tensor, state_slots: torch.Tensor,
                  query_start_loc: torch.Tensor, has_initial_state: torch.Tensor,
                  activation: str | None = "silu", batch_invariant: bool = False,
                  write_slots: torch.Tensor | None = None) -> torch.Tensor:
    """Causal conv of packed lanes; updates `conv_state_pool` in place.

    x `[T, conv_dim]`: every lane's new inputs, lane r owning rows query_start_loc[r] ..
    query_start_loc[r + 1] (`[R + 1]`, int); rows past query_start_loc[R] (padding) belong to
    no lane and come out as zeros. weight `[conv_dim, kernel_size]` (nn.Conv1d's weight
    squeezed), bias `[conv_dim]` or None. conv_state_pool `[num_slots, kernel_size - 1,
    conv_dim]`, state_slots `[R]`, has_initial_state `[R]` bool: see state.py.
    Returns `[T, conv_dim]` in x's dtype. `batch_invariant` (the mode, CPU): the activation
    through its scalar formula, so a token's bits depend on its inputs alone; the mode runs
    decode steps through this function too, for one formula (taps in order, float32).
    `write_slots` `[R, m]` (speculative decoding, state.py): column j < m - 1 gets the state
    after the lane's row min(j, L - 1), column m - 1 after its last row, instead of the last
    row's state to the lane's own slot.
    """
    T, D = x.shape
    W = weight.shape[-1] - 1
    R = state_slots.shape[0]
    slots = state_slots.long()
    qsl = query_start_loc.long()
    tok = torch.arange(T, device=x.device)
    # Each token's lane: how many lanes end at or before it (empty lanes included).
    lane = torch.searchsorted(qsl[1:], tok, right=True)
    owned = lane < R
    lane = lane.clamp(max=R - 1)
    pos = tok - qsl[lane]                       # position within the lane
    # One table to gather every tap from: the new inputs, then each lane's W saved inputs
    # (oldest first), then a zero row.
    states = gather_states(conv_state_pool, slots, has_initial_state)
    table = torch.cat([x, states.reshape(R * W, D).to(x.dtype), x.new_zeros(1, D)])
    state_row0 = T + lane * W                   # the lane's first saved input
    w = weight.float()
    y = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    for j in range(W + 1):
        back = W - j                            # tap j reads the input `back` tokens earlier
        src = torch.where(pos >= back, tok - back, state_row0 + (W - back) + pos)
        src = torch.where(owned, src, T + R * W)
        y = y + table.index_select(0, src).float() * w[:, j]
    if bias is not None:
        y = y + bias.float()
    y = torch.where(owned[:, None], _activate(y, activation, batch_invariant), 0).to(x.dtype)

    # The new state: the last W inputs of (saved inputs ++ new inputs) up to the lane's end
    # (or each end `write_slots` asks for), oldest first. A lane with fewer than W new tokens
    # keeps the newest of its saved inputs before them.
    lens = qsl[1:] - qsl[:-1]
    if write_slots is None:
        ends, dest = lens[:, None], slots[:, None]                   # [R, 1]
    else:
        dest = write_slots.long()
        m = dest.shape[1]
        ends = torch.minimum(torch.arange(1, m + 1, device=x.device), lens[:, None])
        ends[:, -1] = lens
    p = ends[..., None] - W + torch.arange(W, device=x.device)      # [R, m, W], lane-relative
    lanes = torch.arange(R, device=x.device)[:, None, None]
    src = torch.where(p >= 0, qsl[:-1, None, None] + p, T + lanes * W + W + p)
    new_states = table.index_select(0, src.reshape(-1)).view(-1, W, D)
    conv_state_pool.index_copy_(0, dest.reshape(-1), new_states.to(conv_state_pool.dtype))
    return y


def causal_conv1d_decode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         conv_state_pool: torch.Tensor, state_slots: torch.Tensor,
                         has_initial_state: torch.Tensor | None,
                         activation: str | None = "silu") -> torch.Tensor:
    """`causal_conv1d` when every lane has exactly one new token (decode): x `[R, conv_dim]`,
    row r lane r's. has_initial_state None: every lane continues its state. Returns
    `[R, conv_dim]` in x's dtype; updates `conv_state_pool` in place.
    """
    slots = state_slots.long()
    states = gather_states(conv_state_pool, slots, has_initial_state)   # [R, W, D]
    window = torch.cat([states.to(x.dtype), x[:, None]], dim=1)         # [R, K, D], oldest first
    conv_state_pool.index_copy_(0, slots, window[:, 1:].to(conv_state_pool.dtype))
    y = (window.float() * weight.t().float()).sum(dim=1)
    if bias is not None:
        y = y + bias.float()
    return _activate(y, activation).to(x.dtype)
