"""Rotary position embedding (neox layout: rotate_half) with a precomputed cos/sin table."""
from __future__ import annotations

import torch
from torch import nn


def rope_theta_of(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"unsupported rope type {rope_type!r}: only 'default' RoPE is implemented")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("config.json has no rope_theta")
    return float(theta)


class RotaryEmbedding(nn.Module):
    """The cos/sin tables, shared by every layer; `apply_rotary` (or a fused kernel) uses them."""

    def __init__(self, head_dim: int, max_position: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        freqs = torch.arange(max_position, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        # float32 table; cast to the activation dtype at use, as transformers does.
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                 q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hkv, D], positions: [T]; tables [max_position, D] (float32)."""
    cos = cos_table[positions].to(q.dtype).unsqueeze(1)
    sin = sin_table[positions].to(q.dtype).unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
