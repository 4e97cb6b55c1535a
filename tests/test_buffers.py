"""copy_to_persistent: a leading-slice view with the persistent buffer's strides."""
from __future__ import annotations

import pytest
import torch

from fullgraph.buffers import CpuGpuBuffer, copy_to_persistent


def test_copy_returns_a_leading_slice_view():
    dst = torch.zeros(8, 5)
    src = torch.arange(6.0).view(2, 3)
    view = copy_to_persistent(dst, src)
    assert view.shape == (2, 3)
    assert view.stride() == dst.stride()                  # not re-strided to src
    assert view.data_ptr() == dst.data_ptr()              # aliases the buffer
    assert torch.equal(dst[:2, :3], src) and dst[2:].abs().sum() == 0 and dst[:, 3:].abs().sum() == 0
    view.fill_(7)
    assert dst[1, 2] == 7


def test_copy_rejects_oversized_or_mismatched_sources():
    with pytest.raises(ValueError, match="persistent buffer"):
        copy_to_persistent(torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match="persistent buffer"):
        copy_to_persistent(torch.zeros(4, 4), torch.zeros(4))


def test_cpu_buffer_shares_memory_on_cpu():
    b = CpuGpuBuffer((6,), torch.int64, torch.device("cpu"), pin=False)
    b.np[:3] = [1, 2, 3]
    v = b.copy_to_gpu(3)
    assert v.tolist() == [1, 2, 3] and v.data_ptr() == b.gpu.data_ptr()


def test_staging_arena_packs_typed_fields_without_overlap():
    from fullgraph.buffers import StagingArena
    a = StagingArena({"ids": (5, torch.int64), "temp": (3, torch.float32),
                      "qsl": (4, torch.int32)}, torch.device("cpu"), pin=False)
    a.np["ids"][:] = [1, 2, 3, 4, 5]
    a.np["temp"][:] = [0.5, 1.5, 2.5]
    a.np["qsl"][:] = [7, 8, 9, 10]
    a.copy_to_gpu()
    assert a.dev["ids"].tolist() == [1, 2, 3, 4, 5] and a.dev["ids"].dtype == torch.int64
    assert a.dev["temp"].tolist() == [0.5, 1.5, 2.5]
    assert a.dev["qsl"].tolist() == [7, 8, 9, 10]
    starts = sorted(t.data_ptr() for t in a.dev.values())
    assert all(s % 64 == 0 for s in (p - a.gpu.data_ptr() for p in starts))
