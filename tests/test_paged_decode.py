"""The Triton paged decode kernel against float32 attention over each request's gathered KV
(GPU only)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fullgraph.attention.paged_decode import PagedDecodeWorkspace, paged_decode

pytestmark = pytest.mark.gpu

HQ, HKV, D = 16, 8, 128


def _case(rows, query_len, block_size, seed, shared_prefix=False, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    max_pages = 24
    num_blocks = rows * max_pages + 1
    k = torch.randn(num_blocks * block_size, HKV, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(num_blocks * block_size, HKV, D, device="cuda", dtype=dtype, generator=g)
    perm = torch.randperm(num_blocks - 1, device="cuda", generator=g)[:rows * max_pages] + 1
    table = perm.view(rows, max_pages).int()
    if shared_prefix:                        # prefix caching: rows share their first blocks
        table[:, :3] = table[0, :3]
    lens = torch.randint(query_len, max_pages * block_size + 1, (rows,), device="cuda", generator=g)
    lens[rows // 2] = 0 if rows > 2 else lens[rows // 2]   # a batch-padding row
    q = torch.randn(rows * query_len, HQ, D, device="cuda", dtype=dtype, generator=g)
    return q, k, v, table.contiguous(), lens.int()


def _reference(q, k, v, table, lens, query_len, block_size, dtype=torch.float32):
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape, device="cuda", dtype=out_dtype)
    for r, n in enumerate(lens.tolist()):
        if n == 0:
            continue
        pos = torch.arange(n, device="cuda")
        slots = table[r, pos // block_size].long() * block_size + pos % block_size
        qi = q[r * query_len:(r + 1) * query_len].transpose(0, 1).to(dtype)
        mask = pos[None, :] <= torch.arange(n - query_len, n, device="cuda")[:, None]
        oi = F.scaled_dot_product_attention(qi, k[slots].transpose(0, 1).to(dtype),
                                            v[slots].transpose(0, 1).to(dtype), attn_mask=mask,
                                            enable_gqa=True)
        out[r * query_len:(r + 1) * query_len] = oi.transpose(0, 1).to(out.dtype)
    return out


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("query_len", [1, 3, 4])
@pytest.mark.parametrize("splits", [1, 2, 16, 32])
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_decode_matches_float32_attention(rows, query_len, splits, block_size):
    q, k, v, table, lens = _case(rows, query_len, block_size, seed=rows * 100 + splits,
                                 shared_prefix=rows > 1)
    ws = PagedDecodeWorkspace(8, HKV, HQ // HKV * 4, 8 * HKV * 32, D, q.device)
    ref = _reference(q, k, v, table, lens, query_len, block_size)
    ref_bf16 = _reference(q, k, v, table, lens, query_len, block_size, dtype=torch.bfloat16)
    for _ in range(3):       # the arrival counters must be back at zero after every call
        out = paged_decode(q, k, v, table, lens, block_size, query_len, splits, D ** -0.5, ws)
        err = (out.float() - ref).abs().max().item()
        # no worse than bf16 SDPA's own rounding of the same attention
        assert err <= 2 * (ref_bf16 - ref).abs().max().item() + 1e-3, err
    assert not ws.counters.any()
    padded = (lens == 0).nonzero().flatten().tolist()
    for r in padded:
        assert not out[r * query_len:(r + 1) * query_len].any()


@pytest.mark.parametrize("splits", [1, 8])
def test_paged_decode_keeps_float32_exact(splits):
    """Float32 models (the engine's parity tests) must not go through TF32 tensor cores."""
    q, k, v, table, lens = _case(4, 2, 32, seed=5, dtype=torch.float32)
    ws = PagedDecodeWorkspace(4, HKV, HQ // HKV * 2, 4 * HKV * 8, D, q.device)
    out = paged_decode(q, k, v, table, lens, 32, 2, splits, D ** -0.5, ws)
    ref = _reference(q, k, v, table, lens, 2, 32, dtype=torch.float64)
    assert (out.double() - ref.double()).abs().max().item() < 1e-5


def test_paged_decode_in_a_cuda_graph_follows_new_inputs():
    q, k, v, table, lens = _case(8, 1, 32, seed=7)
    ws = PagedDecodeWorkspace(8, HKV, HQ // HKV, 8 * HKV * 8, D, q.device)
    out = torch.empty_like(q)
    paged_decode(q, k, v, table, lens, 32, 1, 8, D ** -0.5, ws, out)      # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode(q, k, v, table, lens, 32, 1, 8, D ** -0.5, ws, out)
    for step in range(3):
        q.copy_(torch.randn_like(q))
        lens.copy_(torch.randint(1, 24 * 32 + 1, lens.shape, device="cuda"))
        table.copy_(table[torch.randperm(8, device="cuda")])
        graph.replay()
        ref = _reference(q, k, v, table, lens, 1, 32)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)


# ------------------------------------------------ fused q/k prologue (paged_decode_qk.py)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("query_len", [1, 3, 4])
@pytest.mark.parametrize("splits", [1, 4, 16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_fused_qk_decode_matches_the_two_kernel_path(rows, query_len, splits, block_size):
    """From the qkv projection: the same K/V stored as qk_norm_rope_store_kv stores (bitwise,
    outside the null block that padding lanes write to), and attention as accurate as the
    two-kernel path against float32 SDPA."""
    from fullgraph.attention.paged_decode_qk import paged_decode_qk
    from fullgraph.layers.qk_norm_rope import qk_norm_rope_store_kv
    from fullgraph.layers.rotary import RotaryEmbedding
    _, k, v, table, lens = _case(rows, query_len, block_size, seed=rows * 10 + splits,
                                 shared_prefix=rows > 1)
    # this step's tokens go to each request's own blocks, never to the shared prefix's
    live = lens > 0
    lens[live] = lens[live].clamp(min=3 * block_size + query_len)
    g = torch.Generator(device="cuda").manual_seed(rows + query_len)
    qkv = torch.randn(rows * query_len, (HQ + 2 * HKV) * D, device="cuda",
                      dtype=torch.bfloat16, generator=g)
    q_w = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).bfloat16()
    k_w = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).bfloat16()
    rotary = RotaryEmbedding(D, 4096, 1e6).cuda()
    t = torch.arange(query_len, device="cuda")
    pos = (lens[:, None] - query_len + t[None, :]).clamp(min=0)
    pos[lens == 0] = 0
    slots = torch.gather(table, 1, (pos // block_size)).long() * block_size + pos % block_size
    slots[lens == 0] = 0                          # padding lanes: the null block
    pos, slots = pos.flatten(), slots.flatten()
    ws = PagedDecodeWorkspace(8, HKV, HQ // HKV * 4, 8 * HKV * 16, D, k.device)
    k_ref, v_ref = k.clone(), v.clone()
    q = qk_norm_rope_store_kv(qkv, pos, rotary.cos, rotary.sin, q_w, k_w, 1e-6, HQ, HKV,
                              k_ref, v_ref, slots)
    ref = _reference(q, k_ref, v_ref, table, lens, query_len, block_size)
    ref_bf16 = _reference(q, k_ref, v_ref, table, lens, query_len, block_size,
                          dtype=torch.bfloat16)
    for _ in range(2):       # the arrival counters must be back at zero after every call
        out = paged_decode_qk(qkv, pos, rotary.cos, rotary.sin, q_w, k_w, 1e-6, HQ, k, v,
                              slots, table, lens, block_size, query_len, splits, D ** -0.5, ws)
        err = (out.float() - ref).abs().max().item()
        assert err <= 2 * (ref_bf16 - ref).abs().max().item() + 1e-3, err
    assert not ws.counters.any()
    assert torch.equal(k[block_size:], k_ref[block_size:])
    assert torch.equal(v[block_size:], v_ref[block_size:])
    for r in (lens == 0).nonzero().flatten().tolist():
        assert not out[r * query_len:(r + 1) * query_len].any()
