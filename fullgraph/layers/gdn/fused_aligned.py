"""The batch-invariant mode's Gated DeltaNet on the GPU: aligned.py's rule (chunks at absolute
multiples of the chunk size, from each slot's committed state and tail) as one Triton kernel,
and the gated output norm as a row kernel.

`aligned_rule`: a program per (lane, value head, block of value columns) walks the lane's
chunks in order. A chunk's rows come from the lane's tail and the step's rows through the
same tables aligned.py builds (rows past the lane's end are the zero row: a no-op token);
the chunk runs reference.py's chunk math (transformers' chunked rule) in float32, the
triangular system solved by forward substitution row by row, and the state is replaced after
complete chunks only. Every chunk, a decode step's one-row-plus-tail chunk as a prefill's
full one, runs the same instructions on a [chunk, ...] tile: a row's terms involve the rows
before it only, and later rows enter its sums as exact zeros (their k, v, beta are 0 and the
triangular factors vanish above the diagonal), so its bits depend neither on the step's cut
nor on the other lanes (docs/batch_invariance.md, 6.7). The tails are aligned.py's torch
data movement, around the kernel.

`gated_norm_rows`: layers/gdn/gating.py's `rms_norm_gated`, one program a (token, head) row,
where torch's reductions choose their launch shape from the row count.
"""
from __future__ import annotations

import torch

from fullgraph.layers.launch import Launcher

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: aligned.py's torch path
    triton = None

V_BLOCK = 32                   # value columns per program (the state block in registers)


def supported(q: torch.Tensor, head_k_dim: int, head_v_dim: int) -> bool:
    pow2 = all(d >= 16 and d & (d - 1) == 0 for d in (head_k_dim, head_v_dim))
    return triton is not None and q.is_cuda and pow2


if triton is not None:
    from fullgraph.layers.gdn.fused_decode import _gated_norm

    @triton.jit
    def _l2norm_rows(x):
        return x * tl.rsqrt(tl.sum(x * x, 1) + 1e-6)[:, None]

    @triton.jit
    def _aligned_rule_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, stride_q, stride_k, stride_v,
                             stride_g, stride_beta, first_ptr, n_tail_ptr, total_ptr, slots_ptr,
                             init_ptr, write_ptr, stride_w, pool_ptr, out_ptr, stride_out,
                             num_rows, HV, heads_per_key, scale, C: tl.constexpr,
                             TAIL: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                             BV: tl.constexpr, M: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        hv = tl.program_id(1)
        offs_v = tl.program_id(2) * BV + tl.arange(0, BV)
        hk = hv // heads_per_key
        p = tl.arange(0, C)
        d = tl.arange(0, DK)
        first = tl.load(first_ptr + r).to(tl.int64)       # the lane's first step row
        n_tail = tl.load(n_tail_ptr + r)
        total = tl.load(total_ptr + r)
        slot = tl.load(slots_ptr + r).to(tl.int64)
        block = d[:, None] * DV + offs_v[None, :]
        s = tl.load(pool_ptr + (slot * HV + hv) * DK * DV + block)
        s = tl.where(tl.load(init_ptr + r) != 0, s, 0.0)  # where: an unused slot may hold NaN
        s_initial = s
        s_first = s                                        # after the lane's first chunk
        eye = (p[:, None] == p[None, :]).to(tl.float32)
        lower = p[:, None] >= p[None, :]
        for c in range(0, tl.cdiv(total, C)):
            pos = c * C + p                                # from the lane's boundary
            real = pos < total
            # table rows: the step's rows, then every lane's TAIL tail rows (aligned.py)
            row = tl.where(pos < n_tail, num_rows + r * TAIL + pos, first + pos - n_tail)
            row = tl.where(real, row, 0).to(tl.int64)       # past the end: masked loads, 0
            q = tl.load(q_ptr + row[:, None] * stride_q + hk * DK + d[None, :],
                        mask=real[:, None], other=0.0).to(tl.float32)
            k = tl.load(k_ptr + row[:, None] * stride_k + hk * DK + d[None, :],
                        mask=real[:, None], other=0.0).to(tl.float32)
            v = tl.load(v_ptr + row[:, None] * stride_v + hv * DV + offs_v[None, :],
                        mask=real[:, None], other=0.0).to(tl.float32)
            g = tl.load(g_ptr + row * stride_g + hv, mask=real, other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + row * stride_beta + hv, mask=real,
                           other=0.0).to(tl.float32)
            q = _l2norm_rows(q) * scale
            k = _l2norm_rows(k)
            gc = tl.cumsum(g, 0)
            pairwise = tl.where(lower, tl.exp(gc[:, None] - gc[None, :]), 0.0)
            k_beta = k * beta[:, None]
            ut = tl.dot(k_beta, tl.trans(k), input_precision="ieee") * pairwise
            intra = tl.dot(q, tl.trans(k), input_precision="ieee") * pairwise
            low = tl.where(p[:, None] > p[None, :], ut, 0.0)
            # (I + low)^-1 by forward substitution: row i = e_i - sum_{j<i} low_ij row_j
            inv = eye
            for i in range(1, C):
                low_i = tl.sum(tl.where(p[:, None] == i, low, 0.0), 0)
                inv_i = tl.where(p == i, 1.0, 0.0) - tl.sum(low_i[:, None] * inv, 0)
                inv = tl.where(p[:, None] == i, inv_i[None, :], inv)
            new_values = tl.dot(inv, v * beta[:, None], input_precision="ieee")
            k_cumdecay = tl.dot(inv, k_beta * tl.exp(gc)[:, None], input_precision="ieee")
            g_last = tl.sum(tl.where(p == C - 1, gc, 0.0), 0)
            v_new = new_values - tl.dot(k_cumdecay, s, input_precision="ieee")
            o = (tl.dot(q * tl.exp(gc)[:, None], s, input_precision="ieee")
                 + tl.dot(intra, v_new, input_precision="ieee"))
            key = k * tl.exp(g_last - gc)[:, None]
            s_new = s * tl.exp(g_last) + tl.dot(tl.trans(key), v_new, input_precision="ieee")
            s = tl.where((c + 1) * C <= total, s_new, s)   # commit complete chunks only
            s_first = tl.where(c == 0, s_new, s_first)
            mine = real & (pos >= n_tail)                  # this step's rows
            step_row = (first + pos - n_tail).to(tl.int64)
            tl.store(out_ptr + step_row[:, None] * stride_out + hv * DV + offs_v[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=mine[:, None])
        if M == 0:
            tl.store(pool_ptr + (slot * HV + hv) * DK * DV + block, s)
        else:
            # speculative decoding (state.py): slot j < M - 1 of the lane's group gets the
            # state committed after its row min(j, L - 1), which crossed at most the first
            # boundary; slot M - 1 the state after its last row
            for j in tl.static_range(M):
                dest = tl.load(write_ptr + r * stride_w + j).to(tl.int64)
                kept = n_tail + tl.minimum(total - n_tail, j + 1)
                committed = tl.where(kept >= C, s_first, s_initial)
                if j == M - 1:
                    committed = s
                tl.store(pool_ptr + (dest * HV + hv) * DK * DV + block, committed)

    _aligned_rule_launcher = Launcher(_aligned_rule_kernel)

    @triton.jit
    def _gated_norm_rows_kernel(x_ptr, stride_x, z_ptr, stride_z, w_ptr, out_ptr, stride_out,
                                eps, DV: tl.constexpr, BV: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs = tl.arange(0, DV)
        x = tl.load(x_ptr + t * stride_x + h * DV + offs).to(tl.float32)
        out_row = out_ptr + t * stride_out + h * DV
        tl.store(out_row + offs, x.to(out_ptr.dtype.element_ty))
        tl.debug_barrier()         # _gated_norm reads what other threads wrote
        _gated_norm(out_row, z_ptr + t * stride_z + h * DV, w_ptr,
                    tl.rsqrt(tl.sum(x * x, 0) / DV + eps), DV, BV)

    _gated_norm_rows_launcher = Launcher(_gated_norm_rows_kernel)


def aligned_rule(tables: list[torch.Tensor], num_rows: int, first: torch.Tensor,
                 n_tail: torch.Tensor, total: torch.Tensor, slots: torch.Tensor,
                 has_initial_state: torch.Tensor, state_pool: torch.Tensor, chunk: int,
                 out: torch.Tensor, write_slots: torch.Tensor | None = None) -> None:
    """aligned.py's rule on its `tables` (q, k `[rows, HK, DK]`, v `[rows, HV, DV]`, g, beta
    `[rows, HV]`: the step's `num_rows` rows, every lane's `chunk - 1` tail rows, the zero
    row); per lane its first step row, tail length and row count from its boundary. Writes
    the step's rows of `out` `[num_rows, HV, DV]` and the lanes' committed states (to the
    columns of `write_slots` `[R, m]` where given, as aligned.py does)."""
    q, k, v, g, beta = tables
    r = slots.shape[0]
    hv, dk, dv = state_pool.shape[1:]
    bv = min(V_BLOCK, dv)
    if r:
        _aligned_rule_launcher[(r, hv, dv // bv)](
            q, k, v, g, beta, q.stride(0), k.stride(0), v.stride(0), g.stride(0),
            beta.stride(0), first, n_tail, total, slots, has_initial_state,
            write_slots if write_slots is not None else slots,
            write_slots.stride(0) if write_slots is not None else 0, state_pool, out,
            out.stride(0), num_rows, hv, hv // q.shape[1], dk ** -0.5, C=chunk,
            TAIL=chunk - 1, DK=dk, DV=dv, BV=bv,
            M=write_slots.shape[1] if write_slots is not None else 0, num_warps=8)


def gated_norm_rows(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """gating.py's `rms_norm_gated` of x, gate `[T, H, DV]` (rows may be strided)."""
    t, h, dv = x.shape
    assert x.stride(1) == gate.stride(1) == dv and x.stride(2) == gate.stride(2) == 1
    out = torch.empty(t, h, dv, dtype=x.dtype, device=x.device)
    if t:
        _gated_norm_rows_launcher[(t, h)](x, x.stride(0), gate, gate.stride(0), weight, out,
                                          out.stride(0), eps, DV=dv, BV=min(V_BLOCK, dv),
                                          num_warps=4)
    return out
