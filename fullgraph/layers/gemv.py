"""Skinny matmuls for decode: `x [M, K] @ w[N, K].T` for a few rows, in Triton.

At M=1 cuBLAS on Hopper picks tiles 64 outputs wide and no split, so Qwen3-0.6B's qkv
projection (N=4096) runs on 64 of 132 SMs: 11.5 µs for 8 MB on an H200, 0.7 TB/s. This
kernel gives every program a narrow strip of output columns, so the weight streams through
all SMs once. One program reads its strip of `w` in `BLOCK_K` slices and multiplies it with
every row of `x` (M <= 32: a broadcast-sum for one row, a tensor-core dot otherwise).
Optionally it first applies the elementwise op that produced its input (RMSNorm with the
residual add, SiLU-and-mul) to each slice it loads, saving that op's launch
(layers/fused_linear.py). With PDL (layers/pdl.py) the first weight slice is in flight
before the kernel waits for the one that produced x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fullgraph.layers import l2_prefetch
from fullgraph.layers.norm import norm_f32
from fullgraph.layers.launch import Launcher, cdiv, next_power_of_2
from fullgraph.layers.pdl import pdl_enabled

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: the op falls back to F.linear
    triton = None
else:
    from fullgraph.layers.activation import silu_mul

GEMV_MAX_ROWS = 32


# What the kernel does to its input rows before the product (see `gemv`).
PLAIN, SILU_MUL, RMS_NORM, GATED_NORM, SIGMOID_GATE = 0, 1, 2, 3, 4


if triton is not None:
    _SILU_MUL, _RMS_NORM = tl.constexpr(SILU_MUL), tl.constexpr(RMS_NORM)   # for jit code
    _GATED_NORM, _SIGMOID_GATE = tl.constexpr(GATED_NORM), tl.constexpr(SIGMOID_GATE)

    @triton.jit
    def _prologue_rows(x_ptr, r_ptr, offs_m, offs_k, mask, stride_xm, stride_rm, K,
                       PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr):
        """One [rows, BLOCK_K] slice of the matmul's input: x, silu(gate) * up, or x + r."""
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
        if PROLOGUE == _SILU_MUL:      # x is [gate | up]; one rounding, as inductor fuses it
            u = tl.load(x_ptr + offs_m[:, None] * stride_xm + K + offs_k[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            x = silu_mul(x.to(tl.float32), u).to(x.dtype)
        elif PROLOGUE == _RMS_NORM and HAS_RES:
            x = x + tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_k[None, :], mask=mask,
                            other=0.0)
        return x

    @triton.jit
    def _gated_norm_rows(x, z_ptr, nw_ptr, offs_m, offs_k, mask, stride_zm, eps,
                         ROWS: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
        """rms_norm(x) * w * silu(z) per group of GROUP elements (a value head; the slice
        holds whole groups), with layers/gdn/fused_decode.py's `_gated_norm` roundings."""
        dtype = x.dtype
        xf = tl.reshape(x.to(tl.float32), (ROWS, BLOCK_K // GROUP, GROUP))
        rstd = tl.rsqrt(tl.sum(xf * xf, 2) / GROUP + eps)
        normed = tl.reshape(xf * rstd[:, :, None], (ROWS, BLOCK_K)).to(dtype).to(tl.float32)
        w = tl.load(nw_ptr + offs_k % GROUP).to(tl.float32)
        n = (w[None, :] * normed).to(dtype).to(tl.float32)
        z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_k[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        return (n * (z / (1.0 + tl.exp(-z)))).to(dtype)

    @triton.jit
    def _sigmoid_gate_rows(x, g_ptr, offs_m, offs_k, mask, stride_gm, GROUP: tl.constexpr):
        """x * sigmoid(gate), the gates of GROUP-element heads interleaved with another
        GROUP elements each in g's rows ([other | gate] per head, a gated attention's q
        projection), with layers/gated_attention.py's `sigmoid_gate` roundings."""
        cols = (offs_k // GROUP) * (2 * GROUP) + GROUP + offs_k % GROUP
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        gate = tl.sigmoid(g).to(x.dtype).to(tl.float32)
        return (x.to(tl.float32) * gate).to(x.dtype)

    @triton.jit
    def gemv_acc(pid, x_ptr, w_ptr, r_ptr, h_ptr, nw_ptr, pa_ptr, pa_bytes, pb_ptr, pb_bytes,
                 M, N, K, stride_xm, stride_wn, stride_rm, stride_hm, eps,
                 PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, NORM_F32: tl.constexpr,
                 M_BUCKET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NUM_L2: tl.constexpr, L2_LINES: tl.constexpr, ONE_SLICE: tl.constexpr,
                 USE_PDL: tl.constexpr, GROUP: tl.constexpr):
        """Program `pid`'s float32 products, [BLOCK_N] for one row, else [M_BUCKET, BLOCK_N]
        (the kernel below; with PDL, the wait for the previous kernel is in here)."""
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_m = tl.arange(0, M_BUCKET)
        mask_m = offs_m < M
        w_rows = w_ptr + offs_n[:, None] * stride_wn
        # With PDL a single row's first weight slice (no kernel writes the weight) is loaded
        # while the previous kernel finishes. Not for the tensor-core path: carrying the
        # slice across iterations cost it 20-80% (probes/gemv.py, H100).
        PREFETCH: tl.constexpr = USE_PDL and M_BUCKET == 1
        if PREFETCH:
            offs_k = tl.arange(0, BLOCK_K)
            w_next = tl.load(w_rows + offs_k[None, :],
                             mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)
        # Later kernels' weights into L2 (layers/l2_prefetch.py), shared over the programs.
        if NUM_L2 > 0:
            l2_prefetch.prefetch_l2(pa_ptr, pa_bytes, pid, tl.num_programs(0), L2_LINES)
        if NUM_L2 > 1:
            l2_prefetch.prefetch_l2(pb_ptr, pb_bytes, pid, tl.num_programs(0), L2_LINES)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if PROLOGUE == _RMS_NORM:      # every program needs its rows' statistics first
            sumsq = tl.zeros((M_BUCKET,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask = mask_m[:, None] & (offs_k < K)[None, :]
                h = _prologue_rows(x_ptr, r_ptr, offs_m, offs_k, mask, stride_xm, stride_rm, K,
                                   PROLOGUE, HAS_RES).to(tl.float32)
                sumsq += tl.sum(h * h, axis=1)
            rstd = tl.rsqrt(sumsq / K + eps)[:, None]
        if M_BUCKET == 1:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        else:
            acc = tl.zeros((M_BUCKET, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            mask = mask_m[:, None] & mask_k[None, :]
            if PREFETCH:               # the slice loaded one iteration ahead
                w = w_next
                if not ONE_SLICE:      # else there is no next slice: no registers for it
                    w_next = tl.load(w_rows + (offs_k + BLOCK_K)[None, :],
                                     mask=mask_n[:, None] & (offs_k + BLOCK_K < K)[None, :],
                                     other=0.0)
            else:
                w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                            other=0.0)
            x = _prologue_rows(x_ptr, r_ptr, offs_m, offs_k, mask, stride_xm, stride_rm, K,
                               PROLOGUE, HAS_RES)
            if PROLOGUE == _GATED_NORM:
                x = _gated_norm_rows(x, r_ptr, nw_ptr, offs_m, offs_k, mask, stride_rm, eps,
                                     M_BUCKET, BLOCK_K, GROUP)
            if PROLOGUE == _SIGMOID_GATE:
                x = _sigmoid_gate_rows(x, r_ptr, offs_m, offs_k, mask, stride_rm, GROUP)
            if PROLOGUE == _RMS_NORM:  # rms_norm's roundings; program 0 keeps x + r
                # a branch, not `mask & (pid == 0)`: Triton 3.9's interpreter refuses that mask
                if pid == 0:
                    tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :], x, mask=mask)
                nw = tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0)
                if NORM_F32:       # zero-centered (layers/norm.py): scaled in float32
                    x = (x.to(tl.float32) * rstd * nw[None, :]).to(x.dtype)
                else:
                    x = (nw[None, :] * (x.to(tl.float32) * rstd).to(x.dtype)).to(x.dtype)
            if M_BUCKET == 1:
                acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)
            else:
                acc += tl.dot(x, tl.trans(w))
        return acc

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, r_ptr, h_ptr, nw_ptr, pa_ptr, pa_bytes, pb_ptr,
                     pb_bytes, M, N, K, stride_xm, stride_wn, stride_ym, stride_rm, stride_hm,
                     eps, PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, NORM_F32: tl.constexpr,
                     M_BUCKET: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_L2: tl.constexpr,
                     L2_LINES: tl.constexpr, ONE_SLICE: tl.constexpr, USE_PDL: tl.constexpr,
                     GROUP: tl.constexpr = 1):
        pid = tl.program_id(0)
        acc = gemv_acc(pid, x_ptr, w_ptr, r_ptr, h_ptr, nw_ptr, pa_ptr, pa_bytes, pb_ptr,
                       pb_bytes, M, N, K, stride_xm, stride_wn, stride_rm, stride_hm, eps,
                       PROLOGUE, HAS_RES, NORM_F32, M_BUCKET, BLOCK_N, BLOCK_K, NUM_L2,
                       L2_LINES, ONE_SLICE, USE_PDL, GROUP)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_m = tl.arange(0, M_BUCKET)
        mask_m = offs_m < M
        if M_BUCKET == 1:
            tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)
        else:
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                     acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    _gemv_launcher = Launcher(_gemv_kernel)


def row_bucket(m: int) -> int:
    """Rows the kernel is compiled for: tl.dot needs 16; the rest are masked loads."""
    return 1 if m == 1 else 16 if m <= 16 else 32


def gemv_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (triton is not None and x.is_cuda and x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS
            and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype
            and w.stride(1) == 1 and x.stride(1) == 1)


def tiles(m_bucket: int, n: int, k: int, prologue: int = PLAIN) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): the fastest tiles measured on an H200 for Qwen3-0.6B's
    shapes (benchmarks/probes/gemv.py, gemv_tiles.py), then in the model on an H100
    (benchmarks/probes/decode_variants.py), as a rule. Fixed rather than
    autotuned: tuning every shape at start-up cost ~40 s of graph capture. One row: few
    outputs per program (many programs) and long K slices; with a prologue, which every
    program repeats over the whole row, a few more outputs per program. Up to 32 rows: with
    PDL the kernel beats cuBLAS there (probes/gemv.py); without PDL it only matched cuBLAS
    at 32-64 rows. The configurations' figures: docs/benchmarks.md, "Tuning figures from
    code comments"."""
    if m_bucket == 1:
        if prologue == RMS_NORM:
            # qkv, gate_up. Where the row fits one slice (no next slice held in registers),
            # 2 warps: 168 registers a thread (ptxas, sm_90a), 6 programs an SM where 4
            # warps fit 5 (docs/benchmarks.md, "Tuning figures from code comments")
            return 8, 1024, (2 if k <= 1024 else 4)
        if prologue == SILU_MUL:
            # down: its whole weight strip in one slice where it fits, which the PDL prefetch
            # loads before the wait
            return 8, min(4096, next_power_of_2(k)), 8
        if n >= 32768:
            return 16, 512, 4
        if n <= 2048 and k >= 2048:
            # o_proj likewise: long slices
            return 1, 2048, 8
        return (1, 1024, 2) if n <= 2048 else (2, 1024, 4)
    return (32 if n >= 32768 else 16), 256, 2


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None, *,
         prologue: int = PLAIN, residual: torch.Tensor | None = None,
         norm_weight: torch.Tensor | None = None, eps: float = 0.0,
         residual_out: torch.Tensor | None = None, group: int = 1,
         l2_prefetch_next: tuple[torch.Tensor, ...] | list[torch.Tensor] = ()) -> torch.Tensor:
    """x: [M, K] with M <= GEMV_MAX_ROWS, w: [N, K] -> [M, N] (fp32 accumulation).

    Prologues (measured faster than a separate kernel at one row only; at 16 rows the
    tensor-core path with a SiLU prologue ran 4x slower: gemv_tiles.py --prologue):
    prologue SILU_MUL: x is [M, 2K] = [gate | up] and the product is silu(gate) * up @ w.T.
    prologue RMS_NORM: the product is rms_norm(x + residual, norm_weight, eps) @ w.T (a
    float32 norm_weight: the zero-centered convention, `norm_f32`), and
    x + residual (x alone without a residual) is written to `residual_out` [M, K].
    prologue GATED_NORM: the product is gated_norm(x) @ w.T, per group of `group` columns
    (a GDN value head) rms_norm(x) * norm_weight [group] * silu(residual), residual [M, K]
    the gate; one row only, where `gated_norm_fits`.
    prologue SIGMOID_GATE: the product is (x * sigmoid(gate)) @ w.T, the gates in residual's
    rows as [q | gate] per head of `group` elements (a gated attention's qkv); one row only.
    `l2_prefetch_next`: weights of later kernels (at most two), prefetched into L2 by this
    one's programs before it waits for its input (layers/l2_prefetch.py); one row only.
    """
    m = x.shape[0]
    n, k = w.shape
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bucket = row_bucket(m)
    block_n, block_k, warps = tiles(bucket, n, k, prologue)
    pdl = pdl_enabled(x)
    r = residual if residual is not None else x
    h = residual_out if residual_out is not None else out
    # one row only: at 8 and 32 rows the hint cost 4% and 3% of a decode step (H100)
    l2_args, num_l2 = l2_prefetch.regions(l2_prefetch_next if bucket == 1 else (), w)
    _gemv_launcher[(cdiv(n, block_n),)](
        x, w, out, r, h, norm_weight if norm_weight is not None else w, *l2_args, m, n, k,
        x.stride(0), w.stride(0), out.stride(0), r.stride(0), h.stride(0), eps,
        PROLOGUE=prologue, HAS_RES=residual is not None,
        NORM_F32=norm_weight is not None and norm_f32(norm_weight, x), M_BUCKET=bucket,
        BLOCK_N=block_n,
        BLOCK_K=block_k, NUM_L2=num_l2, L2_LINES=32 * warps, ONE_SLICE=block_k >= k,
        USE_PDL=pdl, GROUP=group, num_warps=warps, launch_pdl=pdl)
    return out


def gated_norm_fits(w: torch.Tensor, group: int) -> bool:
    """Whether the GATED_NORM prologue can run for w: every K slice of the one-row tiles
    holds whole groups."""
    n, k = w.shape
    return k % group == 0 and tiles(1, n, k, GATED_NORM)[1] % group == 0


def matmul(x: torch.Tensor, w: torch.Tensor,
           l2_prefetch_next: tuple[torch.Tensor, ...] | list[torch.Tensor] = ()) -> torch.Tensor:
    """x @ w.T: this kernel for skinny bf16/fp16 inputs on the GPU, cuBLAS (or CPU) otherwise
    (where the prefetch hint is dropped)."""
    if gemv_supported(x, w):
        return gemv(x, w, l2_prefetch_next=l2_prefetch_next)
    return F.linear(x, w)
