"""The sampler's torch path (worker/sampler.py, the spec the kernels follow) against
references nobody here wrote: torch.softmax, vLLM's published top-k/top-p, min_p and penalty
formulas, with chi-square tests over many seeded draws (deterministic: the draws are a hash
of seed and position), plus ties, batch invariance, variants, state and graph capture."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from fullgraph import SamplingParams
from fullgraph.engine.engine import logprob_entry
from fullgraph.worker import sampler as S
from fullgraph.worker.cudagraph.fake import FakeGraphRuntime

V = 32
N = 12_000


# ------------------------------------------------------------------ references (vLLM, torch)
def vllm_top_k_top_p(logits, k, p):
    """vLLM's apply_top_k_top_p (vllm/v1/sample/ops/topk_topp_sampler.py), sort-based."""
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if k is not None:
        top_k_mask = logits_sort.size(1) - k.to(torch.long)
        top_k_mask = logits_sort.gather(1, top_k_mask.unsqueeze(dim=1))
        logits_sort.masked_fill_(logits_sort < top_k_mask, -float("inf"))
    if p is not None:
        probs_sort = logits_sort.softmax(dim=-1)
        probs_sum = torch.cumsum(probs_sort, dim=-1)
        top_p_mask = probs_sum <= 1 - p.unsqueeze(dim=1)
        top_p_mask[:, -1] = False
        logits_sort.masked_fill_(top_p_mask, -float("inf"))
    return logits_sort.scatter(dim=-1, index=logits_idx, src=logits_sort)


def vllm_min_p(logits, min_p):
    """vLLM's MinPLogitsProcessor: keep probabilities >= min_p * the largest."""
    probs = torch.softmax(logits, dim=-1)
    keep = probs >= min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(~keep, -float("inf"))


def vllm_apply_penalties(logits, prompt_tokens, output_tokens, presence, frequency, repetition):
    """vLLM's apply_penalties (vllm/model_executor/layers/utils.py); token lists padded with
    vocab_size."""
    num_seqs, vocab_size = logits.shape

    def bins(tokens):
        counts = torch.zeros(num_seqs, vocab_size + 1, dtype=torch.long)
        counts.scatter_add_(1, tokens, torch.ones_like(tokens))
        counts = counts[:, :vocab_size]
        return counts, counts > 0

    _, prompt_mask = bins(prompt_tokens)
    output_bin_counts, output_mask = bins(output_tokens)
    rep = repetition[:, None].repeat(1, vocab_size)
    rep[~(prompt_mask | output_mask)] = 1.0
    logits = torch.where(logits > 0, logits / rep, logits * rep)
    logits = logits - frequency[:, None] * output_bin_counts
    logits = logits - presence[:, None] * output_mask
    return logits


def chi2_pvalue(tokens, probs):
    """Pearson's chi-square p-value of draws against `probs` (support checked apart)."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    keep = expected > 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = keep.sum().double() - 1
    return torch.special.gammaincc(df / 2, stat / 2).item()


def batch(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, salt=0, logprobs=-1):
    return S.SamplingTensors(
        temperature=torch.full((n,), float(temperature)),
        top_k=torch.full((n,), top_k, dtype=torch.int32), top_p=torch.full((n,), float(top_p)),
        seeds=torch.arange(n, dtype=torch.int64) * 7919 + salt,
        positions=(torch.arange(n, dtype=torch.int64) * 31 + salt) % 100_003,
        all_greedy=temperature == 0, any_top_k_top_p=bool(top_k) or top_p < 1 or min_p > 0,
        num_logprobs=logprobs, min_p=torch.full((n,), float(min_p)) if min_p else None)


@pytest.fixture(scope="module")
def row():
    return torch.randn(V, generator=torch.Generator().manual_seed(1)) * 1.5


# ------------------------------------------------------------------ noise
def test_noise_is_the_documented_hash():
    """The integers, recomputed in plain Python from the docstring's recipe."""
    def mix(x):
        for _ in range(2):
            x ^= x >> 16
            x = (x * 0x45D9F3B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    for seed, pos in ((0, 0), (12345, 7), (-1, 2 ** 31 + 3), (2 ** 63 - 1, 99), (-2 ** 63, 1)):
        s = seed & (2 ** 64 - 1)
        h = mix((s & 0xFFFFFFFF) ^ mix((s >> 32) ^ mix(pos & 0xFFFFFFFF)))
        want = [mix((h + v * 0x9E3779B1) & 0xFFFFFFFF) for v in range(40)]
        got = S.noise_bits(torch.tensor([seed]), torch.tensor([pos]), 40)[0].tolist()
        assert got == want


def test_uniform_mapping_is_exact_and_open():
    u = S.uniform_noise(torch.arange(64), torch.zeros(64, dtype=torch.int64), 4096)
    j = S.noise_bits(torch.arange(64), torch.zeros(64, dtype=torch.int64), 4096) >> 9
    assert torch.equal(u.double(), (j.double() + 0.5) / 2 ** 23)
    assert 0 < u.min() and u.max() < 1


# ------------------------------------------------------------------ distributions
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_temperature_draws_follow_softmax(row, temperature):
    x = row[None].repeat(N, 1)
    out = S.sample(x, batch(N, temperature)).token_ids
    assert chi2_pvalue(out, torch.softmax(row / temperature, -1)) > 1e-3
    # a wrong temperature is rejected by the same test
    assert chi2_pvalue(out, torch.softmax(row / (temperature * 1.25), -1)) < 1e-6


CASES = {   # name: (sampler kwargs, expected-distribution builder over scaled logits)
    "top_k": (dict(top_k=5),
              lambda s: vllm_top_k_top_p(s[None], torch.tensor([5]), None)[0]),
    "top_p": (dict(top_p=0.7),
              lambda s: vllm_top_k_top_p(s[None], None, torch.tensor([0.7]))[0]),
    "top_k_top_p": (dict(top_k=10, top_p=0.6),
                    lambda s: vllm_top_k_top_p(s[None], torch.tensor([10]),
                                               torch.tensor([0.6]))[0]),
    "min_p": (dict(min_p=0.15), lambda s: vllm_min_p(s[None], torch.tensor([0.15]))[0]),
    "min_p_top_k": (dict(min_p=0.05, top_k=6),
                    lambda s: vllm_top_k_top_p(vllm_min_p(s[None], torch.tensor([0.05])),
                                               torch.tensor([6]), None)[0]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_filtered_draws_follow_the_renormalized_distribution(row, case):
    kwargs, build = CASES[case]
    temperature = 0.8
    expected = torch.softmax(build(row / temperature), -1)
    x = row[None].repeat(N, 1)
    out = S.sample(x, batch(N, temperature, **kwargs)).token_ids
    support = expected > 0
    assert support[out].all(), "a token outside the kept set was drawn"
    assert chi2_pvalue(out, expected) > 1e-3
    # the same test rejects a sampler that ignores the restriction...
    wrong = S.sample(x, batch(N, temperature), S.SamplerFeatures(sample=True)).token_ids
    assert chi2_pvalue(wrong, expected) < 1e-6 or not support[wrong].all()
    # ...and draws that are right, measured against the unrestricted distribution
    assert chi2_pvalue(out, torch.softmax(row / temperature, -1)) < 1e-6


def test_thresholds_equal_vllm_without_ties():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(200, 64, generator=g) * 2
    k = torch.randint(1, 64, (200,), generator=g, dtype=torch.int32)
    p = torch.rand(200, generator=g) * 0.99 + 0.01
    mp = torch.where(torch.rand(200, generator=g) < 0.5, torch.rand(200, generator=g) * 0.3, 0.0)
    thr = S.filter_thresholds(s, k, p, mp)
    want = vllm_top_k_top_p(vllm_min_p(s, mp), k, p) > -float("inf")
    assert torch.equal(s >= thr[:, None], want)


# ------------------------------------------------------------------ ties
def test_ties_at_the_boundary_are_kept_together():
    s = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]])
    # top-k = 2: the second largest value is 2, held by three tokens: all stay
    assert S.filter_thresholds(s, torch.tensor([2]), torch.tensor([1.0]), None).item() == 2.0
    # top-p: the mass strictly above each 1.0 is p(2.0), below 0.6: both tied tokens stay
    s = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    thr = S.filter_thresholds(s, torch.tensor([0]), torch.tensor([0.6]), None)
    assert thr.item() == 1.0
    x = s.repeat(4000, 1)
    out = S.sample(x, batch(4000, 1.0, top_p=0.6)).token_ids
    assert set(out.tolist()) == {0, 1, 2}
    expected = torch.softmax(torch.tensor([2.0, 1.0, 1.0, -float("inf")]), -1)
    assert chi2_pvalue(out, expected) > 1e-3
    # all tied: everything stays, whatever top_p
    thr = S.filter_thresholds(torch.zeros(1, 8), torch.tensor([0]), torch.tensor([0.1]), None)
    assert thr.item() == 0.0


def test_greedy_takes_the_first_maximum():
    x = torch.tensor([[1.0, 4.0, 4.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    t = batch(2, temperature=0.0)
    assert S.sample(x, t).token_ids.tolist() == [1, 0]
    t.state_slots = torch.tensor([-1, -1], dtype=torch.int32)
    state = S.SamplingState.allocate(1, 4, "cpu")
    assert S.sample(x, t, S.ALL_FEATURES, state).token_ids.tolist() == [1, 0]


def test_tiny_temperature_is_greedy():
    x = torch.tensor([[1.0, 4.0, 3.9]]).repeat(50, 1)
    assert set(S.sample(x, batch(50, temperature=1e-6)).token_ids.tolist()) == {1}


# ------------------------------------------------------------------ penalties and state
def _state_rows():
    state = S.SamplingState.allocate(4, 8, "cpu", max_logit_bias=4)
    state.reset_slot(0, prompt_token_ids=[0, 1], output_token_ids=[3, 3, 2],
                     repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    return state


def test_penalties_hand_computed():
    state = _state_rows()
    x = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0, -2.0, 0.0, 4.0]])
    z = S.process_logits(x, state, torch.tensor([0], dtype=torch.int32), torch.zeros(1))
    # 0: prompt, positive -> 2 / 2; 1: prompt, negative -> -1 * 2; 2: once in the output
    # -> 0.5 / 2 - 0.5 - 0.25; 3: twice -> 3 / 2 - 1.0 - 0.25; the rest unchanged
    assert z[0].tolist() == [1.0, -2.0, -0.5, 0.25, 1.0, -2.0, 0.0, 4.0]
    # a row without a slot is untouched
    z = S.process_logits(x, state, torch.tensor([-1], dtype=torch.int32), torch.zeros(1))
    assert torch.equal(z, x)


def test_penalties_equal_vllm_formula():
    g = torch.Generator().manual_seed(3)
    r, v = 6, 50
    x = torch.randn(r, v, generator=g) * 3
    state = S.SamplingState.allocate(r, v, "cpu")
    prompts, outputs = [], []
    for i in range(r):
        prompt = torch.randint(0, v, (10,), generator=g).tolist()
        output = torch.randint(0, v, (i * 4,), generator=g).tolist()
        rep, freq, pres = 1.0 + 0.2 * i, 0.1 * i, 0.3 * (i % 2)
        state.reset_slot(i, prompt_token_ids=prompt, output_token_ids=output,
                         repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
        prompts.append(prompt)
        outputs.append(output + [v] * (20 - len(output)))
    z = S.process_logits(x, state, torch.arange(r, dtype=torch.int32), torch.zeros(r))
    want = vllm_apply_penalties(x.clone(), torch.tensor(prompts), torch.tensor(outputs),
                                state.presence_penalty[:r], state.frequency_penalty[:r],
                                state.repetition_penalty[:r])
    assert torch.allclose(z, want, rtol=0, atol=1e-6)


def test_logit_bias_allowed_and_bad_words():
    state = S.SamplingState.allocate(3, 8, "cpu", max_logit_bias=4)
    state.reset_slot(0, logit_bias={2: 5.0, 7: -1.5})
    state.reset_slot(1, allowed_token_ids=[1, 4], bad_token_ids=[4])
    state.reset_slot(2, logit_bias={3: 1.0}, repetition_penalty=2.0, prompt_token_ids=[3])
    x = torch.arange(8, dtype=torch.float32)[None].repeat(3, 1)
    z = S.process_logits(x, state, torch.tensor([0, 1, 2], dtype=torch.int32),
                         torch.zeros(3))
    assert z[0].tolist() == [0, 1, 7, 3, 4, 5, 6, 5.5]
    inf = float("-inf")
    assert z[1].tolist() == [inf, 1, inf, inf, inf, inf, inf, inf]
    assert z[2, 3].item() == (3 + 1.0) / 2.0          # bias first, then the penalty (vLLM)
    with pytest.raises(ValueError):
        state.reset_slot(0, logit_bias={8: 1.0})
    with pytest.raises(ValueError):
        state.reset_slot(0, logit_bias={i: 1.0 for i in range(5)})


def test_min_tokens_bans_stop_tokens_until_reached():
    state = S.SamplingState.allocate(2, 8, "cpu")
    params = SimpleNamespace(temperature=0.0, min_tokens=2, stop_token_ids=[5],
                             ignore_eos=False, logprobs=None)
    assert S.needs_state(params)
    state.reset_slot_from_params(0, params, prompt_token_ids=[1, 2, 3], eos_token_ids=[7])
    x = torch.arange(8.0)[None].repeat(3, 1)
    slots = torch.zeros(3, dtype=torch.int32)
    # positions 3 and 4 sample output tokens 0 and 1: eos and the stop token are banned
    z = S.process_logits(x, state, slots, torch.tensor([3, 4, 5]))
    inf = float("-inf")
    assert z[0].tolist() == [0, 1, 2, 3, 4, inf, 6, inf] and torch.equal(z[1], z[0])
    assert torch.equal(z[2], x[2])
    t = batch(3, temperature=0.0)
    t.positions = torch.tensor([3, 4, 5])
    t.state_slots = slots
    assert S.sample(x, t, S.SamplerFeatures(process=True), state).token_ids.tolist() == [6, 6, 7]
    # ignore_eos: only the stop token
    params.ignore_eos = True
    state.reset_slot_from_params(1, params, prompt_token_ids=[1], eos_token_ids=[7])
    z = S.process_logits(x[:1], state, torch.tensor([1], dtype=torch.int32), torch.tensor([1]))
    assert z[0].tolist() == [0, 1, 2, 3, 4, inf, 6, 7]


def test_sampling_updates_counts_of_rows_with_a_slot():
    state = S.SamplingState.allocate(2, 8, "cpu")
    state.reset_slot(1, frequency_penalty=0.5)
    x = torch.zeros(3, 8)
    x[:, 5] = 10.0
    t = batch(3, temperature=0.0)
    t.state_slots = torch.tensor([1, -1, 0], dtype=torch.int32)
    for _ in range(3):
        S.sample(x, t, S.SamplerFeatures(process=True), state)
    assert state.output_counts[1, 5].item() == 3 and state.output_counts[0, 5].item() == 3
    assert state.output_counts.sum().item() == 6
    # preemption: the slot is rebuilt from the tokens already generated
    state.reset_slot(1, output_token_ids=[5, 5, 6], frequency_penalty=0.5)
    assert state.output_counts[1].tolist() == [0, 0, 0, 0, 0, 2, 1, 0]


# ------------------------------------------------------------------ logprobs
def test_logprobs_ranks_and_top_n_ties():
    x = torch.tensor([[0.0, 2.0, 1.0, 2.0, -1.0]])
    lp, ids, ranks = S.compute_logprobs(x, torch.tensor([2]), 3)
    ref = torch.log_softmax(x, -1)[0]
    assert ids[0].tolist() == [2, 1, 3, 2]               # ties: lower id first
    assert torch.allclose(lp[0], ref[[2, 1, 3, 2]])
    assert ranks.item() == 3


def test_prompt_logprobs_shape_like_vllm():
    g = torch.Generator().manual_seed(4)
    prompt = [5, 1, 7, 2]
    logits = torch.randn(3, 10, generator=g)
    lp, ids, ranks = S.prompt_logprobs(logits, torch.tensor(prompt[1:]), 2)
    entries = [None] + [logprob_entry(i, p, r, 2)
                        for i, p, r in zip(ids.tolist(), lp.tolist(), ranks.tolist())]
    ref = torch.log_softmax(logits, -1)
    assert entries[0] is None and len(entries) == len(prompt)
    for i, entry in enumerate(entries[1:]):
        tok = prompt[i + 1]
        assert entry[tok].logprob == pytest.approx(ref[i, tok].item(), abs=1e-6)
        assert entry[tok].rank == 1 + int((ref[i] > ref[i, tok]).sum())
        top = ref[i].topk(2).indices.tolist()
        assert set(top) <= set(entry) and len(entry) in (2, 3)


# ------------------------------------------------------------------ invariance and variants
def _mixed(n=40):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 64, generator=g) * 2
    t = S.SamplingTensors(
        temperature=torch.tensor([0.0, 0.7, 1.0, 1.3] * (n // 4)),
        top_k=torch.tensor([0, 5, 0, 20, 3] * (n // 5), dtype=torch.int32),
        top_p=torch.tensor([1.0, 0.9, 0.5, 1.0, 0.8] * (n // 5)),
        seeds=torch.randint(-2 ** 62, 2 ** 62, (n,), generator=g),
        positions=torch.randint(0, 10_000, (n,), generator=g),
        all_greedy=False, any_top_k_top_p=True, num_logprobs=4,
        min_p=torch.tensor([0.0, 0.0, 0.1, 0.0, 0.05] * (n // 5)),
        state_slots=torch.tensor([0, -1, 1, -1] * (n // 4), dtype=torch.int32))
    state = S.SamplingState.allocate(2, 64, "cpu")
    state.reset_slot(0, prompt_token_ids=[1, 2, 3], repetition_penalty=1.3, logit_bias={4: 2.0})
    state.reset_slot(1, output_token_ids=[9, 9], frequency_penalty=0.7)
    return x, t, state


def test_a_row_draws_the_same_whatever_its_batch():
    x, t, state = _mixed()
    counts = state.output_counts.clone()
    full = S.sample(x, t, S.ALL_FEATURES, state)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(6))[:23]
    state.output_counts.copy_(counts)
    sub = S.sample(x[perm], _take(t, perm), S.ALL_FEATURES, state)
    for j, i in enumerate(perm.tolist()):
        state.output_counts.copy_(counts)
        alone = S.sample(x[i:i + 1], t.rows(i, i + 1), S.ALL_FEATURES, state)
        for out, k in ((alone, 0), (sub, j)):
            assert out.token_ids[k] == full.token_ids[i]
            assert torch.equal(out.logprobs[k], full.logprobs[i])
            assert torch.equal(out.logprob_token_ids[k], full.logprob_token_ids[i])
            assert out.ranks[k] == full.ranks[i]


def _take(t, idx):
    return dataclasses.replace(t, **{f: getattr(t, f)[idx] for f in S._ROW_FIELDS
                                     if getattr(t, f) is not None})


def test_every_variant_gives_its_rows_the_general_result():
    x, t, state = _mixed()
    counts = state.output_counts.clone()
    general = S.sample(x, t, S.ALL_FEATURES, state)
    # rows that need no processing: the same tokens without the processing variant, etc.
    plain = torch.tensor(t.state_slots.tolist()) < 0
    for feats in (S.SamplerFeatures(sample=True, filter=True),
                  S.SamplerFeatures(sample=True, filter=True, logprobs=True)):
        out = S.sample(x, dataclasses.replace(t, state_slots=None), feats)
        assert torch.equal(out.token_ids[plain], general.token_ids[plain])
    nofilter = (t.top_k.eq(0) & t.top_p.eq(1.0) & t.min_p.eq(0.0)) | t.temperature.eq(0)
    state.output_counts.copy_(counts)
    out = S.sample(x, t, S.SamplerFeatures(sample=True, process=True), state)
    assert torch.equal(out.token_ids[nofilter], general.token_ids[nofilter])
    greedy = t.temperature.eq(0) & plain
    assert torch.equal(general.token_ids[greedy], x[greedy].argmax(-1))


def test_features_from_params():
    f = S.SamplerFeatures.of_params
    assert f(SamplingParams(temperature=0.0)).greedy_only
    assert f(SamplingParams(temperature=0.0, top_k=5)) == S.GREEDY
    assert f(SamplingParams(temperature=0.7)) == S.SamplerFeatures(sample=True)
    assert f(SamplingParams(temperature=0.7, top_p=0.9)) == S.SamplerFeatures(True, True)
    assert f(SamplingParams(temperature=0.0, logprobs=2)) == S.SamplerFeatures(logprobs=True)
    pen = SimpleNamespace(temperature=0.0, repetition_penalty=1.1, logprobs=None)
    assert f(pen) == S.SamplerFeatures(process=True)
    both = S.SamplerFeatures.of_batch([SamplingParams(temperature=0.7, top_k=3), pen])
    assert both == S.SamplerFeatures(sample=True, filter=True, process=True)
    assert S.ALL_FEATURES.covers(both) and not both.covers(S.ALL_FEATURES)


def test_sampler_captures_in_a_graph_without_host_syncs():
    x, t, state = _mixed(20)
    counts = state.output_counts.clone()
    graph, out = FakeGraphRuntime().capture(lambda: S.sample(x, t, S.ALL_FEATURES, state))
    g = torch.Generator().manual_seed(7)
    x.copy_(torch.randn(x.shape, generator=g))
    t.seeds.add_(1)
    state.output_counts.copy_(counts)
    graph.replay()
    replayed = (out.token_ids.clone(), out.logprobs.clone(), state.output_counts.clone())
    state.output_counts.copy_(counts)
    eager = S.sample(x, t, S.ALL_FEATURES, state)
    assert torch.equal(replayed[0], eager.token_ids)
    assert torch.equal(replayed[1], eager.logprobs)
    assert torch.equal(replayed[2], state.output_counts)
