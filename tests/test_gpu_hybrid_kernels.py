"""The hybrid models' kernels against the torch ops they replace (GPU only): the fused GDN
decode and verify steps (layers/gdn/fused_decode.py, fused_verify.py), the batch-1 layer's
GEMV prologues and epilogue, the gated attention's prologue and output gate
(layers/gated_attention.py), and the zero-centered RMSNorm in the fused projections."""
from __future__ import annotations

import pytest
import torch

from fullgraph.layers import gated_attention
from fullgraph.layers.fused_linear import add_rms_norm, norm_linear
from fullgraph.layers.gdn import (causal_conv1d_decode, fused_decode, gdn_gating,
                                  recurrent_gated_delta_rule_ref, rms_norm_gated)
from fullgraph.layers.linear import Linear
from fullgraph.layers.norm import ZeroCenteredRMSNorm
from fullgraph.layers.rotary import RotaryEmbedding, apply_rotary
from gdn_verify_interpret import (in_proj_conv_case, sigmoid_gate_case, split_decode_case,
                                  verify_case)

pytestmark = pytest.mark.gpu

H, HV, DK, DV, KSIZE, SLOTS = 4, 8, 128, 128, 4, 16
KEY_DIM, VALUE_DIM = H * DK, HV * DV
CONV_DIM = 2 * KEY_DIM + VALUE_DIM
# lanes: slots (0: padding lanes on the null slot) and has_initial_state; lane 2 starts
# fresh on a slot that holds NaN (never written), which must not leak into its output
SLOT = [3, 1, 5, 0, 4, 12, 0]
INIT = [True, False, False, False, True, False, True]


def _inputs(dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = len(SLOT)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)
    proj = rnd(r, CONV_DIM + VALUE_DIM + 2 * HV).to(dtype)     # in_proj's output
    weight = (rnd(CONV_DIM, KSIZE) * 0.5).to(dtype)
    conv_pool = rnd(SLOTS, KSIZE - 1, CONV_DIM).to(dtype)
    rec_pool = rnd(SLOTS, HV, DK, DV) * 0.3
    for pool in (conv_pool, rec_pool):
        pool[5] = float("nan")              # a slot never written: must not leak
    slots = torch.tensor(SLOT, device="cuda")
    init = torch.tensor(INIT, device="cuda")
    A_log = (torch.rand(HV, device="cuda", generator=gen) * 3 - 1).to(dtype)
    dt_bias = rnd(HV).to(dtype)
    norm_w = (1 + 0.1 * rnd(DV)).to(dtype)
    return proj, weight, conv_pool, rec_pool, slots, init, A_log, dt_bias, norm_w


def _reference(proj, weight, conv_pool, rec_pool, slots, init, A_log, dt_bias, norm_w):
    """The unfused ops, as the model ran them before (updates the pools)."""
    r = proj.shape[0]
    qkv, z, b, a = proj.split((CONV_DIM, VALUE_DIM, HV, HV), dim=-1)
    qkv = causal_conv1d_decode(qkv, weight, None, conv_pool, slots, init)
    q, k, v = qkv.split((KEY_DIM, KEY_DIM, VALUE_DIM), dim=-1)
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    o = recurrent_gated_delta_rule_ref(q.reshape(r, H, DK), k.reshape(r, H, DK),
                                       v.reshape(r, HV, DV), g, beta, rec_pool, slots, None,
                                       init)
    return qkv, rms_norm_gated(o, z.reshape(r, HV, DV), norm_w, 1e-6).reshape(r, VALUE_DIM)


def _fused(proj, weight, conv_pool, rec_pool, slots, init, A_log, dt_bias, norm_w):
    qkv, z, b, a = proj.split((CONV_DIM, VALUE_DIM, HV, HV), dim=-1)
    qkv = fused_decode.conv_decode(qkv, weight, conv_pool, slots, init)
    return qkv, fused_decode.gated_delta_decode(qkv, z, b, a, A_log, dt_bias, norm_w, 1e-6,
                                                rec_pool, slots, init, H)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_matches_the_torch_ops(dtype):
    inp = _inputs(dtype)
    real = inp[4] != 0
    used = inp[4][real]
    ref_pools = (inp[2].clone(), inp[3].clone())
    want_qkv, want = _reference(inp[0], inp[1], *ref_pools, *inp[4:])
    got_qkv, got = _fused(*inp)
    assert not got[real].isnan().any()
    # slots no lane uses are untouched; the null slot (padding) is scratch
    untouched = [s for s in range(1, SLOTS) if s not in used.tolist()]
    assert torch.equal(inp[2][untouched].isnan(), ref_pools[0][untouched].isnan())
    assert torch.equal(inp[3][untouched].nan_to_num(), ref_pools[1][untouched].nan_to_num())
    assert torch.equal(inp[2][used], ref_pools[0][used])          # the shifted conv inputs
    if dtype == torch.float32:
        torch.testing.assert_close(got_qkv[real], want_qkv[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(inp[3][used], ref_pools[1][used], rtol=1e-5, atol=1e-5)
        return
    # bf16: both against the float32 ops on the same (bf16-valued) inputs; the fused path
    # may not be further from them than the unfused bf16 path, beyond a rounding step
    exact_inp = [t.float() if t.is_floating_point() else t for t in _inputs(dtype)]
    exact_qkv, exact = _reference(exact_inp[0], exact_inp[1], exact_inp[2], exact_inp[3],
                                  *exact_inp[4:])
    for g, w, e in ((got_qkv, want_qkv, exact_qkv), (got, want, exact)):
        err = (g[real].float() - e[real]).abs().max()
        err_ref = (w[real].float() - e[real]).abs().max()
        assert err <= 2 * err_ref + 1e-2, (err, err_ref)


def test_fused_decode_in_a_cuda_graph():
    inp = _inputs(torch.bfloat16)
    pools = (inp[2].clone(), inp[3].clone())
    _fused(inp[0], inp[1], *pools, *inp[4:])               # compile outside the capture
    pools = (inp[2].clone(), inp[3].clone())
    want_pools = (inp[2].clone(), inp[3].clone())
    want = _fused(inp[0], inp[1], *want_pools, *inp[4:])[1]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = _fused(inp[0], inp[1], *pools, *inp[4:])[1]
    g.replay()
    real = inp[4] != 0
    assert torch.equal(out[real], want[real])
    assert torch.equal(pools[1][inp[4][real]], want_pools[1][inp[4][real]])


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_fused_verify_matches_the_torch_ops(rows):
    """A uniform speculative step of `rows` rows a lane, groups of 4 slots, at the 0.8B
    model's head dims: outputs and the state written after every row to its slot of the
    group, against the torch ops (tests/gdn_verify_interpret.py, which the CPU suite runs
    under Triton's interpreter at small dims)."""
    assert verify_case(rows, "cuda", (H, HV, DK, DV)) == []


@pytest.mark.parametrize("v_block", [16, 32, 64])
def test_split_decode_rule_and_gated_norm_prologue_match_the_torch_ops(v_block):
    """A batch-1 decode's layout: the rule with each head's value columns spread over
    programs, its gated norm in out_proj's one-row GEMV prologue, at the 0.8B model's head
    dims, against the torch ops (tests/gdn_verify_interpret.py)."""
    assert split_decode_case("cuda", (H, HV, DK, DV), v_block) == []


@pytest.mark.parametrize("fresh", [False, True])
def test_in_proj_with_the_conv_in_its_epilogue_matches_the_torch_ops(fresh):
    """A batch-1 decode's in_proj (input RMSNorm in its prologue) and conv in one kernel, at
    the 0.8B model's head dims and hidden size, against the torch ops
    (tests/gdn_verify_interpret.py)."""
    assert in_proj_conv_case("cuda", (H, HV, DK, DV), hidden=1024, fresh=fresh) == []


def test_o_proj_with_the_output_gate_in_its_prologue_matches_the_torch_ops():
    """A batch-1 gated attention layer's output gate in o_proj's one-row GEMV prologue, at
    the 0.8B model's heads (8 of 256), against the torch ops (tests/gdn_verify_interpret.py)."""
    assert sigmoid_gate_case("cuda", heads=8, head_dim=256) == []


@pytest.mark.parametrize("rows", [1, 5, 40])
@torch.inference_mode()
def test_zero_centered_norm_in_the_fused_projections(rows):
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm
    g = torch.Generator(device="cuda").manual_seed(rows)
    hidden, out = 1024, 3072
    x, res = (torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
              for _ in range(2))
    norm = ZeroCenteredRMSNorm(hidden, 1e-6).cuda().to(torch.bfloat16)
    norm.weight.data = (torch.randn(hidden, device="cuda", generator=g) * 0.3).to(torch.bfloat16)
    norm.refresh()
    proj = Linear(hidden, out, bias=False).cuda().to(torch.bfloat16)
    ref_norm = Qwen3_5RMSNorm(hidden, 1e-6).cuda().to(torch.bfloat16)
    ref_norm.weight.data = norm.weight.data.clone()
    h_ref = x + res
    want = ref_norm(h_ref)                           # transformers' op order, in bf16
    normed, h = add_rms_norm(x, res, norm)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(normed.float(), want.float(), rtol=2 ** -7, atol=1e-3)  # 1 ulp
    y, h2 = norm_linear(x, res, norm, proj)
    assert torch.equal(h2, h_ref)
    exact = torch.nn.functional.linear(want.float(), proj.weight.float())
    unfused = torch.nn.functional.linear(want, proj.weight)
    err_unfused = (unfused.float() - exact).abs().max()
    assert (y.float() - exact).abs().max() <= 2 * err_unfused + 1e-3


def gated_attention_case(dtype, device, seed=0):
    """Qwen3.5-0.8B's attention shapes (8 q heads of 256, 2 kv heads, rotary on 64 dims),
    tokens at scattered positions and slots (one on the null slot 0)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hq, hkv, d, rd, t = 8, 2, 256, 64, 5
    qkv = torch.randn(t, (2 * hq + 2 * hkv) * d, device=device, generator=gen).to(dtype)
    positions = torch.tensor([0, 7, 300, 4095, 12], device=device)
    slots = torch.tensor([3, 17, 0, 40, 9], device=device)
    rotary = RotaryEmbedding(rd, 4096, 1e7).to(device)
    norms = [ZeroCenteredRMSNorm(d, 1e-6).to(device) for _ in range(2)]
    for n in norms:
        n.weight.data = (torch.randn(d, device=device, generator=gen) * 0.3).to(dtype)
        n.refresh()
    return qkv, positions, slots, rotary, norms, (hq, hkv, d, rd)


def gated_attention_reference(qkv, positions, rotary, norms, shape):
    """models/qwen3_next.py's torch ops: (q, k, v, the gate)."""
    hq, hkv, d, rd = shape
    t = qkv.shape[0]
    qg, k, v = qkv.split((2 * hq * d, hkv * d, hkv * d), dim=-1)
    q, gate = qg.view(t, hq, 2 * d).chunk(2, dim=-1)
    q, k = norms[0](q), norms[1](k.view(t, hkv, d))
    q_rot, k_rot = apply_rotary(positions, rotary.cos, rotary.sin, q[..., :rd], k[..., :rd])
    return (torch.cat((q_rot, q[..., rd:]), dim=-1), torch.cat((k_rot, k[..., rd:]), dim=-1),
            v.view(t, hkv, d), gate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_attention_kernels_match_the_torch_ops(dtype):
    qkv, positions, slots, rotary, norms, shape = gated_attention_case(dtype, "cuda")
    hq, hkv, d, rd = shape
    k_cache = torch.full((64, hkv, d), float("nan"), device="cuda", dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    q = gated_attention.qk_norm_rope_store_kv(
        qkv, positions, rotary.cos, rotary.sin, norms[0].kernel_weight, norms[1].kernel_weight,
        1e-6, hq, hkv, rd, k_cache, v_cache, slots)
    want_q, want_k, want_v, gate = gated_attention_reference(qkv, positions, rotary, norms,
                                                            shape)
    o = torch.randn(qkv.shape[0], hq, d, device="cuda").to(dtype)
    got_gate = gated_attention.sigmoid_gate(o, qkv, hq)
    want_gate = o.reshape(-1, hq * d) * torch.sigmoid(gate.reshape(-1, hq * d))
    assert torch.equal(v_cache[slots], want_v)
    others = torch.ones(64, dtype=torch.bool)
    others[slots.cpu()] = False
    assert k_cache[others].isnan().all() and v_cache[others].isnan().all()
    pairs = ((q, want_q), (k_cache[slots], want_k), (got_gate, want_gate))
    if dtype == torch.float32:
        for got, want in pairs:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    # bf16: the kernels round the rotation once (float32) where the torch ops round each
    # product; both against the float32 ops on the same inputs, the kernels no further off
    # than the torch ops beyond a rounding step
    f32 = gated_attention_reference(qkv.float(), positions, rotary, norms, shape)
    exact = (f32[0], f32[1], o.float().reshape(-1, hq * d) * torch.sigmoid(f32[3].reshape(
        -1, hq * d)))
    for (got, want), e in zip(pairs, exact):
        err, err_ref = ((x.float() - e).abs().max() for x in (got, want))
        assert err <= 2 * err_ref + 1e-2, (err, err_ref)
