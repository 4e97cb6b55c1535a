"""The sampler's Triton kernels under Triton's CPU interpreter against the torch spec
(benchmarks/probes/sampler_interpret.py), where Triton is installed: the fast threshold
resolution (a 128-value candidate buffer, sorted in blocks of 8, 32 or 128: the interpreter
sorts 4096 values slowly) and, with a tiny buffer, the exact whole-row search. The GPU is
tests/test_gpu_sampling.py's."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")
pytest.importorskip("numpy")
import triton_interpret  # noqa: E402  (tests/, needs Triton)

PROBE = os.path.join(triton_interpret.HERE, "..", "benchmarks", "probes", "sampler_interpret.py")


@pytest.mark.parametrize("candidates, draw_block", [(128, 16), (8, 1024)])
def test_kernels_match_the_spec_in_the_interpreter(candidates, draw_block):
    """128: the fast resolution, rows sorting 8, 32 or 128 values (every block size), and
    draws over 10 blocks a row, one slice, where blocks that cannot win skip their noise;
    8: most rows take the whole-row search, and draws take one block a row."""
    res = triton_interpret.run(PROBE, "--vocab", "160", "--candidates", str(candidates),
                               "--sort-sizes", "8", "32", "--draw-block", str(draw_block),
                               "--draw-programs", "1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILURES 0" in res.stdout
