"""The L2 prefetch hint's argument checks (CPU: no kernel runs)."""
from __future__ import annotations

import pytest
import torch

from fullgraph.layers import l2_prefetch


def test_regions_pad_unused_slots_with_zero_bytes():
    w = torch.empty(4, 8, dtype=torch.bfloat16)
    a = torch.empty(10, dtype=torch.bfloat16)
    args, n = l2_prefetch.regions([a], w)
    assert n == 1 and args[0] is a and args[1] == 20 and args[2] is w and args[3] == 0
    args, n = l2_prefetch.regions((), w)
    assert n == 0 and args[1] == 0 and args[3] == 0


def test_regions_reject_what_the_kernel_cannot_prefetch():
    w = torch.empty(4, 8)
    with pytest.raises(ValueError, match="at most 2"):
        l2_prefetch.regions([w, w, w], w)
    with pytest.raises(ValueError, match="contiguous"):
        l2_prefetch.regions([w.t()], w)
