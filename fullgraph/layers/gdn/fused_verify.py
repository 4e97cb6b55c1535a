"""A uniform speculative step of a Gated DeltaNet layer (every lane has the same n rows: its
last token and its drafts) as two Triton kernels on the state pools, writing the states after
each row to the lane's slot group (state.py's `write_slots`), so that a rejected draft is
rolled back by choosing a slot:

- `conv_verify`: the depthwise causal conv + SiLU of a lane's n rows against its saved
  inputs, and the conv state after row j (the last kernel_size - 1 inputs up to it) to the
  group's slot j;
- `gated_delta_verify`: per (lane, value head), the gating, the l2 norms of q and k, the
  delta rule token by token from the lane's state with the state after row j to slot j, and
  the gated output RMSNorm of every row.

They are fused_decode.py's two kernels with a loop over the lane's rows, in place of the
torch ops (kernels.speculative_gated_delta_rule, conv.causal_conv1d with `write_slots`, the
gating and the gated norm), which launch ~15 kernels a row and layer (docs/benchmarks.md,
nineteenth session: 2,951 kernels a verify step of a 0.8B hybrid at k = 3). The math and
roundings are fused_decode.py's.
"""
from __future__ import annotations

import torch

from fullgraph.layers.launch import Launcher, cdiv, next_power_of_2

from fullgraph.layers.gdn.fused_decode import V_BLOCK

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: the torch ops run instead
    triton = None

if triton is not None:
    from fullgraph.layers.gdn.fused_decode import _gated_norm, _token_terms

    CONV_BLOCK = 256

    @triton.jit
    def _window(saved, new, rows, new_rows, e: tl.constexpr, W: tl.constexpr):
        """Element e of a lane's window (its W saved inputs, oldest first, then its rows)."""
        if e < W:
            return tl.sum(tl.where(rows[:, None] == e, saved, 0.0), 0)
        return tl.sum(tl.where(new_rows[:, None] == e - W, new, 0.0), 0)

    @triton.jit
    def _conv_verify_kernel(x_ptr, stride_x, w_ptr, pool_ptr, stride_ps, stride_pw, slots_ptr,
                            init_ptr, write_ptr, stride_ws, y_ptr, stride_y, D,
                            W: tl.constexpr, W_P2: tl.constexpr, ROWS: tl.constexpr,
                            ROWS_P2: tl.constexpr, HAS_INIT: tl.constexpr,
                            BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        rows = tl.arange(0, W_P2)
        new_rows = tl.arange(0, ROWS_P2)
        slot = tl.load(slots_ptr + r).to(tl.int64)
        saved = tl.load(pool_ptr + slot * stride_ps + rows[:, None] * stride_pw + offs[None, :],
                        mask=(rows < W)[:, None] & mask[None, :], other=0.0)
        if HAS_INIT:               # where, not a multiply: an unused slot may hold NaN
            saved = tl.where(tl.load(init_ptr + r) != 0, saved, 0.0)
        saved = saved.to(tl.float32)
        new = tl.load(x_ptr + (r * ROWS + new_rows)[:, None] * stride_x + offs[None, :],
                      mask=(new_rows < ROWS)[:, None] & mask[None, :], other=0.0).to(tl.float32)
        for j in tl.static_range(ROWS):
            acc = tl.zeros([BLOCK], tl.float32)
            for i in tl.static_range(W + 1):     # tap i reads window element j + i
                w = tl.load(w_ptr + offs * (W + 1) + i, mask=mask, other=0.0).to(tl.float32)
                acc += _window(saved, new, rows, new_rows, j + i, W) * w
            y = acc / (1.0 + tl.exp(-acc))
            tl.store(y_ptr + (r * ROWS + j) * stride_y + offs, y.to(y_ptr.dtype.element_ty),
                     mask=mask)
        tl.debug_barrier()         # every thread's loads of the read slot before the writes
        for j in tl.static_range(ROWS):
            dest = pool_ptr + tl.load(write_ptr + r * stride_ws + j) * stride_ps
            for t in tl.static_range(W):         # the state after row j: elements j+1..j+W
                tl.store(dest + t * stride_pw + offs,
                         _window(saved, new, rows, new_rows, j + 1 + t, W)
                         .to(pool_ptr.dtype.element_ty), mask=mask)

    _conv_verify_launcher = Launcher(_conv_verify_kernel)

    @triton.jit
    def _gated_delta_verify_kernel(qkv_ptr, stride_qkv, z_ptr, b_ptr, a_ptr, stride_in,
                                   a_log_ptr, dt_bias_ptr, norm_w_ptr, pool_ptr, slots_ptr,
                                   init_ptr, write_ptr, stride_ws, o_ptr, stride_o, key_dim,
                                   HV, heads_per_key, scale, eps, DK: tl.constexpr,
                                   DV: tl.constexpr, BV: tl.constexpr, ROWS: tl.constexpr,
                                   ROWS_P2: tl.constexpr, HAS_INIT: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        hv = tl.program_id(1)
        hk = hv // heads_per_key
        offs_k = tl.arange(0, DK)
        a_log = tl.load(a_log_ptr + hv).to(tl.float32)
        dt_bias = tl.load(dt_bias_ptr + hv).to(tl.float32)
        slot = tl.load(slots_ptr + r).to(tl.int64)
        state = pool_ptr + (slot * HV + hv) * DK * DV
        dtype = o_ptr.dtype.element_ty
        which = tl.arange(0, ROWS_P2)
        sumsq = tl.zeros([ROWS_P2], tl.float32)
        # pass 1, per block of value columns: the rule row by row from the lane's state, the
        # state after each row to its slot, the raw outputs and their sums of squares
        for v0 in tl.static_range(0, DV, BV):
            offs_v = v0 + tl.arange(0, BV)
            block = offs_k[:, None] * DV + offs_v[None, :]
            h = tl.load(state + block)
            if HAS_INIT:           # where, not a multiply: an unused slot may hold NaN
                h = tl.where(tl.load(init_ptr + r) != 0, h, 0.0)
            for j in tl.static_range(ROWS):
                t = r * ROWS + j
                row = qkv_ptr + t * stride_qkv
                q, k, decay, beta = _token_terms(row, a_ptr + t * stride_in + hv,
                                                 b_ptr + t * stride_in + hv, hk, a_log,
                                                 dt_bias, key_dim, scale, DK)
                h = h * decay
                v = tl.load(row + 2 * key_dim + hv * DV + offs_v).to(tl.float32)
                v = (v - tl.sum(h * k[:, None], 0)) * beta
                h = h + k[:, None] * v[None, :]
                dest = tl.load(write_ptr + r * stride_ws + j)
                tl.store(pool_ptr + (dest * HV + hv) * DK * DV + block, h)
                o = tl.sum(h * q[:, None], 0).to(dtype)
                tl.store(o_ptr + t * stride_o + hv * DV + offs_v, o)
                of = o.to(tl.float32)
                sumsq += tl.where(which == j, tl.sum(of * of, 0), 0.0)
        tl.debug_barrier()         # pass 2 reads what other threads of the program wrote
        for j in tl.static_range(ROWS):
            t = r * ROWS + j
            _gated_norm(o_ptr + t * stride_o + hv * DV, z_ptr + t * stride_in + hv * DV,
                        norm_w_ptr, tl.rsqrt(tl.sum(tl.where(which == j, sumsq, 0.0), 0) / DV
                                             + eps), DV, BV)

    _gated_delta_verify_launcher = Launcher(_gated_delta_verify_kernel)


def uniform_rows(x: torch.Tensor, state_slots: torch.Tensor, rows: int | None) -> bool:
    """Whether a step's rows are `rows` per lane, lane-major (a uniform verify step)."""
    return rows is not None and x.shape[0] == state_slots.shape[0] * rows


def conv_verify(x: torch.Tensor, weight: torch.Tensor, conv_state_pool: torch.Tensor,
                state_slots: torch.Tensor, has_initial_state: torch.Tensor | None,
                write_slots: torch.Tensor, rows: int) -> torch.Tensor:
    """conv.py's `causal_conv1d` with `write_slots` for `rows` rows a lane (SiLU, no bias):
    x `[R * rows, conv_dim]` (rows may be strided), weight `[conv_dim, kernel_size]`
    contiguous, write_slots `[R, >= rows]`. Returns `[R * rows, conv_dim]`."""
    t, d = x.shape
    w = weight.shape[1] - 1
    y = torch.empty(t, d, dtype=x.dtype, device=x.device)
    r = state_slots.shape[0]
    if r:
        init = has_initial_state if has_initial_state is not None else state_slots
        _conv_verify_launcher[(r, cdiv(d, CONV_BLOCK))](
            x, x.stride(0), weight, conv_state_pool, conv_state_pool.stride(0),
            conv_state_pool.stride(1), state_slots, init, write_slots, write_slots.stride(0),
            y, y.stride(0), d, W=w, W_P2=next_power_of_2(w), ROWS=rows,
            ROWS_P2=next_power_of_2(rows), HAS_INIT=has_initial_state is not None,
            BLOCK=CONV_BLOCK, num_warps=4)
    return y


def gated_delta_verify(qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                       A_log: torch.Tensor, dt_bias: torch.Tensor, norm_weight: torch.Tensor,
                       eps: float, state_pool: torch.Tensor, state_slots: torch.Tensor,
                       has_initial_state: torch.Tensor | None, write_slots: torch.Tensor,
                       rows: int, num_k_heads: int) -> torch.Tensor:
    """fused_decode.gated_delta_decode for `rows` rows a lane, the state after row j to
    `write_slots[:, j]` (the lane's own slot is only read). Returns `[R * rows, value_dim]`."""
    t = qkv.shape[0]
    hv, dk, dv = state_pool.shape[1:]
    assert z.stride(0) == b.stride(0) == a.stride(0), "z, b, a: views of one projection"
    out = torch.empty(t, hv * dv, dtype=qkv.dtype, device=qkv.device)
    r = state_slots.shape[0]
    if r:
        init = has_initial_state if has_initial_state is not None else state_slots
        _gated_delta_verify_launcher[(r, hv)](
            qkv, qkv.stride(0), z, b, a, z.stride(0), A_log, dt_bias, norm_weight, state_pool,
            state_slots, init, write_slots, write_slots.stride(0), out, out.stride(0),
            num_k_heads * dk, hv, hv // num_k_heads, dk ** -0.5, eps, DK=dk, DV=dv,
            BV=min(V_BLOCK, dv), ROWS=rows, ROWS_P2=next_power_of_2(rows),
            HAS_INIT=has_initial_state is not None, num_warps=4)
    return out
