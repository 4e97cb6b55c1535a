"""Gated activations."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: the torch formulas below
    triton = None

if triton is not None:
    @triton.jit
    def silu_mul(g, u):
        """silu(g) * u in float32, the formula of every kernel that applies SiLU-and-mul
        (the row kernel of layers/fused_linear.py, the GEMV's prologue)."""
        return g / (1.0 + tl.exp(-g)) * u


def scalar_path(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """op(x) with every element computed by ATen's scalar CPU loop.

    An elementwise CPU kernel runs a vectorized body and a scalar remainder whose formulas
    may differ in the last bit (F.silu's do), and which elements fall in the remainder
    depends on the tensor's size, strides and thread split (docs/batch_invariance.md,
    section 3). A non-contiguous input sends every element through the scalar loop, so an
    element's result depends on its value alone: the batch-invariant mode's CPU path."""
    strided = x.new_empty(x.shape + (2,))
    strided[..., 0] = x
    return op(strided[..., 0])


def elementwise(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                batch_invariant: bool) -> torch.Tensor:
    """op(x); in the batch-invariant mode on the CPU through `scalar_path` (CUDA kernels
    apply one formula to every element already)."""
    return scalar_path(op, x) if batch_invariant and not x.is_cuda else op(x)


def silu_and_mul(gate_up: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
    """SwiGLU on a fused [..., 2 * d] gate/up projection. The gate half is a strided view for
    several rows and a contiguous one for a single row, so on the CPU a decode row would go
    through another SiLU formula than the same row in a prefill; `batch_invariant` sends
    every row through the scalar one."""
    gate, up = gate_up.chunk(2, dim=-1)
    return elementwise(F.silu, gate, batch_invariant) * up
