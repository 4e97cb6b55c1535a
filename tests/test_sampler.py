"""Sampler: support restriction, reproducibility, independence from the batch (the engine
end to end; tests/test_sampling_*.py test the sampler's parts against references)."""
from __future__ import annotations


import pytest
import torch

from fullgraph import LLM, SamplingParams
from fullgraph.worker.sampler import (GUMBEL_MAX, SamplingTensors, filter_thresholds, gumbel_noise,
                                      sample, uniform_noise)


def tensors(r, temperature=1.0, top_k=None, top_p=1.0, seeds=None, positions=None, vocab=50,
            logprobs=-1, min_p=None):
    top_k = vocab if top_k is None else top_k
    return SamplingTensors(
        temperature=torch.full((r,), temperature), top_k=torch.full((r,), top_k, dtype=torch.int32),
        top_p=torch.full((r,), top_p),
        seeds=torch.tensor(seeds if seeds is not None else list(range(r)), dtype=torch.int64),
        positions=torch.tensor(positions if positions is not None else [0] * r, dtype=torch.int64),
        all_greedy=temperature == 0,
        any_top_k_top_p=top_k < vocab or top_p < 1.0 or bool(min_p),
        num_logprobs=logprobs, min_p=None if min_p is None else torch.full((r,), min_p))


def test_noise_is_uniform_and_depends_on_seed_and_position():
    u = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([5, 6, 5]), 20000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    again = uniform_noise(torch.tensor([2, 1]), torch.tensor([5, 5]), 20000)
    assert torch.equal(again[1], u[0]) and torch.equal(again[0], u[2])


def test_noise_never_reaches_one_and_gumbel_is_bounded():
    # 2**24 draws per row of a 152k vocabulary would reach the top value about once a row if
    # the mapping could produce it: the largest draw is (2**23 - 1 + 0.5) / 2**23 < 1
    top = torch.tensor([(2 ** 23 - 1) + 0.5]) * (1.0 / 2 ** 23)
    assert top.item() < 1.0
    g = gumbel_noise(torch.tensor([3, -7]), torch.tensor([0, 2 ** 31 + 5]), 151_936)
    assert torch.isfinite(g).all() and g.max() <= GUMBEL_MAX


def test_top_k_restricts_support():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    t = tensors(64, top_k=5, seeds=range(64))
    out = sample(logits, t).token_ids
    top5 = logits.topk(5, dim=-1).indices
    assert all(out[i] in top5[i] for i in range(64))


def test_top_p_restricts_support():
    probs = torch.tensor([0.1, 0.3, 0.15, 0.25, 0.2])
    logits = probs.log()[None].repeat(400, 1)
    out = sample(logits, tensors(400, top_p=0.5, seeds=range(400), vocab=5)).token_ids
    # 0.3 + 0.25 covers 0.5: only tokens 1 and 3 may appear, and both do
    assert set(out.tolist()) == {1, 3}


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(6000, 1)
    out = sample(logits, tensors(6000, seeds=range(6000), vocab=3)).token_ids
    freq = torch.bincount(out, minlength=3).float() / 6000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_temperature_zero_is_argmax_and_rows_are_independent():
    logits = torch.randn(8, 50)
    t = tensors(8, temperature=0.0)
    assert torch.equal(sample(logits, t).token_ids, logits.argmax(-1))
    # a sampled row does not change what its neighbours draw
    mixed = tensors(8, seeds=[3] * 8, positions=list(range(8)))
    alone = [sample(logits[i:i + 1], tensors(1, seeds=[3], positions=[i])).token_ids.item()
             for i in range(8)]
    assert sample(logits, mixed).token_ids.tolist() == alone


def test_top_k_top_p_keeps_most_likely():
    logits = torch.tensor([[1.0, 5.0, 2.0]])
    thr = filter_thresholds(logits, torch.tensor([1]), torch.tensor([0.01]), None)
    assert thr.item() == 5.0
    out = sample(logits.repeat(50, 1), tensors(50, top_k=1, top_p=0.01, vocab=3)).token_ids
    assert set(out.tolist()) == {1}


def test_logprobs_and_ranks():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    out = sample(logits, tensors(1, temperature=0.0, vocab=4, logprobs=2))
    lp = logits.log_softmax(-1)
    assert out.token_ids.item() == 1 and out.ranks.item() == 1
    assert torch.allclose(out.logprobs[0], torch.stack([lp[0, 1], lp[0, 1], lp[0, 2]]))
    assert out.logprob_token_ids[0].tolist() == [1, 1, 2]


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-qwen3", max_model_len=256, max_num_seqs=8, num_gpu_blocks_override=128)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["Once upon a time"], p, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate(["Once upon a time"], p, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.7, seed=9, max_tokens=5)
    batch = llm.generate(["The cat", "Once upon a time", "Hello"], [others, p, others],
                         use_tqdm=False)
    assert alone == again == batch[1].outputs[0].token_ids
    different = SamplingParams(temperature=1.0, top_p=0.95, seed=4321, max_tokens=12, ignore_eos=True)
    assert llm.generate(["Once upon a time"], different, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_unseeded_requests_differ_but_engine_seed_reproduces(llm):
    p = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    a, b = llm.generate(["Hello", "Hello"], p, use_tqdm=False)
    assert a.outputs[0].token_ids != b.outputs[0].token_ids
    other = LLM("tiny-qwen3", max_model_len=256, max_num_seqs=8, num_gpu_blocks_override=128)
    c, d = other.generate(["Hello", "Hello"], p, use_tqdm=False)
    assert (c.outputs[0].token_ids, d.outputs[0].token_ids) == (a.outputs[0].token_ids,
                                                                 b.outputs[0].token_ids)


def test_stop_strings_stop_tokens_and_eos(llm):
    base = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    full = llm.generate(["Hello"], base, use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    # stop token: the first generated token id that appears again later
    tid = full.token_ids[3]
    out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                 stop_token_ids=[tid]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == tid
    assert out.token_ids == full.token_ids[:full.token_ids.index(tid) + 1]
    # stop string: a piece of the full text; the output ends right before it
    text = full.text
    starts = [i for i in range(len(text) // 2, len(text) - 2) if text[i:i + 3].strip()]
    assert starts, f"no usable stop string in {text!r}"
    stop = text[starts[0]:starts[0] + 3]
    out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                 stop=[stop, "never-appears"]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]
    # eos: make the first generated token the model's eos, then it stops there unless ignored
    eos_llm = llm.engine
    saved = eos_llm.config.model
    import dataclasses
    eos_llm.config = dataclasses.replace(eos_llm.config, model=dataclasses.replace(
        saved, eos_token_ids=(full.token_ids[0],)))
    try:
        out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=20),
                           use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:1]
        out = llm.generate(["Hello"], base, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == full.token_ids
    finally:
        eos_llm.config = dataclasses.replace(eos_llm.config, model=saved)


def test_min_tokens_holds_back_stop_strings(llm):
    """As in vLLM, a stop string counts from the token after the first `min_tokens` on: one
    that ends in those tokens' text does not stop the request."""
    full = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=24,
                                                  ignore_eos=True), use_tqdm=False)[0].outputs[0]
    text, k = full.text, 6
    head = len(llm.get_tokenizer().decode(full.token_ids[:k]))
    # a stop string found in the first k tokens' text and again after it
    stop = next((text[i:i + 2] for i in range(head - 1) if text[i:i + 2].strip()
                 and text.find(text[i:i + 2], head) >= 0), None)
    assert stop is not None, f"no stop string repeats in {text!r}"
    assert text.index(stop) + len(stop) <= head          # without min_tokens it stops early
    out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                 stop=[stop], min_tokens=k),
                       use_tqdm=False)[0].outputs[0]
    end = next(i for i in range(len(text)) if text.startswith(stop, i) and i + len(stop) > head)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:end] and len(out.token_ids) > k


def test_detokenize_off_gives_the_same_ids_and_no_text(llm):
    """vLLM's detokenize=False: the same tokens and logprobs, no text and no token strings;
    stop strings (matched in the text) need it on."""
    kw = dict(temperature=0.8, seed=3, max_tokens=8, logprobs=2, prompt_logprobs=1)
    on, off = (llm.generate(["Hello there"], SamplingParams(detokenize=d, **kw),
                            use_tqdm=False)[0] for d in (True, False))
    assert on.outputs[0].text and off.outputs[0].text == ""
    assert off.outputs[0].token_ids == on.outputs[0].token_ids
    for a, b in zip(on.outputs[0].logprobs + on.prompt_logprobs[1:],
                    off.outputs[0].logprobs + off.prompt_logprobs[1:]):
        assert {t: x.logprob for t, x in a.items()} == {t: x.logprob for t, x in b.items()}
        assert all(x.decoded_token for x in a.values())
        assert all(x.decoded_token is None for x in b.values())
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(detokenize=False, stop=["a"])


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm):
    """vLLM's truncate_prompt_tokens: k keeps the prompt's last k tokens; -1 as many as the
    context leaves room for (a prompt longer than max_model_len then runs)."""
    greedy = dict(temperature=0.0, max_tokens=6, ignore_eos=True)
    ids = list(range(5, 45))
    cut = llm.generate({"prompt_token_ids": ids}, SamplingParams(truncate_prompt_tokens=7,
                                                                 **greedy), use_tqdm=False)[0]
    tail = llm.generate({"prompt_token_ids": ids[-7:]}, SamplingParams(**greedy),
                        use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-7:]
    assert cut.outputs[0].token_ids == tail.outputs[0].token_ids
    long = [5 + i % 300 for i in range(300)]                  # max_model_len is 256
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": long}, SamplingParams(**greedy), use_tqdm=False)
    out = llm.generate({"prompt_token_ids": long}, SamplingParams(
        truncate_prompt_tokens=-1, **dict(greedy, max_tokens=1)), use_tqdm=False)[0]
    assert out.prompt_token_ids == long[-255:] and len(out.outputs[0].token_ids) == 1
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)


def test_logprobs_in_outputs(llm):
    out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for tid, entry in zip(out.token_ids, out.logprobs):
        assert tid in entry and entry[tid].rank == 1       # greedy = most likely
        assert 3 <= len(entry) <= 4
        assert all(lp.logprob <= 0 for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in
                                                       zip(out.token_ids, out.logprobs)))
