"""Hybrid (Gated DeltaNet) models on a CUDA GPU: parity with transformers, graphs == eager,
and no GPU->CPU synchronization inside a step."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import hf_greedy, logprob_errors, make_hybrid_checkpoint
from fullgraph import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("hf_gdn_torch_paths")]
ENGINE = dict(device="cuda", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=128,
              num_gpu_blocks_override=256, cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64, 128])


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory) -> str:
    pytest.importorskip("transformers.models.qwen3_5")
    return make_hybrid_checkpoint(str(tmp_path_factory.mktemp("hybrid")))


def prompts(lengths, seed=0, vocab=600):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def greedy(llm, ps, n=16, **kw):
    outs = llm.generate([{"prompt_token_ids": p} for p in ps],
                        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw),
                        use_tqdm=False)
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_float32_greedy_parity(hybrid_dir, enforce_eager):
    from transformers import Qwen3_5ForCausalLM
    hf = Qwen3_5ForCausalLM.from_pretrained(hybrid_dir, dtype=torch.float32).eval()
    llm = LLM(hybrid_dir, dtype="float32", enforce_eager=enforce_eager, **ENGINE)
    ps = prompts([1, 9, 63, 64, 65, 150, 16], seed=11)     # 150 > 128: chunked prefill
    for p, out in zip(ps, greedy(llm, ps)):
        assert out.token_ids == hf_greedy(hf, p, 16)


def test_bfloat16_logprobs_close_to_transformers(hybrid_dir):
    from transformers import Qwen3_5ForCausalLM
    ref32 = Qwen3_5ForCausalLM.from_pretrained(hybrid_dir, dtype=torch.float32).cuda().eval()
    ref16 = Qwen3_5ForCausalLM.from_pretrained(hybrid_dir, dtype=torch.bfloat16).cuda().eval()
    llm = LLM(hybrid_dir, dtype="bfloat16", **ENGINE)
    ps = prompts([5, 30, 64, 100], seed=12)
    ours, theirs = logprob_errors(greedy(llm, ps, 8, logprobs=5), ps, ref32, ref16)
    ours_mean, theirs_mean = sum(ours) / len(ours), sum(theirs) / len(theirs)
    assert ours_mean <= 2 * theirs_mean + 1e-3, (ours_mean, theirs_mean)


def test_graphs_equal_eager_on_random_mixed_batches(hybrid_dir):
    graph = LLM(hybrid_dir, dtype="bfloat16", **ENGINE)
    eager = LLM(hybrid_dir, dtype="bfloat16", enforce_eager=True, **ENGINE)
    rng = random.Random(5)
    for trial in range(3):
        ps = prompts([rng.randrange(1, 200) for _ in range(rng.randrange(1, 9))], seed=trial)
        params = [SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(1000),
                                 max_tokens=rng.randrange(2, 20), ignore_eos=True) for _ in ps]
        a = graph.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
        b = eager.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
        assert [x.outputs[0].token_ids for x in a] == [y.outputs[0].token_ids for y in b]
    assert graph.engine.runner.dispatcher.num_graph_steps > 0


def test_no_sync_in_mixed_and_decode_steps(hybrid_dir):
    llm = LLM(hybrid_dir, dtype="bfloat16", **ENGINE)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    lengths = [3, 70, 20, 1, 45]

    def run(tag):
        for i, p in enumerate(prompts(lengths, seed=3)):
            engine.add_request(f"{tag}-{i}", p, params)
            engine.step()                  # prefill chunks next to decodes: mixed steps
        while engine.has_unfinished_requests():
            engine.step()
    run("warm")                            # kernels compile and autotune (syncs) here
    steps = engine.runner.dispatcher.num_graph_steps
    torch.cuda.set_sync_debug_mode("error")
    try:
        run("checked")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.runner.dispatcher.num_graph_steps > steps
    assert engine.runner.dispatcher.num_eager_fallbacks == 0


def test_selftest_covers_a_hybrid():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "fullgraph.entrypoints.cli", "selftest",
                        "--model", "tiny-qwen3.5", "--trials", "2"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr


def test_parallel_samples_fork_after_one_prefill(hybrid_dir):
    """n > 1 on CUDA (graphs, async scheduling): the followers fork at the leader's last
    prompt token (blocks and state copied on the device before the next step, behind the
    leader's step in flight); every float32 greedy sample is transformers' continuation."""
    from transformers import Qwen3_5ForCausalLM
    hf = Qwen3_5ForCausalLM.from_pretrained(hybrid_dir, dtype=torch.float32).eval()
    llm = LLM(hybrid_dir, dtype="float32", **ENGINE)
    ids = prompts([150], seed=5)[0]                  # chunked: 128 + 21, then the last token
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(
        n=3, temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [hf_greedy(hf, ids, 12)] * 3
    assert llm.engine.kv.state_slots.num_free == ENGINE["max_num_seqs"]
