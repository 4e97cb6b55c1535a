"""Persistent buffers: allocated once at their maximum size, filled per step by slicing.

A CUDA graph records the addresses it reads, so the tensors it reads must never be
reallocated or rebound; each step copies its values into a leading slice instead. The slice
keeps the persistent buffer's strides (vLLM once used `as_strided` here and read out of
bounds).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fullgraph import pcie_copy


def copy_to_persistent(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy `src` into the leading `src.shape` corner of `dst`; return that view of `dst`."""
    if src.dim() != dst.dim() or any(s > d for s, d in zip(src.shape, dst.shape)):
        raise ValueError(f"cannot copy shape {tuple(src.shape)} into persistent buffer "
                         f"{tuple(dst.shape)}")
    view = dst[tuple(slice(0, s) for s in src.shape)]
    view.copy_(src, non_blocking=True)
    return view


def to_device(values: list[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    """Host values (a list: int64) on `device`, copied from pinned memory without waiting:
    a pageable copy, or indexing with a list, waits for the work in flight."""
    t = torch.from_numpy(values) if isinstance(values, np.ndarray) else \
        torch.tensor(values, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class CpuGpuBuffer:
    """A host staging buffer (pinned on CUDA, with a numpy view) and its device twin.

    On a CPU device the two are the same tensor, so "copying" is free.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 pin: bool) -> None:
        self.cpu = torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.np: np.ndarray = self.cpu.numpy()
        self.gpu = self.cpu if device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=device)

    def copy_to_gpu(self, n: int | None = None) -> torch.Tensor:
        src = self.cpu if n is None else self.cpu[:n]
        if self.gpu is self.cpu:
            return src
        return copy_to_persistent(self.gpu, src)


@dataclass(frozen=True)
class IndexedWrite:
    """After the arena's copy: target[index[i]] = source[row[i]] for the step's requests i
    (`target`, `index`, `row` int64 fields; `source` an int64 device tensor that earlier
    kernels write, e.g. the last step's sampled tokens)."""
    target: str
    index: str
    row: str
    source: torch.Tensor


# Elements of a field a step uses: tokens * a + requests * b + c (the whole field if absent).
Extent = tuple[int, int, int]


class StagingArena:
    """Several 1-D persistent buffers packed into one pinned host arena and one device arena,
    so a step's inputs reach the device in one transfer instead of one per buffer (each
    costs host time and, on the device, a wait between kernels). Fields are typed views at
    fixed offsets.

    A field may declare its `Extent`: then `copy_to_gpu(num_tokens, num_reqs)` moves only the
    elements a step of that size uses, in one kernel reading pinned memory (pcie_copy.py);
    without counts, or where that kernel cannot run, the whole arena is copied. That kernel
    also performs `merge` (then `merges` is True; otherwise the caller must)."""

    _ALIGN = 64

    def __init__(self, fields: dict[str, tuple[int, torch.dtype]
                                    | tuple[int, torch.dtype, Extent]],
                 device: torch.device, pin: bool, merge: IndexedWrite | None = None) -> None:
        offsets, total, table = {}, 0, []
        for name, (n, dtype, *extent) in fields.items():
            offsets[name] = (total, n, dtype)
            words = dtype.itemsize // 4
            if extent and (words == 0 or dtype.itemsize % 4):
                raise ValueError(f"field {name!r}: an extent needs 4-byte-multiple elements")
            a, b, c = extent[0] if extent else (0, 0, n)
            table.append((total // 4, a * words, b * words, c * words))
            total += -(-n * dtype.itemsize // self._ALIGN) * self._ALIGN
        self.nbytes = total
        self.cpu = torch.zeros(total, dtype=torch.uint8, pin_memory=pin)
        self.gpu = self.cpu if device.type == "cpu" else torch.zeros(total, dtype=torch.uint8,
                                                                     device=device)
        merge_args, max_reqs = None, 1
        if merge is not None:
            names = list(fields)
            if any(fields[f][1] != torch.int64 for f in (merge.target, merge.index, merge.row)):
                raise ValueError("merge fields must be int64")
            merge_args = (names.index(merge.target), *(offsets[f][0] // 8 for f in
                          (merge.target, merge.index, merge.row)), merge.source)
            max_reqs = fields[merge.index][0]
        self._gather = None
        if self.gpu is not self.cpu and pin and pcie_copy.supported(device):
            self._gather = pcie_copy.FieldGather(self.gpu, self.cpu, table, merge_args, max_reqs)
            self.copy_to_gpu(0, 0)     # compiles the kernel now, before any graph warmup
        self.merges = self._gather is not None and merge is not None
        self.np: dict[str, np.ndarray] = {}
        self.dev: dict[str, torch.Tensor] = {}
        for name, (off, n, dtype) in offsets.items():
            size = n * dtype.itemsize
            self.np[name] = self.cpu[off:off + size].view(dtype).numpy()
            self.dev[name] = self.gpu[off:off + size].view(dtype)

    def copy_to_gpu(self, num_tokens: int | None = None, num_reqs: int | None = None) -> None:
        if self.gpu is self.cpu:
            return
        if self._gather is None or num_tokens is None or num_reqs is None:
            self.gpu.copy_(self.cpu, non_blocking=True)
            return
        self._gather(num_tokens, num_reqs)
