"""Hybrid Gated DeltaNet models (Qwen3.5, Qwen3-Next) against transformers, through the engine:
greedy tokens equal to transformers' full forward, however the engine cuts, batches, preempts
or captures the work, and state slots returned when requests end."""
from __future__ import annotations

import json
import logging
import random

import pytest
import torch

from conftest import churn_with_aborts, hf_greedy, make_hybrid_checkpoint
from fullgraph import LLM, SamplingParams

MAX_NEW = 10
KW = dict(max_model_len=256, num_gpu_blocks_override=64)


@pytest.fixture(scope="module")
def qwen35_dir(tmp_path_factory) -> str:
    return make_hybrid_checkpoint(str(tmp_path_factory.mktemp("qwen3_5")))


@pytest.fixture(scope="module")
def qwen35_reference(qwen35_dir):
    """Prompts of mixed lengths (1 token; below, at and across the 64-token chunk) and
    transformers' greedy continuations."""
    from transformers import Qwen3_5ForCausalLM
    hf = Qwen3_5ForCausalLM.from_pretrained(qwen35_dir, dtype=torch.float32).eval()
    rng = random.Random(1)
    lengths = [1, 5, 63, 64, 65, 130, 17]
    prompts = [[rng.randrange(700) for _ in range(n)] for n in lengths]
    return prompts, [hf_greedy(hf, p, MAX_NEW) for p in prompts]


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("engine_kw", [
    pytest.param(dict(attention_backend="sdpa"), id="sdpa"),
    pytest.param(dict(attention_backend="flex"), id="flex"),
    pytest.param(dict(max_num_batched_tokens=37, max_num_seqs=3), id="chunked-prefill-37"),
    pytest.param(dict(max_num_batched_tokens=64, max_num_seqs=2), id="chunked-prefill-64"),
    pytest.param(dict(cudagraph_runtime="fake", max_num_seqs=8, max_num_batched_tokens=128,
                      cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64, 128]), id="fake-graphs"),
])
def test_qwen3_5_greedy_matches_transformers(qwen35_dir, qwen35_reference, engine_kw):
    prompts, expected = qwen35_reference
    llm = LLM(qwen35_dir, **(KW | engine_kw))
    assert generate(llm, prompts) == expected
    if engine_kw.get("cudagraph_runtime") == "fake":
        assert llm.engine.runner.dispatcher.num_graph_steps > 0
    assert llm.engine.kv.state_slots.num_free == llm.engine.config.scheduler.max_num_seqs


def test_qwen3_5_one_prompt_at_a_time(qwen35_dir, qwen35_reference):
    prompts, expected = qwen35_reference
    llm = LLM(qwen35_dir, **KW)
    assert [generate(llm, [p])[0] for p in prompts[:3]] == expected[:3]


def test_preemption_recomputes_the_state(qwen35_dir, qwen35_reference):
    prompts, expected = qwen35_reference
    # 20 usable blocks of 8 tokens cannot hold all seven requests' contexts at once
    llm = LLM(qwen35_dir, max_model_len=256, block_size=8, num_gpu_blocks_override=21,
              max_num_seqs=7)
    assert generate(llm, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.state_slots.num_free == 7


def fused_expert_layout(path) -> None:
    """Rewrite a checkpoint's experts (transformers saves one 2-D tensor per expert and
    projection, as the published Qwen3-Next checkpoints hold them) in the fused layout of the
    published Qwen3.5-MoE checkpoints: gate_up [E, 2I, H] (gate rows first), down [E, H, I]."""
    import re

    from safetensors.torch import load_file, save_file
    file = path / "model.safetensors"
    tensors = load_file(file)
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name in [n for n in tensors if ".mlp.experts." in n]:
        m = re.fullmatch(r"(.*\.mlp\.experts\.)(\d+)\.(\w+)_proj\.weight", name)
        experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = tensors.pop(name)
    for prefix, by_expert in experts.items():
        order = [by_expert[e] for e in sorted(by_expert)]
        tensors[prefix + "gate_up_proj"] = torch.stack([torch.cat([w["gate"], w["up"]])
                                                        for w in order])
        tensors[prefix + "down_proj"] = torch.stack([w["down"] for w in order])
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("architecture, layout", [
    ("Qwen3NextForCausalLM", "per-expert"), ("Qwen3_5MoeForCausalLM", "per-expert"),
    ("Qwen3_5MoeForCausalLM", "fused")])
def test_moe_hybrids_match_transformers(architecture, layout, tmp_path):
    import transformers
    path = make_hybrid_checkpoint(str(tmp_path / "ckpt"), architecture)
    hf = getattr(transformers, architecture).from_pretrained(path, dtype=torch.float32).eval()
    rng = random.Random(2)
    prompts = [[rng.randrange(700) for _ in range(n)] for n in (3, 70, 40)]
    expected = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    if layout == "fused":
        fused_expert_layout(tmp_path / "ckpt")
    assert generate(LLM(path, **KW), prompts) == expected


def test_no_state_slot_or_block_leaks_after_many_requests_with_aborts(qwen35_dir):
    llm = LLM(qwen35_dir, max_model_len=64, max_num_seqs=16, num_gpu_blocks_override=64,
              block_size=16, attention_backend="sdpa")
    engine, rng = llm.engine, random.Random(3)
    params = SamplingParams(temperature=0.8, max_tokens=3, ignore_eos=True, seed=0)
    churn_with_aborts(engine, lambda: [rng.randrange(700) for _ in range(rng.randrange(1, 20))],
                      lambda i: params, 1000, 7, rng)
    assert engine.kv.state_slots.num_free == 16
    assert engine.kv.pool.num_free == engine.kv.num_usable_blocks
    assert engine.stats.aborted_requests > 100


def test_prefix_caching_is_off_for_hybrids(qwen35_dir, caplog):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("fullgraph").addHandler(handler)
    try:
        llm = LLM(qwen35_dir, **KW)
    finally:
        logging.getLogger("fullgraph").removeHandler(handler)
    assert not llm.engine.config.cache.enable_prefix_caching
    assert any("prefix caching is off" in r.getMessage() for r in records)
    with pytest.raises(ValueError, match="prefix caching is not supported"):
        LLM(qwen35_dir, enable_prefix_caching=True, **KW)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(layer_types=["linear_attention", "sliding_attention",
                                     "linear_attention", "full_attention"]),
     "unknown types \\['sliding_attention'\\]"),
    (lambda c: c.pop("linear_key_head_dim"), "linear_key_head_dim"),
    (lambda c: c.update(linear_num_value_heads=3), "linear_num_value_heads"),
])
def test_configs_we_cannot_run_are_named_at_load(qwen35_dir, tmp_path, edit, match):
    import shutil
    path = tmp_path / "bad"
    shutil.copytree(qwen35_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        LLM(str(path), **KW)
