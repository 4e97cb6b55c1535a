"""`n` > 1: a prompt's samples share its prefill (through the prefix cache, or on a model
with recurrent state by forking after the first sample's prefill), come back in index order,
and each is reproducible from the request's seed and its index."""
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


# ------------------------------------------------------------------- models with state
def scheduled_tokens(llm) -> list[int]:
    """Records each step's scheduled token count from now on."""
    sched, counts = llm.engine.scheduler, []
    schedule = sched.schedule

    def spy():
        out = schedule()
        counts.append(out.num_tokens)
        return out
    sched.schedule = spy
    return counts


def hybrid(**kw) -> LLM:
    """tiny-qwen3.5 in the batch-invariant mode: a token's bits do not depend on how its
    prompt was cut, so forked samples can equal separate requests bit for bit."""
    return LLM("tiny-qwen3.5", max_model_len=256, max_num_batched_tokens=64,
               batch_invariant=True, **kw)


def bits(completion) -> tuple:
    return completion.token_ids, [{t: lp.logprob for t, lp in step.items()}
                                  for step in completion.logprobs]


@pytest.mark.parametrize("max_num_seqs, others, async_scheduling",
                         [(8, 0, False), (3, 1, False), (8, 0, True)])
def test_a_hybrids_samples_fork_after_one_prefill(max_num_seqs, others, async_scheduling):
    """A model with recurrent state has no prefix cache: the first sample computes the prompt
    but its last token, then the others take its blocks and state there (the partial block
    and the state slot copied on the device) and each computes the last token with its own
    seed. Each sample equals the n == 1 request seeded sample_seed(seed, i), bit for bit; the
    prompt's tokens are computed once. Where another request holds a seat, the sample that
    finds no room at the fork computes the prompt itself, with the same bits. With async
    scheduling the fork's copies follow the leader's step in flight."""
    llm = hybrid(max_num_seqs=max_num_seqs, async_scheduling=async_scheduling)
    counts = scheduled_tokens(llm)
    prompt = {"prompt_token_ids": list(range(5, 75))}           # 70 tokens, blocks of 32
    params = SamplingParams(n=3, temperature=0.9, seed=11, max_tokens=8, ignore_eos=True,
                            logprobs=2)
    other = ({"prompt_token_ids": list(range(300, 310))},
             SamplingParams(max_tokens=40, ignore_eos=True))
    batch = [other] * others + [(prompt, params)]
    out = llm.generate([p for p, _ in batch], [sp for _, sp in batch], use_tqdm=False)[-1]
    alone = [hybrid(max_num_seqs=max_num_seqs).generate(prompt, SamplingParams(
        temperature=0.9, seed=sample_seed(11, i), max_tokens=8, ignore_eos=True, logprobs=2),
        use_tqdm=False)[0].outputs[0] for i in range(3)]
    assert [bits(c) for c in out.outputs] == [bits(c) for c in alone]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    own = 69 + 3 + 3 * 7     # the prompt but its last token once, each sample's last, decodes
    if others:               # plus the other request's, and one sample's whole prompt
        assert sum(counts) == own + 10 + 39 + 69
    else:
        assert sum(counts) == own
    kv = llm.engine.kv
    assert kv.state_slots.num_free == max_num_seqs
    assert kv.pool.num_free == kv.num_usable_blocks


def test_a_hybrids_forked_greedy_samples_equal_transformers(tmp_path):
    """Normal mode, a transformers checkpoint: every greedy sample is transformers' greedy
    continuation (the forked ones read the copied state and blocks)."""
    import torch
    from transformers import Qwen3_5ForCausalLM

    from conftest import hf_greedy, make_hybrid_checkpoint
    path = make_hybrid_checkpoint(str(tmp_path / "hybrid"))
    hf = Qwen3_5ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = list(range(3, 100))                                   # 97 tokens: a partial block
    llm = LLM(path, max_model_len=256, block_size=16, max_num_batched_tokens=40, max_num_seqs=4)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(
        n=3, temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    want = hf_greedy(hf, ids, 10)
    assert [c.token_ids for c in out.outputs] == [want] * 3
    assert llm.engine.kv.state_slots.num_free == 4
