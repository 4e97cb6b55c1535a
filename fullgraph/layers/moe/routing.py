"""Routing of a sparse MoE block: the router's top-k choice, and the sort of (token, slot)
pairs by expert that the grouped GEMMs work from.

Both have fixed output shapes and no host reads of device values, so they run inside a CUDA
graph (and the CPU fake graphs) with any routing.
"""
from __future__ import annotations

import torch

from fullgraph.layers.moe.route_kernel import route_cuda, triton


def route(logits: torch.Tensor, top_k: int,
          normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) `[T, top_k]` from router logits `[T, E]`: transformers'
    Qwen3NextTopKRouter op for op (softmax in float32, top-k, renormalized when `normalize`,
    cast back to the logits' dtype), so the same logits choose the same experts.
    ids are int64, weights in the logits' dtype. On CUDA the same math in one kernel
    (route_kernel.py)."""
    if logits.is_cuda and triton is not None and logits.dim() == 2 and logits.stride(1) == 1:
        return route_cuda(logits, top_k, normalize)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


def sort_by_expert(topk_ids: torch.Tensor,
                   num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, offsets) for topk_ids `[T, top_k]`.

    Pair p = t * top_k + j is token t's j-th choice. perm `[T * top_k]` (int64) lists the
    pairs by expert, stably (token order within an expert); expert e owns the sorted rows
    offsets[e] .. offsets[e + 1] (offsets `[E + 1]`, int64, offsets[E] = T * top_k). Both
    shapes depend only on T, top_k and E. A stable sort keeps each row's place a function of
    the routing alone, so the kernels run the same programs on the same rows every time.
    """
    flat = topk_ids.reshape(-1)
    sorted_ids, perm = torch.sort(flat, stable=True)
    # searchsorted rather than bincount: CUDA's bincount reads the max id on the host.
    bounds = torch.arange(num_experts + 1, device=flat.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds)
    return perm, offsets
