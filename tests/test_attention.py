"""Attention backends on a paged cache: flex (both layouts; uncompiled, its gathered CPU path)
against eager FlexAttention, SDPA and a dense reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fullgraph.attention.flex import FlexAttentionBackend
from fullgraph.attention.metadata import AttentionSpec, PersistentInputs, StepAttentionInputs
from fullgraph.attention.sdpa import SDPABackend

BS, NB, HQ, HKV, D = 4, 40, 4, 2, 8


def spec(max_seqs=6, max_tokens=64, max_blocks=12):
    return AttentionSpec(1, HQ, HKV, D, BS, NB, max_seqs, max_tokens, max_blocks, torch.float32)


def make_step(seq_lens, q_lens, shared_prefix_blocks=0, pad_tokens=0, seed=0, max_tokens=64):
    """Random block tables (optionally sharing leading blocks) and the matching step inputs."""
    rng = np.random.default_rng(seed)
    s = spec(max_tokens=max_tokens)
    free = list(rng.permutation(np.arange(1, NB)))
    shared = [int(free.pop()) for _ in range(shared_prefix_blocks)]
    n = len(seq_lens)
    bt = np.zeros((s.max_num_seqs + 1, s.max_blocks_per_seq), np.int32)
    for i, L in enumerate(seq_lens):
        nblk = -(-L // BS)
        own = shared[:nblk] + [int(free.pop()) for _ in range(nblk - len(shared[:nblk]))]
        bt[i, :nblk] = own
    qsl = np.zeros(s.max_num_seqs + 1, np.int32)
    qsl[1:n + 1] = np.cumsum(q_lens)
    T = int(qsl[n])
    pos = np.concatenate([np.arange(L - q, L) for L, q in zip(seq_lens, q_lens)]).astype(np.int64)
    req = np.repeat(np.arange(n), q_lens)
    slots = bt[req, pos // BS].astype(np.int64) * BS + pos % BS
    positions = np.zeros(s.max_num_tokens, np.int64)
    positions[:T] = pos
    uniform = q_lens[0] if len(set(q_lens)) == 1 else None
    t_pad = T + pad_tokens
    r_pad = n if uniform is None or pad_tokens == 0 else n + pad_tokens // uniform
    seq = np.zeros(s.max_num_seqs, np.int32)
    seq[:n] = seq_lens
    qsl[n + 1:r_pad + 1] = T + (np.arange(1, r_pad - n + 1) * (uniform or 0))
    bt_t, pos_t = torch.from_numpy(bt), torch.from_numpy(positions)
    inputs = StepAttentionInputs(
        num_reqs=n, num_tokens=T, num_reqs_padded=r_pad, num_tokens_padded=t_pad,
        uniform_query_len=uniform, positions=pos_t[:t_pad],
        slot_mapping=torch.cat([torch.from_numpy(slots), torch.zeros(pad_tokens, dtype=torch.int64)]),
        seq_lens=torch.from_numpy(seq)[:r_pad], query_start_loc=torch.from_numpy(qsl)[:r_pad + 1],
        block_table=bt_t[:r_pad + 1], positions_cpu=positions, seq_lens_cpu=seq,
        query_start_loc_cpu=qsl, block_table_cpu=bt)
    return s, inputs, PersistentInputs(bt_t, pos_t), bt, pos, req


def eager_flex_backend(s, persistent):
    """The flex backend as it was before its gathered CPU path (attention/gathered.py): eager
    FlexAttention over the whole cache, the reference that path must match."""
    backend = FlexAttentionBackend(s, torch.device("cpu"), persistent)
    backend.gathered = None
    return backend


def dense_reference(q, cache, bt, pos, req, scale):
    out = torch.empty_like(q)
    for t in range(q.shape[0]):
        L = int(pos[t]) + 1
        p = np.arange(L)
        slots = torch.from_numpy(bt[req[t], p // BS].astype(np.int64) * BS + p % BS)
        k = cache[0][slots].repeat_interleave(HQ // HKV, dim=1)   # [L, Hq, D]
        v = cache[1][slots].repeat_interleave(HQ // HKV, dim=1)
        w = torch.einsum("hd,lhd->hl", q[t], k) * scale
        out[t] = torch.einsum("hl,lhd->hd", w.softmax(-1), v)
    return out


@pytest.mark.parametrize("seq_lens, q_lens, shared, pad", [
    ([9, 17, 3], [1, 1, 1], 0, 0),          # decode layout
    ([9, 17, 3], [1, 1, 1], 0, 3),          # decode layout with padded requests
    ([12, 20], [3, 3], 2, 0),               # uniform multi-token queries (verify), shared prefix
    ([9, 17, 5, 30], [9, 4, 1, 13], 0, 0),  # mixed: prefills and a decode
    ([20, 22, 7], [20, 2, 7], 4, 5),        # mixed with a shared prefix and padding tokens
])
def test_flex_matches_sdpa_and_dense(seq_lens, q_lens, shared, pad):
    s, inputs, persistent, bt, pos, req = make_step(seq_lens, q_lens, shared, pad)
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(2, NB * BS, HKV, D, generator=g)
    T = inputs.num_tokens_padded
    q = torch.randn(T, HQ, D, generator=g)
    k = torch.randn(T, HKV, D, generator=g)
    v = torch.randn(T, HKV, D, generator=g)
    results = []
    for backend in (FlexAttentionBackend(s, torch.device("cpu"), persistent),
                    SDPABackend(s, torch.device("cpu")), eager_flex_backend(s, persistent)):
        c = cache.clone()
        backend.prepare(inputs)
        meta = backend.build(inputs)
        backend.update(meta, inputs)
        c[0].index_copy_(0, inputs.slot_mapping, k)
        c[1].index_copy_(0, inputs.slot_mapping, v)
        results.append((backend.forward(q, (c[0], c[1]), meta)[:inputs.num_tokens], c))
    (flex, cache_f), (sdpa, cache_s), (eager_flex, _) = results
    # every token's K/V sits in the slot its position maps to; padding only touched block 0
    n = inputs.num_tokens
    slots = torch.from_numpy(bt[req[:n], pos[:n] // BS].astype(np.int64) * BS + pos[:n] % BS)
    _, inv, counts = np.unique(slots.numpy(), return_inverse=True, return_counts=True)
    once = torch.from_numpy(counts[inv] == 1)      # a shared-prefix slot can have 2 writers
    assert torch.equal(cache_f[0][slots[once]], k[:n][once])
    assert torch.equal(cache_f[1][slots[once]], v[:n][once])
    untouched = torch.ones(NB * BS, dtype=torch.bool)
    untouched[slots] = False
    untouched[:BS] = False
    assert torch.equal(cache_f[:, untouched], cache[:, untouched])
    ref = dense_reference(q[:inputs.num_tokens], cache_f, bt, pos, req, s.scale)
    torch.testing.assert_close(sdpa, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex, eager_flex, atol=1e-6, rtol=1e-6)


def test_mixed_kv_blocks_are_the_distinct_visible_blocks():
    s, inputs, persistent, bt, pos, req = make_step([20, 22, 7, 3], [20, 2, 7, 1], shared_prefix_blocks=3)
    backend = FlexAttentionBackend(s, torch.device("cpu"), persistent)
    nqb = -(-inputs.num_tokens // 16)
    counts, indices = backend._mixed_kv_blocks(req.astype(np.int32), pos, bt, nqb)
    for qb in range(nqb):
        toks = range(qb * 16, min(qb * 16 + 16, inputs.num_tokens))
        want = {int(bt[req[t], b]) for t in toks for b in range(int(pos[t]) // BS + 1)}
        got = indices[qb, :counts[qb]].tolist()
        assert len(got) == len(set(got)) and set(got) == want


@pytest.mark.parametrize("compiled", [False, True])
def test_metadata_buffers_are_not_reallocated(compiled):
    """Compiled: the BlockMasks read views of the persistent buffers (the compiled calls are
    not made here). Uncompiled: so do the gathered path's block lists."""
    s, inputs, persistent, *_ = make_step([9, 17, 5, 30], [9, 4, 1, 13])
    backend = FlexAttentionBackend(s, torch.device("cpu"), persistent, compile=compiled)
    ptrs = [t.data_ptr() for t in (backend.block_logical, backend.doc_ids.gpu,
                                   backend.mixed_kv_indices.gpu, backend.decode_kv_num_blocks)]
    backend.prepare(inputs)
    m1 = backend.build(inputs)
    backend.update(m1, inputs)
    _, dec, *_ = make_step([9, 17, 3], [1, 1, 1])
    backend.prepare(dec)
    m2 = backend.build(dec)
    backend.update(m2, dec)
    assert ptrs == [t.data_ptr() for t in (backend.block_logical, backend.doc_ids.gpu,
                                           backend.mixed_kv_indices.gpu, backend.decode_kv_num_blocks)]
    base = backend.mixed_kv_indices.gpu
    if compiled:
        assert m1.block_mask.kv_indices.data_ptr() == base.data_ptr()
        assert m2.block_mask.kv_num_blocks.data_ptr() == backend.decode_kv_num_blocks.data_ptr()
    else:
        assert m1.kv_blocks.data_ptr() == base.data_ptr()
        assert m2.kv_blocks.data_ptr() == dec.block_table.data_ptr()


def test_decode_rows_and_kv_splits():
    from fullgraph.attention.flex import decode_rows, split_kv
    assert [decode_rows(r, 1, 256) for r in (1, 3, 8, 9, 200, 256)] == [1, 4, 8, 16, 256, 256]
    assert decode_rows(5, 16, 256) == 5                   # long verify queries are not padded
    assert decode_rows(100, 1, 100) == 100                # never past the persistent rows
    # the choices measured best on an H200 (132 SMs, 8 KV heads; benchmarks/probes)
    assert [split_kv(r, 8, 132) for r in (1, 8, 16, 32, 64, 128, 256)] == [32, 16, 8, 4, 2, 1, 1]


def test_decode_splits_keep_about_two_programs_per_sm():
    from fullgraph.attention.paged_decode import MAX_SPLITS, decode_splits
    # the choices measured best on an H100 (132 SMs, 8 KV heads; benchmarks/probes)
    assert [decode_splits(r, 8, 132) for r in (1, 8, 32, 128)] == [16, 4, 1, 1]
    for r in range(1, 300):
        s = decode_splits(r, 8, 132)
        assert s & (s - 1) == 0 and 1 <= s <= MAX_SPLITS
        assert s == 1 or r * 8 * s <= 2 * 132


def test_invariant_attention_spreads_splits_only_for_few_tiles():
    """The mode's kernel spreads a tile's splits over programs (a power of two, about two
    programs an SM, at most the workspace's splits rounded up) only for launches of few
    (tile, KV head) pairs, and never without a workspace; the workspace holds a decode
    step's two tiles at least and splits covering PART_TOKENS positions."""
    from fullgraph.attention.paged_invariant import (PART_TOKENS, SplitWorkspace,
                                                     split_programs, tiled_attention)
    from fullgraph.layers.launch import next_power_of_2
    ws = SplitWorkspace.for_spec(16, 8, 128, 40960, 256, 132, torch.device("cpu"))
    assert (ws.max_tiles, ws.part_splits) == (16, PART_TOKENS // 256)
    assert ws.counters.shape == (16 * 8,) and not ws.counters.any()
    assert SplitWorkspace.for_spec(32, 32, 64, 1024, 256, 132, torch.device("cpu")).max_tiles == 4
    assert [split_programs(t, 8, 132, ws) for t in (2, 3, 5, 9, 16, 17)] == [16, 8, 4, 2, 2, 1]
    assert split_programs(2, 8, 132, None) == 1
    small = SplitWorkspace(4, 8, 3, 16, 128, torch.device("cpu"))
    assert split_programs(2, 8, 132, small) == next_power_of_2(3)   # idle programs past splits
    for t in range(1, 40):
        p = split_programs(t, 8, 132, ws)
        assert p & (p - 1) == 0 and (p == 1 or (t <= ws.max_tiles and t * 8 * p <= 2 * 132))
    q, kv = torch.zeros(1, 16, 128), torch.zeros(16, 8, 128)
    tiles = (torch.zeros(2, dtype=torch.int32),) * 3
    with pytest.raises(ValueError, match="workspace"):
        tiled_attention(q, kv, kv, torch.zeros(2, 1, dtype=torch.int32),
                        torch.ones(1, dtype=torch.int32), torch.zeros(1, dtype=torch.long),
                        tiles, 16, 1.0, 8, 32, 256, programs=4, workspace=None)


def test_qk_prologue_fuses_into_split_decode_of_several_requests():
    """The measured rule (flex.fuse_qk_norm_rope) on an H100's split counts."""
    from fullgraph.attention.flex import fuse_qk_norm_rope
    from fullgraph.attention.paged_decode import decode_splits
    fused = [r for r in (1, 2, 4, 8, 16, 24, 32, 128)
             if fuse_qk_norm_rope(r, decode_splits(r, 8, 132))]
    assert fused == [2, 4, 8, 16]


def test_decode_layout_takes_the_triton_kernel_where_it_applies(monkeypatch):
    """Backend dispatch only (the kernel itself is tested on GPU: tests/test_paged_decode.py):
    uniform decode steps get the kernel's metadata and no flex metadata work; queries too long
    for it, and mixed steps, stay with FlexAttention."""
    from fullgraph.attention import flex, paged_decode
    monkeypatch.setattr(paged_decode, "supported", lambda device, head_dim: True)
    s, dec, persistent, *_ = make_step([9, 17, 3], [1, 1, 1])
    backend = flex.FlexAttentionBackend(s, torch.device("cpu"), persistent, compile=True)
    meta = backend.build(dec)
    assert isinstance(meta, flex.PagedDecodeMetadata)
    assert (meta.num_reqs, meta.query_len) == (3, 1)
    assert meta.seq_lens is dec.seq_lens and meta.block_table is dec.block_table
    assert (meta.num_splits, meta.fuse_qk) == (1, False)   # a CPU: no SMs to split over
    backend.num_sms = 132                  # an H100: 3 requests x 2 KV heads, 16 splits
    assert (backend.build(dec).num_splits, backend.build(dec).fuse_qk) == (16, True)
    logical = backend.block_logical.clone()
    backend.update(meta, dec)
    assert torch.equal(backend.block_logical, logical)    # nothing for flex to refresh
    limit = paged_decode.MAX_QUERY_ROWS // (HQ // HKV)
    _, long_q, *_ = make_step([40, 44], [limit + 1, limit + 1], max_tokens=128)
    assert isinstance(backend.build(long_q), flex.FlexMetadata)
    _, mixed, *_ = make_step([9, 17, 5, 30], [9, 4, 1, 13])
    assert isinstance(backend.build(mixed), flex.FlexMetadata)


def test_compiled_packed_layout_pads_short_steps_to_one_shape():
    """Compiled, a packed step runs with at least MIXED_MIN_TOKENS query rows (one compile for
    every token count); the padding rows see no KV blocks and the output is unchanged. The
    compiled call is swapped for eager FlexAttention: inductor's CPU flex kernel does not
    build here, and the padding logic is the backend's."""
    from torch.nn.attention.flex_attention import flex_attention
    from fullgraph.attention.flex import MIXED_MIN_TOKENS, MIXED_Q_BLOCK
    s, inputs, persistent, bt, pos, req = make_step([20, 22, 7], [20, 2, 7], 4, 5,
                                                     max_tokens=MIXED_MIN_TOKENS)
    backend = FlexAttentionBackend(s, torch.device("cpu"), persistent, compile=True)
    backend.attend_mixed = flex_attention
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(2, NB * BS, HKV, D, generator=g)
    q = torch.randn(inputs.num_tokens_padded, HQ, D, generator=g)
    backend.prepare(inputs)
    meta = backend.build(inputs)
    backend.update(meta, inputs)
    nqb = MIXED_MIN_TOKENS // MIXED_Q_BLOCK
    assert meta.query_len == MIXED_MIN_TOKENS
    assert meta.block_mask.kv_num_blocks.shape[-1] == nqb
    used = -(-inputs.num_tokens // MIXED_Q_BLOCK)
    assert not meta.block_mask.kv_num_blocks[..., used:].any()
    out = backend.forward(q, (cache[0], cache[1]), meta)
    assert out.shape == q.shape
    ref = dense_reference(q[:inputs.num_tokens], cache, bt, pos, req, s.scale)
    torch.testing.assert_close(out[:inputs.num_tokens], ref, atol=1e-5, rtol=1e-5)


def test_attention_qkv_takes_the_fused_path_where_the_backend_answers():
    """ForwardContext.attention_qkv: the backend's forward_qkv when it returns a tensor;
    otherwise the q/k op (storing this step's K/V) and then forward."""
    from fullgraph.attention.backend import ForwardContext, QKNormRope
    from fullgraph.layers.qk_norm_rope import qk_norm_rope_store_kv
    from fullgraph.layers.rotary import RotaryEmbedding
    t, d = 3, 16
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(t, (HQ + 2 * HKV) * d, generator=g)
    rotary = RotaryEmbedding(d, 64, 1e4)
    prologue = QKNormRope(torch.ones(d), torch.ones(d), 1e-6, rotary.cos, rotary.sin, HQ, HKV)
    positions, slots = torch.tensor([4, 9, 2]), torch.tensor([5, 1, 7])

    class Backend:
        def __init__(self, fused):
            self.fused, self.seen = fused, []

        def forward_qkv(self, qkv, positions, kv_cache, slot_mapping, prologue, metadata):
            return self.fused

        def forward(self, q, kv_cache, metadata):
            self.seen.append(q)
            return q * 2

    fused = torch.full((t, HQ, d), 7.0)
    cache = (torch.zeros(8, HKV, d), torch.zeros(8, HKV, d))
    ctx = ForwardContext(Backend(fused), None, [cache], slots)
    assert ctx.attention_qkv(qkv, positions, cache, prologue) is fused
    assert not cache[0].any()                      # the fused backend stores K/V itself
    backend = Backend(None)
    out = ForwardContext(backend, None, [cache], slots).attention_qkv(qkv, positions, cache,
                                                                       prologue)
    ref_cache = (torch.zeros(8, HKV, d), torch.zeros(8, HKV, d))
    q = qk_norm_rope_store_kv(qkv, positions, rotary.cos, rotary.sin, torch.ones(d),
                              torch.ones(d), 1e-6, HQ, HKV, ref_cache[0], ref_cache[1], slots)
    torch.testing.assert_close(backend.seen[0], q)
    torch.testing.assert_close(out, 2 * q)
    assert torch.equal(cache[0], ref_cache[0]) and torch.equal(cache[1], ref_cache[1])
    assert cache[0][slots].any()


def test_triton_backend_by_name():
    """`--attention-backend triton`: the flex backend with prompt chunks in a Triton kernel
    on CUDA (tests/test_triton_attn_interpret.py checks that path); on a CPU the flex
    backend's paths, so the engine's tokens are flex's; in the batch-invariant mode the
    invariant backend, as for flex."""
    from fullgraph import LLM, SamplingParams
    from fullgraph.attention.backend import get_backend_class
    from fullgraph.attention.invariant import InvariantAttentionBackend
    from fullgraph.attention.triton_attn import TritonAttentionBackend
    from fullgraph.config import KernelPolicy
    assert get_backend_class("triton") is TritonAttentionBackend
    assert (get_backend_class("triton", KernelPolicy(batch_invariant=True))
            is InvariantAttentionBackend)
    with pytest.raises(ValueError, match="'flex', 'triton' or 'sdpa'"):
        get_backend_class("flash")
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    batch = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 40, 70)]

    def tokens(backend: str) -> list[list[int]]:
        llm = LLM("tiny-qwen3", attention_backend=backend, max_num_batched_tokens=64,
                  max_num_seqs=8)
        return [o.outputs[0].token_ids for o in llm.generate(batch, sp, use_tqdm=False)]
    assert tokens("triton") == tokens("flex")
