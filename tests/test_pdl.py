"""When our kernels and inductor's launch with programmatic dependent launch (layers/pdl.py)."""
from __future__ import annotations

import pytest
import torch

from fullgraph.layers import pdl


@pytest.fixture(autouse=True)
def fresh_cache():
    pdl._enabled.cache_clear()
    yield
    pdl._enabled.cache_clear()


def test_never_on_cpu():
    assert not pdl.pdl_enabled(torch.zeros(1))
    assert pdl.inductor_options(torch.device("cpu")) == {}


@pytest.mark.gpu
def test_on_for_hopper_unless_turned_off(monkeypatch):
    x = torch.zeros(1, device="cuda")
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert pdl.pdl_enabled(x) == hopper
    assert bool(pdl.inductor_options(x.device)) == hopper
    monkeypatch.setenv("FULLGRAPH_PDL", "0")
    pdl._enabled.cache_clear()
    assert not pdl.pdl_enabled(x) and pdl.inductor_options(x.device) == {}


@pytest.mark.gpu
def test_launch_outside_graph_runs_a_pdl_kernel_where_enabled(monkeypatch):
    device = torch.device("cuda")
    mark = pdl.launch_outside_graph(device)
    if torch.cuda.get_device_capability()[0] >= 9:
        assert mark is not None and mark.item() == 1
    else:
        assert mark is None
    monkeypatch.setenv("FULLGRAPH_PDL", "0")
    pdl._enabled.cache_clear()
    assert pdl.launch_outside_graph(device) is None
