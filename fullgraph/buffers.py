"""Persistent buffers: allocated once at their maximum size, filled per step by slicing.

A CUDA graph records the addresses it reads, so the tensors it reads must never be
reallocated or rebound; each step copies its values into a leading slice instead. The slice
keeps the persistent buffer's strides (vLLM once used `as_strided` here and read out of
bounds: seed 002).
"""
from __future__ import annotations

import numpy as np
import torch


def copy_to_persistent(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy `src` into the leading `src.shape` corner of `dst`; return that view of `dst`."""
    if src.dim() != dst.dim() or any(s > d for s, d in zip(src.shape, dst.shape)):
        raise ValueError(f"cannot copy shape {tuple(src.shape)} into persistent buffer "
                         f"{tuple(dst.shape)}")
    view = dst[tuple(slice(0, s) for s in src.shape)]
    view.copy_(src, non_blocking=True)
    return view


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


class StagingArena:
    """Several 1-D persistent buffers packed into one pinned host arena and one device arena,
    so a step's inputs reach the device in a single copy instead of one per buffer (each
    copy costs a few microseconds of host time). Fields are typed views at fixed offsets."""

    _ALIGN = 64

    def __init__(self, fields: dict[str, tuple[int, torch.dtype]], device: torch.device,
                 pin: bool) -> None:
        offsets, total = {}, 0
        for name, (n, dtype) in fields.items():
            offsets[name] = (total, n, dtype)
            total += -(-n * dtype.itemsize // self._ALIGN) * self._ALIGN
        self.nbytes = total
        self.cpu = torch.zeros(total, dtype=torch.uint8, pin_memory=pin)
        self.gpu = self.cpu if device.type == "cpu" else torch.zeros(total, dtype=torch.uint8,
                                                                     device=device)
        self.np: dict[str, np.ndarray] = {}
        self.dev: dict[str, torch.Tensor] = {}
        for name, (off, n, dtype) in offsets.items():
            size = n * dtype.itemsize
            self.np[name] = self.cpu[off:off + size].view(dtype).numpy()
            self.dev[name] = self.gpu[off:off + size].view(dtype)

    def copy_to_gpu(self) -> None:
        if self.gpu is not self.cpu:
            self.gpu.copy_(self.cpu, non_blocking=True)
