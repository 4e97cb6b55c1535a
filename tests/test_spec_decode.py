"""Speculative decoding with EAGLE drafters through the engine (issue 26, docs/speculative.md).

Greedy output with speculation must equal output without it, token for token, whatever the
drafter proposes (a random drafter, one that agrees with the target, one that agrees on half
the vocabulary), for k in {1, 3, 5}, with chunked prefill, preemption and prefix-cache hits;
the engines run in batch-invariant mode so that scoring k + 1 positions at once gives the
same logits as scoring them one step at a time. Sampled output must follow the target's
distribution: a chi-square test against non-speculative sampling, with an inverse check that
the test rejects a different distribution. Drafters that agree get their drafts accepted;
random ones do not.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from fullgraph import LLM, SamplingParams
from fullgraph.engine.args import EngineArgs
from conftest import churn_with_aborts
from spec_pairs import agreeing_drafter, agreeing_eagle1_drafter, bigram_target

VOCAB = 740


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small CPU ops: one thread keeps the module's time steady under a parallel test
    run (as tests/test_batch_invariant.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(bigram target, agreeing drafter, drafter agreeing on half the vocabulary)."""
    root = tmp_path_factory.mktemp("spec")
    target = bigram_target(str(root / "target"))
    return (target, agreeing_drafter(str(root / "agree"), target),
            agreeing_drafter(str(root / "half"), target, disagree=0.5))


def spec(model: str, k: int, method: str = "eagle3") -> dict:
    return {"method": method, "model": model, "num_speculative_tokens": k}


def prompts(seed: int, n: int, shared: int = 0) -> list[dict]:
    """`n` random prompts; with `shared`, each starts with the same `shared` tokens (prefix
    cache hits)."""
    rng = random.Random(seed)
    head = [rng.randrange(3, VOCAB) for _ in range(shared)]
    return [{"prompt_token_ids": head + [rng.randrange(3, VOCAB)
                                         for _ in range(rng.randrange(1, 90))]}
            for _ in range(n)]


def greedy_ids(llm: LLM, batch: list[dict], max_tokens: int = 24) -> list[list[int]]:
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(batch, sp, use_tqdm=False)]


def tokens_and_logprobs(llm: LLM, batch: list[dict], params) -> list:
    """Each output's tokens and its logprobs ({token: logprob} per position)."""
    return [(o.outputs[0].token_ids,
             [{t: lp.logprob for t, lp in s.items()} for s in o.outputs[0].logprobs])
            for o in llm.generate(batch, params, use_tqdm=False)]


# max_model_len bounds the KV extent a recorded (fake) graph step of the mode's CPU attention
# walks: the prompts (<= 129 tokens) and outputs fit well inside
KW = dict(max_num_batched_tokens=64, max_num_seqs=16, block_size=16, batch_invariant=True,
          max_model_len=256)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_output_equals_non_speculative(pair, k):
    target, agree, half = pair
    batch = prompts(k, 20, shared=40)
    want = greedy_ids(LLM(target, **KW), batch)
    for drafter in (agree, half):
        llm = LLM(target, speculative_config=spec(drafter, k), **KW)
        assert greedy_ids(llm, batch) == want, drafter
        stats = llm.engine.stats
        assert stats.spec_num_draft_tokens > 0
        assert llm.engine.kv.prefix_hits > 0              # the shared head was reused
        if drafter == agree:                              # every draft accepted
            assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
        else:
            assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens


def test_eagle1_drafter_reads_the_final_hidden_state_and_agrees(pair, tmp_path):
    target = pair[0]
    drafter = agreeing_eagle1_drafter(str(tmp_path / "eagle1"), target)
    batch = prompts(11, 12)
    want = greedy_ids(LLM(target, **KW), batch)
    llm = LLM(target, speculative_config=spec(drafter, 3, method="eagle"), **KW)
    assert greedy_ids(llm, batch) == want
    stats = llm.engine.stats
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens > 0


def test_drafter_over_a_smaller_draft_vocabulary_agrees(tmp_path):
    """A drafter whose vocabulary is the target's first 300 ids (d2t / t2d, its own LM head
    rows), on a target whose next tokens stay among them: every draft accepted, output
    unchanged; the same drafter on the full-vocabulary target is still lossless."""
    target = bigram_target(str(tmp_path / "target"), draft_vocab=300)
    drafter = agreeing_drafter(str(tmp_path / "agree"), target, draft_vocab=300)
    batch = prompts(13, 10)
    want = greedy_ids(LLM(target, **KW), batch)
    assert all(t < 300 for ids in want for t in ids)
    llm = LLM(target, speculative_config=spec(drafter, 3), **KW)
    assert greedy_ids(llm, batch) == want
    stats = llm.engine.stats
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens > 0
    wide = bigram_target(str(tmp_path / "wide"))
    llm = LLM(wide, speculative_config=spec(drafter, 3), **KW)
    assert greedy_ids(llm, batch) == greedy_ids(LLM(wide, **KW), batch)
    assert llm.engine.stats.spec_num_accepted_tokens < llm.engine.stats.spec_num_draft_tokens


def test_random_drafter_is_rejected_and_lossless_under_preemption():
    """The tiny-qwen3-eagle3 preset (random weights) on tiny-qwen3: drafts almost never
    accepted, output unchanged, with a KV cache small enough to preempt."""
    kw = dict(KW, num_gpu_blocks_override=24)
    batch = prompts(7, 16)
    want = greedy_ids(LLM("tiny-qwen3", **kw), batch)
    llm = LLM("tiny-qwen3", speculative_config=spec("tiny-qwen3-eagle3", 3), **kw)
    assert greedy_ids(llm, batch) == want
    stats = llm.engine.stats
    assert llm.engine.scheduler.num_preemptions > 0
    assert stats.spec_num_accepted_tokens < 0.1 * stats.spec_num_draft_tokens
    assert llm.engine.kv.pool.num_free == llm.engine.kv.num_usable_blocks


def test_logprobs_and_metrics_of_accepted_tokens(pair):
    """Each emitted token's logprob is the target's at its position: with an agreeing
    drafter (several tokens a step) they equal the non-speculative run's."""
    target, agree, _ = pair
    batch = prompts(3, 4)
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    base = LLM(target, **KW).generate(batch, sp, use_tqdm=False)
    got = LLM(target, speculative_config=spec(agree, 4), **KW).generate(batch, sp,
                                                                        use_tqdm=False)
    for a, b in zip(base, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [{t: (lp.logprob, lp.rank) for t, lp in s.items()} for s in a.outputs[0].logprobs] \
            == [{t: (lp.logprob, lp.rank) for t, lp in s.items()} for s in b.outputs[0].logprobs]
        assert b.metrics["spec_num_accepted_tokens"] == b.metrics["spec_num_draft_tokens"] > 0


def test_stops_n_and_max_model_len_end_requests_as_plain_decoding(pair):
    """A step emits several tokens: a stop token, a stop string or max_model_len inside them
    ends the request there (the rest dropped), as plain decoding ends it; with graphs, and
    n > 1 samples sharing the prompt."""
    target, agree, _ = pair
    kw = dict(KW, max_model_len=128, max_num_batched_tokens=256, max_num_seqs=8)
    batch = prompts(21, 4)
    plain = LLM(target, **kw)
    free = [o.outputs[0] for o in plain.generate(
        batch, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)]
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                             stop_token_ids=[free[0].token_ids[6]]),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                             stop=[free[1].text[len(free[1].text) // 2:][:3]]),
              SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True),  # max_model_len
              SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, n=2)]

    def run(llm):
        return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs]
                for o in llm.generate(batch, params, use_tqdm=False)]
    want = run(plain)
    assert want[0][0][2:] == ("stop", free[0].token_ids[6]) and want[1][0][2] == "stop"
    assert len(batch[2]["prompt_token_ids"]) + len(want[2][0][0]) == 128
    for graphs in ({}, {"cudagraph_runtime": "fake", "cudagraph_capture_sizes": [4, 8, 16]}):
        llm = LLM(target, speculative_config=spec(agree, 3), **kw, **graphs)
        assert run(llm) == want
        assert llm.engine.stats.spec_num_accepted_tokens > 0
        assert llm.engine.kv.pool.num_free == llm.engine.kv.num_usable_blocks


def chi_square_homogeneity(a: Counter, b: Counter) -> tuple[float, int]:
    """Two-sample chi-square statistic over the categories with enough counts (the rest
    pooled), and its degrees of freedom."""
    keys = sorted(set(a) | set(b), key=lambda t: -(a[t] + b[t]))
    na, nb = sum(a.values()), sum(b.values())
    bins, rest = [], [0, 0]
    for t in keys:
        if a[t] + b[t] >= 20:
            bins.append((a[t], b[t]))
        else:
            rest[0] += a[t]
            rest[1] += b[t]
    if sum(rest):
        bins.append(tuple(rest))
    stat = 0.0
    for x, y in bins:
        total = x + y
        for obs, n in ((x, na), (y, nb)):
            exp = total * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    return stat, len(bins) - 1


def critical_value(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 0.001 (z: the normal's), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def sampled_tokens(llm: LLM, n: int, temperature: float, position: int = 3) -> Counter:
    """The token at output `position` of `n` seeded samples of one prompt."""
    prompt = {"prompt_token_ids": [11, 12, 13, 14]}
    params = [SamplingParams(temperature=temperature, top_k=6, seed=s, max_tokens=position + 1,
                             ignore_eos=True) for s in range(n)]
    outs = llm.generate([prompt] * n, params, use_tqdm=False)
    return Counter(o.outputs[0].token_ids[position] for o in outs)


def test_sampling_follows_the_target_distribution(pair):
    """The 4th sampled token (its path crosses accepted and rejected drafts) over 1,500
    seeds, with a drafter agreeing on half the vocabulary, against plain sampling."""
    target, _, half = pair
    kw = dict(max_num_batched_tokens=256, max_num_seqs=64)
    base = sampled_tokens(LLM(target, **kw), 1500, 1.0)
    llm = LLM(target, speculative_config=spec(half, 3), **kw)
    got = sampled_tokens(llm, 1500, 1.0)
    stats = llm.engine.stats
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    stat, df = chi_square_homogeneity(base, got)
    assert df >= 5 and stat < critical_value(df), (stat, df)
    # the inverse: the test tells another temperature's distribution apart
    colder = sampled_tokens(llm, 1500, 0.6)
    stat, df = chi_square_homogeneity(base, colder)
    assert stat > critical_value(df), (stat, df)


def test_no_block_leaks_after_many_requests_with_aborts(pair):
    target, _, half = pair
    llm = LLM(target, max_model_len=128, max_num_seqs=16, num_gpu_blocks_override=48,
              block_size=16, speculative_config=spec(half, 3))
    engine, rng = llm.engine, random.Random(3)
    churn_with_aborts(
        engine, lambda: [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 40))],
        lambda i: SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=i,
                                 max_tokens=rng.randrange(1, 12), ignore_eos=True),
        1000, 3, rng)
    assert engine.kv.pool.num_free == engine.kv.num_usable_blocks
    assert engine.stats.aborted_requests > 100 and engine.stats.spec_num_accepted_tokens > 0


def test_bad_speculative_configs_are_named_at_start(pair, tmp_path):
    target, agree, _ = pair

    def config(value, model=target, **kw):
        return EngineArgs(model, speculative_config=value, **kw).create_engine_config()

    for value, message in [
            (spec(agree, 0), "num_speculative_tokens must be an integer >= 1"),
            (spec(agree, 2, method="medusa"),
             "speculative method 'medusa' is not supported; supported: eagle3, eagle"),
            # the method first: another method's keys are not the problem to name
            ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
             "method 'ngram' is not supported; supported: eagle3, eagle"),
            # an EAGLE-3 checkpoint given EAGLE-1's method: named before its weights load
            (spec(agree, 2, method="eagle"), "is an EAGLE-3 checkpoint \\(architectures "
             "\\['LlamaForCausalLMEagle3'\\]\\) but method is 'eagle' \\(EAGLE-1\\): "
             'set "method": "eagle3"'),
            (dict(spec(agree, 2), draft_tp=1), "unknown \\['draft_tp'\\]"),
            (dict(spec(agree, 2), draft_tensor_parallel_size=2),
             "draft_tensor_parallel_size must be 1"),
            ("{not json", "not valid JSON"),
            (spec(str(tmp_path / "missing"), 2), "is not a local directory")]:
        with pytest.raises(ValueError, match=message):
            config(value)
    with pytest.raises(ValueError, match="does not match the target's vocab_size"):
        config(spec(agree, 2), model="tiny-qwen3-vl")        # 3 image tokens more
    # a drafter built for another hidden size
    import json
    import shutil
    other = tmp_path / "wide"
    shutil.copytree(agree, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["target_hidden_size"] = 96
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="target hidden size 96"):
        config(spec(str(other), 2))
    assert config(json.dumps(spec(agree, 2))).speculative.num_speculative_tokens == 2
    # PIECEWISE is refused on a CPU too, where no graphs run (so is the same command line on
    # a GPU); --enforce-eager wins over the mode
    with pytest.raises(ValueError, match="not piecewise"):
        config(spec(agree, 2), cudagraph_mode="piecewise")
    assert config(spec(agree, 2), cudagraph_mode="piecewise", enforce_eager=True).speculative
    # vLLM's EAGLE example: the drafter's tensor-parallel size 1, and no method where the
    # drafter's config names one
    vllm_style = {"model": agree, "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}
    assert config(vllm_style).speculative.method == "eagle3"
    # a drafter shipping another tokenizer (the target's, two tokens' ids swapped)
    odd = tmp_path / "odd"
    shutil.copytree(agree, odd)
    tok = json.loads((Path(target) / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = [w for w in vocab if w.isalpha()][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (odd / "tokenizer.json").write_text(json.dumps(tok))
    shutil.copy(Path(target) / "tokenizer_config.json", odd / "tokenizer_config.json")
    with pytest.raises(ValueError, match="tokenizer .* does not match the target's"):
        config(spec(str(odd), 2))
    # an EAGLE-1 checkpoint whose architectures name it, given EAGLE-3's method
    eagle1 = agreeing_eagle1_drafter(str(tmp_path / "eagle1"), target)
    assert config(spec(eagle1, 2, method="eagle")).speculative.method == "eagle"
    with pytest.raises(ValueError, match="no method and the drafter's config .* does not "
                                         "name one"):     # a plain LlamaForCausalLM
        config({"model": eagle1, "num_speculative_tokens": 2})
    cfg = json.loads((Path(eagle1) / "config.json").read_text())
    cfg["architectures"] = ["EagleLlamaForCausalLM"]
    (Path(eagle1) / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match='EAGLE-1 checkpoint .* set "method": "eagle"$'):
        config(spec(eagle1, 2))


def test_processed_logits_follow_each_rows_position(pair):
    """logit_bias, allowed_token_ids, one-token bad words, min_tokens and penalties apply
    to every verified row at its own position, the penalties counting the drafts before it:
    greedy output equals plain decoding's (and a seeded sampled one too here: the half-
    agreeing drafter's accept tests and the plain sampler draw with different noise, so
    only its length and validity are compared)."""
    target, _, half = pair
    rng = random.Random(4)
    allowed = rng.sample(range(3, VOCAB), 40)
    eos = LLM(target, **KW).engine.config.model.eos_token_ids
    params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                             logit_bias={t: 3.0 for t in allowed[:10]}),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                             allowed_token_ids=allowed),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                             bad_words=["the", "is"]),
              SamplingParams(temperature=0.0, max_tokens=16, min_tokens=12,
                             logit_bias={t: 30.0 for t in eos}),     # eos, banned until 12
              SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                             repetition_penalty=1.5),
              SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                             frequency_penalty=0.6, presence_penalty=0.4),
              SamplingParams(temperature=0.9, seed=3, max_tokens=24, ignore_eos=True,
                             presence_penalty=1.0, logit_bias={allowed[0]: 2.0})]
    batch = prompts(13, len(params))
    want = LLM(target, **KW).generate(batch, params, use_tqdm=False)
    llm = LLM(target, speculative_config=spec(half, 3), **KW)
    got = llm.generate(batch, params, use_tqdm=False)
    assert ([o.outputs[0].token_ids for o in got[:-1]]
            == [o.outputs[0].token_ids for o in want[:-1]])
    assert len(got[-1].outputs[0].token_ids) == 24
    assert set(got[1].outputs[0].token_ids) <= set(allowed)
    assert len(got[3].outputs[0].token_ids) == 13                  # eos right after 12
    assert llm.engine.stats.spec_num_accepted_tokens > 0


def test_bad_words_of_several_tokens_follow_each_rows_history(pair):
    """A bad word of several tokens is banned only right after its other tokens (vLLM's
    rule); a verified row's history is the output and the drafts before it: output equals
    plain decoding's with the same words, which change the free text."""
    target, agree, half = pair
    plain = LLM(target, **KW)
    tok = plain.engine.tokenizer
    batch = prompts(17, 8)
    free = greedy_ids(plain, batch)
    words = []                   # two-token pieces of the free text that encode as such
    for ids in free:
        for a, b in zip(ids, ids[1:]):
            text = tok.decode([a, b])
            if text == text.lstrip() and tok.encode(text, add_special_tokens=False) == [a, b]:
                words.append(text)
                break
    assert len(words) >= 3
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, bad_words=words)
    want = [o.outputs[0].token_ids for o in plain.generate(batch, params, use_tqdm=False)]
    assert want != free
    for drafter in (agree, half):
        llm = LLM(target, speculative_config=spec(drafter, 3), **KW)
        got = llm.generate(batch, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == want, drafter
        assert llm.engine.stats.spec_num_accepted_tokens > 0


def test_server_serves_speculatively_and_reports_acceptance(pair):
    """The OpenAI server on a speculative engine, through the official client; /metrics
    has vLLM's acceptance counters."""
    import httpx
    import openai
    from prometheus_client.parser import text_string_to_metric_families

    from conftest import served
    from fullgraph.engine.async_engine import AsyncLLMEngine
    from fullgraph.engine.engine import LLMEngine

    target, agree, _ = pair
    engine = AsyncLLMEngine(LLMEngine.from_engine_args(
        EngineArgs(target, speculative_config=spec(agree, 3), max_num_seqs=8)))
    with served(engine) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model=target, prompt=[5, 6, 7], max_tokens=16,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 16
        text = httpx.get(f"{url}/metrics", timeout=10).text
        values = {s.name: s.value for fam in text_string_to_metric_families(text)
                  for s in fam.samples}
        drafts = values["fullgraph:spec_decode_num_draft_tokens_total"]
        assert drafts > 0 and values["fullgraph:spec_decode_num_accepted_tokens_total"] == drafts


@pytest.mark.parametrize("method", ["eagle3", "eagle"])
def test_verify_and_draft_graphs_equal_eager_steps(pair, tmp_path, method):
    """Uniform verify steps replay captured graphs (CPU fake runtime): the model's, then the
    verification and the drafter's steps built on the device from it; greedy and seeded
    sampled outputs equal the eager speculative engine's, bit for bit (batch-invariant
    mode: the graphs also compute the rows eager steps skip)."""
    target, _, half = pair
    drafter = half if method == "eagle3" else agreeing_eagle1_drafter(str(tmp_path / "e1"),
                                                                      target)
    batch = prompts(5, 6)
    params = [SamplingParams(temperature=t, seed=i, max_tokens=16, ignore_eos=True,
                             logprobs=2) for i, t in enumerate([0.0, 0.9] * 3)]
    kw = dict(KW, max_num_batched_tokens=256, max_num_seqs=8,
              speculative_config=spec(drafter, 3, method))

    def run(llm):
        return tokens_and_logprobs(llm, batch, params)
    eager = run(LLM(target, **kw))
    llm = LLM(target, cudagraph_runtime="fake", cudagraph_capture_sizes=[4, 8], **kw)
    assert run(llm) == eager
    assert llm.engine.runner.dispatcher.num_graph_steps >= 3


def recorded_drafts(llm: LLM, batch: list[dict], sp: SamplingParams) -> dict:
    """Each request's drafts, step by step, as many as its next step can use (the graphed
    drafter always drafts k, the eager one stops at the request's max_tokens)."""
    seen: dict = {}
    engine = llm.engine
    append = engine._append_verified

    def recording(req, entry, result, i):
        n = append(req, entry, result, i)
        usable = max(0, min(3, req.max_tokens - req.num_output_tokens - 1))
        seen.setdefault(req.request_id, []).append(list(result.draft_token_ids[i])[:usable])
        return n
    engine._append_verified = recording
    llm.generate(batch, sp, use_tqdm=False)
    return seen


@pytest.mark.parametrize("budget, sizes, invariant", [(256, [4, 8], True),
                                                     (64, [4, 8, 16, 32, 64], True),
                                                     (64, [4, 8, 16, 32, 64], False)])
def test_graphed_drafts_equal_eager_drafts(pair, tmp_path, budget, sizes, invariant):
    """The drafts themselves, step by step, from the graphed drafter (built on the device
    from the verification: positions, slots, rows) and the eager one, with a drafter whose
    rows read their neighbours' K/V, so drafts depend on every one of those; as many as
    the next step can use (the graphed drafter always drafts k, the eager one stops at the
    request's max_tokens). With a budget of 64 tokens prompt chunks run beside decoding
    requests: those steps draft in the mixed steps' graphs. Outside the batch-invariant mode
    the drafter's pass over a mixed step reads packed-layout metadata of its own (its heads
    are not the target's), which the host prepares every step."""
    batch = prompts(9, 6)
    sp = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    target = pair[0]
    blurred = agreeing_drafter(str(tmp_path / "blurred"), target, focus=1.0)
    kw = dict(KW, max_num_batched_tokens=budget, max_num_seqs=8,
              speculative_config=spec(blurred, 3), batch_invariant=invariant)
    eager = recorded_drafts(LLM(target, **kw), batch, sp)
    llm = LLM(target, cudagraph_runtime="fake", cudagraph_capture_sizes=sizes, **kw)
    steps, mixed = llm.engine.runner.spec, []
    assert not steps.proposer.reads_target_metadata
    finish = steps._finish_mixed
    steps._finish_mixed = lambda *a: (mixed.append(1), finish(*a))[1]
    assert recorded_drafts(llm, batch, sp) == eager
    stats = llm.engine.stats
    assert llm.engine.runner.dispatcher.num_graph_steps >= 3
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert (len(mixed) >= 2) == (budget == 64)


@pytest.mark.parametrize("invariant", [True, False])
def test_drafter_reads_the_targets_attention_state_pair(pair, invariant):
    """A drafter whose heads are laid out as the target's (the tiny-qwen3-eagle3 preset,
    random weights: its drafts depend on the K/V it attends to) reads the target's attention
    metadata in graphed verify and mixed steps: the target's warmup state in its warmup, the
    captured one in its capture (`AttentionStatePair`), which the target's graph refreshes
    every step. The states hold tensors their `update` makes per step (the CPU paths' masks
    and block lists, as a lazily planned backend's workspace): a drafter graph captured over
    the warmup state reads what the warmup left there, and its drafts change. Drafts equal
    the eager drafter's, step by step."""
    batch = prompts(4, 6)
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    kw = dict(KW, max_num_batched_tokens=64, max_num_seqs=8, batch_invariant=invariant,
              speculative_config=spec("tiny-qwen3-eagle3", 3))
    eager = recorded_drafts(LLM(pair[0], **kw), batch, sp)
    llm = LLM(pair[0], cudagraph_runtime="fake", cudagraph_capture_sizes=[4, 8, 16, 32, 64],
              **kw)
    assert llm.engine.runner.spec.proposer.reads_target_metadata
    assert recorded_drafts(llm, batch, sp) == eager
    assert llm.engine.runner.dispatcher.num_graph_steps >= 3


def test_requests_near_their_end_stay_in_graphs(pair):
    """A request whose max_tokens leaves room for fewer than k drafts runs in the graphed
    step padded to k drafts (never accepted): only steps with a prompt chunk run eagerly, and
    the tokens and logprobs equal the eager speculative engine's."""
    target, agree, half = pair
    batch = prompts(11, 6)
    params = [SamplingParams(temperature=t, seed=i, max_tokens=5 + 3 * i, ignore_eos=True,
                             logprobs=1) for i, t in enumerate([0.0, 0.8] * 3)]
    kw = dict(KW, max_num_batched_tokens=256, max_num_seqs=8)

    def run(llm):
        return tokens_and_logprobs(llm, batch, params)
    for drafter in (agree, half):
        eager = run(LLM(target, speculative_config=spec(drafter, 3), **kw))
        llm = LLM(target, cudagraph_runtime="fake", cudagraph_capture_sizes=[4, 8],
                  speculative_config=spec(drafter, 3), **kw)
        steps, eager_steps = llm.engine.runner.spec, []
        launch_eager = steps._launch_eager
        steps._launch_eager = lambda chunks: (
            eager_steps.append(all(c.samples and c.num_new_tokens == len(c.spec_token_ids) + 1
                                   for c in chunks)), launch_eager(chunks))[1]
        assert run(llm) == eager
        assert eager_steps and not any(eager_steps)      # only steps with a prompt chunk
        assert llm.engine.runner.dispatcher.num_graph_steps >= 5


def test_prompt_and_processed_steps_replay_the_targets_graphs(pair, monkeypatch):
    """Steps the verification graph does not take replay the target's graph where one fits:
    steps with prompt chunks a mixed graph, steps with processed logits (logit_bias,
    penalties) the uniform verify step's graph, then verification and drafting eagerly. No
    step runs the target eagerly, and the outputs equal the eager speculative engine's."""
    target, _, half = pair
    batch = prompts(17, 6)
    extras = [{"logit_bias": {5: 2.0}}, {"presence_penalty": 0.5}, {}]
    params = [SamplingParams(temperature=t, seed=i, max_tokens=12, ignore_eos=True,
                             logprobs=1, **extras[i % 3])
              for i, t in enumerate([0.0, 0.8] * 3)]
    kw = dict(KW, max_num_batched_tokens=256, max_num_seqs=8,
              speculative_config=spec(half, 3))

    def run(llm):
        return tokens_and_logprobs(llm, batch, params)
    eager = run(LLM(target, **kw))
    llm = LLM(target, cudagraph_runtime="fake",
              cudagraph_capture_sizes=[4, 8, 16, 32, 64, 128, 256], **kw)
    from fullgraph.worker.spec_decode import steps as steps_module
    steps, prepared, processed = llm.engine.runner.spec, [], []
    prepare, process = steps._prepare, steps_module.process_rows
    steps._prepare = lambda chunks, desc, **kw: (
        prepared.append((desc.mode.name, desc.uniform_query_len)), prepare(chunks, desc, **kw))[1]
    monkeypatch.setattr(steps_module, "process_rows",
                        lambda *a: (processed.append(1), process(*a))[1])
    assert run(llm) == eager
    assert {m for m, _ in prepared} == {"FULL"} and processed
    assert {q for _, q in prepared} == {None, 4}          # mixed and verify graphs


def test_steps_with_prompt_chunks_verify_and_draft_in_graphs(pair):
    """A step with prompt chunks among decoding requests (a small token budget interleaves
    them) replays its mixed model graph, then a verification and drafting graph captured on
    the first such step of its shape: the drafter over every row of the step, each carrying
    the token after it. Tokens and logprobs equal the eager speculative engine's; a failed
    capture leaves such steps eager, with the same outputs."""
    target, _, half = pair
    batch = prompts(23, 8)
    params = [SamplingParams(temperature=t, seed=i, max_tokens=16, ignore_eos=True,
                             logprobs=1) for i, t in enumerate([0.0, 0.8] * 4)]
    kw = dict(KW, max_num_batched_tokens=64, max_num_seqs=8,
              speculative_config=spec(half, 3))

    def run(llm):
        return tokens_and_logprobs(llm, batch, params)
    eager = run(LLM(target, **kw))
    for fail in (False, True):
        llm = LLM(target, cudagraph_runtime="fake", cudagraph_capture_sizes=[4, 8, 16, 32, 64],
                  **kw)
        steps, graphed, eager_mixed = llm.engine.runner.spec, [], []
        finish, launch_eager = steps._finish_mixed, steps._launch_eager
        steps._finish_mixed = lambda *a: (graphed.append(1), finish(*a))[1]
        steps._launch_eager = lambda chunks: (
            eager_mixed.append(not all(c.samples and c.num_new_tokens == len(c.spec_token_ids)
                                       + 1 for c in chunks)), launch_eager(chunks))[1]
        if fail:
            def broken(key):
                raise RuntimeError("no graph")
            steps.create_mixed_fn = broken
        assert run(llm) == eager
        if fail:
            assert not graphed and steps._mixed_failed
        else:
            keys = {k for k in llm.engine.runner.graphs.graphs if type(k).__name__ == "MixedSpecKey"}
            assert len(graphed) >= 3 and keys          # each shape's first step ran eagerly
            assert sum(eager_mixed) - len(graphed) <= len(keys)


def test_penalties_count_the_accepted_drafts_before_a_row(tmp_path):
    """A bigram target where y is followed by t and t by itself, and an agreeing drafter,
    which proposes t, t, t after y. With presence and frequency penalties plain decoding
    emits t once, then something else; the verified rows must count the drafts before them
    to do the same (row 1, after the accepted draft t, must see t as generated)."""
    import os

    from safetensors.torch import load_file, save_file

    target = bigram_target(str(tmp_path / "target"))
    path = os.path.join(target, "model.safetensors")
    w = load_file(path)
    e, norm, head = w["model.embed_tokens.weight"], w["model.norm.weight"], w["lm_head.weight"]
    hidden = e / e.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm   # what head reads
    x, t = 7, 100
    y = int((head @ hidden[x]).argmax())              # x's next token: the prompt's sample
    assert y not in (x, t)
    others = torch.cat([head[:t], head[t + 1:]])
    # t's row in the plane of y's and t's hidden states: ahead of every other token by a
    # logit of 3 after y and of 1 after t (less than the penalties)
    basis = torch.stack([hidden[y], hidden[t]])
    want = torch.stack([(others @ hidden[y]).max() + 3.0, (others @ hidden[t]).max() + 1.0])
    head[t] = torch.linalg.solve(basis @ basis.T, want) @ basis
    save_file(w, path, metadata={"format": "pt"})
    drafter = agreeing_drafter(str(tmp_path / "agree"), target)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                            presence_penalty=2.0, frequency_penalty=2.0)
    prompt = [{"prompt_token_ids": [5, 6, x]}]
    plain = LLM(target, **KW).generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    unpenalized = LLM(target, **KW).generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].token_ids
    assert unpenalized == [y, t, t, t] and plain[:2] == [y, t] and plain[2] != t  # as built
    llm = LLM(target, speculative_config=spec(drafter, 3), **KW)
    assert llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == plain
    assert llm.engine.stats.spec_num_accepted_tokens > 0
