"""Asking L2 for a later kernel's weights while this one waits on latency, not bandwidth.

At batch 1 a layer's q/k kernel and decode attention move ~1 MB in several dependent round
trips (~8.5 µs of a ~24.5 µs layer on an H100, docs/benchmarks.md) while HBM idles; the
GEMVs after them stream their weights at full rate only once they run. A kernel that starts
early under PDL can issue `prefetch.global.L2` for a later kernel's weights before it
waits: the lines are fetched while attention's latency chain runs, and the later GEMV
reads them from L2.
Prefetches are fire-and-forget (no registers, no completion), so the issuing kernel is not
slowed by them; a line evicted before use only costs its bandwidth again.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: nothing to prefetch
    triton = None

MAX_TENSORS = 2                # per kernel: enough for a layer's MLP (gate_up, down)


def regions(tensors: tuple[torch.Tensor, ...] | list[torch.Tensor],
            fallback: torch.Tensor) -> tuple[list, int]:
    """Kernel arguments for up to MAX_TENSORS contiguous tensors: [ptr, bytes] pairs (unused
    slots point at `fallback` with 0 bytes) and how many are live."""
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"at most {MAX_TENSORS} tensors to prefetch, got {len(tensors)}")
    args: list = []
    for i in range(MAX_TENSORS):
        t = tensors[i] if i < len(tensors) else None
        if t is not None and not t.is_contiguous():
            raise ValueError("tensors to prefetch must be contiguous")
        args += [t, t.numel() * t.element_size()] if t is not None else [fallback, 0]
    return args, len(tensors)


if triton is not None:
    @triton.jit
    def prefetch_l2(base, nbytes, part, parts, LINES: tl.constexpr):
        """Prefetch part `part` of `parts` equal shares of the `nbytes` at `base` into L2,
        LINES 128-byte lines per instruction round (one per thread)."""
        LINE: tl.constexpr = 128
        share = tl.cdiv(tl.cdiv(nbytes, parts), LINE) * LINE
        start = part.to(tl.int64) * share
        end = tl.minimum(start + share, nbytes)
        p = base.to(tl.pointer_type(tl.int8))
        for off in range(start, end, LINES * LINE):
            # past the end: the share's last line again (a prefetch must stay in bounds)
            offs = tl.minimum(off + tl.arange(0, LINES).to(tl.int64) * LINE, end - 1)
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [p + offs],
                                      dtype=tl.int32, is_pure=False, pack=1)
