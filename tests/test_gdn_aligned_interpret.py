"""The batch-invariant mode's GDN kernels (layers/gdn/fused_aligned.py) under Triton's CPU
interpreter against aligned.py's torch path and gating.py's norm
(tests/gdn_aligned_interpret.py), where Triton is installed. The GPU is
tests/test_gpu_batch_invariant.py's."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(__file__)


def test_kernels_match_the_torch_path_in_the_interpreter():
    path = os.pathsep.join([os.path.join(HERE, ".."), HERE, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    res = subprocess.run([sys.executable, os.path.join(HERE, "gdn_aligned_interpret.py")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILURES 0" in res.stdout, res.stdout
