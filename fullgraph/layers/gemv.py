"""Skinny matmuls for decode: `x [M, K] @ w[N, K].T` for a few rows, in Triton.

At M=1 cuBLAS on Hopper picks tiles 64 outputs wide and no split, so Qwen3-0.6B's qkv
projection (N=4096) runs on 64 of 132 SMs: 11.5 µs for 8 MB on an H200, 0.7 TB/s. This
kernel gives every program a narrow strip of output columns, so the weight streams through
all SMs once. One program reads its strip of `w` in `BLOCK_K` slices and multiplies it with
every row of `x` (M <= 16: a broadcast-sum for one row, a tensor-core dot otherwise).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: the op falls back to F.linear
    triton = None

GEMV_MAX_ROWS = 16


if triton is not None:
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                     M_BUCKET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        if M_BUCKET == 1:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                            mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0)
                acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
            tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)
        else:
            offs_m = tl.arange(0, M_BUCKET)
            mask_m = offs_m < M
            acc = tl.zeros((M_BUCKET, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                            mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                acc += tl.dot(x, tl.trans(w))
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                     acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemv_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (triton is not None and x.is_cuda and x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS
            and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype
            and w.stride(1) == 1 and x.stride(1) == 1)


def _config(m_bucket: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): the fastest tiles measured on an H200 for Qwen3-0.6B's
    shapes (benchmarks/probes/gemv.py, gemv_tiles.py), as a rule. Fixed rather than
    autotuned: tuning every shape at start-up cost ~40 s of graph capture. One row: few
    outputs per program (many programs) and long K slices. At 32-64 rows the kernel only
    matches cuBLAS (same probe), hence GEMV_MAX_ROWS = 16."""
    if m_bucket == 1:
        if n >= 32768:
            return 16, 512, 4
        return (1, 1024, 2) if n <= 2048 else (2, 1024, 4)
    return (32 if n >= 32768 else 16), 256, 2


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] with M <= GEMV_MAX_ROWS, w: [N, K] -> [M, N] (fp32 accumulation)."""
    m, k = x.shape
    n = w.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bucket = 1 if m == 1 else 16       # tl.dot needs 16 rows: the rest are masked loads
    block_n, block_k, warps = _config(bucket, n, k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
        M_BUCKET=bucket, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out
