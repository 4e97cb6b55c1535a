"""`fullgraph::moe_experts`: the routed experts of a sparse MoE block as one opaque op.

Opaque to torch.compile, like fullgraph::linear: its kernels and their tiles are picked
from shapes at run time, and the CPU path loops over experts on the host. Also opaque to
the CPU fake graphs (worker/cudagraph/fake.py), which record it as one op and replay it
whole, so the CPU path's host loop is re-run on each replay's routing.
"""
from __future__ import annotations

import torch

from fullgraph.layers.moe.grouped_gemm import experts_triton, triton
from fullgraph.layers.moe.reference import experts_reference


@torch.library.custom_op("fullgraph::moe_experts", mutates_args=())
def _moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 gate_up: torch.Tensor, down: torch.Tensor, shared: torch.Tensor | None,
                 shared_gate: torch.Tensor | None) -> torch.Tensor:
    if x.is_cuda and triton is not None:
        return experts_triton(x, topk_weights, topk_ids, gate_up, down, shared, shared_gate)
    return experts_reference(x, topk_weights, topk_ids, gate_up, down, shared, shared_gate)


@_moe_experts.register_fake
def _(x, topk_weights, topk_ids, gate_up, down, shared, shared_gate):
    return torch.empty_like(x)


def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor, shared: torch.Tensor | None = None,
                shared_gate: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]) (+ sigmoid(shared_gate[t]) *
    shared[t]), each expert a SwiGLU MLP.

    x `[T, H]`; topk_weights `[T, top_k]` (x's dtype), topk_ids `[T, top_k]` (int, in
    0 .. E-1); gate_up `[E, 2I, H]` (gate rows, then up rows), down `[E, H, I]`; shared
    `[T, H]` the shared expert's output and shared_gate `[T, 1]` its gate logit, or both
    None. Returns `[T, H]` in x's dtype. On CUDA: no host syncs, shapes from T alone
    (grouped_gemm.py); elsewhere the torch reference (reference.py).
    """
    if (shared is None) != (shared_gate is None):
        raise ValueError("shared and shared_gate come together")
    return _moe_experts(x, topk_weights, topk_ids, gate_up, down, shared, shared_gate)
