"""Batch-invariant mode (docs/batch_invariance.md) on the CPU for the vision-language models:
Qwen3-VL and Qwen3.5-VL (the hybrid) test checkpoints.

A prompt with an image gives the same token ids and logprob bits alone and at a random place
among random text and image prompts, cut by several `max_num_batched_tokens`, greedy and
seeded, eager or in graphs; generation equals scoring (the prompt with its completion,
scored in another batch). The tower encodes a request's own images once, so what the mode needs is the text
model's: Qwen3's or the hybrid's invariant layers, and the MRoPE cos/sin through their
scalar formulas. The inverse test runs the comparison without the mode and finds a
difference.
"""
from __future__ import annotations

import random

import pytest

from fullgraph import LLM
from fullgraph.sampling_params import SamplingParams
# one_thread: the module-scoped autouse fixture that runs torch on one thread (see there)
from test_batch_invariant import GREEDY, SEEDED, one_thread, result  # noqa: F401
from test_qwen3_5_vl_engine import make_checkpoint as make_hybrid_vl_checkpoint
from test_vl_engine import images, make_vl_checkpoint, prompt

MAX_SEQS = 16
NEEDLE = prompt([9, 8, 7], None, [6, 5, 4, 3, 2] * 6)
NEEDLE_IMAGE = images((64, 96), seed=5)[0]


@pytest.fixture(scope="module", params=["qwen3-vl", "qwen3.5-vl"])
def model(request, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp(request.param))
    return (make_vl_checkpoint(path) if request.param == "qwen3-vl"
            else make_hybrid_vl_checkpoint(path))


def engine(model: str, batched: int, invariant: bool = True, **kwargs) -> LLM:
    return LLM(model, max_model_len=512, max_num_batched_tokens=batched,
               max_num_seqs=MAX_SEQS, num_gpu_blocks_override=256, batch_invariant=invariant,
               **kwargs)


def completions(llm: LLM, needles: list[tuple[list[int], SamplingParams]], num_others: int,
                seed: int) -> list:
    """The needles (the image prompt, or the ids given) at random places among random text
    and image prompts with their own random sampling; the needles' outputs, in order."""
    rng = random.Random(seed)
    prompts = []
    for i in range(num_others):
        ids = [rng.randrange(3, 490) for _ in range(rng.randrange(3, 60))]
        request = {"prompt_token_ids": ids}
        if i % 3 == 0:
            request = {"prompt_token_ids": prompt(ids[:2], None, ids[2:]),
                       "multi_modal_data": {"image": images((64, 64), seed=i)[0]}}
        prompts.append((request, SamplingParams(
            temperature=rng.choice([0.0, 0.7]), seed=rng.randrange(1 << 30),
            max_tokens=rng.randrange(1, 10), logprobs=rng.choice([None, 2]), ignore_eos=True)))
    for ids, params in needles:
        prompts.insert(rng.randrange(len(prompts) + 1), (
            {"prompt_token_ids": ids, "multi_modal_data": {"image": NEEDLE_IMAGE}}, params))
    wanted = [next(i for i, (_, sp) in enumerate(prompts) if sp is params)
              for _, params in needles]
    outs = llm.generate([p for p, _ in prompts], [sp for _, sp in prompts], use_tqdm=False)
    return [outs[i] for i in wanted]


CONFIGS = [(16, 12, 1), (40, 20, 2), (512, 24, 3)]


def needle_runs(model: str, invariant: bool = True) -> tuple[list, list[list]]:
    alone = [result(completions(engine(model, 512, invariant), [(NEEDLE, sp)], 0, 0)[0])
             for sp in (GREEDY, SEEDED)]
    mixed = [[result(o) for o in completions(engine(model, batched, invariant),
                                             [(NEEDLE, GREEDY), (NEEDLE, SEEDED)], others,
                                             seed)]
             for batched, others, seed in CONFIGS]
    return alone, mixed


def test_needle_with_an_image_alone_equals_it_in_any_batch(model):
    alone, mixed = needle_runs(model)
    for config, got in zip(CONFIGS, mixed):
        assert got == alone, f"max_num_batched_tokens, others, seed = {config}"


def test_graphs_keep_the_bits(model):
    """Text steps in (CPU fake) graphs, the images through the eager tower in the mode (no
    encoder graphs: their packed budgets round otherwise)."""
    alone = [result(completions(engine(model, 512), [(NEEDLE, sp)], 0, 0)[0])
             for sp in (GREEDY, SEEDED)]
    llm = engine(model, 40, cudagraph_runtime="fake",
                 cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 40])
    got = [result(o) for o in completions(llm, [(NEEDLE, GREEDY), (NEEDLE, SEEDED)], 16, 4)]
    assert got == alone
    assert llm.engine.runner.dispatcher.num_graph_steps > 0
    assert llm.engine.runner.encoder_graphs is None


def test_inverse_without_the_mode_the_needle_changes(model):
    alone, mixed = needle_runs(model, invariant=False)
    assert any(got != alone for got in mixed)


def test_generation_equals_scoring_with_an_image(model):
    """The logprob generation reported for each sampled token is the prompt logprob of that
    token when the prompt and its completion are scored, image included, in another batch
    cut otherwise."""
    gen = completions(engine(model, 16), [(NEEDLE, SEEDED)], 10, 5)[0].outputs[0]
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5)
    score = completions(engine(model, 40), [(NEEDLE + gen.token_ids, scoring)], 12,
                        6)[0].prompt_logprobs
    # the scored prompt holds the image's tokens expanded: the completion is its tail
    tail = score[len(score) - len(gen.token_ids):]
    got = [{t: (lp.logprob, lp.rank) for t, lp in step.items()} for step in gen.logprobs]
    want = [{t: (lp.logprob, lp.rank) for t, lp in step.items()} for step in tail]
    assert got == want
