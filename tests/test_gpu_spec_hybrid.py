"""Speculative decoding on a hybrid (Gated DeltaNet) target on a CUDA GPU: fla's kernels
with a state per verified position, verify and mixed steps in CUDA graphs; greedy output
equal to transformers' in float32 (the pair of tests/test_spec_hybrid.py)."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import hf_greedy
from fullgraph import LLM, SamplingParams
from spec_pairs import hybrid_pair

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("hf_gdn_torch_paths")]
ENGINE = dict(device="cuda", dtype="float32", max_model_len=512, max_num_seqs=8,
              max_num_batched_tokens=128, num_gpu_blocks_override=256,
              cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64, 128])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return hybrid_pair(str(tmp_path_factory.mktemp("spec_hybrid_gpu")))


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_greedy_speculation_on_a_hybrid_equals_transformers(pair, enforce_eager):
    from transformers import Qwen3_5ForCausalLM
    target, drafter = pair
    hf = Qwen3_5ForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 700) for _ in range(n)] for n in (1, 9, 63, 64, 65, 150, 16)]
    llm = LLM(target, enforce_eager=enforce_eager, speculative_config={
        "method": "eagle3", "model": drafter, "num_speculative_tokens": 3}, **ENGINE)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 24) for p in prompts]
    engine = llm.engine
    stats = engine.stats
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert engine.kv.state_slots.num_free == 8
    if not enforce_eager:
        assert engine.runner.dispatcher.num_graph_steps > 0
