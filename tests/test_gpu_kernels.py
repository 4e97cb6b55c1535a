"""Our Triton kernels against float32 references (GPU only)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fullgraph.layers.gemv import GEMV_MAX_ROWS, gemv, gemv_supported
from fullgraph.layers.linear import linear

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("n, k", [(4096, 1024), (1000, 3000), (37, 130)])
def test_gemv_matches_float32_matmul(dtype, m, n, k):
    g = torch.Generator(device="cuda").manual_seed(m * n + k)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g) * k ** -0.5
    ref = x.float() @ w.float().t()
    out = gemv(x, w)
    assert out.shape == (m, n) and out.dtype == dtype
    # no worse than cuBLAS's own rounding of the same product
    err = (out.float() - ref).abs().max()
    err_cublas = (F.linear(x, w).float() - ref).abs().max()
    assert err <= 2 * err_cublas + 1e-3


def test_gemv_writes_into_a_row_slice_of_a_wider_buffer():
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(500, 256, device="cuda", dtype=torch.bfloat16)
    buf = torch.zeros(8, 500, device="cuda", dtype=torch.bfloat16)
    gemv(x, w, buf[:3])
    torch.testing.assert_close(buf[:3].float(), (x.float() @ w.float().t()), atol=0.5, rtol=2e-2)
    assert not buf[3:].any()


def test_compiled_linear_picks_the_kernel_per_row_count():
    w = torch.randn(768, 512, device="cuda", dtype=torch.bfloat16) * 0.05
    f = torch.compile(lambda x: linear(x, w) * 2, dynamic=True, fullgraph=True)
    for m in (1, 7, GEMV_MAX_ROWS + 1, 300):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        assert gemv_supported(x, w) == (m <= GEMV_MAX_ROWS)
        torch.testing.assert_close(f(x), F.linear(x, w) * 2, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 3, 64, 1000])
def test_qk_norm_rope_kernel_matches_transformers(dtype, t):
    from test_qk_norm_rope import hf_reference, make_inputs
    from fullgraph.layers.qk_norm_rope import qk_norm_rope_store_kv
    a = make_inputs(t=t, slots=t + 500, dtype=dtype, device="cuda", seed=t)
    slots = a["slot_mapping"]
    q = qk_norm_rope_store_kv(**a)
    q_ref, k_ref, v_ref = hf_reference(a)
    # within the rounding of the same computation done op by op in `dtype` (reference path)
    q_lo = qk_norm_rope_store_kv(**make_inputs(t=t, slots=t + 500, dtype=dtype, seed=t))
    err_ref = (q_lo.float() - q_ref.cpu()).abs().max()
    assert (q.float() - q_ref).abs().max() <= 2 * err_ref + 1e-3
    assert (a["k_cache"][slots].float() - k_ref).abs().max() <= 2 * err_ref + 1e-3
    assert torch.equal(a["v_cache"][slots], v_ref.to(dtype))
    untouched = torch.ones(t + 500, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert not a["k_cache"][untouched].any() and not a["v_cache"][untouched].any()
