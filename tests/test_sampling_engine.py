"""The sampling surface through the engine, against transformers' logits processed in plain
torch with vLLM's formulas: penalties, logit_bias, allowed tokens, bad words, min_tokens,
and a mixed batch (greedy, sampled, top-p, penalties, logprobs) equal to each request alone,
eager and with (fake) graphs."""
from __future__ import annotations

import random

import pytest
import torch

from fullgraph import LLM, SamplingParams

KW = dict(max_model_len=256, max_num_seqs=8, num_gpu_blocks_override=64)
PROMPTS = [[5, 6, 7, 8, 9, 5, 6], [11, 12, 13], [200, 201, 202, 203, 204, 205, 206, 207, 208]]
N = 10


@pytest.fixture(scope="module")
def llm(hf_dir):
    return LLM(hf_dir, **KW)


def vllm_process(logits, prompt, output, sp, eos):
    """vLLM's logits processing (v1 sampler order): banned tokens, logit_bias, min_tokens,
    then apply_penalties (vllm/model_executor/layers/utils.py), all in float32."""
    z = logits.float().clone()
    v = z.shape[0]
    if sp.allowed_token_ids:
        mask = torch.ones(v, dtype=torch.bool)
        mask[sp.allowed_token_ids] = False
        z[mask] = float("-inf")
    for word in sp.bad_words_token_ids:      # vLLM: the last token, after the rest of the word
        k = len(word) - 1
        if k == 0 or (len(output) >= k and output[-k:] == word[:-1]):
            z[word[-1]] = float("-inf")
    for t, b in (sp.logit_bias or {}).items():
        z[t] += b
    if len(output) < sp.min_tokens:
        for t in list(sp.stop_token_ids or []) + ([] if sp.ignore_eos else list(eos)):
            z[t] = float("-inf")
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=v) if output \
        else torch.zeros(v, dtype=torch.long)
    seen = counts > 0
    seen_any = seen.clone()
    seen_any[torch.tensor(prompt)] = True
    rep = sp.repetition_penalty
    z = torch.where(seen_any & (z > 0), z / rep, torch.where(seen_any, z * rep, z))
    z -= sp.frequency_penalty * counts.float()
    z -= sp.presence_penalty * seen.float()
    return z


def reference_greedy(hf_model, prompt, sp, eos):
    out = []
    with torch.no_grad():
        for _ in range(sp.max_tokens):
            logits = hf_model(torch.tensor([prompt + out])).logits[0, -1]
            tok = int(vllm_process(logits, prompt, out, sp, eos).argmax())
            out.append(tok)
            if not sp.ignore_eos and tok in eos and len(out) >= sp.min_tokens:
                break
    return out


@pytest.mark.parametrize("extra", [
    dict(repetition_penalty=1.8), dict(repetition_penalty=0.6), dict(frequency_penalty=1.5),
    dict(presence_penalty=2.0), dict(frequency_penalty=0.7, presence_penalty=-0.5,
                                     repetition_penalty=1.3),
    dict(logit_bias={100: 3.0, 7: -100}), dict(allowed_token_ids=[3, 9, 50, 60, 70]),
], ids=lambda d: ",".join(d))
def test_greedy_processing_matches_vllm_formulas(llm, hf_model, extra):
    sp = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, **extra)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    eos = llm.engine.config.model.eos_token_ids
    plain = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                         SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True),
                         use_tqdm=False)
    changed = False
    for p, o, base in zip(PROMPTS, outs, plain):
        assert o.outputs[0].token_ids == reference_greedy(hf_model, p, sp, eos)
        changed |= o.outputs[0].token_ids != base.outputs[0].token_ids
    assert changed, "the feature changed nothing: the test would not see it missing"


def test_bad_words_are_never_generated(llm, hf_model):
    plain = llm.generate({"prompt_token_ids": PROMPTS[1]},
                         SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    tok = llm.get_tokenizer()
    # a word greedy decoding produces, that is one token on its own
    word = next(w for w in (tok.decode([t]).strip() for t in plain)
                if w and tok.encode(w, add_special_tokens=False) in ([t] for t in plain))
    sp = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, bad_words=[word])
    out = llm.generate({"prompt_token_ids": PROMPTS[1]}, sp, use_tqdm=False)[0].outputs[0]
    banned = {ids[0] for ids in sp.bad_words_token_ids if len(ids) == 1}
    assert banned & set(plain) and not banned & set(out.token_ids)
    assert out.token_ids == reference_greedy(hf_model, PROMPTS[1], sp,
                                             llm.engine.config.model.eos_token_ids)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_multi_token_bad_words(hf_dir, hf_model, async_scheduling):
    llm = LLM(hf_dir, async_scheduling=async_scheduling, **KW)
    tok = llm.get_tokenizer()
    plain = llm.generate({"prompt_token_ids": PROMPTS[2]},
                         SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    # a two-token word greedy decoding produces
    word = next(w for w in (tok.decode(plain[i:i + 2]) for i in range(len(plain) - 1))
                if len(tok.encode(w.lstrip(), add_special_tokens=False)) == 2
                and any(tok.encode(v, add_special_tokens=False) == plain[i:i + 2]
                        for v in (w, w.lstrip()) for i in range(len(plain) - 1)))
    sp = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, bad_words=[word])
    out = llm.generate({"prompt_token_ids": PROMPTS[2]}, sp, use_tqdm=False)[0].outputs[0]
    words = [w for w in sp.bad_words_token_ids if len(w) == 2]
    pairs = {tuple(out.token_ids[i:i + 2]) for i in range(len(out.token_ids) - 1)}
    assert words and not pairs & {tuple(w) for w in words}
    assert out.token_ids != plain
    assert out.token_ids == reference_greedy(hf_model, PROMPTS[2], sp,
                                             llm.engine.config.model.eos_token_ids)


def test_min_tokens_holds_back_eos(llm, hf_model):
    eos = llm.engine.config.model.eos_token_ids
    # a bias that makes eos the greedy choice everywhere, so only min_tokens delays it
    bias = {eos[0]: 50.0}
    sp = SamplingParams(temperature=0.0, max_tokens=N, min_tokens=4, logit_bias=bias)
    out = llm.generate({"prompt_token_ids": PROMPTS[0]}, sp, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos[0]
    assert eos[0] not in out.token_ids[:4]
    assert out.token_ids == reference_greedy(hf_model, PROMPTS[0], sp, eos)


def mixed_params():
    rng = random.Random(0)
    kinds = [dict(temperature=0.0), dict(temperature=0.9, seed=3),
             dict(temperature=0.7, top_p=0.8, seed=4), dict(temperature=1.0, top_k=5, seed=5),
             dict(temperature=0.8, min_p=0.2, seed=6), dict(temperature=0.0, logprobs=3),
             dict(temperature=0.9, frequency_penalty=1.0, seed=7, logprobs=2),
             dict(temperature=0.0, repetition_penalty=1.5, logit_bias={42: 2.0})]
    prompts = [[rng.randrange(700) for _ in range(rng.randrange(1, 40))] for _ in kinds]
    return prompts, [SamplingParams(max_tokens=N, ignore_eos=True, **k) for k in kinds]


@pytest.mark.parametrize("graphs", [False, True])
def test_mixed_batch_equals_each_request_alone(hf_dir, graphs):
    kw = KW | (dict(cudagraph_runtime="fake", max_num_batched_tokens=256,
                    cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64, 128, 256])
               if graphs else {})
    llm = LLM(hf_dir, **kw)
    prompts, params = mixed_params()
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, sp, out in zip(prompts, params, together):
        alone = llm.generate({"prompt_token_ids": p}, sp, use_tqdm=False)[0].outputs[0]
        assert alone.token_ids == out.outputs[0].token_ids
        if sp.logprobs is not None:   # bitwise only in the batch-invariant mode
            for a, b in zip(alone.logprobs, out.outputs[0].logprobs):
                assert a.keys() == b.keys()
                assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    if graphs:
        assert llm.engine.runner.dispatcher.num_graph_steps > 0
    assert llm.engine.kv.sampling_slots.num_free == KW["max_num_seqs"]


@pytest.mark.parametrize("engine_kw", [
    pytest.param(dict(max_num_batched_tokens=16), id="chunked-prefill"),
    pytest.param(dict(cudagraph_runtime="fake", max_num_batched_tokens=64,
                      cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64]), id="fake-graphs"),
    pytest.param(dict(block_size=8, num_gpu_blocks_override=9, max_num_seqs=4),
                 id="preemption"),
])
def test_prompt_logprobs_match_transformers(hf_dir, hf_model, engine_kw):
    llm = LLM(hf_dir, **(KW | engine_kw))
    rng = random.Random(9)
    prompts = [[rng.randrange(700) for _ in range(n)] for n in (40, 1, 23, 30)]
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert len(out.prompt_logprobs) == len(p) and out.prompt_logprobs[0] is None
        with torch.no_grad():
            ref = hf_model(torch.tensor([p])).logits[0].float().log_softmax(-1)
        for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
            actual = entry[p[pos]]
            assert abs(actual.logprob - ref[pos - 1, p[pos]].item()) < 1e-4
            assert actual.rank == int((ref[pos - 1] > ref[pos - 1, p[pos]]).sum()) + 1
            top = [t for t, lp in entry.items() if lp.rank <= 3]
            assert set(ref[pos - 1].topk(3).indices.tolist()) <= set(top) | {p[pos]}
    if "num_gpu_blocks_override" in engine_kw:
        assert llm.engine.scheduler.num_preemptions > 0
