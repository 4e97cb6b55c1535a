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
from fullgraph.layers.opaque import opaque_op
from fullgraph.layers.policy import DEFAULT_POLICY, KernelPolicy


# `invariant_block_rows`: 0 in the normal mode; in the batch-invariant mode the policy's
# `matmul_block_rows` (an op takes plain values, not the policy object; the policy is
# rebuilt from it), for the CPU path. On CUDA both modes run the Triton kernels: their
# tl.dot accumulates in K order with no split-K (the matmul probe found such a row's bits
# independent of the tile, docs/batch_invariance.md 4.1) and the combine sums the slots in
# order; the hybrids' GPU test checks it.
@opaque_op("fullgraph::moe_experts")
def _moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 gate_up: torch.Tensor, down: torch.Tensor, shared: torch.Tensor | None,
                 shared_gate: torch.Tensor | None, invariant_block_rows: int = 0) -> torch.Tensor:
    if x.is_cuda and triton is not None:
        return experts_triton(x, topk_weights, topk_ids, gate_up, down, shared, shared_gate)
    if invariant_block_rows:
        policy = KernelPolicy(batch_invariant=True, matmul_block_rows=invariant_block_rows)
        return experts_reference(x, topk_weights, topk_ids, gate_up, down, shared, shared_gate,
                                 policy)
    return experts_reference(x, topk_weights, topk_ids, gate_up, down, shared, shared_gate)


@_moe_experts.register_fake
def _(x, topk_weights, topk_ids, gate_up, down, shared, shared_gate, invariant_block_rows=0):
    return torch.empty_like(x)


def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor, shared: torch.Tensor | None = None,
                shared_gate: torch.Tensor | None = None,
                policy: KernelPolicy = DEFAULT_POLICY) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]) (+ sigmoid(shared_gate[t]) *
    shared[t]), each expert a SwiGLU MLP.

    x `[T, H]`; topk_weights `[T, top_k]` (x's dtype), topk_ids `[T, top_k]` (int, in
    0 .. E-1); gate_up `[E, 2I, H]` (gate rows, then up rows), down `[E, H, I]`; shared
    `[T, H]` the shared expert's output and shared_gate `[T, 1]` its gate logit, or both
    None. Returns `[T, H]` in x's dtype. On CUDA: no host syncs, shapes from T alone
    (grouped_gemm.py), in both modes; elsewhere the torch reference (reference.py), with the
    batch-invariant mode's products (`policy`, layers/policy.py).
    """
    if (shared is None) != (shared_gate is None):
        raise ValueError("shared and shared_gate come together")
    block_rows = policy.matmul_block_rows if policy.batch_invariant else 0
    return _moe_experts(x, topk_weights, topk_ids, gate_up, down, shared, shared_gate,
                        block_rows)
