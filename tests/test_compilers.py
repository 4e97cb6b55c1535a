"""The Triton cache directory is pinned once, so inductor cannot move it mid-start."""
from __future__ import annotations

import os
import sys
import types

from fullgraph.worker.compilers import pin_triton_cache_dir


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
