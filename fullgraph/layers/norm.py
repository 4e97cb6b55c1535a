"""RMSNorm, optionally fused with the residual add that precedes it, in the two conventions of
the models we run: Qwen3's (the weight applied in the activations' dtype) and the zero-centered
one of Qwen3.5 / Qwen3-Next (scaled by 1 + weight in float32). The kernels (the row kernel
here, `rms_norm_rows`, and the fused ones of layers/fused_linear.py, gemv.py) take
`kernel_weight`: the weight itself, or the float32 1 + weight, which tells them to scale in
float32 before the cast. On the GPU the modules run the row kernel in half precision and,
in any dtype, in the batch-invariant mode (layers/policy.py)."""
from __future__ import annotations

import torch
from torch import nn

from fullgraph.layers.launch import Launcher, next_power_of_2
from fullgraph.layers.pdl import pdl_enabled
from fullgraph.layers.policy import policy_of

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: the torch formulas below
    triton = None


if triton is not None:
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
        if NORM_F32:                # zero-centered: scaled in float32, then cast
            y = (xf * rstd * w).to(x.dtype)
        else:
            y = (w * (xf * rstd).to(x.dtype)).to(x.dtype)
        tl.store(y_ptr + row * stride_y + offs, y, mask=mask)

    _add_rms_norm_rows_launcher = Launcher(_add_rms_norm_rows_kernel)


def norm_f32(norm_weight: torch.Tensor, x: torch.Tensor) -> bool:
    """A float32 norm weight for half-precision rows: RMSNorm's zero-centered convention,
    scaled in float32 before the cast."""
    return norm_weight.dtype == torch.float32 and x.dtype != torch.float32


def rms_norm_rows(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                  eps: float, h: torch.Tensor, normed: torch.Tensor) -> None:
    """h = x + residual (x without one) and normed = RMSNorm(h) `[M, K]`, one Triton program a
    row: a row's statistics in one order whatever M is (the fused kernels' norm, and the
    batch-invariant mode's on the GPU). `norm_weight`: a module's `kernel_weight`."""
    if x.shape[0]:
        pdl = pdl_enabled(x)
        r = residual if residual is not None else x
        _add_rms_norm_rows_launcher[(x.shape[0],)](
            x, r, h, normed, norm_weight, x.shape[1], x.stride(0), r.stride(0), h.stride(0),
            normed.stride(0), eps, HAS_RES=residual is not None,
            NORM_F32=norm_f32(norm_weight, x), BLOCK=next_power_of_2(x.shape[1]),
            USE_PDL=pdl, num_warps=4, launch_pdl=pdl)


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
        rms_norm_rows(x2, r2, self.kernel_weight, self.eps, h, normed)
        return normed.view(shape) if residual is None else (normed.view(shape), h.view(shape))


class ZeroCenteredRMSNorm(RMSNorm):
    """RMSNorm scaled by (1 + weight), in float32 then cast (transformers' Qwen3NextRMSNorm;
    the checkpoint stores the weight around 0). The fused kernels read the float32 1 + weight
    that `refresh()` computes: call it once the weight is loaded or moved (a weight update
    refreshes it in place). A plain attribute, not a buffer, so that a module-wide
    `.to(dtype)` cannot round it."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        with torch.no_grad():
            self.weight.zero_()
        self.refresh()

    def refresh(self) -> None:
        scale = 1.0 + self.weight.detach().float()
        old = getattr(self, "scale", None)
        if old is not None and old.device == scale.device:
            old.copy_(scale)           # in place: captured graphs read this tensor
        else:
            self.scale = scale

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
