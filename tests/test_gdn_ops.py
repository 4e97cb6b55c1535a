"""Gated DeltaNet layer ops (fullgraph/layers/gdn) against transformers' torch fallbacks."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

from fullgraph.layers.gdn import (causal_conv1d, causal_conv1d_decode, chunk_capacity,
                                  chunk_gated_delta_rule, chunk_gated_delta_rule_ref,
                                  chunk_metadata, decode_gated_delta_rule, gdn_gating,
                                  padded_chunk_indices, recurrent_gated_delta_rule_ref,
                                  rms_norm_gated)


@pytest.fixture(autouse=True)
def _transformers_torch_paths(monkeypatch):
    """transformers' pure-torch fallbacks, undecorated: with fla (or causal-conv1d) installed,
    some transformers versions (5.17) hand even CPU tensors to those packages."""
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",
                 "causal_conv1d_fn", "causal_conv1d_update"):
        monkeypatch.setattr(hf, name, inspect.unwrap(getattr(hf, name)))


H, HV, DK, DV = 2, 4, 16, 8          # GQA-style: each q/k head serves 2 value heads
CONV_DIM, KSIZE = 24, 4
SLOTS = 8
EXACT = dict(atol=2e-6, rtol=2e-6)   # float32, same ops as transformers


def inputs(t, seed=0, dtype=torch.float32):
    """q, k, v, g, beta of t packed tokens, as the layer produces them."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(t, H, DK, generator=gen) for _ in range(2))
    v = torch.randn(t, HV, DV, generator=gen)
    a, b = torch.randn(t, HV, generator=gen), torch.randn(t, HV, generator=gen)
    A_log = torch.rand(HV, generator=gen).mul(16).clamp(min=0.01).log()
    g, beta = gdn_gating(a, b, A_log, torch.randn(HV, generator=gen))
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta.to(dtype)


def hf_rule(fn, q, k, v, g, beta, h0):
    o, ht = fn(q[None], k[None], v[None], g[None], beta[None],
               initial_state=None if h0 is None else h0[None], output_final_state=True,
               use_qk_l2norm_in_kernel=True)
    return o[0], ht[0]


def pool(seed=1):
    return torch.randn(SLOTS, HV, DK, DV, generator=torch.Generator().manual_seed(seed)) * 0.1


def qsl_of(lens):
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)


# --- the gated delta rule -------------------------------------------------------------------

@pytest.mark.parametrize("t", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("init", [False, True])
def test_chunked_rule_matches_transformers(t, init):
    q, k, v, g, beta = inputs(t, seed=t)
    states = pool()
    h0 = states[3].clone() if init else None
    o = chunk_gated_delta_rule_ref(q, k, v, g, beta, states, torch.tensor([3]),
                                   qsl_of([t]), torch.tensor([init]))
    o_ref, ht_ref = hf_rule(hf.torch_chunk_gated_delta_rule, q, k, v, g, beta, h0)
    torch.testing.assert_close(o, o_ref, **EXACT)
    torch.testing.assert_close(states[3], ht_ref, **EXACT)


def test_half_precision_inputs_match_transformers():
    q, k, v, g, beta = inputs(100, seed=5, dtype=torch.bfloat16)
    for fn, ours in ((hf.torch_chunk_gated_delta_rule, chunk_gated_delta_rule_ref),
                     (hf.torch_recurrent_gated_delta_rule, recurrent_gated_delta_rule_ref)):
        states = pool()
        h0 = states[2].clone()
        extra = {} if ours is chunk_gated_delta_rule_ref else {"max_query_len": 100}
        o = ours(q, k, v, g, beta, states, torch.tensor([2]), qsl_of([100]),
                 torch.tensor([True]), **extra)
        o_ref, ht_ref = hf_rule(fn, q, k, v, g, beta, h0)
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o, o_ref, atol=0, rtol=0)
        torch.testing.assert_close(states[2], ht_ref, **EXACT)


@pytest.mark.parametrize("t", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("init", [False, True])
def test_recurrent_rule_matches_transformers(t, init):
    q, k, v, g, beta = inputs(t, seed=t)
    states = pool()
    h0 = states[5].clone() if init else None
    o = recurrent_gated_delta_rule_ref(q, k, v, g, beta, states, torch.tensor([5]), qsl_of([t]),
                                       torch.tensor([init]), max_query_len=t)
    o_ref, ht_ref = hf_rule(hf.torch_recurrent_gated_delta_rule, q, k, v, g, beta, h0)
    torch.testing.assert_close(o, o_ref, **EXACT)
    torch.testing.assert_close(states[5], ht_ref, **EXACT)


def test_decode_rule_matches_transformers_step():
    q, k, v, g, beta = inputs(5, seed=3)       # 5 lanes, one token each
    states = pool()
    before = states.clone()
    slots = torch.tensor([6, 2, 0, 4, 0])      # two padding lanes on the null slot
    has_init = torch.tensor([True, False, False, True, False])
    o = decode_gated_delta_rule(q, k, v, g, beta, states, slots, has_init)
    for r in (0, 1, 3):
        h0 = before[slots[r]] if has_init[r] else None
        o_ref, ht_ref = hf_rule(hf.torch_recurrent_gated_delta_rule, *(x[r:r + 1] for x in
                                                                        (q, k, v, g, beta)), h0)
        torch.testing.assert_close(o[r], o_ref[0], **EXACT)
        torch.testing.assert_close(states[slots[r]], ht_ref, **EXACT)
    for s in (1, 3, 5, 7):                     # slots outside the batch are untouched
        assert torch.equal(states[s], before[s])


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_packed_lanes_equal_each_lane_alone(form):
    # an empty lane, a padding lane on the null slot, and 5 padding tokens of no lane at the end
    lens = [65, 0, 1, 130, 3, 64, 7]
    slots = torch.tensor([3, 7, 1, 6, 0, 2, 5])
    has_init = torch.tensor([True, True, False, True, False, False, True])
    T = sum(lens) + 5
    q, k, v, g, beta = inputs(T, seed=7)
    qsl = qsl_of(lens)
    states = pool()
    states[0] = float("nan")                   # the null slot may hold anything
    before = states.clone()
    for x in (q, k, v):                        # padding tokens too
        x[sum(lens):] = float("nan")
    if form == "chunked":
        cap = chunk_capacity(T, len(lens))
        ci = torch.from_numpy(padded_chunk_indices(qsl.numpy(), cap))
        o = chunk_gated_delta_rule(q, k, v, g, beta, states, slots, qsl, has_init, ci)
    else:
        o = recurrent_gated_delta_rule_ref(q, k, v, g, beta, states, slots, qsl, has_init,
                                           max_query_len=max(lens))
    fn = hf.torch_chunk_gated_delta_rule if form == "chunked" else \
        hf.torch_recurrent_gated_delta_rule
    for r, n in enumerate(lens):
        if slots[r] == 0:
            continue
        lo = int(qsl[r])
        h0 = before[slots[r]] if has_init[r] else None
        if n == 0:
            torch.testing.assert_close(states[slots[r]], torch.zeros_like(h0) if h0 is None else h0)
            continue
        o_ref, ht_ref = hf_rule(fn, *(x[lo:lo + n] for x in (q, k, v, g, beta)), h0)
        torch.testing.assert_close(o[lo:lo + n], o_ref, **EXACT)
        torch.testing.assert_close(states[slots[r]], ht_ref, **EXACT)
    assert torch.isfinite(o).all()             # the padding lane's rows included
    assert torch.equal(o[sum(lens):], torch.zeros_like(o[sum(lens):]))
    assert torch.equal(states[4], before[4])


@pytest.mark.parametrize("split", [1, 40, 64, 100])
def test_prefill_continued_from_saved_state_equals_whole(split):
    t = 150
    q, k, v, g, beta = inputs(t, seed=11)
    whole = pool()
    o_whole = chunk_gated_delta_rule_ref(q, k, v, g, beta, whole, torch.tensor([4]),
                                         qsl_of([t]), torch.tensor([False]))
    parts = pool()
    o1 = chunk_gated_delta_rule_ref(*(x[:split] for x in (q, k, v, g, beta)), parts,
                                    torch.tensor([4]), qsl_of([split]), torch.tensor([False]))
    # the rest as a decode step then a chunk, each continuing the saved state
    o2 = decode_gated_delta_rule(*(x[split:split + 1] for x in (q, k, v, g, beta)), parts,
                                 torch.tensor([4]), torch.tensor([True]))
    o3 = chunk_gated_delta_rule_ref(*(x[split + 1:] for x in (q, k, v, g, beta)), parts,
                                    torch.tensor([4]), qsl_of([t - split - 1]),
                                    torch.tensor([True]))
    torch.testing.assert_close(torch.cat([o1, o2, o3]), o_whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts[4], whole[4], atol=1e-5, rtol=1e-5)


# --- the conv --------------------------------------------------------------------------------

def conv_weights(seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(CONV_DIM, KSIZE, generator=gen) * 0.5
    return w, (torch.randn(CONV_DIM, generator=gen) if bias else None)


def hf_conv_prefill(x, w, b, saved=None):
    """transformers' prefill conv of one lane ([n, D]) after `saved` inputs ([K-1, D])."""
    seq = x.t()[None] if saved is None else torch.cat([saved, x]).t()[None]
    out = hf.causal_conv1d_fn(seq, w, b, activation="silu")
    return out[0, :, -x.shape[0]:].t()


@pytest.mark.parametrize("bias", [True, False])
def test_conv_packed_lanes_match_transformers_prefill(bias):
    w, b = conv_weights(bias=bias)
    lens = [1, 3, 4, 0, 5, 64]
    slots = torch.tensor([1, 2, 3, 0, 4, 5])
    has_init = torch.tensor([True, False, True, False, True, False])
    T = sum(lens) + 3
    x = torch.randn(T, CONV_DIM)
    x[sum(lens):] = float("nan")               # padding tokens
    states = torch.randn(SLOTS, KSIZE - 1, CONV_DIM)
    states[0] = float("nan")
    before = states.clone()
    qsl = qsl_of(lens)
    y = causal_conv1d(x, w, b, states, slots, qsl, has_init)
    for r, n in enumerate(lens):
        lo, s = int(qsl[r]), int(slots[r])
        saved = before[s] if has_init[r] else torch.zeros(KSIZE - 1, CONV_DIM)
        if n:
            torch.testing.assert_close(y[lo:lo + n], hf_conv_prefill(x[lo:lo + n], w, b, saved),
                                       **EXACT)
        if s:
            torch.testing.assert_close(states[s], torch.cat([saved, x[lo:lo + n]])[-(KSIZE - 1):])
    assert torch.equal(y[sum(lens):], torch.zeros(3, CONV_DIM))
    for s in (6, 7):
        assert torch.equal(states[s], before[s])


def test_conv_decode_matches_transformers_update():
    w, b = conv_weights()
    x = torch.randn(4, CONV_DIM)
    saved = torch.randn(SLOTS, KSIZE - 1, CONV_DIM)
    slots = torch.tensor([5, 1, 0, 7])
    has_init = torch.tensor([True, True, False, False])
    real = [0, 1, 3]
    # transformers keeps the last K inputs, [batch, D, K]; its oldest one no longer matters
    hf_state = torch.cat([torch.zeros(4, 1, CONV_DIM), saved[slots]], 1).transpose(1, 2)
    hf_state[~has_init] = 0
    hf_state = hf_state.contiguous()
    y_ref = hf.causal_conv1d_update(x[:, :, None], hf_state, w, b, activation="silu")[:, :, 0]
    states = saved.clone()
    y = causal_conv1d_decode(x, w, b, states, slots, has_init)
    torch.testing.assert_close(y[real], y_ref[real], **EXACT)
    torch.testing.assert_close(states[slots[real]], hf_state[real, :, 1:].transpose(1, 2))
    # the varlen op on the same one-token lanes does the same
    states2 = saved.clone()
    y2 = causal_conv1d(x, w, b, states2, slots, qsl_of([1] * 4), has_init)
    torch.testing.assert_close(y2, y, **EXACT)
    torch.testing.assert_close(states2[1:], states[1:])


@pytest.mark.parametrize("split", [1, 2, 3, 9])
def test_conv_continued_from_saved_state_equals_whole(split):
    w, b = conv_weights(seed=2)
    x = torch.randn(12, CONV_DIM)
    whole = torch.zeros(SLOTS, KSIZE - 1, CONV_DIM)
    y_whole = causal_conv1d(x, w, b, whole, torch.tensor([2]), qsl_of([12]),
                            torch.tensor([False]))
    parts = torch.zeros(SLOTS, KSIZE - 1, CONV_DIM)
    y1 = causal_conv1d(x[:split], w, b, parts, torch.tensor([2]), qsl_of([split]),
                       torch.tensor([False]))
    y2 = causal_conv1d_decode(x[split:split + 1], w, b, parts, torch.tensor([2]), None)
    y3 = causal_conv1d(x[split + 1:], w, b, parts, torch.tensor([2]), qsl_of([11 - split]),
                       torch.tensor([True]))
    torch.testing.assert_close(torch.cat([y1, y2, y3]), y_whole, **EXACT)
    assert torch.equal(parts, whole)


# --- gating, norm, and the whole layer against transformers' module ----------------------------

def test_layer_built_from_the_ops_matches_transformers_with_cache():
    """Qwen3_5GatedDeltaNet with a DynamicCache: a prefill, a decode step, a continued prefill;
    the same layer composed of our ops on state pools, slot 3."""
    from transformers import DynamicCache, Qwen3_5TextConfig
    cfg = Qwen3_5TextConfig(
        hidden_size=32, linear_num_key_heads=H, linear_num_value_heads=HV, linear_key_head_dim=DK,
        linear_value_head_dim=DV, linear_conv_kernel_dim=KSIZE, num_hidden_layers=1,
        layer_types=["linear_attention"], num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, intermediate_size=64, vocab_size=64)
    torch.manual_seed(0)
    layer = hf.Qwen3_5GatedDeltaNet(cfg, 0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    conv_pool = torch.zeros(SLOTS, KSIZE - 1, layer.conv_dim)
    rec_pool = torch.zeros(SLOTS, HV, DK, DV)
    slot = torch.tensor([3])

    def ours(x, has_init, decode):
        t = x.shape[0]
        mixed = F.linear(x, layer.in_proj_qkv.weight)
        z = F.linear(x, layer.in_proj_z.weight).view(t, HV, DV)
        g, beta = gdn_gating(F.linear(x, layer.in_proj_a.weight),
                             F.linear(x, layer.in_proj_b.weight), layer.A_log, layer.dt_bias)
        w = layer.conv1d.weight.squeeze(1)
        has_init = torch.tensor([has_init])
        if decode:
            mixed = causal_conv1d_decode(mixed, w, layer.conv1d.bias, conv_pool, slot, has_init)
        else:
            mixed = causal_conv1d(mixed, w, layer.conv1d.bias, conv_pool, slot, qsl_of([t]),
                                  has_init)
        q, k, v = mixed.split([layer.key_dim, layer.key_dim, layer.value_dim], -1)
        q, k, v = q.view(t, H, DK), k.view(t, H, DK), v.view(t, HV, DV)
        if decode:
            o = decode_gated_delta_rule(q, k, v, g, beta, rec_pool, slot, has_init)
        else:
            o = chunk_gated_delta_rule(q, k, v, g, beta, rec_pool, slot, qsl_of([t]), has_init,
                                       torch.from_numpy(chunk_metadata(qsl_of([t]).numpy())[0]))
        o = rms_norm_gated(o, z, layer.norm.weight, layer.norm.variance_epsilon)
        return F.linear(o.reshape(t, -1), layer.out_proj.weight)

    x = torch.randn(1, 90, 32)
    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        for lo, hi, decode in ((0, 70, False), (70, 71, True), (71, 90, False)):
            ref = layer(x[:, lo:hi], cache)[0]    # `cache_params` before 5.25
            torch.testing.assert_close(ours(x[0, lo:hi], lo > 0, decode), ref,
                                       atol=1e-5, rtol=1e-5)


def test_gated_norm_matches_transformers():
    norm = hf.Qwen3_5RMSNormGated(DV, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x, z = torch.randn(9, HV, DV), torch.randn(9, HV, DV)
    for dtype in (torch.float32, torch.bfloat16):
        norm.to(dtype)
        ref = norm(x.to(dtype).reshape(-1, DV), z.to(dtype).reshape(-1, DV)).view(9, HV, DV)
        assert torch.equal(rms_norm_gated(x.to(dtype), z.to(dtype), norm.weight, 1e-6), ref)


# --- chunk maps --------------------------------------------------------------------------------

def fla_chunk_maps(qsl, cs):
    """fla's prepare_chunk_indices / prepare_chunk_offsets, written from their definitions."""
    lens = [b - a for a, b in zip(qsl[:-1], qsl[1:])]
    counts = [-(-n // cs) for n in lens]
    indices = [(i, j) for i, c in enumerate(counts) for j in range(c)]
    return np.array(indices, dtype=np.int64).reshape(-1, 2), np.cumsum([0] + counts)


@pytest.mark.parametrize("lens", [[1], [64], [65, 0, 1], [0, 0, 200, 63, 64], [3] * 40])
def test_chunk_metadata_matches_fla_definition(lens):
    qsl = qsl_of(lens).numpy()
    indices, offsets = chunk_metadata(qsl)
    ref_indices, ref_offsets = fla_chunk_maps(qsl.tolist(), 64)
    assert np.array_equal(indices, ref_indices) and np.array_equal(offsets, ref_offsets)
    assert indices.dtype == np.int32 and indices.flags.c_contiguous


def test_padded_chunk_indices_fit_the_capacity_and_are_empty():
    rng = np.random.default_rng(0)
    for _ in range(200):
        r = int(rng.integers(1, 9))
        t = int(rng.integers(1, 400))
        cuts = np.sort(rng.integers(0, t + 1, r - 1))
        real = int(rng.integers(0, t + 1))                 # tokens past this are padding
        qsl = np.minimum(np.concatenate([[0], cuts, [t]]), real).astype(np.int32)
        cap = chunk_capacity(t, r)
        rows = padded_chunk_indices(qsl, cap)
        n = len(chunk_metadata(qsl)[0])
        assert rows.shape == (cap, 2) and np.array_equal(rows[:n], chunk_metadata(qsl)[0])
        lane, first = rows[n:, 0], rows[n:, 1] * 64
        assert np.all(lane == r - 1) and np.all(first >= qsl[r] - qsl[r - 1])
    # the bound is reached: every lane ends one token into a new chunk
    lens = [65] * 3 + [1]
    assert len(chunk_metadata(qsl_of(lens).numpy())[0]) == chunk_capacity(sum(lens), 4) == 7
    with pytest.raises(ValueError):
        padded_chunk_indices(qsl_of(lens).numpy(), 6)


# --- graph safety: the CPU fake graphs replay recorded ops on new tensor contents -------------

def test_ops_replay_in_fake_graphs_with_new_batches():
    from fullgraph.worker.cudagraph.fake import FakeGraphRuntime
    T, R = 150, 4
    cap = chunk_capacity(T, R)
    w, b = conv_weights()
    buf = dict(x=torch.zeros(T, CONV_DIM), q=torch.zeros(T, H, DK), k=torch.zeros(T, H, DK),
               v=torch.zeros(T, HV, DV), g=torch.zeros(T, HV), beta=torch.zeros(T, HV),
               qsl=torch.zeros(R + 1, dtype=torch.int32), slots=torch.zeros(R, dtype=torch.int64),
               has_init=torch.zeros(R, dtype=torch.bool),
               ci=torch.zeros(cap, 2, dtype=torch.int32))
    conv_pool, rec_pool = torch.zeros(SLOTS, KSIZE - 1, CONV_DIM), torch.zeros(SLOTS, HV, DK, DV)

    def step():
        y = causal_conv1d(buf["x"], w, b, conv_pool, buf["slots"], buf["qsl"], buf["has_init"])
        o = chunk_gated_delta_rule(buf["q"], buf["k"], buf["v"], buf["g"], buf["beta"], rec_pool,
                                   buf["slots"], buf["qsl"], buf["has_init"], buf["ci"])
        return y, o

    def stage(lens, slots, has_init, seed):
        qsl = qsl_of(lens)
        q, k, v, g, beta = inputs(T, seed=seed)
        for name, val in dict(x=torch.randn(T, CONV_DIM), q=q, k=k, v=v, g=g, beta=beta, qsl=qsl,
                              slots=torch.tensor(slots), has_init=torch.tensor(has_init),
                              ci=torch.from_numpy(padded_chunk_indices(qsl.numpy(), cap))).items():
            buf[name].copy_(val)

    stage([10, 20, 30, 40], [1, 2, 3, 4], [False] * 4, seed=0)
    graph, (y, o) = FakeGraphRuntime().capture(step)
    for lens, slots, has_init, seed in (([100, 1, 0, 49], [5, 1, 0, 6], [False, True, False, True], 1),
                                        ([0, 64, 65, 2], [0, 7, 3, 2], [False, False, True, True], 2)):
        stage(lens, slots, has_init, seed)
        pools = conv_pool.clone(), rec_pool.clone()
        graph.replay()
        conv_pool2, rec_pool2 = pools
        y_ref, o_ref = (causal_conv1d(buf["x"], w, b, conv_pool2, buf["slots"], buf["qsl"],
                                      buf["has_init"]),
                        chunk_gated_delta_rule(buf["q"], buf["k"], buf["v"], buf["g"], buf["beta"],
                                               rec_pool2, buf["slots"], buf["qsl"],
                                               buf["has_init"], None))
        torch.testing.assert_close(y, y_ref, **EXACT)
        torch.testing.assert_close(o, o_ref, **EXACT)
        torch.testing.assert_close(conv_pool[1:], conv_pool2[1:])
        torch.testing.assert_close(rec_pool[1:], rec_pool2[1:], **EXACT)
