"""The batch-invariant mode's matmul on the GPU: `x [M, K] @ w [N, K].T` where a row's bits
depend on that row and the weight only, whatever M is.

The normal mode picks its kernel from the row count (layers/gemv.py: a broadcast-sum at one
row, a tensor-core dot up to 32 rows, cuBLAS above, whose kernel and split-K follow M), so a
token's projections change in the last bits with the batch around it. Here every M runs one
kernel: a program owns a [BLOCK_M, BLOCK_N] tile of the output and accumulates `tl.dot` over
K in order, in float32, with no split-K and no one-row broadcast-sum. A row's output is the
dot products of its own input row with the weight's rows, accumulated 16 products at a time
in K order; rows past M are masked zeros, and `M` is not specialized.

What is pinned is that order, not the tile shape. The probe
(benchmarks/probes/invariant_matmul.py; its run is in docs/benchmarks.md) found that for
each of Qwen3-0.6B's projections and its LM head, BLOCK_M 16-128 (mma and wgmma), BLOCK_N
32-256, BLOCK_K 32-256, 4 or 8 warps and 2-4 stages all give a row the same bits (so does
cuBLAS at 257 rows, which is not relied on: its split-K and kernel follow M). So `tiles`
picks the tile shape from the row count for speed, as the normal mode does, and the GPU tests
(test_gpu_batch_invariant.py) check rows across the buckets bit for bit. With PDL
(layers/pdl.py) the kernel launches while the one before it finishes and waits for it
before any load.

For a few rows (`FOLD_ROWS`) the op that feeds a projection runs in its x loads, with
its row kernel's arithmetic: SiLU-and-mul for the down projection (layers/fused_linear.py
`_silu_mul_rows`), the residual add and RMSNorm for qkv and gate_up (layers/norm.py, the
mode's ordered sum of squares over the whole row first, then the scaled tiles). A tile then
holds the bits that kernel would have stored, so folding or not is a speed choice by row
count like the tile shape, and a decode step saves three launches a layer.
"""
from __future__ import annotations

import torch

from fullgraph.layers.launch import Launcher, cdiv
from fullgraph.layers.norm import norm_f32
from fullgraph.layers.pdl import pdl_enabled

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: the mode's CPU path is layers/linear.py's
    triton = None
else:
    from fullgraph.layers.activation import silu_mul
    from fullgraph.layers.norm import norm_output, ordered_sum_squares


def tiles(m: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for M rows: narrow output strips
    and long K slices for a few rows (many programs stream the weight, as layers/gemv.py's
    tensor-core path), GEMM tiles for many."""
    if m <= 16:
        return 16, 16, 256, 2, 3
    if m <= 32:
        return 32, 16, 256, 2, 3
    if m <= 256:
        return 64, 64, 64, 4, 3
    return 128, 128, 64, 8, 3


# The most rows at which each op runs in the matmul's x loads: the fewest-row tile's, where
# the weight's stream bounds the kernel and a launch saved counts (compiled for sm_90, the
# 32-row tile would spill with SiLU-and-mul); above, every x tile would be transformed once
# per output strip, so the row kernel runs first. Per op, so each can be timed alone
# (benchmarks/device_round.sh invariant-fold-ab).
FOLD_ROWS = {"norm": 16, "silu_mul": 16}


def folds_prologue(m: int, op: str) -> bool:
    """Whether `op` ("norm", "silu_mul") runs in the matmul's x loads for M rows."""
    return m <= FOLD_ROWS[op]


if triton is not None:
    @triton.jit(do_not_specialize=["M"])
    def _invariant_mm_kernel(x_ptr, w_ptr, y_ptr, r_ptr, h_ptr, nw_ptr, M, N, K, stride_xm,
                             stride_wn, stride_ym, stride_rm, stride_hm, eps,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                             SILU_MUL: tl.constexpr, NORM: tl.constexpr,
                             HAS_RES: tl.constexpr, NORM_F32: tl.constexpr,
                             USE_PDL: tl.constexpr):
        if USE_PDL:                    # nothing is loaded before the previous kernel is done
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # N tiles vary fastest, so the programs that share an x tile run together
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        if NORM:          # h = x + r: its rows' statistics, h stored by the first strip
            if HAS_RES:
                ss = ordered_sum_squares(x_ptr, r_ptr, h_ptr, offs_m, mask_m, K, stride_xm,
                                         stride_rm, stride_hm, pid_n == 0, True, BLOCK_M, 0)
            else:
                ss = ordered_sum_squares(x_ptr, r_ptr, h_ptr, offs_m, mask_m, K, stride_xm,
                                         stride_rm, stride_hm, False, False, BLOCK_M, 0)
            rstd = tl.rsqrt(ss / K + eps)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x_at = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
            mask_x = mask_m[:, None] & mask_k[None, :]
            x = tl.load(x_at, mask=mask_x, other=0.0)
            if SILU_MUL:               # x_ptr rows are [gate | up], K wide each
                u = tl.load(x_at + K, mask=mask_x, other=0.0).to(tl.float32)
                x = silu_mul(x.to(tl.float32), u).to(x_ptr.dtype.element_ty)
            if NORM:
                if HAS_RES:
                    x = x + tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_k[None, :],
                                    mask=mask_x, other=0.0)
                nw = tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0)
                x = norm_output(x.to(tl.float32), rstd[:, None], nw[None, :], NORM_F32,
                                x_ptr.dtype.element_ty)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    _invariant_mm_launcher = Launcher(_invariant_mm_kernel)


def invariant_mm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
                 tile_shape: tuple[int, ...] | None = None, silu_mul: bool = False,
                 norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                 residual: torch.Tensor | None = None, h: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """x [M, K] @ w [N, K].T into `out` ([M, N], x's dtype; allocated when None).
    `tile_shape` overrides `tiles(M)` (the probes). `silu_mul`: x is [M, 2K], gate then up,
    and the product is silu(gate) * up @ w.T. `norm_weight` (an RMSNorm's `kernel_weight`):
    the product is RMSNorm(x + residual) @ w.T, and x + residual is stored into `h` when
    there is a residual (module docstring)."""
    if triton is None or x.dtype != w.dtype or x.dtype not in (torch.bfloat16, torch.float16,
                                                                 torch.float32):
        raise ValueError(f"the batch-invariant matmul needs Triton and one of bfloat16, "
                         f"float16, float32 for both operands (got {x.dtype} @ {w.dtype})")
    x, w = x if x.stride(-1) == 1 else x.contiguous(), w if w.stride(-1) == 1 else w.contiguous()
    m, k = x.shape
    n = w.shape[0]
    if silu_mul:
        k //= 2
    if k != w.shape[1]:
        raise ValueError(f"the batch-invariant matmul's x rows hold {k} columns"
                         f"{' a half (gate, up)' if silu_mul else ''}, the weight's rows "
                         f"{w.shape[1]}")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    norm = norm_weight is not None
    r = residual if residual is not None else x
    if residual is not None and (h is None or r.stride(-1) != 1 or h.stride(-1) != 1):
        raise ValueError("the batch-invariant matmul's norm prologue stores x + residual "
                         "into h: both contiguous by row")
    h = h if h is not None else x
    if m:
        block_m, block_n, block_k, warps, stages = tile_shape or tiles(m)
        grid = (cdiv(n, block_n), cdiv(m, block_m))
        pdl = pdl_enabled(x)
        _invariant_mm_launcher[grid](
            x, w, out, r, h, norm_weight if norm else w, m, n, k, x.stride(0), w.stride(0),
            out.stride(0), r.stride(0), h.stride(0), eps, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, IEEE=x.dtype == torch.float32, SILU_MUL=silu_mul, NORM=norm,
            HAS_RES=residual is not None, NORM_F32=norm and norm_f32(norm_weight, x),
            USE_PDL=pdl, num_warps=warps, num_stages=stages,
            launch_pdl=pdl)
    return out
