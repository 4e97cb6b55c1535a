"""RMSNorm, optionally fused with the residual add that precedes it, in the two conventions of
the models we run: Qwen3's (the weight applied in the activations' dtype) and the zero-centered
one of Qwen3.5 / Qwen3-Next (scaled by 1 + weight in float32). The kernels (the row kernel
here, `rms_norm_rows`, and the fused ones of layers/fused_linear.py, gemv.py) take
`kernel_weight`: the weight itself, or the float32 1 + weight, which tells them to scale in
float32 before the cast. On the GPU the modules run the row kernel in half precision and,
in any dtype, in the batch-invariant mode (layers/policy.py).

In that mode a row's sum of squares has one order that any kernel can repeat, whatever its
tile layout (`tl.sum`'s order follows the layout): 64 lanes, each adding its elements'
squares chunk after chunk with one fused multiply-add, then the lanes added in adjacent
pairs, level by level (`ordered_sum_squares`). Every step is one IEEE rounding of values the
order fixes, so the bits depend on the row alone. The mode's matmul folds the norm into its
x loads with the same helpers for a few rows (layers/invariant_gemm.py), the row kernel
serves more."""
from __future__ import annotations

import torch
from torch import nn

from fullgraph.layers.launch import Launcher, cdiv, next_power_of_2
from fullgraph.layers.pdl import pdl_enabled
from fullgraph.layers.policy import policy_of

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: the torch formulas below
    triton = None


if triton is not None:
    @triton.jit
    def _pair_sum(acc, ROWS: tl.constexpr, WIDTH: tl.constexpr):
        """[ROWS, WIDTH] -> [ROWS, WIDTH / 2]: lanes 2j and 2j + 1 added (a sum of two is
        one rounding whatever the lowering; the reshape keeps the logical order)."""
        return tl.sum(tl.reshape(acc, (ROWS, WIDTH // 2, 2)), axis=2)

    @triton.jit
    def _lanes_sum(acc, ROWS: tl.constexpr):
        """[ROWS, 64] float32 -> [ROWS]: the lanes added pairwise, a fixed tree."""
        acc = _pair_sum(acc, ROWS, 64)
        acc = _pair_sum(acc, ROWS, 32)
        acc = _pair_sum(acc, ROWS, 16)
        acc = _pair_sum(acc, ROWS, 8)
        acc = _pair_sum(acc, ROWS, 4)
        return tl.sum(acc, axis=1)                  # the last two lanes

    @triton.jit
    def _h_chunk(x_ptr, r_ptr, rows, offs, mask, stride_x, stride_r, HAS_RES: tl.constexpr):
        """h = x + residual at `rows` x `offs` (x without one)."""
        h = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :], mask=mask, other=0.0)
        if HAS_RES:
            h = h + tl.load(r_ptr + rows[:, None] * stride_r + offs[None, :], mask=mask,
                            other=0.0)
        return h

    @triton.jit
    def _add_squares(acc, offs, x_ptr, r_ptr, h_ptr, rows, mask_rows, K, stride_x, stride_r,
                     stride_h, store_h, HAS_RES: tl.constexpr):
        """acc [ROWS, 64] plus the squares of h at `offs` (64 columns), one fma each; h
        stored where `store_h`."""
        mask = mask_rows[:, None] & (offs < K)[None, :]
        h = _h_chunk(x_ptr, r_ptr, rows, offs, mask, stride_x, stride_r, HAS_RES)
        if store_h:
            tl.store(h_ptr + rows[:, None] * stride_h + offs[None, :], h, mask=mask)
        hf = h.to(tl.float32)
        return tl.fma(hf, hf, acc)

    @triton.jit
    def ordered_sum_squares(x_ptr, r_ptr, h_ptr, rows, mask_rows, K, stride_x, stride_r,
                            stride_h, store_h, HAS_RES: tl.constexpr, ROWS: tl.constexpr,
                            CHUNKS: tl.constexpr):
        """The sum of squares of h = x + residual over each of `rows` ([ROWS] indices), in
        the mode's order (module docstring); h stored where `store_h`. CHUNKS: K's 64-wide
        chunks, unrolled (their loads issue together); 0: a loop, for kernels whose
        registers the unrolled loads would crowd."""
        lanes = tl.arange(0, 64)
        acc = tl.zeros((ROWS, 64), dtype=tl.float32)
        if CHUNKS:
            for c in tl.static_range(CHUNKS):
                acc = _add_squares(acc, c * 64 + lanes, x_ptr, r_ptr, h_ptr, rows, mask_rows,
                                   K, stride_x, stride_r, stride_h, store_h, HAS_RES)
        else:
            for k0 in range(0, K, 64):
                acc = _add_squares(acc, k0 + lanes, x_ptr, r_ptr, h_ptr, rows, mask_rows, K,
                                   stride_x, stride_r, stride_h, store_h, HAS_RES)
        return _lanes_sum(acc, ROWS)

    @triton.jit
    def norm_output(hf, rstd, w, NORM_F32: tl.constexpr, dtype: tl.constexpr):
        """RMSNorm's output from float32 h and its rstd, in the two conventions."""
        if NORM_F32:                # zero-centered: scaled in float32, then cast
            return (hf * rstd * w).to(dtype)
        return (w * (hf * rstd).to(dtype)).to(dtype)

    @triton.jit
    def _ordered_rms_norm_rows_kernel(x_ptr, r_ptr, h_ptr, y_ptr, w_ptr, K, stride_x,
                                      stride_r, stride_h, stride_y, eps,
                                      HAS_RES: tl.constexpr, NORM_F32: tl.constexpr,
                                      CHUNKS: tl.constexpr, USE_PDL: tl.constexpr):
        """The batch-invariant mode's row kernel: the ordered sum, then a second pass, both
        over the row's CHUNKS 64-wide chunks unrolled."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rows = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)
        every = rows >= 0
        ss = ordered_sum_squares(x_ptr, r_ptr, h_ptr, rows, every, K, stride_x, stride_r,
                                 stride_h, True, HAS_RES, 1, CHUNKS)
        rstd = tl.rsqrt(ss / K + eps)
        lanes = tl.arange(0, 64)
        for c in tl.static_range(CHUNKS):
            offs = c * 64 + lanes
            mask = every[:, None] & (offs < K)[None, :]
            h = _h_chunk(x_ptr, r_ptr, rows, offs, mask, stride_x, stride_r, HAS_RES)
            w = tl.load(w_ptr + offs, mask=offs < K, other=0.0)
            y = norm_output(h.to(tl.float32), rstd[:, None], w[None, :], NORM_F32,
                            y_ptr.dtype.element_ty)
            tl.store(y_ptr + rows[:, None] * stride_y + offs[None, :], y, mask=mask)

    _ordered_rms_norm_rows_launcher = Launcher(_ordered_rms_norm_rows_kernel)

    @triton.jit
    def _add_rms_norm_rows_kernel(x_ptr, r_ptr, h_ptr, y_ptr, w_ptr, K, stride_x, stride_r,
                                  stride_h, stride_y, eps, HAS_RES: tl.constexpr,
                                  NORM_F32: tl.constexpr, BLOCK: tl.constexpr,
                                  USE_PDL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)    # a parameter: before the wait
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RES:
            x = x + tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
        tl.store(h_ptr + row * stride_h + offs, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / K + eps)
        tl.store(y_ptr + row * stride_y + offs, norm_output(xf, rstd, w, NORM_F32, x.dtype),
                 mask=mask)

    _add_rms_norm_rows_launcher = Launcher(_add_rms_norm_rows_kernel)


def norm_f32(norm_weight: torch.Tensor, x: torch.Tensor) -> bool:
    """A float32 norm weight for half-precision rows: RMSNorm's zero-centered convention,
    scaled in float32 before the cast."""
    return norm_weight.dtype == torch.float32 and x.dtype != torch.float32


def rms_norm_rows(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                  eps: float, h: torch.Tensor, normed: torch.Tensor,
                  ordered: bool = False) -> None:
    """h = x + residual (x without one) and normed = RMSNorm(h) `[M, K]`, one Triton program a
    row: a row's statistics in one order whatever M is (the fused kernels' norm, and the
    batch-invariant mode's on the GPU). `norm_weight`: a module's `kernel_weight`.
    `ordered`: the sum of squares in the mode's order, which its matmul repeats (module
    docstring)."""
    if x.shape[0]:
        pdl = pdl_enabled(x)
        r = residual if residual is not None else x
        args = (x, r, h, normed, norm_weight, x.shape[1], x.stride(0), r.stride(0),
                h.stride(0), normed.stride(0), eps)
        flags = dict(HAS_RES=residual is not None, NORM_F32=norm_f32(norm_weight, x),
                     USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
        if ordered:
            _ordered_rms_norm_rows_launcher[(x.shape[0],)](
                *args, CHUNKS=cdiv(x.shape[1], 64), **flags)
        else:
            _add_rms_norm_rows_launcher[(x.shape[0],)](
                *args, BLOCK=next_power_of_2(x.shape[1]), **flags)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same op order as transformers' Qwen3RMSNorm (float32 statistics, weight applied in
    # the input dtype) so float32 runs match it token for token.
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    @property
    def kernel_weight(self) -> torch.Tensor:
        return self.weight

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if (triton is not None and x.is_cuda
                and (x.dtype != torch.float32 or policy_of(self).batch_invariant)):
            return self._rows(x, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _rows(self, x: torch.Tensor, residual: torch.Tensor | None
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """On the GPU, `rms_norm_rows`: one launch where the formula takes seven kernels
        (half precision, as the fused kernels; float32 keeps transformers' op order), and in
        the batch-invariant mode in any dtype, where torch's reductions choose their launch
        shape (and so a row's order of sums) from the row count."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        r2 = residual.reshape(-1, shape[-1]) if residual is not None else None
        h, normed = torch.empty_like(x2), torch.empty_like(x2)
        rms_norm_rows(x2, r2, self.kernel_weight, self.eps, h, normed,
                      ordered=policy_of(self).batch_invariant)
        return normed.view(shape) if residual is None else (normed.view(shape), h.view(shape))


class ZeroCenteredRMSNorm(RMSNorm):
    """RMSNorm scaled by (1 + weight), in float32 then cast (transformers' Qwen3NextRMSNorm;
    the checkpoint stores the weight around 0). The fused kernels read the float32 1 + weight
    that `refresh()` computes: call it once the weight is loaded (or moved). A plain
    attribute, not a buffer, so that a module-wide `.to(dtype)` cannot round it."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        with torch.no_grad():
            self.weight.zero_()
        self.refresh()

    def refresh(self) -> None:
        self.scale = 1.0 + self.weight.detach().float()

    def _apply(self, fn, recurse: bool = True):
        """`.to()`, `.cuda()` and the like move or cast the weight: recompute the scale
        from it (float32 whatever the module's dtype)."""
        out = super()._apply(fn, recurse)
        self.refresh()
        return out

    @property
    def kernel_weight(self) -> torch.Tensor:
        return self.scale

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)
