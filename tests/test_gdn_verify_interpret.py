"""The fused GDN verify kernels (layers/gdn/fused_verify.py) under Triton's CPU interpreter
against the torch ops they replace (tests/gdn_verify_interpret.py), where Triton is installed.
The GPU is tests/test_gpu_hybrid_kernels.py's."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")
import triton_interpret  # noqa: E402  (tests/, needs Triton)


def test_kernels_match_the_torch_ops_in_the_interpreter():
    res = triton_interpret.run(os.path.join(triton_interpret.HERE, "gdn_verify_interpret.py"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILURES 0" in res.stdout, res.stdout
