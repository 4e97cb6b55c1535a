"""Speculative decoding on a CUDA GPU: verify steps and the drafter in CUDA graphs, bf16.

The pairs of tests/spec_pairs.py: a bigram target (its next token depends on the current
token alone, so scoring k + 1 rows at once gives the argmax single steps give, up to bf16
near-ties the random head makes rare) and drafters of known agreement.
"""
from __future__ import annotations

import random

import pytest

from fullgraph import LLM, SamplingParams
from spec_pairs import agreeing_drafter, agreeing_eagle1_drafter, bigram_target

pytestmark = pytest.mark.gpu

VOCAB = 740


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_gpu")
    target = bigram_target(str(root / "target"))
    return (target, agreeing_drafter(str(root / "agree"), target),
            agreeing_drafter(str(root / "half"), target, disagree=0.5),
            agreeing_eagle1_drafter(str(root / "eagle1"), target))


def batch(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 90))]}
            for _ in range(n)]


def greedy(llm: LLM, prompts: list[dict]) -> list[list[int]]:
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


KW = dict(device="cuda", dtype="bfloat16", max_model_len=512, max_num_seqs=16,
          max_num_batched_tokens=512, num_gpu_blocks_override=512)


@pytest.mark.parametrize("which, method", [(1, "eagle3"), (2, "eagle3"), (3, "eagle")])
def test_graphed_speculation_matches_plain_decoding_in_bf16(pair, which, method):
    target, drafter = pair[0], pair[which]
    prompts = batch(which, 12)
    want = greedy(LLM(target, **KW), prompts)
    llm = LLM(target, speculative_config={"method": method, "model": drafter,
                                          "num_speculative_tokens": 3}, **KW)
    assert greedy(llm, prompts) == want
    stats = llm.engine.stats
    assert llm.engine.runner.dispatcher.num_graph_steps > 0
    if which != 2:                                   # the agreeing drafters
        assert stats.spec_num_accepted_tokens >= 0.95 * stats.spec_num_draft_tokens


def test_graphs_equal_eager_speculative_steps_on_gpu(pair):
    target, _, half, _ = pair
    spec = {"method": "eagle3", "model": half, "num_speculative_tokens": 3}
    prompts = batch(9, 8)
    eager = greedy(LLM(target, speculative_config=spec, enforce_eager=True, **KW), prompts)
    assert greedy(LLM(target, speculative_config=spec, **KW), prompts) == eager


def test_an_eager_speculative_step_reads_the_device_twice(pair):
    """An eager verify step (`enforce_eager`, as a step of a shape no graph holds) waits for
    the device twice: the verification's tokens and accepted counts in one read, then the
    drafts, all k at once (each stays on the device as the next drafter step's input).
    Host-side indices reach the device from pinned memory without a wait."""
    from fullgraph.entrypoints.bench.latency import count_syncs
    target, _, half, _ = pair
    spec = {"method": "eagle3", "model": half, "num_speculative_tokens": 3}
    llm = LLM(target, speculative_config=spec, enforce_eager=True, async_scheduling=False,
              **KW)
    engine = llm.engine
    sp = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for i, p in enumerate(batch(13, 4)):
        engine.add_request(f"sync-{i}", p["prompt_token_ids"], sp)
    engine.step()                                   # the prompts, then their first drafts
    assert count_syncs(engine) <= 2                 # a verify step


def test_async_scheduling_continues_verify_steps_on_gpu(pair):
    """Async scheduling: steady verify steps launch before the step in flight is read, their
    inputs carried over on the device (the bonus token through the arena's pending merge,
    positions, slots and drafts by `continue_rows` inside the model graph). Greedy output
    equals plain decoding (seeded bits in the batch-invariant mode: test_gpu_batch_invariant,
    whose kernel needs a head dim of 32 or more)."""
    target, _, half, _ = pair
    spec = {"method": "eagle3", "model": half, "num_speculative_tokens": 3}
    prompts = batch(11, 12)
    want = greedy(LLM(target, **KW), prompts)
    llm = LLM(target, speculative_config=spec, async_scheduling=True, **KW)
    assert greedy(llm, prompts) == want
    assert llm.engine.runner.spec.num_continued > 0


@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_metadata_is_shared_only_between_backends_that_build_it_alike(backend):
    """A drafter's graphed pass reads the target's metadata where the two backends'
    `metadata_key`s are equal. The head counts alone do not decide it: on the GPU the head
    size picks the kernels (the paged decode kernel takes powers of two, the tiled prefill
    kernel 16..256), and a layer on another path cannot run on the other's metadata."""
    import torch
    from fullgraph.attention.backend import get_backend_class
    from fullgraph.attention.metadata import AttentionSpec, PersistentInputs

    cls, dev = get_backend_class(backend), torch.device("cuda")
    buffers = PersistentInputs(torch.zeros(9, 16, dtype=torch.int32, device=dev),
                               torch.zeros(64, dtype=torch.int64, device=dev))

    def key(heads: int, kv_heads: int, head_dim: int) -> tuple:
        spec = AttentionSpec(1, heads, kv_heads, head_dim, 16, 64, 8, 64, 16, torch.bfloat16)
        return cls(spec, dev, buffers, compile=True).metadata_key()

    assert key(16, 8, 64) == key(16, 8, 128)       # same paths: shared
    assert key(16, 8, 128) != key(16, 4, 128)      # another GQA group
    assert key(16, 8, 128) != key(16, 8, 96)       # no paged decode kernel at 96
    if backend == "triton":
        assert key(16, 8, 128) != key(16, 8, 512)  # no tiled prefill kernel at 512
