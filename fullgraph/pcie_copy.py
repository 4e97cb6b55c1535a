"""Small host<->device copies as kernels that read or write pinned host memory directly.

A step's inputs (a few hundred bytes in decode) and its sampled ids (8 bytes a request)
cross PCIe every step. As copy-engine copies on the step's stream, each costs the device
5-13 µs between kernels (H100, batch-1 decode: 0.802 -> 0.789 ms/step without the input
copy, 0.796 without the output copy; docs/benchmarks.md, ninth session): the copy waits for
the kernels before it, and the kernels after it wait for the copy. A kernel reads and
writes pinned memory through unified addressing instead, and as a PDL kernel (layers/pdl.py)
it loads its host words while the previous kernel finishes.

The samples' copy launches eagerly after each replay; the inputs' copy eagerly before it, or
inside the graph for steps of 2-32 requests (model_runner.py). Their host buffers stay put
until an event says the kernel ran (the runner's `_inputs_copied`, the step's event).
They launch without Triton's per-call work (`_Launch`): through the JIT a launch cost
~29 µs of host time against ~4 µs for a copy-engine copy (H100 host,
benchmarks/probes/host_copy_launch.py), and host time per step is a budget.
"""
from __future__ import annotations

import torch

from fullgraph.layers.launch import direct_launch_checked, launch_hooks, next_power_of_2
from fullgraph.layers.pdl import pdl_enabled

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: copies go through torch
    triton = None

CHUNK_WORDS = 1024             # 4-byte words per program


if triton is not None:
    # No argument is specialized on (Triton would compile variants for the value 1, multiples
    # of 16 and 16-byte-aligned pointers): one variant per pointer dtype, compiled when the
    # buffers are made, which `_Launch` may then reuse for any arguments. And a launch
    # skipped under compile-ahead (worker/compilers.py) would leave the last step's inputs,
    # indices included, in place.
    @triton.jit(do_not_specialize=["num_tokens", "num_reqs", "target_field", "target_off",
                                   "index_off", "row_off"],
                do_not_specialize_on_alignment=["dst_ptr", "src_ptr", "table_ptr", "dst64_ptr",
                                                "src64_ptr", "source_ptr"])
    def _gather_fields_kernel(dst_ptr, src_ptr, table_ptr, num_tokens, num_reqs,
                              dst64_ptr, src64_ptr, source_ptr, target_field, target_off,
                              index_off, row_off, CHUNK: tl.constexpr, MERGE: tl.constexpr,
                              R_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        """Program (f, c) copies chunk c of field f's step extent, in words: table row f
        is (offset, words per token, words per request, extra words). With MERGE, the
        programs of int64 field `target_field` then set target[index[i]] = source[row[i]]
        for i < num_reqs, where index[i] falls in their chunk of the step's extent (offsets
        in int64 elements)."""
        f = tl.program_id(0)
        row = table_ptr + f * 4
        offset = tl.load(row)
        n = num_tokens * tl.load(row + 1) + num_reqs * tl.load(row + 2) + tl.load(row + 3)
        idx = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
        mask = idx < n
        words = tl.load(src_ptr + offset + idx, mask=mask)     # host memory: no kernel writes it
        if MERGE:
            i = tl.arange(0, R_BLOCK)
            lo = tl.program_id(1) * (CHUNK // 2)
            index = tl.load(src64_ptr + index_off + i, mask=(i < num_reqs) & (f == target_field),
                            other=-1)
            merge = ((f == target_field) & (index >= lo) & (index < lo + CHUNK // 2)
                     & (index < n // 2))
            source_row = tl.load(src64_ptr + row_off + i, mask=merge, other=0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(dst_ptr + offset + idx, words, mask=mask)
        if MERGE:                  # the source is device memory an earlier kernel wrote
            value = tl.load(source_ptr + source_row, mask=merge)
            tl.debug_barrier()     # this program's copy of the target lands first
            tl.store(dst64_ptr + target_off + index, value, mask=merge)

    @triton.jit(do_not_specialize=["n"], do_not_specialize_on_alignment=["dst_ptr", "src_ptr"])
    def _copy_rows_kernel(dst_ptr, src_ptr, n, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(dst_ptr + idx, tl.load(src_ptr + idx, mask=idx < n), mask=idx < n)


class _Launch:
    """Launches a Triton kernel whose arguments are never specialized: the first launch of a
    variant (`key`: what selects it, the pointer dtypes and constants) goes through the JIT,
    which compiles or loads the kernel; later ones call the compiled kernel's launcher
    directly, skipping the JIT's binding, specialization and cache lookup. Through the JIT
    always on other Triton versions, and whenever a launch hook is set (profilers read
    launch metadata there)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.compiled: dict = {}
        self.direct = direct_launch_checked()

    def __call__(self, key, grid: tuple[int, int, int], device_index: int, *args,
                 **options) -> None:
        kernel = self.compiled.get(key)
        if kernel is None or not self.direct or launch_hooks():
            self.compiled[key] = self.fn[grid](*args, **options)
            return
        stream = torch._C._cuda_getCurrentRawStream(device_index)   # as Triton's driver does
        kernel.run(*grid, stream, kernel.function, kernel.packed_metadata, None, None, None,
                   *args)


def supported(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


_gather = _Launch(_gather_fields_kernel) if triton is not None else None
_copy_rows = _Launch(_copy_rows_kernel) if triton is not None else None


class FieldGather:
    """One arena's step copy (`_gather_fields_kernel`): dst[field extents] = src[field
    extents] for a device arena and its pinned host twin (byte tensors). `table` rows are
    (offset, words per token, words per request, extra words); `merge` is (target field,
    target, index and row offsets in int64 elements, int64 device source) for at most
    `max_reqs` requests. Everything but the counts is fixed here, once."""

    _MAX_GRIDS = 4096          # grids kept per count pair (eager shapes are unbounded)

    def __init__(self, dst: torch.Tensor, src: torch.Tensor,
                 table: list[tuple[int, int, int, int]],
                 merge: tuple[int, int, int, int, torch.Tensor] | None = None,
                 max_reqs: int = 1) -> None:
        self.rows = table
        self.device_index = dst.device.index
        self.pdl = pdl_enabled(dst)
        r_block = next_power_of_2(max_reqs)
        field, target, index, row, source = merge if merge is not None else (0, 0, 0, 0, dst)
        dst32, src32 = dst.view(torch.int32), src.view(torch.int32)
        self.head = (dst32, src32, torch.tensor(table, dtype=torch.int32, device=dst.device))
        self.tail = (dst32.view(torch.int64), src32.view(torch.int64), source, field, target,
                     index, row, CHUNK_WORDS, merge is not None, r_block, self.pdl)
        self.key = (merge is not None, r_block, self.pdl)
        self.grids: dict[tuple[int, int], tuple[int, int, int]] = {}

    def __call__(self, num_tokens: int, num_reqs: int) -> None:
        grid = self.grids.get((num_tokens, num_reqs))
        if grid is None:
            words = max(num_tokens * a + num_reqs * b + c for _, a, b, c in self.rows)
            grid = (len(self.rows), max(1, -(-words // CHUNK_WORDS)), 1)
            if len(self.grids) < self._MAX_GRIDS:
                self.grids[num_tokens, num_reqs] = grid
        _gather(self.key, grid, self.device_index, *self.head, num_tokens, num_reqs,
                *self.tail, num_warps=4, launch_pdl=self.pdl)


def to_host(src: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Contiguous device `src` into pinned host memory (`out`, or a new tensor), written by a
    kernel, not the copy engine; valid once the stream has passed this point."""
    dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True) if out is None else out
    n = src.numel()
    if n:
        pdl = pdl_enabled(src)
        _copy_rows((src.dtype, pdl), (-(-n // 128), 1, 1), src.device.index, dst, src, n, 128,
                   pdl, num_warps=4, launch_pdl=pdl)
    return dst
