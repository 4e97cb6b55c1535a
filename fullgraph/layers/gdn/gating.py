"""The per-token inputs of the gated delta rule that the layer computes around it.

Same ops, in the same order and dtypes, as transformers' Qwen3_5GatedDeltaNet /
Qwen3NextGatedDeltaNet (the float32 casts are theirs: in a half-precision model, exp(A_log)
would otherwise overflow to inf), so float32 runs match them bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fullgraph.layers.activation import elementwise


def gdn_gating(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor,
               dt_bias: torch.Tensor, batch_invariant: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, beta) from the `in_proj_a` / `in_proj_b` outputs a, b `[T, num_v_heads]`.

    g = -exp(A_log) * softplus(a + dt_bias): the log of the state's decay per token, float32
    (<= 0); beta = sigmoid(b): the delta rule's step size, in b's dtype.
    """
    # in the mode, one formula for every element: a and b are strided views of the
    # projection for several rows and contiguous for one (layers/activation.py)
    beta = elementwise(torch.sigmoid, b, batch_invariant)
    g = (-elementwise(torch.exp, A_log.float(), batch_invariant)
         * elementwise(F.softplus, a.float() + dt_bias, batch_invariant))
    return g, beta


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, as transformers' `l2norm` (which aligns
    with fla's in-kernel normalization, `use_qk_l2norm_in_kernel`)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def rms_norm_gated(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                   eps: float, batch_invariant: bool = False) -> torch.Tensor:
    """The layer's output norm: RMSNorm of x `[..., head_v_dim]` (per head), times silu(gate).

    transformers' Qwen3_5RMSNormGated / Qwen3NextRMSNormGated: float32 statistics, the weight
    applied in x's dtype, the gate in float32, the result cast back to x's dtype. The
    statistics are per row (one head of one token) in every mode; `batch_invariant` sends
    the SiLU through its scalar formula (the gate is a strided view for several rows).
    """
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * h.to(dtype)
    h = h * elementwise(F.silu, gate.float(), batch_invariant)
    return h.to(dtype)
