"""A decode step of a Gated DeltaNet layer (one token per lane) as two Triton kernels that
work in place on the state pools, between the layer's in_proj and out_proj:

- `conv_decode`: the depthwise causal conv + SiLU of each lane's new input against its
  saved inputs, and the conv state shifted by one (conv.py's `causal_conv1d_decode`);
- `gated_delta_decode`: the gating (g, beta from a, b), the l2 norms of q and k, one step of
  the delta rule on the lane's recurrent state and the gated output RMSNorm (gating.py's
  `gdn_gating` and `rms_norm_gated`, reference.py's recurrent rule), one program per
  (lane, value head).

The torch ops they replace read and write whole states through gather / scatter copies and
launch ~30 kernels a layer; here each state is read once and written once, where it lives
(its slot), and the layer's elementwise work costs no launch of its own. The same math and
roundings as the torch path: float32 inside, the activations' dtype where transformers rounds
(the conv output, beta, the rule's output before the norm, the norm before the gate).
A lane whose `has_initial_state` is False starts from zeros whatever its slot holds; padding
lanes share the null slot, whose contents are garbage (state.py).

With PDL (layers/pdl.py) both kernels read their lane's slot and its state (the first
block of it, for the rule) before they wait for the kernel before them: the host wrote the
slots before the step and the layer's previous step the states, and no kernel of this step
writes them before these do.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: the torch ops in conv.py / reference.py
    triton = None

from fullgraph.layers import gemv
from fullgraph.layers.launch import Launcher, cdiv, next_power_of_2
from fullgraph.layers.norm import norm_f32
from fullgraph.layers.pdl import pdl_enabled

CONV_BLOCK = 512
V_BLOCK = 32                   # value columns of the state per pass (registers: K x V_BLOCK)


def supported(x: torch.Tensor, head_k_dim: int, head_v_dim: int) -> bool:
    """On CUDA with Triton, for power-of-two head dims (a program holds a whole key head)."""
    pow2 = all(d & (d - 1) == 0 for d in (head_k_dim, head_v_dim))
    return triton is not None and x.is_cuda and pow2


if triton is not None:
    _RMS_NORM = tl.constexpr(gemv.RMS_NORM)

    @triton.jit
    def _conv_inputs(w_ptr, base, stride_pw, init_ptr, offs, rows, taps, mask,
                     W: tl.constexpr, HAS_INIT: tl.constexpr):
        """What a lane's conv needs besides its new input, for channels `offs` (`mask`):
        the weights' [W_P2, BLOCK] taps of the saved inputs and their tap of the new one,
        and the saved inputs `[W_P2, BLOCK]` at `base` (zeros for a lane starting now)."""
        w_s = tl.load(w_ptr + offs[None, :] * (W + 1) + rows[:, None], mask=taps,
                      other=0.0).to(tl.float32)
        w_x = tl.load(w_ptr + offs * (W + 1) + W, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(base + rows[:, None] * stride_pw + offs[None, :], mask=taps, other=0.0)
        if HAS_INIT:               # where, not a multiply: an unused slot may hold NaN
            s = tl.where(tl.load(init_ptr) != 0, s, 0.0)
        return w_s, w_x, s

    @triton.jit
    def _conv_silu(s, w_s, x, w_x):
        """silu of the conv over the saved inputs and the new one, float32."""
        acc = tl.sum(s.to(tl.float32) * w_s, axis=0) + x.to(tl.float32) * w_x
        return acc / (1.0 + tl.exp(-acc))

    @triton.jit
    def _shift_state(base, stride_pw, offs, rows, taps, mask, s, x, W: tl.constexpr):
        """The conv state shifted: saved input j + 1 to row j, the new input to row W - 1
        (after every thread's loads of the rows it overwrites)."""
        tl.debug_barrier()
        tl.store(base + (rows[:, None] - 1) * stride_pw + offs[None, :], s,
                 mask=(rows >= 1)[:, None] & taps)
        tl.store(base + (W - 1) * stride_pw + offs, x.to(base.dtype.element_ty), mask=mask)

    @triton.jit
    def _conv_decode_kernel(x_ptr, stride_x, w_ptr, pool_ptr, stride_ps, stride_pw,
                            slots_ptr, init_ptr, y_ptr, stride_y, D,
                            W: tl.constexpr, W_P2: tl.constexpr, HAS_INIT: tl.constexpr,
                            BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        rows = tl.arange(0, W_P2)
        taps = (rows < W)[:, None] & mask[None, :]
        # the weights (parameters) and the saved inputs before the wait (module docstring)
        base = pool_ptr + tl.load(slots_ptr + r).to(tl.int64) * stride_ps
        w_s, w_x, s = _conv_inputs(w_ptr, base, stride_pw, init_ptr + r, offs, rows, taps, mask,
                                   W, HAS_INIT)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x = tl.load(x_ptr + r * stride_x + offs, mask=mask, other=0.0)
        y = _conv_silu(s, w_s, x, w_x)
        tl.store(y_ptr + r * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        _shift_state(base, stride_pw, offs, rows, taps, mask, s, x, W)

    _conv_decode_launcher = Launcher(_conv_decode_kernel)

    @triton.jit
    def _in_proj_conv_kernel(x_ptr, w_ptr, y_ptr, r_ptr, h_ptr, nw_ptr, N, K, stride_xm,
                             stride_wn, stride_rm, stride_hm, eps, cw_ptr, pool_ptr, stride_ps,
                             stride_pw, slots_ptr, init_ptr, conv_dim, HAS_RES: tl.constexpr,
                             NORM_F32: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, ONE_SLICE: tl.constexpr,
                             W: tl.constexpr, W_P2: tl.constexpr, HAS_INIT: tl.constexpr,
                             USE_PDL: tl.constexpr):
        """One row: in_proj with its input RMSNorm (gemv.py's one-row kernel), then on the
        program's outputs below conv_dim `_conv_decode_kernel`'s conv + SiLU and state shift.
        A program owns its channels, so no other reads the conv state it shifts."""
        pid = tl.program_id(0)
        offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        conv = offs < conv_dim
        rows = tl.arange(0, W_P2)
        taps = (rows < W)[:, None] & conv[None, :]
        # the conv's weights and saved inputs before the GEMV's wait (module docstring)
        base = pool_ptr + tl.load(slots_ptr).to(tl.int64) * stride_ps
        w_s, w_x, s = _conv_inputs(cw_ptr, base, stride_pw, init_ptr, offs, rows, taps, conv,
                                   W, HAS_INIT)
        acc = gemv.gemv_acc(pid, x_ptr, w_ptr, r_ptr, h_ptr, nw_ptr, x_ptr, 0, x_ptr, 0, 1, N,
                            K, stride_xm, stride_wn, stride_rm, stride_hm, eps, _RMS_NORM,
                            HAS_RES, NORM_F32, 1, BLOCK_N, BLOCK_K, 0, 32, ONE_SLICE, USE_PDL,
                            1)
        x = acc.to(y_ptr.dtype.element_ty)         # in_proj's output, rounded
        y = tl.where(conv, _conv_silu(s, w_s, x, w_x), x.to(tl.float32))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=offs < N)
        _shift_state(base, stride_pw, offs, rows, taps, conv, s, x, W)

    _in_proj_conv_launcher = Launcher(_in_proj_conv_kernel)

    @triton.jit
    def _softplus(x):
        """torch's softplus (beta 1, threshold 20)."""
        return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))

    @triton.jit
    def _token_terms(row, a_ptr, b_ptr, hk, a_log, dt_bias, key_dim, scale,
                     DK: tl.constexpr):
        """One token's terms for one value head: q (l2-normed, scaled) and k (l2-normed) of
        its key head `hk` from its conv output `row`, the decay and beta from its a and b."""
        offs_k = tl.arange(0, DK)
        q = tl.load(row + hk * DK + offs_k).to(tl.float32)
        k = tl.load(row + key_dim + hk * DK + offs_k).to(tl.float32)
        q = q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6) * scale
        k = k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)
        a = tl.load(a_ptr).to(tl.float32)
        b = tl.load(b_ptr)
        decay = tl.exp(-tl.exp(a_log) * _softplus(a + dt_bias))
        beta = tl.sigmoid(b.to(tl.float32)).to(b.dtype).to(tl.float32)
        return q, k, decay, beta

    @triton.jit
    def _gated_norm(o_row, z_row, norm_w_ptr, rstd, DV: tl.constexpr, BV: tl.constexpr):
        """The gated output RMSNorm of one token's value head, in place: `o_row` holds the
        rule's output (the activations' dtype), `rstd` its statistics."""
        dtype = o_row.dtype.element_ty
        for v0 in tl.static_range(0, DV, BV):
            offs_v = v0 + tl.arange(0, BV)
            o = tl.load(o_row + offs_v).to(tl.float32)
            n = (tl.load(norm_w_ptr + offs_v).to(tl.float32)
                 * (o * rstd).to(dtype).to(tl.float32))
            z = tl.load(z_row + offs_v).to(tl.float32)
            gated = n.to(dtype).to(tl.float32) * (z / (1.0 + tl.exp(-z)))
            tl.store(o_row + offs_v, gated.to(dtype))

    @triton.jit
    def _gated_delta_decode_kernel(qkv_ptr, stride_qkv, z_ptr, b_ptr, a_ptr, stride_in,
                                   a_log_ptr, dt_bias_ptr, norm_w_ptr, pool_ptr, slots_ptr,
                                   init_ptr, o_ptr, stride_o, key_dim, HV, heads_per_key,
                                   scale, eps, DK: tl.constexpr, DV: tl.constexpr,
                                   BV: tl.constexpr, SPAN: tl.constexpr, NORM: tl.constexpr,
                                   HAS_INIT: tl.constexpr, USE_PDL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        hv = tl.program_id(1)
        first = tl.program_id(2) * SPAN        # this program's value columns: SPAN from here
        hk = hv // heads_per_key
        offs_k = tl.arange(0, DK)
        a_log = tl.load(a_log_ptr + hv).to(tl.float32)
        dt_bias = tl.load(dt_bias_ptr + hv).to(tl.float32)
        # the first block of the state too (module docstring)
        slot = tl.load(slots_ptr + r).to(tl.int64)
        state = pool_ptr + (slot * HV + hv) * DK * DV
        h_first = tl.load(state + offs_k[:, None] * DV + (first + tl.arange(0, BV))[None, :])
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = qkv_ptr + r * stride_qkv
        q, k, decay, beta = _token_terms(row, a_ptr + r * stride_in + hv,
                                         b_ptr + r * stride_in + hv, hk, a_log, dt_bias,
                                         key_dim, scale, DK)
        v_row = row + 2 * key_dim + hv * DV
        o_row = o_ptr + r * stride_o + hv * DV
        dtype = o_ptr.dtype.element_ty
        # pass 1, per block of value columns: the rule on the state, the raw output (rounded
        # to the activations' dtype, as the unfused rule returns it) and its sum of squares
        sumsq = 0.0
        for v0 in tl.static_range(0, SPAN, BV):
            offs_v = first + v0 + tl.arange(0, BV)
            ptrs = state + offs_k[:, None] * DV + offs_v[None, :]
            h = h_first if v0 == 0 else tl.load(ptrs)
            if HAS_INIT:           # where, not a multiply: an unused slot may hold NaN
                h = tl.where(tl.load(init_ptr + r) != 0, h, 0.0)
            h = h * decay
            v = tl.load(v_row + offs_v).to(tl.float32)
            v = (v - tl.sum(h * k[:, None], 0)) * beta
            h = h + k[:, None] * v[None, :]
            tl.store(ptrs, h)
            o = tl.sum(h * q[:, None], 0).to(dtype)
            tl.store(o_row + offs_v, o)
            if NORM:
                of = o.to(tl.float32)
                sumsq += tl.sum(of * of, 0)
        if NORM:                   # SPAN == DV: the program holds the whole head
            tl.debug_barrier()     # pass 2 reads what other threads of the program wrote
            _gated_norm(o_row, z_ptr + r * stride_in + hv * DV, norm_w_ptr,
                        tl.rsqrt(sumsq / DV + eps), DV, BV)

    _gated_delta_decode_launcher = Launcher(_gated_delta_decode_kernel)


def conv_decode(x: torch.Tensor, weight: torch.Tensor, conv_state_pool: torch.Tensor,
                state_slots: torch.Tensor, has_initial_state: torch.Tensor | None
                ) -> torch.Tensor:
    """conv.py's `causal_conv1d_decode` (SiLU, no bias): x `[R, conv_dim]` (rows may be
    strided), weight `[conv_dim, kernel_size]` contiguous. Returns `[R, conv_dim]`."""
    r, d = x.shape
    w = weight.shape[1] - 1
    y = torch.empty(r, d, dtype=x.dtype, device=x.device)
    if r:
        pdl = pdl_enabled(x)
        init = has_initial_state if has_initial_state is not None else state_slots
        _conv_decode_launcher[(r, cdiv(d, CONV_BLOCK))](
            x, x.stride(0), weight, conv_state_pool, conv_state_pool.stride(0),
            conv_state_pool.stride(1), state_slots, init, y, y.stride(0), d, W=w,
            W_P2=next_power_of_2(w), HAS_INIT=has_initial_state is not None,
            BLOCK=CONV_BLOCK, USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
    return y


def gated_delta_decode(qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                       A_log: torch.Tensor, dt_bias: torch.Tensor, norm_weight: torch.Tensor,
                       eps: float, state_pool: torch.Tensor, state_slots: torch.Tensor,
                       has_initial_state: torch.Tensor | None, num_k_heads: int,
                       v_block: int = V_BLOCK, num_warps: int = 4,
                       norm: bool = True) -> torch.Tensor:
    """The rest of a GDN layer's decode before out_proj: qkv `[R, 2 * key_dim + value_dim]`
    (the conv's output), z `[R, value_dim]`, b, a `[R, num_v_heads]` (views of in_proj's
    output sharing one row stride). Returns rms_norm_gated(o, z) `[R, value_dim]`, o the
    rule's output; updates `state_pool` `[slots, num_v_heads, head_k_dim, head_v_dim]`.
    `v_block`, `num_warps`: the state's columns a pass and the warps (the probes compare).

    `norm=False` returns o itself, for a caller that applies the gated norm later (out_proj's
    prologue at one row: layers/fused_linear.py `gated_norm_linear`), and then a head's
    value columns spread over programs, `v_block` each, rather than one program walking
    them in turn: at batch 1 one program per value head leaves most SMs idle while each
    works through its passes."""
    r = qkv.shape[0]
    hv, dk, dv = state_pool.shape[1:]
    assert z.stride(0) == b.stride(0) == a.stride(0), "z, b, a: views of one projection"
    out = torch.empty(r, hv * dv, dtype=qkv.dtype, device=qkv.device)
    if r:
        pdl = pdl_enabled(qkv)
        init = has_initial_state if has_initial_state is not None else state_slots
        bv = min(v_block, dv)
        span = dv if norm else bv
        _gated_delta_decode_launcher[(r, hv, dv // span)](
            qkv, qkv.stride(0), z, b, a, z.stride(0), A_log, dt_bias, norm_weight, state_pool,
            state_slots, init, out, out.stride(0), num_k_heads * dk, hv, hv // num_k_heads,
            dk ** -0.5, eps, DK=dk, DV=dv, BV=bv, SPAN=span, NORM=norm,
            HAS_INIT=has_initial_state is not None, USE_PDL=pdl, num_warps=num_warps,
            launch_pdl=pdl)
    return out


def in_proj_conv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                 eps: float, weight: torch.Tensor, conv_weight: torch.Tensor,
                 conv_state_pool: torch.Tensor, state_slots: torch.Tensor,
                 has_initial_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-row decode's in_proj and conv in one kernel: (y, h) with h = x + residual (x
    without one), p = rms_norm(h, norm_weight, eps) @ weight.T `[1, N]` and y = p but for its
    first conv_dim = conv_weight.shape[0] columns, which are `conv_decode` of them (the conv
    state shifted in place). As `gemv(..., prologue=RMS_NORM)` then `conv_decode`."""
    n, k = weight.shape
    d, taps = conv_weight.shape
    block_n, block_k, warps = gemv.tiles(1, n, k, gemv.RMS_NORM)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    h = torch.empty_like(x)
    r = residual if residual is not None else x
    pdl = pdl_enabled(x)
    init = has_initial_state if has_initial_state is not None else state_slots
    _in_proj_conv_launcher[(cdiv(n, block_n),)](
        x, weight, y, r, h, norm_weight, n, k, x.stride(0), weight.stride(0), r.stride(0),
        h.stride(0), eps, conv_weight, conv_state_pool, conv_state_pool.stride(0),
        conv_state_pool.stride(1), state_slots, init, d, HAS_RES=residual is not None,
        NORM_F32=norm_f32(norm_weight, x), BLOCK_N=block_n, BLOCK_K=block_k,
        ONE_SLICE=block_k >= k, W=taps - 1, W_P2=next_power_of_2(taps - 1),
        HAS_INIT=has_initial_state is not None, USE_PDL=pdl, num_warps=warps, launch_pdl=pdl)
    return y, h
