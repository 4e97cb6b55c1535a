"""Batch-invariant mode (docs/batch_invariance.md, 6.7 and 6.8) on the CPU for the hybrid
Gated DeltaNet models: the `tiny-qwen3.5` preset (dense) and a Qwen3.5-MoE test checkpoint.

The checks of tests/test_batch_invariant.py (whose helpers this module reuses): a prompt's
tokens and every logprob are the same bits alone and at a random place among random
prompts, with prompts cut at other than 64-token boundaries by several
`max_num_batched_tokens`, greedy and seeded, float32 and bfloat16; generation equals scoring;
fake graphs, async scheduling, preemptions and reused state slots keep the bits. The inverse
tests run the same comparisons without the mode and find a difference.
"""
from __future__ import annotations

import functools

import pytest
import torch

from conftest import make_hybrid_checkpoint
from fullgraph import LLM
from fullgraph.layers.policy import DEFAULT_POLICY, KernelPolicy
from fullgraph.models.registry import get_model_class
# one_thread: the module-scoped autouse fixture that runs torch on one thread (see there)
from test_batch_invariant import (CONFIGS, GREEDY, NEEDLE, SEEDED, completions,  # noqa: F401
                                  generation_vs_scoring, one_thread, result)

MAX_SEQS = 64


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    return make_hybrid_checkpoint(str(tmp_path_factory.mktemp("qwen3_5_moe")),
                                  "Qwen3_5MoeForCausalLM")


@pytest.fixture(params=["tiny-qwen3.5", "qwen3.5-moe"])
def model(request) -> str:
    """The dense preset, or the mixture-of-experts checkpoint's directory."""
    return request.param if request.param == "tiny-qwen3.5" else request.getfixturevalue("moe_dir")


def engine(model: str, batched: int, dtype: str = "float32", invariant: bool = True,
           **kwargs) -> LLM:
    return LLM(model, max_num_batched_tokens=batched, max_num_seqs=MAX_SEQS, dtype=dtype,
               batch_invariant=invariant, **kwargs)


@functools.cache
def alone(model: str, dtype: str, invariant: bool = True) -> tuple:
    """The needle alone, greedy and seeded (shared by the tests that compare with it)."""
    return tuple(result(completions(engine(model, 2048, dtype, invariant), [(NEEDLE, sp)], 0,
                                    0)[0]) for sp in (GREEDY, SEEDED))


def mixed(model: str, dtype: str, invariant: bool = True) -> list[tuple]:
    """The two needles among others, per (max_num_batched_tokens, others, seed) of CONFIGS:
    budgets of 64, 100 and 2048 tokens cut the 100-token prompt at 64, at other places, or
    not at all, and the others' prompts anywhere."""
    return [tuple(result(o) for o in completions(engine(model, batched, dtype, invariant),
                                                 [(NEEDLE, GREEDY), (NEEDLE, SEEDED)], others,
                                                 seed))
            for batched, others, seed in CONFIGS]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_needle_alone_equals_needle_in_any_batch(model, dtype):
    want = alone(model, dtype)
    for config, got in zip(CONFIGS, mixed(model, dtype)):
        assert got == want, f"max_num_batched_tokens, others, seed = {config}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inverse_without_the_mode_the_needle_changes(model, dtype):
    """Without the mode (the chunked rule cut where the step cuts, the recurrent decode
    form, MKL's / oneDNN's row-count-dependent GEMMs, SDPA) a difference is found."""
    want = alone(model, dtype, invariant=False)
    assert any(got != want for got in mixed(model, dtype, invariant=False))


def test_graphs_and_async_scheduling_keep_the_bits(model):
    """CPU fake graphs (padded shapes: padding lanes on the null slot, the GDN layers' chunk
    capacity of the padded shape; 16 sequences, so a mixed graph pads to 16 lanes rather
    than 64) and async scheduling, against eager synchronous steps."""
    sizes = [1, 2, 4, 8, 16, 32, 64, 100]
    for kwargs in (dict(async_scheduling=True),
                   dict(async_scheduling=True, cudagraph_runtime="fake",
                        cudagraph_capture_sizes=sizes)):
        llm = LLM(model, max_num_batched_tokens=100, max_num_seqs=16, max_model_len=256,
                  batch_invariant=True, **kwargs)
        got = tuple(result(o) for o in completions(llm, [(NEEDLE, GREEDY), (NEEDLE, SEEDED)],
                                                   30, 11))
        assert got == alone(model, "float32"), kwargs
        if "cudagraph_runtime" in kwargs:
            assert llm.engine.runner.dispatcher.num_graph_steps > 0


def test_preemption_and_reused_state_slots_keep_the_bits(monkeypatch):
    """Four state slots for 22 requests, so the needles take slots whose tails other
    requests filled; and too few KV blocks for four contexts, so requests are preempted and
    recomputed: a needle among them, in the middle of a chunk (its tail not empty). A lane
    that starts (again) must read neither its slot's state nor its tail."""
    llm = LLM("tiny-qwen3.5", max_num_batched_tokens=64, max_num_seqs=4, max_model_len=256,
              block_size=8, num_gpu_blocks_override=24, batch_invariant=True)
    scheduler, preempted = llm.engine.scheduler, []
    preempt = scheduler._preempt

    def recorded(req) -> None:
        preempted.append((req.request_id, req.num_computed_tokens))
        preempt(req)
    monkeypatch.setattr(scheduler, "_preempt", recorded)
    outs = completions(llm, [(NEEDLE, GREEDY), (NEEDLE, SEEDED)], 20, 10)
    needles = {o.request_id for o in outs}
    assert any(r in needles and done % 64 for r, done in preempted), preempted
    assert tuple(result(o) for o in outs) == alone("tiny-qwen3.5", "float32")
    assert llm.engine.kv.state_slots.num_free == 4


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_generation_equals_scoring(model, sampling):
    # generation decodes through the tails, scoring runs the completion's positions inside
    # a prefill
    got, want = generation_vs_scoring(sampling, functools.partial(engine, model))
    assert got == want


def test_inverse_generation_differs_from_scoring_without_the_mode(model):
    got, want = generation_vs_scoring(
        GREEDY, lambda batched: engine(model, batched, invariant=False))
    assert got != want


def test_tails_exist_in_the_mode_only_and_every_hybrid_declares_it():
    """The mode's per-slot tails are extra state tensors of the mode alone (the normal
    mode's state is unchanged); the text hybrids declare the mode, and so do the
    vision-language ones built on the same layers (tests/test_batch_invariant_vl.py)."""
    from transformers import Qwen3_5TextConfig
    cls = get_model_class("Qwen3_5ForCausalLM")
    cfg = Qwen3_5TextConfig(num_hidden_layers=4, linear_num_key_heads=2,
                            linear_num_value_heads=4, linear_key_head_dim=16,
                            linear_value_head_dim=8)
    normal = cls.cache_specs(cfg, DEFAULT_POLICY).state.tensors
    assert [t.name for t in normal] == ["conv", "recurrent"]
    mode = cls.cache_specs(cfg, KernelPolicy(batch_invariant=True)).state.tensors
    assert mode[:2] == normal
    assert {t.name: (t.shape, t.dtype) for t in mode[2:]} == {
        "tail_q": ((63, 2, 16), None), "tail_k": ((63, 2, 16), None),
        "tail_v": ((63, 4, 8), None), "tail_g": ((63, 4), torch.float32),
        "tail_beta": ((63, 4), None)}
    for arch in ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen3NextForCausalLM",
                 "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"):
        assert "cpu" in get_model_class(arch).capabilities.batch_invariant, arch
