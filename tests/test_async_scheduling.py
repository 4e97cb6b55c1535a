"""Async scheduling: step N+1 is scheduled and launched before step N's samples reach the
host; its input tokens come from the device. Outputs must equal the synchronous engine's."""
from __future__ import annotations

import random

import numpy as np
import pytest

from conftest import hf_greedy
from fullgraph import LLM, SamplingParams


def prompts(lengths, seed, vocab=600):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(1, vocab, n).tolist()} for n in lengths]


def check_hf(llm, hf_model, ps, max_tokens):
    outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf_model, p["prompt_token_ids"], max_tokens)


def test_next_step_launches_before_the_samples_are_known(hf_dir):
    llm = LLM(hf_dir, max_model_len=128, max_num_seqs=4, num_gpu_blocks_override=64,
              async_scheduling=True)
    engine = llm.engine
    req = engine.add_request("a", list(range(1, 9)),
                             SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert engine.step() == []                     # prefill launched, nothing processed yet
    assert req.num_pending == 1 and req.output_token_ids == []
    assert engine.step() == []                     # decode launched on the pending token
    assert len(req.output_token_ids) == 1 and req.num_pending == 1
    engine.step()
    outs = engine.step()                           # max_tokens known: no 4th step scheduled
    assert [o.request_id for o in outs] == ["a"] and len(outs[0].outputs[0].token_ids) == 3
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs", [
    dict(max_model_len=512, max_num_seqs=4, num_gpu_blocks_override=128),
    dict(max_model_len=512, max_num_seqs=4, max_num_batched_tokens=8,
         num_gpu_blocks_override=128),                               # chunked prefill
    dict(max_model_len=64, max_num_seqs=4, block_size=4, num_gpu_blocks_override=13),  # preemption
], ids=["plain", "chunked", "preempt"])
def test_greedy_parity_with_transformers(hf_dir, hf_model, kwargs):
    llm = LLM(hf_dir, async_scheduling=True, **kwargs)
    check_hf(llm, hf_model, prompts([10, 12, 8, 11], seed=4), max_tokens=20)
    kv = llm.engine.kv
    assert kv.pool.num_free == kv.num_usable_blocks     # everything returned to the pool


@pytest.fixture(scope="module")
def engines():
    common = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=32,
                  num_gpu_blocks_override=24, block_size=8, cudagraph_runtime="fake",
                  cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32])
    return (LLM("tiny-qwen3", async_scheduling=True, **common),
            LLM("tiny-qwen3", async_scheduling=False, **common))


def test_same_outputs_as_synchronous_on_random_batches(engines):
    """Fake graphs (the pending-token fix-up runs inside them), sampling, logprobs, stop
    strings and tokens, a KV pool small enough to preempt."""
    a, s = engines
    rng = random.Random(0)
    for _ in range(3):
        ps = [{"prompt_token_ids": [rng.randrange(1, 700) for _ in range(rng.randrange(1, 60))]}
              for _ in range(rng.randrange(2, 9))]
        params = [SamplingParams(temperature=rng.choice([0.0, 0.9]), top_p=rng.choice([1.0, 0.8]),
                                 seed=rng.randrange(100), max_tokens=rng.choice([1, 2, 7, 30]),
                                 ignore_eos=rng.random() < 0.5, logprobs=rng.choice([None, 2]),
                                 stop=rng.choice([None, ["e", "a "]]),
                                 stop_token_ids=rng.choice([None, [5, 17, 33]]))
                  for _ in ps]
        x = a.generate(ps, params, use_tqdm=False)
        y = s.generate(ps, params, use_tqdm=False)
        for ox, oy in zip(x, y):
            cx, cy = ox.outputs[0], oy.outputs[0]
            assert (cx.token_ids, cx.text, cx.finish_reason, cx.stop_reason) == \
                   (cy.token_ids, cy.text, cy.finish_reason, cy.stop_reason)
            if cx.logprobs is not None:
                assert [sorted(d) for d in cx.logprobs] == [sorted(d) for d in cy.logprobs]
    assert a.engine.runner.dispatcher.num_graph_steps > 0
    assert a.engine.scheduler.num_preemptions > 0
    kv = a.engine.kv
    assert kv.pool.num_free == kv.num_usable_blocks


def test_abort_while_its_step_is_in_flight(engines):
    a, s = engines
    engine = a.engine
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine.add_request("keep", [3, 4, 5, 6], params)
    engine.add_request("drop", [7, 8, 9], params)
    engine.step()
    engine.step()
    assert engine.requests["drop"].num_pending == 1
    engine.abort_request("drop")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    outs += engine.step()
    want = s.generate([{"prompt_token_ids": [3, 4, 5, 6]}], params, use_tqdm=False)[0]
    assert [o.request_id for o in outs] == ["keep"]
    assert outs[0].outputs[0].token_ids == want.outputs[0].token_ids
    assert engine.kv.pool.num_free == engine.kv.num_usable_blocks
