"""Speculative decoding on a hybrid Gated DeltaNet target (Qwen3.5): rejected drafts must
not stay in the recurrent and conv states (layers/gdn/state.py: a state per verified
position, the kept one chosen after verification).

The target is a Qwen3.5 checkpoint made a bigram model except for its Gated DeltaNet layers
(tests/spec_pairs.py, `mix`): an agreeing drafter is accepted often but not always, and the
next token depends on the history through the GDN states, so a state that kept a rejected
draft changes the output. Greedy output is compared with transformers' full forward, token
for token, through chunked prefill, preemption, graphs and k in {1, 3, 5}; the inverse check
keeps the wrong slot and finds a difference.
"""
from __future__ import annotations

import random

import pytest
import torch

from conftest import churn_with_aborts, hf_greedy
from fullgraph import LLM, SamplingParams
from fullgraph.engine.kv_cache import KVCacheManager
from spec_pairs import hybrid_pair

MAX_NEW = 24
KW = dict(max_model_len=256, num_gpu_blocks_override=64)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return hybrid_pair(str(tmp_path_factory.mktemp("spec_hybrid")))


@pytest.fixture(scope="module")
def reference(pair):
    """Prompts of mixed lengths (below, at and across the 64-token chunk) and transformers'
    greedy continuations."""
    from transformers import Qwen3_5ForCausalLM
    hf = Qwen3_5ForCausalLM.from_pretrained(pair[0], dtype=torch.float32).eval()
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 700) for _ in range(n)] for n in (1, 5, 63, 64, 65, 130, 17)]
    return prompts, [hf_greedy(hf, p, MAX_NEW) for p in prompts]


def spec(drafter: str, k: int) -> dict:
    return {"method": "eagle3", "model": drafter, "num_speculative_tokens": k}


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("k,engine_kw", [
    pytest.param(1, {}, id="k1"),
    pytest.param(3, {}, id="k3"),
    pytest.param(5, {}, id="k5"),
    pytest.param(3, dict(max_num_batched_tokens=37, max_num_seqs=3), id="k3-chunked-37"),
    pytest.param(3, dict(max_model_len=256, block_size=8, num_gpu_blocks_override=24,
                         max_num_seqs=7), id="k3-preemption"),
    pytest.param(3, dict(cudagraph_runtime="fake", max_num_seqs=8, max_num_batched_tokens=128,
                         cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64, 128]),
                 id="k3-fake-graphs"),
])
def test_greedy_output_equals_transformers(pair, reference, k, engine_kw):
    target, drafter = pair
    prompts, expected = reference
    llm = LLM(target, speculative_config=spec(drafter, k), **(KW | engine_kw))
    assert generate(llm, prompts) == expected
    engine = llm.engine
    stats = engine.stats
    # drafts accepted and rejected both: the states were rolled back
    assert 0.2 * stats.spec_num_draft_tokens < stats.spec_num_accepted_tokens \
        < 0.95 * stats.spec_num_draft_tokens
    assert engine.kv.state_slots.num_free == engine.config.scheduler.max_num_seqs
    assert engine.runner.num_state_slots == engine.config.scheduler.max_num_seqs * (k + 1)
    if "block_size" in engine_kw:
        assert engine.scheduler.num_preemptions > 0
    if "cudagraph_runtime" in engine_kw:
        assert engine.runner.dispatcher.num_graph_steps > 0


def test_keeping_the_state_after_every_draft_changes_the_output(pair, reference, monkeypatch):
    """The inverse check: always reading the slot after the step's last row (rejected
    drafts included) gives other tokens."""
    target, drafter = pair
    prompts, expected = reference

    def keep_last(self, req, kept):
        if req.state_slot:
            slots = self.state_slots
            req.state_slot = slots.group_of(req.state_slot) + slots.group - 1
    monkeypatch.setattr(KVCacheManager, "keep_state", keep_last)
    llm = LLM(target, speculative_config=spec(drafter, 3), **KW)
    assert generate(llm, prompts) != expected


def test_no_state_slot_or_block_leaks_after_many_requests_with_aborts(pair):
    target, drafter = pair
    llm = LLM(target, max_model_len=128, max_num_seqs=8, num_gpu_blocks_override=40,
              block_size=16, speculative_config=spec(drafter, 3))
    engine, rng = llm.engine, random.Random(5)
    churn_with_aborts(
        engine, lambda: [rng.randrange(3, 700) for _ in range(rng.randrange(1, 40))],
        lambda i: SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=i,
                                 max_tokens=rng.randrange(1, 10), ignore_eos=True),
        1000, 3, rng)
    assert engine.kv.pool.num_free == engine.kv.num_usable_blocks
    assert engine.kv.state_slots.num_free == 8
    assert engine.stats.aborted_requests > 100 and engine.stats.spec_num_accepted_tokens > 0


@pytest.mark.parametrize("k,engine_kw", [
    pytest.param(3, dict(max_num_batched_tokens=37, max_num_seqs=3), id="k3-chunked-37"),
    pytest.param(5, dict(max_num_batched_tokens=256, max_num_seqs=8), id="k5"),
])
def test_batch_invariant_mode_keeps_every_bit(pair, k, engine_kw):
    """In batch-invariant mode (the GDN rule with chunks at absolute positions, a committed
    state and a tail of inputs per slot: one per verified position here) tokens and
    logprobs with speculation are the bits of plain decoding, however the prompt is cut."""
    target, drafter = pair
    rng = random.Random(k)
    # generation crosses a 64-token chunk boundary at every place in a verify step
    prompts = [[rng.randrange(3, 700) for _ in range(n)]
               for n in (1, 40, 44, 50, 55, 58, 60, 61, 62, 63, 100, 110, 120)]
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=3)

    def run(llm):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return [(o.outputs[0].token_ids,
                 [{t: lp.logprob for t, lp in s.items()} for s in o.outputs[0].logprobs])
                for o in outs]
    want = run(LLM(target, batch_invariant=True, max_num_batched_tokens=64, max_num_seqs=8,
                   **KW))
    llm = LLM(target, speculative_config=spec(drafter, k), batch_invariant=True,
              **(KW | engine_kw))
    assert run(llm) == want
    stats = llm.engine.stats
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens


def test_parallel_samples_fork_with_speculation(pair):
    """n > 1 on the hybrid target with a drafter: the samples fork after the first one's
    prefill (the drafter's K/V of the partial block is copied with the target's, which only
    acceptance would show), and every greedy sample is transformers' continuation."""
    from transformers import Qwen3_5ForCausalLM
    target, drafter = pair
    hf = Qwen3_5ForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ids = list(range(3, 90))
    want = hf_greedy(hf, ids, 16)
    llm = LLM(target, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
              speculative_config=spec(drafter, 3))
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(
        n=3, temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [want] * 3
    assert llm.engine.stats.spec_num_accepted_tokens > 0
    assert llm.engine.kv.state_slots.num_free == 4


def test_server_serves_n_samples_speculatively(pair, reference):
    """The OpenAI server on the hybrid target with its drafter, through the official client:
    n = 2 greedy samples (forked after one prefill, drafted and verified) are transformers'
    continuation each."""
    import openai

    from conftest import served
    from fullgraph.engine.async_engine import AsyncLLMEngine
    from fullgraph.engine.engine import LLMEngine
    from fullgraph.engine.args import EngineArgs
    target, drafter = pair
    prompts, expected = reference
    engine = AsyncLLMEngine(LLMEngine.from_engine_args(EngineArgs(
        target, speculative_config=spec(drafter, 3), max_num_seqs=8, **KW)))
    with served(engine) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model=target, prompt=prompts[4], max_tokens=MAX_NEW,
                                        n=2, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1]
    tok = engine.engine.tokenizer
    want = tok.decode(expected[4])
    assert [c.text for c in out.choices] == [want, want]
