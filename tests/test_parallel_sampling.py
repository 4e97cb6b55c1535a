"""`n` > 1: a prompt's samples share its prefill, come back in index order, and each is
reproducible from the request's seed and its index."""
from __future__ import annotations

import pytest

from fullgraph import LLM, SamplingParams
from fullgraph.engine.engine import sample_seed

PROMPT = {"prompt_token_ids": list(range(5, 105))}      # 100 tokens: 6 full blocks of 16


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-qwen3", max_model_len=256, block_size=16, num_gpu_blocks_override=128,
               max_num_seqs=8)


def sampled(n, seed=7, **kw):
    return SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=8, ignore_eos=True, **kw)


def test_samples_in_index_order_and_reproducible(llm):
    out = llm.generate(PROMPT, sampled(4), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    texts = [c.token_ids for c in out.outputs]
    assert len({tuple(t) for t in texts}) == 4          # independent draws
    again = llm.generate(PROMPT, sampled(4), use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == texts
    # sample i is the n == 1 request seeded sample_seed(seed, i)
    for i in (0, 2):
        one = llm.generate(PROMPT, sampled(1, seed=sample_seed(7, i)), use_tqdm=False)[0]
        assert one.outputs[0].token_ids == texts[i]


def test_the_prompt_is_prefilled_once(llm):
    kv = llm.engine.kv
    fresh = {"prompt_token_ids": list(range(200, 300))}
    hits0, queries0 = kv.prefix_hits, kv.prefix_queries
    llm.generate(fresh, sampled(4), use_tqdm=False)
    # samples 1..3 waited for sample 0's prefill and found all 6 full prompt blocks cached
    assert kv.prefix_hits - hits0 == 3 * 6 * 16
    assert kv.prefix_queries - queries0 == 4 * 100
    assert kv.pool.num_free == kv.num_usable_blocks       # every shared block released


def test_greedy_samples_agree_and_bad_n(llm):
    out = llm.generate(PROMPT, SamplingParams(n=3, temperature=0.0, max_tokens=6,
                                              ignore_eos=True), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1
    with pytest.raises(ValueError, match="n must be at least 1"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="n=9 exceeds max_num_seqs=8"):
        llm.generate(PROMPT, SamplingParams(n=9), use_tqdm=False)
    assert not llm.engine.requests                   # nothing was left behind


def test_n_with_prompts_in_one_call(llm):
    outs = llm.generate([PROMPT, {"prompt_token_ids": [9, 8, 7]}], sampled(2), use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [2, 2]
    assert outs[1].prompt_token_ids == [9, 8, 7]


def test_n_keeps_the_prompts_other_outputs(llm):
    sp = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=2, prompt_logprobs=1)
    out = llm.generate({"prompt_token_ids": [9, 8, 7, 6]}, sp, use_tqdm=False)[0]
    assert len(out.outputs) == 2 and out.request_id.startswith("offline-")
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == 4
