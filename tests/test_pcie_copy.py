"""Step inputs and samples across PCIe by kernels (pcie_copy.py, the arena's extents)."""
from __future__ import annotations

import pytest
import torch

from fullgraph.buffers import StagingArena
from fullgraph.worker.step_output import to_host


def test_extent_needs_four_byte_elements():
    with pytest.raises(ValueError, match="'flags'.*4-byte"):
        StagingArena({"flags": (8, torch.uint8, (1, 0, 0))}, torch.device("cpu"), pin=False)


def _arena(device):
    return StagingArena({"ids": (33, torch.int64, (1, 0, 0)),
                         "qsl": (9, torch.int32, (0, 1, 1)),
                         "temp": (8, torch.float32, (0, 1, 0)),
                         "whole": (5, torch.int32)}, device, pin=device.type == "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, reqs", [(0, 0), (1, 1), (5, 2), (33, 8), (32, 3)])
def test_arena_moves_each_fields_step_extent_and_nothing_else(tokens, reqs):
    a = _arena(torch.device("cuda"))
    for name, arr in a.np.items():          # device: -1 everywhere; host: a pattern
        a.dev[name].fill_(-1)
        arr[:] = range(10, 10 + len(arr))
    a.copy_to_gpu(tokens, reqs)
    torch.cuda.synchronize()
    for name, n in {"ids": tokens, "qsl": reqs + 1, "temp": reqs, "whole": 5}.items():
        got, want = a.dev[name].cpu(), torch.from_numpy(a.np[name])
        assert torch.equal(got[:n], want[:n]), name
        assert (got[n:] == -1).all(), name


@pytest.mark.gpu
def test_arena_without_counts_copies_everything():
    a = _arena(torch.device("cuda"))
    for arr in a.np.values():
        arr[:] = 7
    a.copy_to_gpu()
    torch.cuda.synchronize()
    assert all((t == 7).all() for t in a.dev.values())


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype", [((1,), torch.int64), ((300,), torch.int64),
                                          ((4, 21), torch.float32)])
def test_to_host_copies_a_device_slice_into_pinned_memory(shape, dtype):
    src = torch.arange(2 * torch.Size(shape).numel(), device="cuda").to(dtype)
    src = src[:torch.Size(shape).numel()].view(shape)
    host = to_host(src)
    torch.cuda.synchronize()
    assert host.is_pinned() and host.shape == src.shape and host.dtype == dtype
    assert torch.equal(host, src.cpu())


@pytest.mark.gpu
def test_arena_merge_fills_indexed_tokens_from_a_device_source_across_chunks():
    from fullgraph.buffers import IndexedWrite
    source = torch.tensor([100, 101, 102, 103, 104], device="cuda")
    tok, req = (1, 0, 0), (0, 1, 0)
    a = StagingArena({"ids": (1500, torch.int64, tok), "index": (5, torch.int64, req),
                      "row": (5, torch.int64, req)}, torch.device("cuda"), pin=True,
                     merge=IndexedWrite("ids", "index", "row", source))
    assert a.merges
    a.np["ids"][:] = range(1500)
    # rows 0-2 land in three different chunks of the copy; row 3 points past the step's
    # tokens (the scratch slot), row 4 is past the step's requests: neither is written
    a.np["index"][:] = [3, 700, 1299, 1300, 5]
    a.np["row"][:] = [4, 0, 2, 1, 3]
    a.dev["ids"].fill_(-1)
    a.copy_to_gpu(1300, 4)
    torch.cuda.synchronize()
    want = torch.arange(1500)
    want[1300:] = -1
    want[3], want[700], want[1299] = 104, 100, 102
    assert torch.equal(a.dev["ids"].cpu(), want)
