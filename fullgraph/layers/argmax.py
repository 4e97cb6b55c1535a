"""Row argmax (greedy sampling) as two short Triton kernels.

torch's `argmax(dim=-1)` over one row of a 152k vocabulary is a single reduction kernel that
took 11 µs of a batch-1 decode step on an H100 (benchmarks/probes/profile_step.py
--timeline), longer than three of a layer's GEMVs: one row gives it few programs. Here every
row is cut into chunks, one program each, which write their maximum and its first index;
a second kernel picks, per row, the first chunk holding the row's maximum. The result is
torch's: the first index of the maximum.
"""
from __future__ import annotations

import torch

from fullgraph.layers.launch import Launcher, cdiv, next_power_of_2
from fullgraph.layers.pdl import pdl_enabled

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: torch.argmax
    triton = None

MIN_CHUNK = 1024               # elements per program (4 warps, 8 per thread)
MAX_CHUNKS = 512               # per row: the second kernel loads them all at once

if triton is not None:
    @triton.jit
    def _chunk_max_kernel(x_ptr, max_ptr, idx_ptr, V, stride_x, CHUNKS, CHUNK: tl.constexpr,
                          USE_PDL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x = tl.load(x_ptr + r * stride_x + offs, mask=offs < V, other=float("-inf"))
        m, i = tl.max(x.to(tl.float32), 0, return_indices=True,
                      return_indices_tie_break_left=True)
        tl.store(max_ptr + r * CHUNKS + c, m)
        tl.store(idx_ptr + r * CHUNKS + c, c * CHUNK + i)

    _chunk_max_launcher = Launcher(_chunk_max_kernel)

    @triton.jit
    def _pick_chunk_kernel(max_ptr, idx_ptr, out_ptr, V, CHUNKS, CHUNKS_P2: tl.constexpr,
                           USE_PDL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, CHUNKS_P2)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        m = tl.load(max_ptr + r * CHUNKS + c, mask=c < CHUNKS, other=float("-inf"))
        # the first chunk holding the maximum holds its first index (maxima compare exactly:
        # they are the logits themselves, widened)
        first = tl.minimum(tl.min(tl.where(m == tl.max(m, 0), c, CHUNKS_P2), 0), CHUNKS - 1)
        # clamped: NaN logits match no maximum, and under compile-ahead the first kernel's
        # launch may have been skipped (its outputs garbage); callers index with the result
        i = tl.minimum(tl.maximum(tl.load(idx_ptr + r * CHUNKS + first), 0), V - 1)
        tl.store(out_ptr + r, i.to(out_ptr.dtype.element_ty))

    _pick_chunk_launcher = Launcher(_pick_chunk_kernel)


def argmax_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [R, V] -> [R] int64 (or into `out`, [R] integers), the first index of each row's
    maximum: torch.argmax(x, dim=-1)."""
    if triton is None or not x.is_cuda or x.dim() != 2 or x.stride(-1) != 1 or not x.shape[0]:
        return x.argmax(dim=-1) if out is None else out.copy_(x.argmax(dim=-1))
    rows, v = x.shape
    chunk = max(MIN_CHUNK, next_power_of_2(cdiv(v, MAX_CHUNKS)))
    chunks = cdiv(v, chunk)
    maxima = torch.empty(rows, chunks, dtype=torch.float32, device=x.device)
    index = torch.empty(rows, chunks, dtype=torch.int32, device=x.device)
    if out is None:
        # zeros, not empty: a warmup under compile-ahead (worker/compilers.py) may skip these
        # launches, and callers index with the result (gather): it must stay in range
        out = torch.zeros(rows, dtype=torch.int64, device=x.device)
    pdl = pdl_enabled(x)
    _chunk_max_launcher[(rows, chunks)](x, maxima, index, v, x.stride(0), chunks, CHUNK=chunk,
                                        USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
    _pick_chunk_launcher[(rows,)](maxima, index, out, v, chunks,
                                  CHUNKS_P2=next_power_of_2(chunks), USE_PDL=pdl,
                                  num_warps=4, launch_pdl=pdl)
    return out
