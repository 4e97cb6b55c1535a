"""The router's top-k on CUDA in one kernel, one program per token: `routing.route`'s math
(softmax in float32, top-k, renormalized when asked, cast to the logits' dtype). torch's
version is five kernels (softmax, topk, sum, div, cast), most of them launch-bound at
decode. Top-k by repeated argmax, ties to the lower expert id, largest first as torch.topk's
sorted output; the float32 values may differ from torch's in the last bit (sum order).
"""
from __future__ import annotations

import torch

from fullgraph.layers.opaque import opaque_op
from fullgraph.layers.launch import Launcher, next_power_of_2
from fullgraph.layers.pdl import pdl_enabled

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: routing.route stays in torch
    triton = None


if triton is not None:
    @triton.jit
    def _route_kernel(logits_ptr, w_ptr, ids_ptr, E, stride_l, TOP_K: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, NORMALIZE: tl.constexpr,
                      USE_PDL: tl.constexpr):
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        t = tl.program_id(0).to(tl.int64)
        ex = tl.arange(0, BLOCK_E)
        x = tl.load(logits_ptr + t * stride_l + ex, mask=ex < E,
                    other=-float("inf")).to(tl.float32)
        p = tl.exp(x - tl.max(x, 0))
        p = p / tl.sum(p, 0)                      # padding lanes: 0, after every expert
        kk = tl.arange(0, BLOCK_K)
        vals = tl.zeros((BLOCK_K,), dtype=tl.float32)
        ids = tl.zeros((BLOCK_K,), dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            m = tl.max(p, 0)
            i = tl.min(tl.where(p == m, ex, BLOCK_E), 0)
            vals = tl.where(kk == j, m, vals)
            ids = tl.where(kk == j, i, ids)
            p = tl.where(ex == i, -1.0, p)
        if NORMALIZE:
            vals = vals / tl.sum(vals, 0)
        tl.store(w_ptr + t * TOP_K + kk, vals.to(w_ptr.dtype.element_ty), mask=kk < TOP_K)
        tl.store(ids_ptr + t * TOP_K + kk, ids.to(tl.int64), mask=kk < TOP_K)

    _route_launcher = Launcher(_route_kernel)


@opaque_op("fullgraph::moe_route")
def route_cuda(logits: torch.Tensor, top_k: int,
               normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) `[T, top_k]` from logits `[T, E]` (stride 1 over E) on CUDA."""
    T, E = logits.shape
    weights = logits.new_empty(T, top_k)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T:
        pdl = pdl_enabled(logits)
        _route_launcher[(T,)](logits, weights, ids, E, logits.stride(0), TOP_K=top_k,
                              BLOCK_K=next_power_of_2(top_k),
                              BLOCK_E=max(16, next_power_of_2(E)), NORMALIZE=normalize,
                              USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
    return weights, ids


@route_cuda.register_fake
def _(logits, top_k, normalize):
    T = logits.shape[0]
    return (logits.new_empty(T, top_k),
            torch.empty(T, top_k, dtype=torch.int64, device=logits.device))
