"""fla's gated delta rule kernels (through fullgraph/layers/gdn/kernels.py) against our torch
reference, and the GDN ops free of host syncs and inside CUDA graphs (GPU only)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fullgraph.layers.gdn import (causal_conv1d, causal_conv1d_decode, chunk_capacity,
                                  chunk_gated_delta_rule, chunk_gated_delta_rule_ref,
                                  chunk_metadata, decode_gated_delta_rule, gdn_gating,
                                  padded_chunk_indices, recurrent_gated_delta_rule_ref)

pytestmark = pytest.mark.gpu

H, HV, DK, DV = 4, 8, 128, 128       # Qwen3.5's head dims, GQA-style heads
CONV_DIM, KSIZE, SLOTS = 512, 4, 16
# lanes: lengths, slots, has_initial_state; lane 4 is a padding lane on the null slot, lane 5
# is empty, and 7 padding tokens of no lane follow
LENS = [1, 63, 64, 65, 3, 0, 200, 2]
SLOT = [3, 1, 9, 4, 0, 7, 12, 2]
INIT = [True, False, True, False, False, True, True, False]
PAD = 7


@pytest.fixture(autouse=True)
def _fla():
    pytest.importorskip("fla", reason="fla-core (the `gpu` extra) is not installed")


def qsl_of(lens):
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device="cuda")


def rule_inputs(t, seed, dtype):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)
    A_log = torch.rand(HV, device="cuda", generator=gen) * 3 - 1     # A in (e^-1, e^2)
    g, beta = gdn_gating(rnd(t, HV), rnd(t, HV), A_log, rnd(HV))
    pool = rnd(SLOTS, HV, DK, DV) * 0.5
    return dict(q=rnd(t, H, DK).to(dtype), k=rnd(t, H, DK).to(dtype), v=rnd(t, HV, DV).to(dtype),
                g=g, beta=beta.to(dtype), state_pool=pool)


def batch(lens=LENS, slots=SLOT, init=INIT):
    return (torch.tensor(slots, device="cuda"), qsl_of(lens),
            torch.tensor(init, device="cuda"))


def test_chunk_metadata_matches_fla():
    from fla.ops.utils.index import prepare_chunk_indices, prepare_chunk_offsets
    for lens in ([1], [64, 65], LENS, [0, 0, 129, 1, 0], [7] * 33):
        qsl = qsl_of(lens)
        indices, offsets = chunk_metadata(qsl.cpu().numpy())
        assert np.array_equal(indices, prepare_chunk_indices(qsl, 64).cpu().numpy())
        assert np.array_equal(offsets, prepare_chunk_offsets(qsl, 64).cpu().numpy())


# float32: fla's tl.dot rounds its inputs to tf32, so not bit-close; bf16: bf16 inputs and
# intermediates against the float32 reference of the same inputs
TOL = {torch.float32: dict(atol=3e-3, rtol=3e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_fla_chunked_matches_reference(dtype, padded):
    t = sum(LENS) + PAD
    a = rule_inputs(t, seed=1, dtype=dtype)
    slots, qsl, init = batch()
    qsl_np = qsl.cpu().numpy()
    ci = padded_chunk_indices(qsl_np, chunk_capacity(t, len(LENS))) if padded else \
        chunk_metadata(qsl_np)[0]
    ci = torch.from_numpy(ci).cuda()
    ref_pool = a["state_pool"].clone()
    ref = chunk_gated_delta_rule_ref(**{**a, "state_pool": ref_pool}, state_slots=slots,
                                     query_start_loc=qsl, has_initial_state=init,
                                     chunk_indices=ci)
    out = chunk_gated_delta_rule(**a, state_slots=slots, query_start_loc=qsl,
                                 has_initial_state=init, chunk_indices=ci)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    assert torch.equal(out[sum(LENS):], torch.zeros_like(out[sum(LENS):]))
    torch.testing.assert_close(a["state_pool"][1:], ref_pool[1:], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_decode_matches_reference(dtype):
    r = 37
    a = rule_inputs(r, seed=2, dtype=dtype)
    slots = torch.randperm(SLOTS - 1, device="cuda")[:r % (SLOTS - 1)] + 1
    slots = torch.cat([slots, torch.zeros(r - len(slots), dtype=slots.dtype, device="cuda")])
    init = torch.rand(r, device="cuda") < 0.7
    ref_pool = a["state_pool"].clone()
    ref = recurrent_gated_delta_rule_ref(**{**a, "state_pool": ref_pool}, state_slots=slots,
                                         query_start_loc=None, has_initial_state=init)
    out = decode_gated_delta_rule(**a, state_slots=slots, has_initial_state=init)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    torch.testing.assert_close(a["state_pool"][1:], ref_pool[1:], **TOL[dtype])


def _step_fns(t, dtype, seed):
    """Static buffers and a step running every op: conv (varlen, decode), chunked, decode."""
    cap = chunk_capacity(t, len(LENS))
    a = rule_inputs(t, seed=seed, dtype=dtype)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, CONV_DIM, device="cuda", generator=gen).to(dtype)
    w = torch.randn(CONV_DIM, KSIZE, device="cuda", generator=gen).to(dtype)
    conv_pool = torch.zeros(SLOTS, KSIZE - 1, CONV_DIM, device="cuda", dtype=dtype)
    slots, qsl, init = batch()
    ci = torch.from_numpy(padded_chunk_indices(qsl.cpu().numpy(), cap)).cuda()
    rule = {k: a[k] for k in ("q", "k", "v", "g", "beta")}
    r = len(LENS)

    def step():
        y = causal_conv1d(x, w, None, conv_pool, slots, qsl, init)
        y1 = causal_conv1d_decode(x[:r], w, None, conv_pool, slots, init)
        o = chunk_gated_delta_rule(**rule, state_pool=a["state_pool"], state_slots=slots,
                                   query_start_loc=qsl, has_initial_state=init,
                                   chunk_indices=ci)
        o1 = decode_gated_delta_rule(*(v[:r] for v in rule.values()), a["state_pool"], slots,
                                     init)
        return y, y1, o, o1

    def restage(lens, new_slots, new_init, seed):
        """New step contents written into the same buffers (shapes unchanged)."""
        b = rule_inputs(t, seed=seed, dtype=dtype)
        for k in rule:
            rule[k].copy_(b[k])
        x.copy_(torch.randn_like(x))
        s, q_, i_ = batch(lens, new_slots, new_init)
        slots.copy_(s), qsl.copy_(q_), init.copy_(i_)
        ci.copy_(torch.from_numpy(padded_chunk_indices(q_.cpu().numpy(), cap)))

    return step, restage, (conv_pool, a["state_pool"])


NEXT = ([130, 2, 0, 1, 64, 5, 100, 95], [5, 0, 0, 8, 11, 14, 3, 6],
        [False, False, False, True, True, False, True, True])


def test_no_host_sync_once_warm():
    t = sum(LENS) + PAD
    step, restage, _ = _step_fns(t, torch.bfloat16, seed=3)
    step()                                     # compiles and autotunes fla's kernels
    restage(*NEXT, seed=4)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_cuda_graph_replays_new_batches():
    t = sum(LENS) + PAD
    step, restage, pools = _step_fns(t, torch.bfloat16, seed=5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                                 # warm up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    restage(*NEXT, seed=6)
    saved = [p.clone() for p in pools]
    expected = [o.clone() for o in step()]     # eagerly, on the new contents
    after = [p.clone() for p in pools]
    for p, s in zip(pools, saved):
        p.copy_(s)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    for got, want in zip(pools, after):
        torch.testing.assert_close(got[1:], want[1:], atol=0, rtol=0)
