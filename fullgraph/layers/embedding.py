"""Token embedding as a PDL Triton gather on the GPU.

torch's embedding is an `index_select` kernel without programmatic dependent launch, so in a
decode graph the first layer's qkv projection could start loading its weights only once the
embedding had completed (the GPU idled ~1.2-1.4 µs between them at batch 1 on an H100,
docs/benchmarks.md). This kernel is a PDL kernel like ours (layers/pdl.py): it waits for the
input copy that wrote the token ids, then lets the projection launch. One program copies one
token's row; the result is the same bits as `F.embedding` (its effect on a decode step:
docs/benchmarks.md, "Tuning figures from code comments").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fullgraph.layers.launch import Launcher, next_power_of_2
from fullgraph.layers.pdl import pdl_enabled

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: torch's embedding
    triton = None


if triton is not None:
    @triton.jit
    def _embedding_kernel(ids_ptr, w_ptr, out_ptr, H, stride_w, stride_o,
                          BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        t = tl.program_id(0)
        if USE_PDL:            # the ids come from the kernel just before
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        tok = tl.load(ids_ptr + t).to(tl.int64)
        for h0 in range(0, H, BLOCK):
            offs = h0 + tl.arange(0, BLOCK)
            row = tl.load(w_ptr + tok * stride_w + offs, mask=offs < H)
            tl.store(out_ptr + t.to(tl.int64) * stride_o + offs, row, mask=offs < H)

    _embedding_launcher = Launcher(_embedding_kernel)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.embedding(ids, weight)` for ids [T] (ids must be inside the vocabulary: the engine
    checks prompts, and sampled ids come from the model's own vocabulary)."""
    if (triton is None or not ids.is_cuda or ids.dim() != 1 or ids.stride(0) != 1
            or weight.stride(1) != 1):
        return F.embedding(ids, weight)
    h = weight.shape[1]
    out = torch.empty(ids.shape[0], h, dtype=weight.dtype, device=weight.device)
    if ids.shape[0]:
        pdl = pdl_enabled(weight)
        block = min(4096, next_power_of_2(h))
        _embedding_launcher[(ids.shape[0],)](ids, weight, out, h, weight.stride(0), out.stride(0),
                                             BLOCK=block, USE_PDL=pdl,
                                             num_warps=4 if block >= 1024 else 1,
                                             launch_pdl=pdl)
    return out


class Embedding(nn.Embedding):
    """nn.Embedding (same parameter and state dict) whose forward is `embedding`."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding(ids, self.weight)
