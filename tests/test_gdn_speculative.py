"""Gated DeltaNet states per verified position (speculative decoding, layers/gdn/state.py):
the conv and the rule write, for each lane, the states after each of its first rows and after
its last into the lane's slot group, read from the slot the previous step kept; checked
against transformers' torch fallbacks run on each prefix."""
from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

from fullgraph.engine.kv_cache import KVCacheManager
from fullgraph.engine.request import Request
from fullgraph.layers.gdn import causal_conv1d, slot_groups, speculative_gated_delta_rule
from fullgraph.sampling_params import SamplingParams
from test_gdn_ops import CONV_DIM, DK, DV, EXACT, HV, KSIZE, inputs as rule_inputs

pytestmark = pytest.mark.usefixtures("hf_gdn_torch_paths")

M = 4                                   # k = 3 drafts: 4 slots a request
GROUPS = 5
SLOTS = 1 + GROUPS * M


def hf_recurrent(q, k, v, g, beta, h0):
    o, ht = hf.torch_recurrent_gated_delta_rule(
        q[None], k[None], v[None], g[None], beta[None],
        initial_state=None if h0 is None else h0[None], output_final_state=True,
        use_qk_l2norm_in_kernel=True)
    return o[0], ht[0]


def qsl_of(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int64)


# Lanes: (rows, group, slot of the group read, continues a saved state). A padding lane
# (group None: slot 0) has rows too, as a graph's padding lanes do.
VERIFY_LANES = [(4, 0, 2, True), (4, 3, 0, True), (4, 1, 3, False), (4, None, 0, False)]
MIXED_LANES = [(4, 0, 1, True), (70, 2, 3, True), (1, 4, 0, True), (2, 1, 3, True),
               (130, 3, 0, False), (0, None, 0, False)]


def lanes_tensors(lanes):
    lens = [n for n, *_ in lanes]
    slots = torch.tensor([0 if grp is None else 1 + grp * M + c for _, grp, c, _ in lanes])
    has_init = torch.tensor([init for *_, init in lanes])
    return lens, slots, has_init


def expected_kept_rows(n: int, j: int) -> int:
    """The rows slot j of a lane's group holds the states after."""
    return n if j == M - 1 else min(j + 1, n)


@pytest.mark.parametrize("lanes,short", [(VERIFY_LANES, M), (VERIFY_LANES, None),
                                         (MIXED_LANES, None)])
def test_rule_writes_each_positions_state(lanes, short):
    """A verify step (every lane M rows, token by token) and a step with prompt chunks
    (chunked rule, then the first rows again): outputs as transformers' over each lane, and
    slot j of each group the state transformers reaches after the lane's first rows."""
    lens, slots, has_init = lanes_tensors(lanes)
    t = sum(lens)
    q, k, v, g, beta = rule_inputs(t + 2, seed=7)       # two rows of no lane at the end
    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(SLOTS, HV, DK, DV, generator=gen) * 0.1
    before = pool.clone()
    qsl = qsl_of(lens)
    write = slot_groups(slots, M)
    o = speculative_gated_delta_rule(q, k, v, g, beta, pool, slots, write, qsl, has_init,
                                     None, short)
    for r, (n, grp, c, init) in enumerate(lanes):
        lo = int(qsl[r])
        h0 = before[slots[r]] if init else None
        if grp is None:
            assert write[r].tolist() == [0] * M
            continue
        o_ref, _ = hf_recurrent(*(x[lo:lo + n] for x in (q, k, v, g, beta)), h0)
        # the chunked rule reaches the same outputs up to rounding
        torch.testing.assert_close(o[lo:lo + n], o_ref, atol=2e-5, rtol=2e-5)
        for j in range(M if short is None else short):
            rows = expected_kept_rows(n, j)
            _, h_ref = hf_recurrent(*(x[lo:lo + rows] for x in (q, k, v, g, beta)), h0)
            torch.testing.assert_close(pool[1 + grp * M + j], h_ref, atol=2e-5, rtol=2e-5)
    assert torch.equal(o[t:], torch.zeros(2, HV, DV))
    used = {1 + grp * M + j for _, grp, *_ in lanes if grp is not None for j in range(M)}
    for s in set(range(1, SLOTS)) - used:                 # other groups untouched
        assert torch.equal(pool[s], before[s])


def test_conv_writes_each_positions_state():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(CONV_DIM, KSIZE, generator=gen) * 0.5
    lanes = [(4, 0, 2, True), (1, 1, 3, True), (9, 2, 0, False), (2, 4, 1, True),
             (0, None, 0, False)]
    lens, slots, has_init = lanes_tensors(lanes)
    x = torch.randn(sum(lens), CONV_DIM, generator=gen)
    pool = torch.randn(SLOTS, KSIZE - 1, CONV_DIM, generator=gen)
    before = pool.clone()
    qsl = qsl_of(lens)
    y = causal_conv1d(x, w, None, pool, slots, qsl, has_init, write_slots=slot_groups(slots, M))
    for r, (n, grp, c, init) in enumerate(lanes):
        if grp is None:
            continue
        lo = int(qsl[r])
        saved = before[slots[r]] if init else torch.zeros(KSIZE - 1, CONV_DIM)
        seq = torch.cat([saved, x[lo:lo + n]])
        ref = hf.causal_conv1d_fn(seq.t()[None], w, None, activation="silu")[0, :, KSIZE - 1:]
        torch.testing.assert_close(y[lo:lo + n], ref.t(), **EXACT)
        for j in range(M):
            end = KSIZE - 1 + expected_kept_rows(n, j)
            assert torch.equal(pool[1 + grp * M + j], seq[end - (KSIZE - 1):end])
    assert torch.equal(pool[1 + 3 * M:1 + 4 * M], before[1 + 3 * M:1 + 4 * M])


def test_slot_groups_and_the_kept_slot():
    assert slot_groups(torch.tensor([0, 1, 6, 8, 9]), 4).tolist() == [
        [0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8], [5, 6, 7, 8], [9, 10, 11, 12]]
    kv = KVCacheManager(16, 4, False, num_state_slots=3 * M, state_slots_per_request=M)
    reqs = [Request(str(i), [1, 2, 3], SamplingParams(), 0, 4) for i in range(3)]
    for req in reqs:
        assert kv.allocate_slots(req, 3)
    assert sorted(r.state_slot for r in reqs) == [1, 5, 9]
    req = reqs[1]
    first = req.state_slot
    for kept, slot in [(1, 0), (4, 3), (2, 1), (9, 3), (3, 2)]:
        kv.keep_state(req, kept)        # the rows kept: min(kept, M) - 1 of the group
        assert req.state_slot == first + slot
    kv.free(req)
    assert kv.state_slots.num_free == 1
    assert kv.allocate_slots(Request("new", [1], SamplingParams(), 0, 4), 1)
    assert kv.state_slots.num_free == 0
