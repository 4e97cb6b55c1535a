"""The batch-invariant mode's matmul and attention kernels (layers/invariant_gemm.py,
attention/paged_invariant.py) under Triton's CPU interpreter, float32
(tests/invariant_kernels_interpret.py), where Triton is installed. The GPU is
tests/test_gpu_batch_invariant.py's."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")
import triton_interpret  # noqa: E402  (tests/, needs Triton)


def test_kernels_keep_a_row_s_bits_in_the_interpreter():
    res = triton_interpret.run(os.path.join(triton_interpret.HERE,
                                            "invariant_kernels_interpret.py"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILURES 0" in res.stdout, res.stdout
