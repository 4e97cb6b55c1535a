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
"""
from __future__ import annotations

import torch

from fullgraph.layers.launch import Launcher, cdiv
from fullgraph.layers.pdl import pdl_enabled

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: the mode's CPU path is layers/linear.py's
    triton = None


# K from which a projection counts as wide (Qwen3-0.6B's o_proj 2048, down 3072): its N is
# the hidden size, narrow, so the row-count tiles below leave most SMs idle.
WIDE_K = 2048


def tiles(m: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for M rows of K columns: narrow
    output strips and long K slices for a few rows (many programs stream the weight, as
    layers/gemv.py's tensor-core path), GEMM tiles for many. A wide K (`WIDE_K`) goes with a
    narrow N, so its tiles are narrower in N and longer in K, giving it more programs
    (benchmarks/probes/invariant_matmul.py --sweep-rows; docs/benchmarks.md)."""
    wide = k >= WIDE_K
    if m <= 16:
        return 16, 16, 512 if wide else 256, 2, 3
    if m <= 32:
        return (32, 16, 512, 4, 3) if wide else (32, 16, 256, 2, 3)
    if m <= 256:
        return (64, 16, 256, 4, 4) if wide else (64, 64, 64, 4, 3)
    if m <= 512 and wide:
        return 64, 128, 128, 8, 3
    return 128, 128, 64, 8, 3


if triton is not None:
    @triton.jit(do_not_specialize=["M"])
    def _invariant_mm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
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
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
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
                 tile_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K].T into `out` ([M, N], x's dtype; allocated when None).
    `tile_shape` overrides `tiles(M, K)` (the probes)."""
    if triton is None or x.dtype != w.dtype or x.dtype not in (torch.bfloat16, torch.float16,
                                                                 torch.float32):
        raise ValueError(f"the batch-invariant matmul needs Triton and one of bfloat16, "
                         f"float16, float32 for both operands (got {x.dtype} @ {w.dtype})")
    x, w = x if x.stride(-1) == 1 else x.contiguous(), w if w.stride(-1) == 1 else w.contiguous()
    m, k = x.shape
    n = w.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block_m, block_n, block_k, warps, stages = tile_shape or tiles(m, k)
        grid = (cdiv(n, block_n), cdiv(m, block_m))
        pdl = pdl_enabled(x)
        _invariant_mm_launcher[grid](
            x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            IEEE=x.dtype == torch.float32, USE_PDL=pdl, num_warps=warps, num_stages=stages,
            launch_pdl=pdl)
    return out
