"""Qwen3-VL on a CUDA GPU: greedy parity with transformers in float32 (eager, FULL and
PIECEWISE graphs), graphs == eager with images in random batches, and the VLM in selftest."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fullgraph import LLM, SamplingParams
from test_vl_engine import END, IMAGE, START, hf_generate, make_vl_checkpoint

pytestmark = pytest.mark.gpu
ENGINE = dict(device="cuda", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=128,
              num_gpu_blocks_override=256, cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64, 128])
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory) -> str:
    # head_dim 32: the Triton q/k and decode-attention kernels cover it (16 falls back)
    return make_vl_checkpoint(str(tmp_path_factory.mktemp("qwen3-vl-gpu")), head_dim=32,
                              mrope_section=(4, 6, 6))


def _mm_prompt(rng: random.Random, n_images: int):
    ids = [rng.randrange(400) for _ in range(rng.randrange(1, 40))]
    for _ in range(n_images):
        ids += [START, IMAGE, END] + [rng.randrange(400) for _ in range(rng.randrange(0, 9))]
    imgs = [np.random.default_rng(rng.randrange(1 << 30)).integers(
        0, 256, (32 * rng.randrange(1, 5), 32 * rng.randrange(1, 5), 3), dtype=np.uint8)
        for _ in range(n_images)]
    return ids, imgs


@pytest.mark.parametrize("mode", ["none", "full", "piecewise"])
def test_float32_greedy_parity(vl_dir, mode):
    # piecewise: attention runs eagerly between the pieces, on rotary rows the pieces compute
    from transformers import Qwen3VLForConditionalGeneration
    hf = Qwen3VLForConditionalGeneration.from_pretrained(vl_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    llm = LLM(vl_dir, dtype="float32", cudagraph_mode=mode, **ENGINE)
    rng = random.Random(3)
    for n in (1, 2, 0):
        ids, imgs = _mm_prompt(rng, n)
        prompt = {"prompt_token_ids": ids} | ({"multi_modal_data": {"image": imgs}} if imgs
                                                else {})
        out = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        assert out == hf_generate(hf, ids, imgs, 12), n


def test_graphs_equal_eager_with_images(vl_dir):
    # float32: the encoder graphs pack images into padded budgets, whose matmuls round
    # differently from the eager tower's per-image ones (in bf16 a random tiny model's
    # near-ties then flip; test_encoder_graphs_equal_eager_encoder bounds that error)
    graph = LLM(vl_dir, dtype="float32", **ENGINE)
    eager = LLM(vl_dir, dtype="float32", enforce_eager=True, **ENGINE)
    rng = random.Random(5)
    for _ in range(3):
        batch = []
        for _ in range(rng.randrange(2, 8)):
            ids, imgs = _mm_prompt(rng, rng.randrange(0, 3))
            batch.append({"prompt_token_ids": ids} | ({"multi_modal_data": {"image": imgs}}
                                                       if imgs else {}))
        a = graph.generate(batch, GREEDY, use_tqdm=False)
        b = eager.generate(batch, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert graph.engine.runner.dispatcher.num_graph_steps > 0


def test_selftest_covers_the_vlm():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "fullgraph.entrypoints.cli", "selftest",
                        "--model", "tiny-qwen3-vl", "--trials", "2"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_encoder_graphs_equal_eager_encoder(vl_dir, dtype):
    """The encoder's graph replays (packed images, padding) against the eager tower, for
    random mixes of image sizes; an image above every budget goes eager and is counted. In
    bf16 both are compared with a float32 copy of the tower: the graphs' error may not
    exceed twice the eager bf16 path's, plus a rounding step."""
    import copy
    llm = LLM(vl_dir, dtype=dtype, encoder_cudagraph_token_budgets=[16, 64, 128],
              encoder_cudagraph_max_images_per_batch=4, **ENGINE)
    runner = llm.engine.runner
    graphs, model = runner.encoder_graphs, runner.model
    exact = copy.deepcopy(model).float()
    proc = llm.engine.mm_processor.image_processor
    rng = np.random.default_rng(0)
    for trial in range(4):
        sizes = [(32 * int(rng.integers(1, 9)), 32 * int(rng.integers(1, 9)))
                 for _ in range(int(rng.integers(1, 6)))]
        if trial == 0:
            sizes.append((256, 256))                 # 256 patches: above every budget
        p = proc([rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes])
        grids = [tuple(int(v) for v in g) for g in p.image_grid_thw.tolist()]
        with torch.inference_mode():
            got = graphs.encode(p.pixel_values, grids)
            want = model.encode_images(p.pixel_values.to("cuda", runner.config.model.dtype),
                                       grids)
            ref = exact.encode_images(p.pixel_values.to("cuda", torch.float32), grids)
        for (ge, gd), (we, wd), (re, rd) in zip(got, want, ref, strict=True):
            for g, w, r in ((ge, we, re), (gd, wd, rd)):
                if dtype == "float32":
                    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
                else:
                    err, err_eager = ((x.float() - r).abs().max() for x in (g, w))
                    assert err <= 2 * err_eager + 1e-2, (err, err_eager)
    assert graphs.num_graph_replays > 0 and graphs.num_eager_fallbacks >= 1


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_speculative_decoding_with_images_equals_transformers(vl_dir, tmp_path,
                                                              enforce_eager):
    """EAGLE-3 on the VL target on CUDA (tests/test_vl_engine.py's CPU check): verify rows and
    drafts at their MRoPE positions, image steps eager, verify graphs otherwise; float32
    greedy tokens equal transformers'."""
    from spec_pairs import agreeing_drafter, bigram_target
    from test_vl_engine import speculation_with_images
    target = bigram_target(str(tmp_path / "target"), source=vl_dir, mix=0.5)
    drafter = agreeing_drafter(str(tmp_path / "drafter"), target)
    llm = speculation_with_images(target, drafter, dtype="float32",
                                  enforce_eager=enforce_eager, **ENGINE)
    assert llm.engine.stats.spec_num_accepted_tokens > 0
    if not enforce_eager:
        assert llm.engine.runner.dispatcher.num_graph_steps > 0
