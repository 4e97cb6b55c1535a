"""Compiler settings: the Triton cache directory pinned once (so inductor cannot move it
mid-start); compile-ahead's worker processes."""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from fullgraph.worker.compilers import (pin_triton_cache_dir, start_compile_workers,
                                        triton_compile_ahead)

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _scale_kernel(x_ptr, y_ptr, n, FACTOR: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * FACTOR, mask=i < n)
except ImportError:
    triton = None


def _fake_triton(directory: str) -> types.ModuleType:
    triton = types.ModuleType("triton")
    triton.knobs = types.SimpleNamespace(cache=types.SimpleNamespace(dir=directory))
    return triton


def test_pins_tritons_default_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", "unset")     # so monkeypatch restores it after
    monkeypatch.delenv("TRITON_CACHE_DIR")
    monkeypatch.setitem(sys.modules, "triton", _fake_triton(str(tmp_path / "default")))
    pin_triton_cache_dir()
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "default")


def test_keeps_a_directory_the_user_set(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setitem(sys.modules, "triton", _fake_triton(str(tmp_path / "default")))
    pin_triton_cache_dir()
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")


def test_without_triton_nothing_is_set(monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", "unset")
    monkeypatch.delenv("TRITON_CACHE_DIR")
    monkeypatch.setitem(sys.modules, "triton", None)      # import fails
    pin_triton_cache_dir()
    assert "TRITON_CACHE_DIR" not in os.environ


def test_ptxas_is_pinned_to_inductors_choice_unless_set(monkeypatch):
    from fullgraph.worker.compilers import pin_triton_ptxas
    calls = []
    tasks = types.ModuleType("torch._inductor.runtime.compile_tasks")
    tasks._set_triton_ptxas_path = lambda: calls.append(1)
    monkeypatch.setitem(sys.modules, "torch._inductor.runtime.compile_tasks", tasks)
    monkeypatch.setenv("TRITON_PTXAS_PATH", "/opt/mine/ptxas")
    pin_triton_ptxas()
    assert calls == []
    monkeypatch.delenv("TRITON_PTXAS_PATH")
    pin_triton_ptxas()
    assert calls == [1]


# ------------------------------------------------------------------ compile workers
class _FakeKernel:
    """What a worker calls: `preload(specialization)`; here it writes a file, or fails."""

    def preload(self, specialization: str) -> None:
        if specialization == "fail":
            raise ValueError("no such layout")
        with open(specialization, "w") as f:
            f.write(str(os.getpid()))


fake_kernel = _FakeKernel()


def test_compile_workers_run_requests_in_subprocesses(tmp_path):
    from fullgraph.worker.compile_worker import CompileWorkers
    workers = CompileWorkers(2)
    try:
        outs = [tmp_path / f"k{i}" for i in range(5)]
        futures = [workers.submit(__name__, "fake_kernel", str(p)) for p in outs]
        for f in futures:
            f.result(timeout=120)
        pids = {int(p.read_text()) for p in outs}
        assert os.getpid() not in pids and 1 <= len(pids) <= 2
        with pytest.raises(RuntimeError, match=r"(?s)fake_kernel.*no such layout"):
            workers.submit(__name__, "fake_kernel", "fail").result(timeout=120)
        # a worker survives a failed request
        workers.submit(__name__, "fake_kernel", str(tmp_path / "after")).result(timeout=120)
        assert (tmp_path / "after").exists()
    finally:
        workers.close()
    assert all(p.poll() is not None for p in workers._procs)


def test_compile_ahead_without_triton_changes_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    assert start_compile_workers() is None
    with triton_compile_ahead(None) as ahead:
        assert ahead is None


@pytest.mark.gpu
def test_compile_ahead_skips_cold_launches_and_loads_cached_kernels(monkeypatch, tmp_path,
                                                                   request):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))     # cold: an empty cache
    loads = []
    monkeypatch.setattr(triton.knobs.compilation, "listener",
                        lambda **kw: loads.append(kw["cache_hit"]))
    x = torch.arange(100.0, device="cuda")
    y = torch.zeros_like(x)

    def launch():
        _scale_kernel[(1,)](x, y, 100, FACTOR=3.0, BLOCK=128)

    workers = start_compile_workers(2)
    request.addfinalizer(workers.close)
    _scale_kernel.device_caches.clear()
    with triton_compile_ahead(workers) as ahead:
        launch()                  # not compiled anywhere: skipped, compiled in a worker
        launch()                  # compiling: skipped again, not compiled twice
        assert ahead.launches_skipped == 2 and len(ahead.compiles) == 1
        torch.cuda.synchronize()
        assert not y.any() and loads == []   # nothing ran, nothing compiled in this process
    assert loads == [True]        # the exit loaded the worker's kernel from the cache
    launch()
    assert torch.equal(y, x * 3) and loads == [True]
    # a restart: not in memory, in the cache -> loaded and launched, nothing skipped
    _scale_kernel.device_caches.clear()
    y.zero_()
    with triton_compile_ahead(workers) as ahead:
        launch()
        assert ahead.launches_skipped == 0 and not ahead.compiles
    assert torch.equal(y, x * 3) and all(loads)
