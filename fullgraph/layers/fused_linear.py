"""Projections with the elementwise op that feeds them folded in: RMSNorm (and the residual
add before it) into qkv and gate/up, SiLU-and-mul into down, a Gated DeltaNet layer's gated
output norm into its out_proj, a gated attention layer's output gate into its o_proj.

For a single row (batch-1 decode) the skinny-matmul kernel applies the op to each slice of
its input as it loads it (layers/gemv.py), so a layer's norms and activation cost no launch
of their own: 3 of a batch-1 step's ~11 kernels per layer. Every program of that kernel
repeats the op over the whole row, which only pays off for one row
(`benchmarks/probes/gemv_tiles.py --prologue`): for more, one Triton kernel per row does the
elementwise part and the plain GEMV or cuBLAS the product, the kernel count inductor's fusion
gave. On CPU (eager, the reference path) these are the plain modules. In the batch-invariant
mode (the projection's `kernel_policy`, layers/policy.py) nothing is folded into the product,
which is `linear.invariant_matmul`: the norm is the module's (on the GPU its row kernel,
layers/norm.py), SiLU-and-mul the row kernel here on the GPU and the scalar path on the CPU
(layers/activation.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fullgraph.layers.activation import silu_and_mul
from fullgraph.layers.linear import linear
from fullgraph.layers.gated_attention import sigmoid_gate
from fullgraph.layers.gemv import (GATED_NORM, RMS_NORM, SIGMOID_GATE, SILU_MUL,
                                   gated_norm_fits, gemv, gemv_supported, matmul, triton)
from fullgraph.layers.norm import RMSNorm, rms_norm_rows
from fullgraph.layers.opaque import opaque_op
from fullgraph.layers.launch import Launcher, cdiv
from fullgraph.layers.pdl import pdl_enabled
from fullgraph.layers.policy import KernelPolicy, policy_of

if triton is not None:
    import triton.language as tl

    from fullgraph.layers.activation import silu_mul

    @triton.jit
    def _silu_mul_rows_kernel(x_ptr, y_ptr, K, stride_x, stride_y, BLOCK: tl.constexpr,
                              USE_PDL: tl.constexpr):
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < K
        g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * stride_x + K + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + offs, silu_mul(g, u).to(y_ptr.dtype.element_ty),
                 mask=mask)

    _silu_mul_rows_launcher = Launcher(_silu_mul_rows_kernel)


SILU_BLOCK = 1024


def _silu_mul_rows(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up], elementwise, one rounding."""
    m, k = gate_up.shape[0], gate_up.shape[1] // 2
    act = gate_up.new_empty(m, k)
    if m:
        pdl = pdl_enabled(gate_up)
        _silu_mul_rows_launcher[(m, cdiv(k, SILU_BLOCK))](
            gate_up, act, k, gate_up.stride(0), act.stride(0), BLOCK=SILU_BLOCK, USE_PDL=pdl,
            num_warps=4, launch_pdl=pdl)
    return act


# Opaque ops for torch.compile, like fullgraph::linear: the row count (and so the kernel)
# is only known at run time.
@opaque_op("fullgraph::add_rms_norm")
def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor,
                  norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h), h) with h = x + residual: the model's final norm, one kernel."""
    h, normed = torch.empty_like(x), torch.empty_like(x)
    rms_norm_rows(x, residual, norm_weight, eps, h, normed)
    return normed, h


@_add_rms_norm.register_fake
def _(x, residual, norm_weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@opaque_op("fullgraph::rms_norm_linear")
def _rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                     eps: float, weight: torch.Tensor,
                     l2_prefetch_next: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h) @ weight.T, h) with h = x + residual (x without one)."""
    h = torch.empty_like(x)
    if x.shape[0] == 1 and gemv_supported(x, weight):
        y = gemv(x, weight, prologue=RMS_NORM, residual=residual, norm_weight=norm_weight,
                 eps=eps, residual_out=h, l2_prefetch_next=l2_prefetch_next)
        return y, h
    normed = torch.empty_like(x)
    rms_norm_rows(x, residual, norm_weight, eps, h, normed)
    return matmul(normed, weight, l2_prefetch_next), h


@_rms_norm_linear.register_fake
def _(x, residual, norm_weight, eps, weight, l2_prefetch_next):
    return x.new_empty(x.shape[0], weight.shape[0]), torch.empty_like(x)


@opaque_op("fullgraph::silu_mul_linear")
def _silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor,
                     l2_prefetch_next: list[torch.Tensor]) -> torch.Tensor:
    if gate_up.shape[0] == 1 and gemv_supported(gate_up, weight):
        return gemv(gate_up, weight, prologue=SILU_MUL, l2_prefetch_next=l2_prefetch_next)
    return matmul(_silu_mul_rows(gate_up), weight, l2_prefetch_next)


@_silu_mul_linear.register_fake
def _(gate_up, weight, l2_prefetch_next):
    return gate_up.new_empty(gate_up.shape[0], weight.shape[0])


@opaque_op("fullgraph::gated_norm_linear")
def _gated_norm_linear(x: torch.Tensor, gate: torch.Tensor, norm_weight: torch.Tensor,
                       eps: float, weight: torch.Tensor,
                       l2_prefetch_next: list[torch.Tensor]) -> torch.Tensor:
    return gemv(x, weight, prologue=GATED_NORM, residual=gate, norm_weight=norm_weight,
                eps=eps, group=norm_weight.shape[0], l2_prefetch_next=l2_prefetch_next)


@_gated_norm_linear.register_fake
def _(x, gate, norm_weight, eps, weight, l2_prefetch_next):
    return x.new_empty(x.shape[0], weight.shape[0])


@opaque_op("fullgraph::sigmoid_gate_linear")
def _sigmoid_gate_linear(x: torch.Tensor, qkv: torch.Tensor, head_dim: int,
                         weight: torch.Tensor,
                         l2_prefetch_next: list[torch.Tensor]) -> torch.Tensor:
    return gemv(x, weight, prologue=SIGMOID_GATE, residual=qkv, group=head_dim,
                l2_prefetch_next=l2_prefetch_next)


@_sigmoid_gate_linear.register_fake
def _(x, qkv, head_dim, weight, l2_prefetch_next):
    return x.new_empty(x.shape[0], weight.shape[0])


def _fusable(x: torch.Tensor) -> bool:
    return (triton is not None and x.is_cuda and x.dim() == 2 and x.stride(-1) == 1
            and x.dtype in (torch.bfloat16, torch.float16))


def _invariant_rows(x: torch.Tensor, policy: KernelPolicy) -> bool:
    """The mode on the GPU, in any dtype: SiLU-and-mul by the row kernel, never folded into
    the product (the norms: RMSNorm's own row kernel in the mode, layers/norm.py)."""
    return (policy.batch_invariant and triton is not None and x.is_cuda and x.dim() == 2
            and x.stride(-1) == 1)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor,
                 norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual)."""
    if _fusable(x) and not policy_of(norm).batch_invariant:
        return _add_rms_norm(x, residual, norm.kernel_weight, norm.eps)
    return norm(x, residual)


def _product(x: torch.Tensor, proj: nn.Module, policy: KernelPolicy) -> torch.Tensor:
    """The unfused path's matmul (no bias)."""
    if policy.batch_invariant:
        return linear(x, proj.weight, policy=policy)
    return F.linear(x, proj.weight)


def one_row_prologue(x: torch.Tensor, proj: nn.Module) -> bool:
    """Whether the op that feeds `proj` runs in its one-row GEMV prologue (a batch-1 decode
    step on the GPU, outside the batch-invariant mode): `norm_linear`'s norm, and the gated
    norm and output gate below; a model may then fold more into that kernel
    (layers/gdn/fused_decode.py `in_proj_conv`)."""
    return (x.shape[0] == 1 and _fusable(x) and not policy_of(proj).batch_invariant
            and proj.bias is None and gemv_supported(x, proj.weight))


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, proj: nn.Module,
                l2_prefetch_next: tuple[torch.Tensor, ...] = ()
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """proj(norm(x + residual)) and the new residual x + residual (x when there is none).
    `l2_prefetch_next`: weights the next kernels read, a hint (layers/l2_prefetch.py)."""
    policy = policy_of(proj)
    if _fusable(x) and not policy.batch_invariant:
        y, residual = _rms_norm_linear(x, residual, norm.kernel_weight, norm.eps, proj.weight,
                                       list(l2_prefetch_next))
    else:
        if residual is None:
            residual, normed = x, norm(x)
        else:
            normed, residual = norm(x, residual)
        y = _product(normed, proj, policy)
    return (y if proj.bias is None else y + proj.bias), residual


def silu_mul_linear(gate_up: torch.Tensor, proj: nn.Module,
                    l2_prefetch_next: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """proj(silu(gate) * up) for gate_up = [gate | up]; `l2_prefetch_next` as in norm_linear."""
    policy = policy_of(proj)
    if _invariant_rows(gate_up, policy):
        y = _product(_silu_mul_rows(gate_up), proj, policy)
    elif _fusable(gate_up):
        y = _silu_mul_linear(gate_up, proj.weight, list(l2_prefetch_next))
    else:
        y = _product(silu_and_mul(gate_up, policy.batch_invariant), proj, policy)
    return y if proj.bias is None else y + proj.bias


def gated_norm_linear(x: torch.Tensor, gate: torch.Tensor, norm: nn.Module, proj: nn.Module,
                      l2_prefetch_next: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """proj(norm(x, gate)) for a Gated DeltaNet layer's output: x, gate `[T, heads *
    head_dim]`, `norm` the per-head gated RMSNorm (weight `[head_dim]`, times silu(gate)).
    `l2_prefetch_next` as in norm_linear."""
    if one_row_prologue(x, proj) and gated_norm_fits(proj.weight, norm.weight.shape[0]):
        return _gated_norm_linear(x, gate, norm.weight, norm.eps, proj.weight,
                                  list(l2_prefetch_next))
    t, d = x.shape[0], norm.weight.shape[0]
    return proj(norm(x.reshape(t, -1, d), gate.reshape(t, -1, d)).reshape(t, -1))


def sigmoid_gate_linear(o: torch.Tensor, qkv: torch.Tensor, proj: nn.Module,
                        l2_prefetch_next: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """proj(o * sigmoid(gate)) for a gated attention layer on the GPU: o `[T, Hq, D]` the
    attention's output, qkv the layer's projection holding each head's gate after its q
    (layers/gated_attention.py `sigmoid_gate`). At one row the gate runs in the projection's
    prologue. `l2_prefetch_next` as in norm_linear."""
    t, heads, d = o.shape
    x = o.reshape(t, heads * d)
    if one_row_prologue(x, proj):
        return _sigmoid_gate_linear(x, qkv, d, proj.weight, list(l2_prefetch_next))
    return proj(sigmoid_gate(o, qkv, heads))
