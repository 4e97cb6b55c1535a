"""The engine on a CUDA GPU: parity with transformers (float32) and bf16 closeness."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import hf_greedy, logprob_errors
from fullgraph import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def prompts(lengths, seed=0, vocab=600):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("backend, enforce_eager, compile_layers", [
    ("flex", True, False), ("flex", False, False), ("sdpa", True, False), ("sdpa", False, False),
    ("flex", False, True),                      # --compile-layers (off by default)
    ("triton", True, False), ("triton", False, False),   # prompt chunks in the tiled kernel
])
def test_float32_greedy_parity_on_gpu(hf_dir, hf_model, backend, enforce_eager, compile_layers):
    llm = LLM(hf_dir, device="cuda", dtype="float32", max_model_len=512, max_num_seqs=8,
              max_num_batched_tokens=64, num_gpu_blocks_override=256,
              attention_backend=backend, enforce_eager=enforce_eager,
              compile_layers=compile_layers)
    ps = prompts([1, 9, 40, 77, 16], seed=11)      # 77 > 64: chunked prefill
    outs = llm.generate([{"prompt_token_ids": p} for p in ps],
                        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf_model, p, 24)


@pytest.mark.parametrize("compile_layers", [False, True])
def test_bfloat16_logprobs_close_to_transformers(hf_dir, compile_layers):
    """Our bf16 logprobs are as close to the float32 reference as transformers' own bf16 run
    (our fused kernels: the path bf16 models take on a GPU), eager or compiled layers."""
    from transformers import Qwen3ForCausalLM
    ref32 = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda().eval()
    ref16 = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).cuda().eval()
    llm = LLM(hf_dir, device="cuda", dtype="bfloat16", max_model_len=512, max_num_seqs=8,
              num_gpu_blocks_override=256, compile_layers=compile_layers)
    ps = prompts([5, 30, 64], seed=12)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps],
                        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5),
                        use_tqdm=False)
    ours, theirs = logprob_errors([o.outputs[0] for o in outs], ps, ref32, ref16)
    ours_mean, theirs_mean = sum(ours) / len(ours), sum(theirs) / len(theirs)
    assert ours_mean <= 2 * theirs_mean + 1e-3, (ours_mean, theirs_mean)
    assert max(ours) <= 2 * max(theirs) + 1e-2, (max(ours), max(theirs))


def test_weight_updates_under_graphs_on_gpu(hf_dir, hf_model, tmp_path):
    """An RL loop's update on the GPU (float32, FULL graphs, async scheduling): a bad update
    copies nothing, a good one (a directory, then a state dict) gives transformers' greedy
    tokens of the new weights without a new capture."""
    from transformers import Qwen3ForCausalLM

    from conftest import make_hf_checkpoint
    new = make_hf_checkpoint(str(tmp_path / "new"), seed=1)
    hf_new = Qwen3ForCausalLM.from_pretrained(new, dtype=torch.float32).eval()
    llm = LLM(hf_dir, device="cuda", dtype="float32", max_model_len=512, max_num_seqs=8,
              num_gpu_blocks_override=256, enable_prefix_caching=True)
    ps = prompts([9, 40, 77], seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def tokens():
        return [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in ps], greedy, use_tqdm=False)]

    assert tokens() == [hf_greedy(hf_model, p, 16) for p in ps]
    graphs = len(llm.engine.runner.graphs.graphs)
    with pytest.raises(ValueError, match="model.norm.weight"):
        llm.update_weights(list(hf_new.state_dict().items())
                           + [("model.norm.weight", torch.zeros(3))])
    assert tokens() == [hf_greedy(hf_model, p, 16) for p in ps]
    llm.update_weights(new)
    assert tokens() == [hf_greedy(hf_new, p, 16) for p in ps]
    llm.update_weights(hf_model.state_dict())
    assert tokens() == [hf_greedy(hf_model, p, 16) for p in ps]
    assert len(llm.engine.runner.graphs.graphs) == graphs
