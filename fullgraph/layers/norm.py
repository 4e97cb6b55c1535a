"""RMSNorm, optionally fused with the residual add that precedes it, in the two conventions of
the models we run: Qwen3's (the weight applied in the activations' dtype) and the zero-centered
one of Qwen3.5 / Qwen3-Next (scaled by 1 + weight in float32). The fused kernels
(layers/fused_linear.py, gemv.py) take `kernel_weight`: the weight itself, or the float32
1 + weight, which tells them to scale in float32 before the cast."""
from __future__ import annotations

import torch
from torch import nn


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
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


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
