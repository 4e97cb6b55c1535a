"""The sampler's Triton kernels under Triton's CPU interpreter against the torch spec
(benchmarks/probes/sampler_interpret.py), where Triton is installed: the fast threshold
resolution (a 256-value candidate buffer: the interpreter sorts 4096 values slowly) and,
with a tiny buffer, the exact whole-row search. The GPU is tests/test_gpu_sampling.py's."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
np = pytest.importorskip("numpy")

PROBE = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "probes", "sampler_interpret.py")


@pytest.mark.skipif(tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 3),
                    reason="Triton 3.6's interpreter converts 1-element arrays with int(), "
                           "which numpy >= 2.3 refuses")
@pytest.mark.parametrize("candidates", [256, 8])
def test_kernels_match_the_spec_in_the_interpreter(candidates):
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, PROBE, "--vocab", "160", "--candidates",
                          str(candidates)], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILURES 0" in res.stdout
