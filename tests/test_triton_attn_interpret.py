"""The triton attention backend's tiled prefill path under Triton's CPU interpreter
(tests/triton_attn_interpret.py), where Triton is installed. The GPU runs it in
test_gpu_engine.py and test_gpu_cudagraph.py (`attention_backend="triton"`)."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")
import triton_interpret  # noqa: E402  (tests/, needs Triton)


def test_tiled_prefill_steps_match_the_dense_reference_in_the_interpreter():
    res = triton_interpret.run(os.path.join(triton_interpret.HERE, "triton_attn_interpret.py"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILURES 0" in res.stdout, res.stdout
