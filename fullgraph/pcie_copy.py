"""Small host<->device copies as kernels that read or write pinned host memory directly.

A step's inputs (a few hundred bytes in decode) and its sampled ids (8 bytes a request)
cross PCIe every step. As copy-engine copies on the step's stream, each costs the device
5-13 µs between kernels (H100, batch-1 decode: 0.802 -> 0.789 ms/step without the input
copy, 0.796 without the output copy; docs/benchmarks.md, ninth session): the copy waits for
the kernels before it, and the kernels after it wait for the copy. A kernel reads and
writes pinned memory through unified addressing instead, and as a PDL kernel (layers/pdl.py)
it loads its host words while the previous kernel finishes.

Both kernels launch eagerly, between graph replays, with host buffers that stay put until
the launch's event says the kernel ran (the runner's `_inputs_copied`, the step's event).
"""
from __future__ import annotations

import torch

from fullgraph.layers.pdl import pdl_enabled

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: copies go through torch
    triton = None

CHUNK_WORDS = 1024             # 4-byte words per program


if triton is not None:
    # Counts are not specialized on (Triton would compile variants for 1 and multiples of 16):
    # one variant, compiled when the buffers are made. A launch skipped under compile-ahead
    # (worker/compilers.py) would leave the last step's inputs, indices included, in place.
    @triton.jit(do_not_specialize=["num_tokens", "num_reqs"])
    def _gather_fields_kernel(dst_ptr, src_ptr, table_ptr, num_tokens, num_reqs,
                              CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
        """Program (f, c) copies chunk c of field f's step extent, in words: table row f
        is (offset, words per token, words per request, extra words)."""
        row = table_ptr + tl.program_id(0) * 4
        offset = tl.load(row)
        n = num_tokens * tl.load(row + 1) + num_reqs * tl.load(row + 2) + tl.load(row + 3)
        idx = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
        mask = idx < n
        words = tl.load(src_ptr + offset + idx, mask=mask)     # host memory: no kernel writes it
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(dst_ptr + offset + idx, words, mask=mask)

    @triton.jit(do_not_specialize=["n"])
    def _copy_rows_kernel(dst_ptr, src_ptr, n, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(dst_ptr + idx, tl.load(src_ptr + idx, mask=idx < n), mask=idx < n)


def supported(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def gather_fields(dst: torch.Tensor, src: torch.Tensor, table: torch.Tensor, num_tokens: int,
                  num_reqs: int, max_words: int) -> None:
    """dst[field extents] = src[field extents]: `dst` a device int32 arena, `src` its pinned
    host twin, `table` an int32 [F, 4] device tensor (see the kernel); `max_words` bounds any
    field's extent at these counts."""
    pdl = pdl_enabled(dst)
    grid = (table.shape[0], triton.cdiv(max(max_words, 1), CHUNK_WORDS))
    _gather_fields_kernel[grid](dst, src, table, num_tokens, num_reqs, CHUNK=CHUNK_WORDS,
                                USE_PDL=pdl, num_warps=4, launch_pdl=pdl)


def to_host(src: torch.Tensor) -> torch.Tensor:
    """A new pinned host tensor receiving contiguous device `src` (written by a kernel, not the
    copy engine); valid once the stream has passed this point."""
    dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    n = src.numel()
    if n:
        pdl = pdl_enabled(src)
        block = 128
        _copy_rows_kernel[(triton.cdiv(n, block),)](dst, src, n, BLOCK=block, USE_PDL=pdl,
                                                   num_warps=4, launch_pdl=pdl)
    return dst
