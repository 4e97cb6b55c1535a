"""Our Triton kernels against float32 references (GPU only)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fullgraph.layers.embedding import embedding
from fullgraph.layers.gemv import GEMV_MAX_ROWS, gemv, gemv_supported
from fullgraph.layers.linear import linear

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 4, 5, 8, 9, 16, 17, 32])
@pytest.mark.parametrize("n, k", [(4096, 1024), (1024, 2048), (1000, 3000), (37, 130)])
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
@pytest.mark.parametrize("norm", [True, False], ids=["qwen3", "llama"])
def test_qk_norm_rope_kernel_matches_transformers(dtype, t, norm):
    from test_qk_norm_rope import hf_reference, make_inputs
    from fullgraph.layers.qk_norm_rope import qk_norm_rope_store_kv
    a = make_inputs(t=t, slots=t + 500, dtype=dtype, device="cuda", seed=t, norm=norm)
    slots = a["slot_mapping"]
    q = qk_norm_rope_store_kv(**a)
    q_ref, k_ref, v_ref = hf_reference(a)
    # each within the rounding of the same computation done op by op in `dtype` (the
    # reference path's q, and the k it stores)
    lo = make_inputs(t=t, slots=t + 500, dtype=dtype, seed=t, norm=norm)
    q_lo = qk_norm_rope_store_kv(**lo)
    err_q = (q_lo.float() - q_ref.cpu()).abs().max()
    err_k = (lo["k_cache"][slots.cpu()].float() - k_ref.cpu()).abs().max()
    assert (q.float() - q_ref).abs().max() <= 2 * err_q + 1e-3
    assert (a["k_cache"][slots].float() - k_ref).abs().max() <= 2 * err_k + 1e-3
    assert torch.equal(a["v_cache"][slots], v_ref.to(dtype))
    untouched = torch.ones(t + 500, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert not a["k_cache"][untouched].any() and not a["v_cache"][untouched].any()


@pytest.mark.parametrize("m", [1, 5, 16, 17, 300])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("hidden", [1024, 2560])   # one K slice at one row, and several
@torch.inference_mode()
def test_norm_linear_matches_transformers_rmsnorm(m, with_residual, hidden):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    from fullgraph.layers.fused_linear import norm_linear
    from fullgraph.layers.norm import RMSNorm
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    res = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16, generator=g) \
        if with_residual else None
    norm = RMSNorm(hidden, 1e-6).cuda().to(torch.bfloat16)
    norm.weight.data = torch.rand(hidden, device="cuda", generator=g).to(torch.bfloat16) + 0.5
    proj = torch.nn.Linear(hidden, 3000, bias=False, device="cuda", dtype=torch.bfloat16)
    y, h = torch.compile(norm_linear, dynamic=True, fullgraph=True)(x, res, norm, proj)
    h_ref = x + res if with_residual else x
    assert torch.equal(h, h_ref)
    ref_norm = Qwen3RMSNorm(hidden, 1e-6).cuda()
    ref_norm.weight.data = norm.weight.float()
    ref = F.linear(ref_norm(h_ref.float()), proj.weight.float())
    unfused = F.linear(norm(h_ref), proj.weight)        # the same math op by op in bf16
    err_unfused = (unfused.float() - ref).abs().max()
    assert (y.float() - ref).abs().max() <= 2 * err_unfused + 1e-3


@pytest.mark.parametrize("m", [1, 8, 300])
@torch.inference_mode()
def test_add_rms_norm_matches_transformers_rmsnorm(m):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    from fullgraph.layers.fused_linear import add_rms_norm
    from fullgraph.layers.norm import RMSNorm
    g = torch.Generator(device="cuda").manual_seed(m)
    x, res = (torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16, generator=g)
              for _ in range(2))
    norm = RMSNorm(1024, 1e-6).cuda().to(torch.bfloat16)
    norm.weight.data = torch.rand(1024, device="cuda", generator=g).to(torch.bfloat16) + 0.5
    y, h = add_rms_norm(x, res, norm)
    assert torch.equal(h, x + res)
    ref_norm = Qwen3RMSNorm(1024, 1e-6).cuda().to(torch.bfloat16)
    ref_norm.weight.data = norm.weight.data.clone()
    ref = ref_norm(x + res)                       # transformers' bf16 op order
    torch.testing.assert_close(y.float(), ref.float(), rtol=2 ** -7, atol=1e-3)   # 1 bf16 ulp


@pytest.mark.parametrize("m", [1, 7, 16, 17, 300])
@torch.inference_mode()
def test_silu_mul_linear_matches_float32(m):
    from fullgraph.layers.fused_linear import silu_mul_linear
    g = torch.Generator(device="cuda").manual_seed(m)
    gate_up = torch.randn(m, 2 * 3072, device="cuda", dtype=torch.bfloat16, generator=g) * 2
    proj = torch.nn.Linear(3072, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    y = torch.compile(silu_mul_linear, dynamic=True, fullgraph=True)(gate_up, proj)
    gate, up = gate_up.float().chunk(2, dim=-1)
    ref = F.linear(F.silu(gate) * up, proj.weight.float())
    gate, up = gate_up.chunk(2, dim=-1)
    err_unfused = (F.linear(F.silu(gate) * up, proj.weight).float() - ref).abs().max()
    assert (y.float() - ref).abs().max() <= 2 * err_unfused + 1e-3


@pytest.mark.parametrize("m", [1, 16])
def test_gemv_l2_prefetch_hint_changes_nothing_it_computes(m):
    """The prefetched tensors (sizes not multiples of a 128-byte line, more programs than
    lines) stay as they were, and the product is bitwise the one without the hint."""
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    later = [torch.randn(6144, 1024, device="cuda", dtype=torch.bfloat16, generator=g),
             torch.randn(37, device="cuda", dtype=torch.bfloat16, generator=g)]
    before = [t.clone() for t in later]
    plain = gemv(x, w)
    for hint in ([later[0]], later, [later[1]]):
        out = gemv(x, w, l2_prefetch_next=hint)
        torch.cuda.synchronize()
        assert torch.equal(out, plain)
    assert all(torch.equal(a, b) for a, b in zip(later, before))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, vocab", [(1, 151936), (3, 1000), (128, 151936), (2, 600000)])
def test_argmax_rows_is_torch_argmax_with_ties(dtype, rows, vocab):
    """Few distinct values, so every row's maximum appears many times, in many chunks: the
    first index must win, as in torch.argmax."""
    from fullgraph.layers.argmax import argmax_rows
    g = torch.Generator(device="cuda").manual_seed(rows + vocab)
    x = torch.randint(-40, 40, (rows, vocab), device="cuda", generator=g).to(dtype)
    x[0, -1] = 100.0                       # a lone maximum in the last (partial) chunk
    if rows > 1:
        x[1, :] = -3.0                     # one value everywhere: index 0
    got = argmax_rows(x)
    assert got.dtype == torch.int64
    assert torch.equal(got, x.argmax(dim=-1))
    sliced = x[:, : vocab - 5]             # a row stride wider than the row
    assert torch.equal(argmax_rows(sliced), sliced.argmax(dim=-1))
    buf = torch.full((rows + 3,), -1, dtype=torch.int64, device="cuda")
    assert argmax_rows(x, out=buf[:rows]).data_ptr() == buf.data_ptr()
    assert torch.equal(buf[:rows], x.argmax(dim=-1)) and (buf[rows:] == -1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("t, vocab, hidden", [(1, 151936, 1024), (7, 1000, 100),
                                              (300, 5000, 5000), (0, 10, 64)])
def test_embedding_kernel_is_torch_embedding(dtype, ids_dtype, t, vocab, hidden):
    g = torch.Generator(device="cuda").manual_seed(t + hidden)
    weight = torch.randn(vocab, hidden, device="cuda", dtype=dtype, generator=g)
    ids = torch.randint(0, vocab, (t,), device="cuda", generator=g).to(ids_dtype)
    if t:
        ids[0] = vocab - 1             # the last row: no overflow in the row offset
    out = embedding(ids, weight)
    assert out.shape == (t, hidden) and out.dtype == dtype
    assert torch.equal(out, F.embedding(ids, weight))
