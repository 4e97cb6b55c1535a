"""The fused GDN verify kernels (layers/gdn/fused_verify.py) under Triton's CPU interpreter
against the torch ops they replace (tests/gdn_verify_interpret.py), where Triton is installed.
The GPU is tests/test_gpu_hybrid_kernels.py's."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = os.path.join(os.path.dirname(__file__), "gdn_verify_interpret.py")


def test_kernels_match_the_torch_ops_in_the_interpreter():
    root = os.path.join(os.path.dirname(__file__), "..")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILURES 0" in res.stdout, res.stdout
