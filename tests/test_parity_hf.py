"""Greedy output equals transformers' Qwen3ForCausalLM token for token (float32, CPU)."""
from __future__ import annotations

import random

import pytest

from conftest import hf_greedy, make_hf_checkpoint
from fullgraph import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def random_prompts(lengths, seed=0, vocab=600):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def check(llm, hf_model, prompts, max_tokens=16):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.prompt_token_ids == p
        assert o.outputs[0].token_ids == hf_greedy(hf_model, p, max_tokens), f"prompt len {len(p)}"
    return outs


@pytest.fixture(scope="module", params=["flex", "sdpa"])
def llm(request, hf_dir):
    return LLM(hf_dir, max_model_len=512, max_num_seqs=8, num_gpu_blocks_override=256,
               attention_backend=request.param)


def test_single_prompt(llm, hf_model):
    check(llm, hf_model, random_prompts([13]))


def test_batched_prompts_of_different_lengths(llm, hf_model):
    check(llm, hf_model, random_prompts([1, 7, 16, 17, 40, 3], seed=1))


def test_text_prompts(llm, hf_model):
    tok = llm.get_tokenizer()
    texts = ["The cat sat on the mat.", "Hello, world!", "Errors should never pass silently"]
    outs = llm.generate(texts, GREEDY, use_tqdm=False)
    for text, o in zip(texts, outs):
        ids = tok.encode(text)
        assert o.prompt_token_ids == ids
        assert o.outputs[0].token_ids == hf_greedy(hf_model, ids, GREEDY.max_tokens)
        assert o.outputs[0].text == tok.decode(o.outputs[0].token_ids, skip_special_tokens=True)


def test_prefix_cache_hits(llm, hf_model):
    bs = llm.engine.config.cache.block_size
    shared = random_prompts([3 * bs], seed=2)[0]
    first = check(llm, hf_model, [shared + [5, 6, 7]])
    assert first[0].num_cached_tokens == 0 or first[0].num_cached_tokens % bs == 0
    again = check(llm, hf_model, [shared + [9, 10], shared + [11]])
    assert all(o.num_cached_tokens >= 3 * bs for o in again)
    hits_before = llm.engine.kv.prefix_hits
    check(llm, hf_model, [shared + [5, 6, 7]])
    assert llm.engine.kv.prefix_hits > hits_before


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_chunked_prefill_forced_small(hf_dir, hf_model, backend):
    llm = LLM(hf_dir, max_model_len=512, max_num_seqs=4, max_num_batched_tokens=8,
              num_gpu_blocks_override=128, attention_backend=backend)
    outs = check(llm, hf_model, random_prompts([30, 5, 19, 2], seed=3), max_tokens=12)
    assert llm.engine.stats.steps > 30 // 8   # the long prompt really took several chunks
    assert len(outs) == 4


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_preemption_forced_by_tiny_kv_pool(hf_dir, hf_model, backend):
    # 12 usable blocks of 4 tokens = 48 slots; four requests of ~30 tokens each cannot all fit.
    llm = LLM(hf_dir, max_model_len=64, max_num_seqs=4, block_size=4, num_gpu_blocks_override=13,
              attention_backend=backend)
    check(llm, hf_model, random_prompts([10, 12, 8, 11], seed=4), max_tokens=20)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.pool.num_free == 12          # everything returned to the pool


def test_preemption_without_prefix_caching(hf_dir, hf_model):
    llm = LLM(hf_dir, max_model_len=64, max_num_seqs=4, block_size=4, num_gpu_blocks_override=13,
              enable_prefix_caching=False)
    check(llm, hf_model, random_prompts([10, 12, 8, 11], seed=5), max_tokens=20)
    assert llm.engine.scheduler.num_preemptions > 0


def test_untied_and_sharded_checkpoint(tmp_path):
    from transformers import Qwen3ForCausalLM
    import torch
    path = make_hf_checkpoint(str(tmp_path), tie=False, num_layers=3, seed=7, max_shard_size="100KB")
    import os
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    ref = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, max_model_len=256, max_num_seqs=4, num_gpu_blocks_override=64)
    check(llm, ref, random_prompts([9, 21], seed=8))


def test_flex_and_sdpa_agree_on_logprobs(hf_dir):
    prompts = [{"prompt_token_ids": p} for p in random_prompts([5, 33, 18], seed=9)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    results = {}
    for backend in ("flex", "sdpa"):
        llm = LLM(hf_dir, max_model_len=256, max_num_seqs=4, num_gpu_blocks_override=64,
                  attention_backend=backend)
        results[backend] = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(results["flex"], results["sdpa"]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            for t in la:
                assert la[t].logprob == pytest.approx(lb[t].logprob, abs=1e-4)
