"""The MoE block's CUDA path (fullgraph/layers/moe/grouped_gemm.py) against the torch
reference, inside CUDA graphs under changing routing, and free of host syncs (GPU only)."""
from __future__ import annotations

import pytest
import torch

from fullgraph.layers.moe import (SparseMoeBlock, experts_reference, moe_experts, route,
                                  sort_by_expert)

pytestmark = pytest.mark.gpu


def experts_inputs(t, e, k, h, i, dtype, seed, routing="random"):
    """CPU tensors: x, weights, ids, gate_up, down, shared, shared_gate."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    logits = torch.randn(t, e, generator=g)
    if routing == "skewed":        # every token picks experts 0 .. k-1: long row ranges
        logits[:, :k] += 100.0
    w, ids = route(logits, k, normalize=True)
    gate_up = torch.randn(e, 2 * i, h, generator=g) * h ** -0.5
    down = torch.randn(e, h, i, generator=g) * i ** -0.5
    shared = torch.randn(t, h, generator=g)
    shared_gate = torch.randn(t, 1, generator=g)
    return [x.to(dtype), w.to(dtype), ids, gate_up.to(dtype), down.to(dtype),
            shared.to(dtype), shared_gate.to(dtype)]


SHAPES = [(8, 2, 128, 64), (64, 8, 96, 40)]        # E, top_k, H, I (the second: ragged K)


@pytest.mark.parametrize("routing", ["random", "skewed"])
@pytest.mark.parametrize("t", [1, 5, 33, 300, 2048])
@pytest.mark.parametrize("e, k, h, i", SHAPES)
def test_kernels_match_reference_float32(e, k, h, i, t, routing):
    args = experts_inputs(t, e, k, h, i, torch.float32, seed=t + e, routing=routing)
    ref = experts_reference(*args)
    out = moe_experts(*(a.cuda() for a in args))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
    # without the shared expert
    out = moe_experts(*(a.cuda() for a in args[:5]))
    torch.testing.assert_close(out.cpu(), experts_reference(*args[:5]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("routing", ["random", "skewed"])
@pytest.mark.parametrize("t", [1, 5, 33, 300, 2048])
@pytest.mark.parametrize("e, k, h, i", SHAPES)
def test_kernels_match_reference_half(e, k, h, i, t, routing, dtype):
    args = experts_inputs(t, e, k, h, i, dtype, seed=t + e, routing=routing)
    exact = experts_reference(*(a if a.dtype == torch.int64 else a.float() for a in args))
    err_ref = (experts_reference(*args).float() - exact).abs().max()
    out = moe_experts(*(a.cuda() for a in args))
    assert out.dtype == dtype
    # no worse than the same computation op by op in `dtype`
    assert (out.cpu().float() - exact).abs().max() <= 2 * err_ref + 1e-3


@pytest.mark.parametrize("e", [8, 60, 64, 512])
@pytest.mark.parametrize("t, k", [(1, 1), (1, 8), (7, 4), (127, 8), (256, 4)])
def test_one_program_sort_matches_torch_sort(t, k, e):
    from fullgraph.layers.moe.grouped_gemm import ALIGN_MAX_PAIRS, _align_kernel, triton
    assert t * k <= ALIGN_MAX_PAIRS
    ids = torch.randn(t, e, device="cuda").topk(k).indices
    perm, offsets = sort_by_expert(ids, e)
    block_e = max(16, triton.next_power_of_2(e))
    perm32 = torch.empty(t * k, dtype=torch.int32, device="cuda")
    offsets32 = torch.empty(block_e + 1, dtype=torch.int32, device="cuda")
    _align_kernel[(1,)](ids, perm32, offsets32, t * k,
                        BLOCK_P=max(16, triton.next_power_of_2(t * k)), BLOCK_E=block_e,
                        USE_PDL=False)
    assert torch.equal(perm32.long(), perm)
    assert torch.equal(offsets32[:e + 1].long(), offsets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("t, e, k", [(1, 8, 1), (5, 60, 4), (300, 512, 10), (3, 16, 16)])
def test_route_kernel_matches_torch(t, e, k, normalize, dtype):
    from fullgraph.layers.moe.route_kernel import route_cuda
    # distinct logits, exact in bf16: the order of tied experts is either's choice
    logits = torch.stack([torch.randperm(e) - e / 2 for _ in range(t)]).div(32).to("cuda", dtype)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    want_w, want_ids = torch.topk(probs, k, dim=-1)
    if normalize:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    w, ids = route_cuda(logits, k, normalize)
    assert torch.equal(ids, want_ids) and w.dtype == dtype
    torch.testing.assert_close(w, want_w.to(dtype), rtol=1e-6, atol=1e-7)


def cuda_block(dtype, seed=0, h=256, e=32, k=4, i=128, s=192) -> SparseMoeBlock:
    torch.manual_seed(seed)
    block = SparseMoeBlock(h, e, k, i, s)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    return block.to("cuda", dtype).eval()


@pytest.mark.parametrize("t", [1, 4, 100])
def test_block_matches_cpu_block_float32(t):
    block = cuda_block(torch.float32)
    x = torch.randn(t, 256)
    with torch.no_grad():
        torch.testing.assert_close(block(x.cuda()).cpu(), block.cpu()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 4, 100])
def test_graph_replay_follows_new_routing(dtype, t):
    """One capture; each replay routes new inputs elsewhere and matches eager bit for bit."""
    block = cuda_block(dtype)
    x = torch.randn(t, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):       # compiles the kernels outside the capture
            block(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = block(x)
        routings = set()
        for seed in range(4):
            new = torch.randn(t, 256, generator=torch.Generator().manual_seed(seed))
            x.copy_(new.to(dtype))
            graph.replay()
            routings.add(tuple(route(block.gate(x), 4, True)[1].flatten().tolist()))
            assert torch.equal(out, block(x))
            if dtype == torch.float32:
                cpu = cuda_block(torch.float32).cpu()
                torch.testing.assert_close(out.cpu(), cpu(new), rtol=1e-5, atol=1e-5)
        assert len(routings) == 4


@pytest.mark.parametrize("t", [1, 4, 100, 2048])
def test_no_host_sync_and_deterministic(t):
    block = cuda_block(torch.bfloat16)
    x = torch.randn(t, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        first = block(x)                 # compiles (which may sync)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            runs = [block(x) for _ in range(3)]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert all(torch.equal(r, first) for r in runs)


def test_compiled_block_uses_the_op():
    block = cuda_block(torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for t in (3, 40):
            x = torch.randn(t, 256, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(compiled(x), block(x), rtol=2e-2, atol=2e-2)
