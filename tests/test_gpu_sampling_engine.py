"""The sampling surface through the engine on a CUDA GPU, with graphs: a mixed batch (greedy,
sampled, top-p, top-k, min_p, penalties, logit_bias, logprobs) gives each request the tokens
it gets alone, and temperature sampling follows the softmax (chi-square on the model's own
next-token distribution)."""
from __future__ import annotations

import pytest
import torch

from fullgraph import LLM, SamplingParams
from test_sampling_engine import KW, mixed_params

pytestmark = pytest.mark.gpu


def test_mixed_batch_equals_each_request_alone_with_graphs(hf_dir):
    llm = LLM(hf_dir, device="cuda", dtype="float32", **KW)
    prompts, params = mixed_params()
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, sp, out in zip(prompts, params, together):
        alone = llm.generate({"prompt_token_ids": p}, sp, use_tqdm=False)[0].outputs[0]
        assert alone.token_ids == out.outputs[0].token_ids
    assert llm.engine.runner.dispatcher.num_graph_steps > 0


def test_temperature_draws_follow_the_softmax(hf_dir, hf_model):
    """1,500 seeded one-token draws of the same prompt (graph replays), against the softmax
    of transformers' logits at temperature 0.7: chi-square over the likeliest tokens."""
    prompt = [5, 6, 7, 8]
    llm = LLM(hf_dir, device="cuda", dtype="float32", **KW)
    params = [SamplingParams(temperature=0.7, seed=s, max_tokens=1) for s in range(1500)]
    outs = llm.generate([{"prompt_token_ids": prompt}] * len(params), params, use_tqdm=False)
    counts = torch.bincount(torch.tensor([o.outputs[0].token_ids[0] for o in outs]),
                            minlength=hf_model.config.vocab_size).double()
    with torch.no_grad():
        p = (hf_model(torch.tensor([prompt])).logits[0, -1].double() / 0.7).softmax(-1)
    top = p.argsort(descending=True)[:8]
    expected = torch.cat([p[top], 1 - p[top].sum(0, keepdim=True)]) * len(params)
    observed = torch.cat([counts[top], len(params) - counts[top].sum(0, keepdim=True)])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 27.9, chi2          # 8 degrees of freedom, p = 0.0005
