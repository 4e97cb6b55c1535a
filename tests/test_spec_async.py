"""Speculative decoding with async scheduling (issue 26, docs/speculative.md, "Async
scheduling"): a uniform verify step is launched before the step in flight is read, its
requests' drafts, positions, slots, lengths and (hybrid targets) state slots carried over
on the device from that step's verification.

The targets are history-dependent bigram models (tests/spec_pairs.py, `mix`) and the
drafter reads its neighbours' K/V (`focus`) and disagrees on part of the vocabulary, so a row
at a wrong position, a wrong draft or a state that kept a rejected draft changes tokens or
logprobs. Every engine here runs in the batch-invariant mode with fake graphs (CPU), where
the same request gives the same bits whatever the batch: the async engine must give exactly
the synchronous speculative engine's tokens, logprobs and draft statistics, and greedy
output must equal non-speculative output.
"""
from __future__ import annotations

import random

import pytest

from conftest import churn_with_aborts
from fullgraph import LLM, SamplingParams
from spec_pairs import agreeing_drafter, bigram_target, hybrid_pair
from test_batch_invariant import one_thread  # noqa: F401  (autouse: one CPU thread)

VOCAB = 700
GRAPHS = dict(cudagraph_runtime="fake", cudagraph_capture_sizes=[4, 8])
# max_model_len bounds the KV extent a recorded (fake) graph step of the mode's CPU attention
# walks: the prompts (< 90 tokens) and outputs fit well inside
KW = dict(max_num_batched_tokens=256, max_num_seqs=8, block_size=16, batch_invariant=True,
          max_model_len=256, **GRAPHS)


@pytest.fixture(scope="module")
def dense_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_async")
    target = bigram_target(str(root / "target"), mix=0.02)
    return target, agreeing_drafter(str(root / "drafter"), target, focus=3.0)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    return hybrid_pair(str(tmp_path_factory.mktemp("spec_async_hybrid")))


def spec(drafter: str, k: int) -> dict:
    return {"method": "eagle3", "model": drafter, "num_speculative_tokens": k}


def prompts(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 70))]}
            for _ in range(n)]


def run(llm: LLM, batch: list[dict], params) -> tuple[list, tuple[int, int]]:
    """Each output's tokens and logprobs, and the engine's (drafts, accepted) totals."""
    outs = llm.generate(batch, params, use_tqdm=False)
    got = [(o.outputs[0].token_ids,
            None if o.outputs[0].logprobs is None else
            [{t: lp.logprob for t, lp in s.items()} for s in o.outputs[0].logprobs])
           for o in outs]
    stats = llm.engine.stats
    return got, (stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens)


def sync_and_async(target: str, drafter: str, k: int, batch, params, **kw):
    """The synchronous and the async speculative engines' results, and the async engine."""
    sync = run(LLM(target, speculative_config=spec(drafter, k), **kw), batch, params)
    llm = LLM(target, speculative_config=spec(drafter, k), async_scheduling=True, **kw)
    return sync, run(llm, batch, params), llm


def mixed_params(n: int, max_tokens) -> list[SamplingParams]:
    """Greedy and seeded sampled requests, with logprobs, ending at various max_tokens."""
    return [SamplingParams(temperature=0.0 if i % 2 == 0 else 0.9, seed=i,
                           max_tokens=max_tokens(i), ignore_eos=True, logprobs=2)
            for i in range(n)]


@pytest.mark.parametrize("k", [1, 3])
def test_async_verify_steps_continue_on_the_device(dense_pair, k):
    """Greedy and seeded sampled requests with logprobs, ending at various max_tokens (so
    the device cuts the drafts a continuing step was scheduled with): tokens, logprobs and
    the draft/accept totals equal the synchronous engine's; most steps continued the one in
    flight; greedy output equals non-speculative decoding."""
    target, drafter = dense_pair
    batch = prompts(3, 5)
    params = mixed_params(5, lambda i: 9 + 4 * i)
    sync, got, llm = sync_and_async(target, drafter, k, batch, params, **KW)
    assert got == sync
    drafts, accepted = got[1]
    assert 0.2 < accepted / drafts < 0.9            # rejections move the positions back
    steps = llm.engine.runner.spec
    assert steps.num_continued >= llm.engine.stats.steps // 2
    greedy = [SamplingParams(temperature=0.0, max_tokens=p.max_tokens, ignore_eos=True)
              for p in params]
    plain = LLM(target, **KW).generate(batch, greedy, use_tqdm=False)
    for i in range(0, 5, 2):
        assert got[0][i][0] == plain[i].outputs[0].token_ids


def test_async_hybrid_target_keeps_the_accepted_rows_state(hybrid):
    """On a Qwen3.5 target a continuing step reads the state slot its group kept after the
    accepted rows, chosen on the device: equal to the synchronous engine, greedy and
    sampled."""
    target, drafter = hybrid
    batch = prompts(4, 6)
    params = mixed_params(6, lambda i: 12 + 3 * i)
    kw = dict(KW, num_gpu_blocks_override=64)
    sync, got, llm = sync_and_async(target, drafter, 3, batch, params, **kw)
    assert got == sync
    assert 0 < got[1][1] < got[1][0]
    assert llm.engine.runner.spec.num_continued >= llm.engine.stats.steps // 2


def test_async_with_chunked_prefill_preemption_and_new_arrivals(dense_pair):
    """A small budget (prompt chunks beside decoding requests), a pool small enough to
    preempt, requests arriving while others decode, prefix-cache hits (the prompts share
    their first 16 tokens): steps that admit or prefill wait for the step in flight, steady
    ones continue it; greedy output equals non-speculative decoding, and no block or slot is
    left behind."""
    target, drafter = dense_pair
    head = prompts(7, 1)[0]["prompt_token_ids"][:16]
    batch = [{"prompt_token_ids": head + p["prompt_token_ids"]} for p in prompts(6, 8)]
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    kw = dict(KW, max_num_batched_tokens=48, max_num_seqs=4, block_size=8,
              num_gpu_blocks_override=24, cudagraph_capture_sizes=[4, 8, 16, 32, 48])
    want = [o.outputs[0].token_ids for o in LLM(target, **kw).generate(batch, sp, use_tqdm=False)]
    llm = LLM(target, speculative_config=spec(drafter, 3), async_scheduling=True, **kw)
    engine = llm.engine
    for i, p in enumerate(batch[:4]):
        engine.add_request(str(i), p["prompt_token_ids"], sp)
    outs = {}
    for i, p in enumerate(batch[4:], start=4):    # one new request every third step
        for _ in range(3):
            outs.update({o.request_id: o for o in engine.step() if o.finished})
        engine.add_request(str(i), p["prompt_token_ids"], sp)
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert [outs[str(i)].outputs[0].token_ids for i in range(8)] == want
    assert any(o.num_cached_tokens for o in outs.values())
    assert engine.scheduler.num_preemptions > 0
    assert engine.runner.spec.num_continued > 0
    assert engine.kv.pool.num_free == engine.kv.num_usable_blocks


def test_no_leaks_after_many_requests_with_aborts(dense_pair):
    """1,000 requests, a random live one aborted every fifth, some finishing while their
    next step is in flight: the pool and the slots end full."""
    target, drafter = dense_pair
    llm = LLM(target, speculative_config=spec(drafter, 3), async_scheduling=True, **KW)
    engine, rng = llm.engine, random.Random(0)
    churn_with_aborts(engine,
                      lambda: [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 12))],
                      lambda i: SamplingParams(temperature=0.0 if i % 3 else 0.8, seed=i,
                                               max_tokens=rng.randrange(1, 9), ignore_eos=True),
                      1000, 4, rng)
    assert engine.runner.spec.num_continued > 0
    assert engine.kv.pool.num_free == engine.kv.num_usable_blocks
    assert not engine.scheduler.running and not engine.requests


def test_server_with_async_speculation(dense_pair):
    """The OpenAI server on an async speculative engine, through the official client, with
    requests arriving while others decode (some streamed): each completion equals the
    synchronous engine's, and steady steps continued the one in flight."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from conftest import served
    from fullgraph.engine.args import EngineArgs
    from fullgraph.engine.async_engine import AsyncLLMEngine
    from fullgraph.engine.engine import LLMEngine

    target, drafter = dense_pair
    batch = prompts(8, 8)
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    kw = dict(KW, speculative_config=spec(drafter, 3))
    want = [o.outputs[0].token_ids for o in LLM(target, **kw).generate(batch, sp, use_tqdm=False)]
    engine = AsyncLLMEngine(LLMEngine.from_engine_args(
        EngineArgs(target, async_scheduling=True, **kw)))
    with served(engine) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def complete(i: int) -> list[int]:
            args = dict(model=target, prompt=batch[i]["prompt_token_ids"], max_tokens=16,
                        temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
            if i % 2:
                chunks = list(client.completions.create(stream=True, **args))
                return [t for c in chunks for t in (c.choices[0].token_ids or [])]
            return client.completions.create(**args).choices[0].token_ids
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(complete, range(8)))
    assert got == want
    assert engine.engine.runner.spec.num_continued > 0
