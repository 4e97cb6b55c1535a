"""The routed experts in torch: the CPU path and the reference for the Triton kernels.

It makes the kernels' roundings in the kernels' order, so it is their reference and not
only transformers': each (token, slot) pair's expert output rounded to x's dtype (as
transformers' per-expert linear does), then per token a float32 sum over its slots in slot
order, the shared expert's gated output added last, one rounding at the end (`combine`).
transformers instead rounds after every product and every add; in float32 the two agree to
about 1e-6 relative. The expert loop reads the experts' row ranges on the host, which is
fine off CUDA (the op is opaque to the CPU fake graphs, which replay it whole).

In the batch-invariant mode (a `KernelPolicy` with `batch_invariant`) each expert's product
goes through `linear.invariant_matmul`: one `F.linear` over an expert's gathered rows picks
its algorithm from how many tokens the step routed there, so a token's bits would follow its
neighbours' routing (docs/batch_invariance.md, 6.8). The SiLU and the shared gate's sigmoid
go through their scalar formula (layers/activation.py).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from fullgraph.layers.activation import elementwise, silu_and_mul
from fullgraph.layers.linear import invariant_matmul
from fullgraph.layers.policy import DEFAULT_POLICY, KernelPolicy
from fullgraph.layers.moe.routing import sort_by_expert


def combine(y: torch.Tensor, topk_weights: torch.Tensor, shared: torch.Tensor | None,
            shared_gate: torch.Tensor | None, dtype: torch.dtype,
            batch_invariant: bool = False) -> torch.Tensor:
    """sum_j w[t, j] * y[t, j] (+ sigmoid(shared_gate[t]) * shared[t]) in float32.

    y `[T, top_k, H]`, topk_weights `[T, top_k]`, shared `[T, H]`, shared_gate `[T, 1]`
    (the shared expert's gate logit, before the sigmoid). Returns `[T, H]` in `dtype`.
    """
    w = topk_weights.float()
    acc = y[:, 0].float() * w[:, 0, None]
    for j in range(1, y.shape[1]):
        acc = acc + y[:, j].float() * w[:, j, None]
    if shared is not None:
        gate = shared_gate.float()
        # [T, 1]: which rows take the vectorized formula depends on T
        gate = elementwise(torch.sigmoid, gate, batch_invariant)
        acc = acc + gate * shared.float()
    return acc.to(dtype)


def experts_reference(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      gate_up: torch.Tensor, down: torch.Tensor,
                      shared: torch.Tensor | None = None,
                      shared_gate: torch.Tensor | None = None,
                      policy: KernelPolicy = DEFAULT_POLICY) -> torch.Tensor:
    """x `[T, H]`, topk_weights / topk_ids `[T, top_k]`, gate_up `[E, 2I, H]` (gate rows
    first), down `[E, H, I]`; shared, shared_gate as in `combine`. Returns `[T, H]`:
    sum_j w_j * down_e(silu(gate_e(x)) * up_e(x)) with e = ids[t, j], plus the shared term.
    `policy`: the engine's kernel policy (the batch-invariant mode's products, see above)."""
    T, H = x.shape
    top_k = topk_ids.shape[1]
    invariant = policy.batch_invariant
    product = partial(invariant_matmul, policy=policy) if invariant else F.linear
    perm, offsets = sort_by_expert(topk_ids, gate_up.shape[0])
    bounds = offsets.tolist()
    y = x.new_zeros(T * top_k, H)
    for e in range(gate_up.shape[0]):
        if bounds[e] == bounds[e + 1]:
            continue
        pairs = perm[bounds[e]:bounds[e + 1]]
        h = silu_and_mul(product(x[pairs // top_k], gate_up[e]), invariant)
        y[pairs] = product(h, down[e])
    return combine(y.view(T, top_k, H), topk_weights, shared, shared_gate, x.dtype, invariant)
