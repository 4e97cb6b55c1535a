"""Qwen3-VL end to end through `LLM.generate` with images: greedy tokens equal transformers'
Qwen3VLForConditionalGeneration.generate on a tiny random checkpoint (float32, CPU), with
transformers' own image processor preparing the reference's inputs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fullgraph import LLM, SamplingParams

IMAGE, START, END = 500, 501, 502          # image pad, vision start / end token ids
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
              temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
              num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
PREPROCESSOR = dict(patch_size=16, temporal_patch_size=2, merge_size=2,
                    min_pixels=32 * 32, max_pixels=256 * 256,
                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def make_vl_checkpoint(path: str, seed: int = 0, head_dim: int = 16,
                       mrope_section: tuple[int, int, int] = (2, 3, 3)) -> str:
    """A tiny random Qwen3VLForConditionalGeneration saved by transformers, with a
    preprocessor_config.json (mrope_section sums to head_dim / 2)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from fullgraph.models.presets import train_tokenizer
    tok = train_tokenizer(1024)
    tok.save_pretrained(path)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=head_dim, max_position_embeddings=1024, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": list(mrope_section),
                                 "mrope_interleaved": True})
    cfg = Qwen3VLConfig(vision_config=VISION, text_config=text, image_token_id=IMAGE,
                        vision_start_token_id=START, vision_end_token_id=END,
                        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    cfg.architectures = ["Qwen3VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(dict(PREPROCESSOR, image_processor_type="Qwen2VLImageProcessor"), f)
    return path


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return make_vl_checkpoint(str(tmp_path_factory.mktemp("qwen3-vl")))


@pytest.fixture(scope="module")
def hf_vl(vl_dir):
    from transformers import Qwen3VLForConditionalGeneration
    model = Qwen3VLForConditionalGeneration.from_pretrained(vl_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None      # ignore_eos, as our requests do
    return model


def images(*sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def hf_generate(model, ids, imgs, max_new_tokens):
    """transformers' greedy tokens, its processor expanding the placeholders. Image sizes
    here are whole merge blocks (no resize), where its PIL and torchvision backends agree."""
    if not imgs:
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens,
                             do_sample=False, attention_mask=torch.ones(1, len(ids),
                                                                        dtype=torch.long))
        return out[0, len(ids):].tolist()
    ids_t, kwargs = hf_image_inputs(ids, imgs)
    out = model.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), **kwargs,
                         max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids_t.shape[1]:].tolist()


def hf_image_inputs(ids, imgs):
    """The prompt with each placeholder expanded to its image's token count (transformers'
    processor preparing the images), and generate's image arguments: with
    `mm_token_type_ids`, which tokens are image tokens, as its processor returns them
    (without them transformers' MRoPE falls back to text positions)."""
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import \
            Qwen2VLImageProcessor as cls           # needs torchvision
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
            Qwen2VLImageProcessorPil as cls
    inputs = cls(**PREPROCESSOR)(images=imgs, return_tensors="pt")
    grid = inputs["image_grid_thw"]
    merge = PREPROCESSOR["merge_size"]
    expanded, k = [], 0
    for t in ids:
        if t == IMAGE:
            expanded += [IMAGE] * int(grid[k].prod() // merge ** 2)
            k += 1
        else:
            expanded.append(t)
    input_ids = torch.tensor([expanded])
    return input_ids, dict(pixel_values=inputs["pixel_values"], image_grid_thw=grid,
                           mm_token_type_ids=(input_ids == IMAGE).int())


def prompt(*parts):
    """Text ids and images: each image as vision_start, one placeholder, vision_end."""
    ids = []
    for p in parts:
        ids += [START, IMAGE, END] if p is None else p
    return ids


@pytest.fixture(scope="module")
def llm(vl_dir):
    return LLM(vl_dir, max_model_len=512, max_num_seqs=4, num_gpu_blocks_override=128)


GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def test_one_image_greedy_equals_transformers(llm, hf_vl):
    ids = prompt([1, 2, 3], None, [4, 5, 6, 7])
    imgs = images((64, 64))
    out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": imgs[0]}},
                       GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_generate(hf_vl, ids, imgs, 8)


def test_two_images_batched_with_text_and_chunked(vl_dir, hf_vl):
    llm = LLM(vl_dir, max_model_len=512, max_num_seqs=4, num_gpu_blocks_override=128,
              max_num_batched_tokens=8)         # prompts and images split across steps
    a = prompt([9, 8], None, [7], None, [6, 5])
    imgs = images((64, 96), (96, 64), seed=1)
    text = [11, 12, 13, 14, 15]
    outs = llm.generate([{"prompt_token_ids": a, "multi_modal_data": {"image": imgs}},
                         {"prompt_token_ids": text}], GREEDY, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == hf_generate(hf_vl, a, imgs, 8)
    assert outs[1].outputs[0].token_ids == hf_generate(hf_vl, text, [], 8)


@pytest.fixture(scope="module")
def spec_pair(vl_dir, tmp_path_factory):
    """The checkpoint made nearly a bigram model (tests/spec_pairs.py: MLPs zeroed,
    attention's output halved, so the history still tips many tokens through attention at
    its MRoPE positions) and a drafter proposing the bigram's choice."""
    from spec_pairs import agreeing_drafter, bigram_target
    root = tmp_path_factory.mktemp("vl_spec")
    target = bigram_target(str(root / "target"), source=vl_dir, mix=0.5)
    return target, agreeing_drafter(str(root / "drafter"), target)


@pytest.mark.parametrize("engine_kw", [
    pytest.param(dict(max_num_batched_tokens=16), id="chunked"),
    pytest.param(dict(cudagraph_runtime="fake", cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32]),
                 id="fake-graphs"),
])
def test_speculative_decoding_with_images_equals_transformers(spec_pair, engine_kw):
    """EAGLE-3 on a vision-language target: verify rows and drafts at their MRoPE positions
    (the text positions after the prompt's), steps with image tokens eager; greedy tokens
    equal transformers'. (Leaving the speculative steps' rotary rows unwritten fails it.)"""
    llm = speculation_with_images(*spec_pair, max_model_len=512, max_num_seqs=4,
                                  num_gpu_blocks_override=128, **engine_kw)
    stats = llm.engine.stats
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    if "cudagraph_runtime" in engine_kw:
        assert llm.engine.runner.dispatcher.num_graph_steps > 0


def speculation_with_images(target: str, drafter: str, **engine_kw) -> LLM:
    """An engine on `target` with the EAGLE-3 `drafter` (k = 3) over a prompt with two images
    and a text one, asserting its greedy tokens equal transformers'; returns the engine."""
    from transformers import Qwen3VLForConditionalGeneration
    hf = Qwen3VLForConditionalGeneration.from_pretrained(target, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    a = prompt([9, 8], None, [7], None, [6, 5])
    imgs = images((64, 96), (96, 64), seed=1)
    text = [11, 12, 13, 14, 15]
    llm = LLM(target, speculative_config={"method": "eagle3", "model": drafter,
                                          "num_speculative_tokens": 3}, **engine_kw)
    outs = llm.generate([{"prompt_token_ids": a, "multi_modal_data": {"image": imgs}},
                         {"prompt_token_ids": text}],
                        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_generate(hf, a, imgs, 24),
                                                      hf_generate(hf, text, [], 24)]
    return llm


def test_async_speculation_with_images_equals_synchronous(spec_pair):
    """With async scheduling, steady verify steps continue the one in flight, their MRoPE
    rows moved back on the device by the drafts it rejected: tokens and logprobs equal the
    synchronous engine's, bit for bit (batch-invariant mode, fake graphs)."""
    target, drafter = spec_pair
    batch = [{"prompt_token_ids": prompt([9, 8], None, [7], None, [6, 5]),
              "multi_modal_data": {"image": images((64, 96), (96, 64), seed=1)}},
             {"prompt_token_ids": [11, 12, 13, 14, 15]}]
    params = [SamplingParams(temperature=t, seed=3, max_tokens=20, ignore_eos=True, logprobs=1)
              for t in (0.0, 0.8)]
    kw = dict(max_model_len=512, max_num_seqs=4, num_gpu_blocks_override=128,
              batch_invariant=True, cudagraph_runtime="fake", cudagraph_capture_sizes=[1, 2, 4],
              speculative_config={"method": "eagle3", "model": drafter,
                                  "num_speculative_tokens": 3})

    def run(llm):
        return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in s.items()}
                                          for s in o.outputs[0].logprobs])
                for o in llm.generate(batch, params, use_tqdm=False)]
    llm = LLM(target, async_scheduling=True, **kw)
    assert run(llm) == run(LLM(target, **kw))
    assert llm.engine.runner.spec.num_continued > 0


def test_image_errors_leave_the_engine_usable(llm):
    ids = prompt([1], None, [2])
    with pytest.raises(ValueError, match="placeholders"):
        llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": images(
            (64, 64), (64, 64))}}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="image"):
        llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": "/no/file.png"}},
                     GREEDY, use_tqdm=False)
    out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": images(
        (64, 64))[0]}}, GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8


def test_text_only_model_refuses_images(tmp_path):
    llm = LLM("tiny-qwen3")
    with pytest.raises(ValueError, match="takes no images"):
        llm.generate({"prompt_token_ids": [1, 2], "multi_modal_data": {"image": images(
            (64, 64))[0]}}, GREEDY, use_tqdm=False)


def test_chat_with_an_image_part(llm, hf_vl):
    img = images((64, 64), seed=3)[0]
    messages = [{"role": "user", "content": [{"type": "text", "text": "describe "},
                                             {"type": "image", "image": img},
                                             {"type": "text", "text": " briefly"}]}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    # the template renders the text around the image; its ids come from the tokenizer
    text = llm.engine.render_chat_template(
        [{"role": "user", "content": "describe \x00 briefly"}]).split("\x00")
    tok = llm.get_tokenizer()
    ids = (tok.encode(text[0], add_special_tokens=False) + [START, IMAGE, END]
           + tok.encode(text[1], add_special_tokens=False))
    assert out.prompt_token_ids == ids[:ids.index(IMAGE)] + [IMAGE] * 4 + ids[
        ids.index(IMAGE) + 1:]
    assert out.outputs[0].token_ids == hf_generate(hf_vl, ids, [img], 8)
    # the reported prompt spells the image as the tokenizer does (vLLM's prompt text)
    assert out.prompt == text[0] + tok.decode([START, IMAGE, END]) + text[1]
    # vLLM's image_pil part: the same image as a PIL image, the same run
    import PIL.Image
    messages[0]["content"][1] = {"type": "image_pil", "image_pil": PIL.Image.fromarray(img)}
    assert llm.chat(messages, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == \
        out.outputs[0].token_ids


def test_prefix_cache_shares_an_image_only_with_itself(vl_dir, hf_vl):
    llm = LLM(vl_dir, max_model_len=512, max_num_seqs=4, num_gpu_blocks_override=128,
              block_size=4, enable_prefix_caching=True)
    ids = prompt([1, 2, 3], None, [4, 5, 6, 7, 8, 9, 10, 11])
    a, b = images((64, 64), (64, 64), seed=4)
    kv = llm.engine.kv

    def run(img):
        hits = kv.prefix_hits
        out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": img}},
                           GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        return out, kv.prefix_hits - hits
    first, _ = run(a)
    again, hits_same = run(a.copy())
    other, hits_other = run(b)
    assert first == again == hf_generate(hf_vl, ids, [a], 8)
    assert other == hf_generate(hf_vl, ids, [b], 8)
    # block 0 (1 2 3 <start>) holds no image token: shared; every later block holds some
    assert hits_same >= 12 and hits_other == 4


def test_server_chat_with_a_data_url_image(vl_dir, llm, tmp_path):
    """The official openai client sends an image as a data URL; a file under the allowed
    media path works, http URLs and paths outside it are a 400."""
    openai = pytest.importorskip("openai")
    import base64
    import io
    import httpx

    import PIL.Image

    from conftest import served
    from fullgraph.engine.args import EngineArgs
    from fullgraph.engine.async_engine import AsyncLLMEngine
    from fullgraph.engine.engine import LLMEngine

    img = images((64, 96), seed=5)[0]
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    media = tmp_path / "media"
    media.mkdir()
    (media / "cat.png").write_bytes(buf.getvalue())
    engine = AsyncLLMEngine(LLMEngine.from_engine_args(EngineArgs(   # graphs: the CPU emulator
        model=vl_dir, max_model_len=512, max_num_seqs=4, num_gpu_blocks_override=128,
        cudagraph_runtime="fake")))
    with served(engine, allowed_media_path=str(media)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x")
        messages = [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": url}}]}]
        want = llm.chat(messages, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        got = client.chat.completions.create(model=vl_dir, messages=messages, max_tokens=8,
                                             temperature=0.0, logprobs=True,
                                             extra_body={"ignore_eos": True})
        assert len(got.choices[0].logprobs.content) == 8
        text = llm.get_tokenizer().decode(want, skip_special_tokens=True)
        assert got.choices[0].message.content == text
        local = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"file://{media / 'cat.png'}"}}]}]
        assert client.chat.completions.create(model=vl_dir, messages=local, max_tokens=2)
        for bad, message in [("http://example.com/cat.png", "not fetched"),
                             ("ftp://example.com/cat.png", "scheme 'ftp' is not supported"),
                             (str(tmp_path / "elsewhere.png"), "outside")]:
            with pytest.raises(openai.BadRequestError, match=message):
                client.chat.completions.create(model=vl_dir, max_tokens=2, messages=[
                    {"role": "user", "content": [{"type": "image_url",
                                                  "image_url": {"url": bad}}]}])
        # /tokenize gives the ids generation runs, placeholders expanded
        tok = httpx.post(f"{base}/tokenize", json={"messages": messages})
        ran = llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False)[0]
        assert tok.status_code == 200 and tok.json()["tokens"] == ran.prompt_token_ids
        # the engine is still serving; its encoder ran in graphs, as /metrics counts
        assert client.chat.completions.create(model=vl_dir, messages=messages, max_tokens=2)
        metrics = httpx.get(f"{base}/metrics").text
        replays = [line for line in metrics.splitlines()
                   if line.startswith("fullgraph:encoder_cudagraph_replays_total")]
        assert replays and float(replays[0].split()[-1]) >= 2, replays


@pytest.mark.parametrize("model", ["tiny-qwen3", "vl"])
def test_the_memory_profile_step_runs_in_the_constructor(model, vl_dir, monkeypatch):
    """CUDA sizes the KV cache with a max-size forward (`_profile_run`) from inside the
    runner's constructor, before the cache exists; a CPU skips it. Run it there, as CUDA
    does, for a text and a multimodal model."""
    from fullgraph.worker.model_runner import ModelRunner
    cpu_default = ModelRunner._default_num_blocks

    def profiled(self):              # _profile_num_blocks' steps, without the CUDA memory calls
        self._allocate_kv_cache(-(-self.max_num_tokens // self.block_size) + 1)
        self._profile_run()
        del self.kv_caches, self.backend
        return cpu_default(self)
    monkeypatch.setattr(ModelRunner, "_default_num_blocks", profiled)
    llm = LLM(vl_dir if model == "vl" else model, max_model_len=256, max_num_seqs=4,
              max_num_batched_tokens=64)
    assert llm.engine.runner.num_blocks > 1


def test_image_tokens_without_images_are_refused(llm):
    with pytest.raises(ValueError, match="image tokens"):
        llm.generate({"prompt_token_ids": prompt([1], None, [2])}, GREEDY, use_tqdm=False)


def test_samples_of_one_prompt_share_the_encoder(vl_dir, hf_vl):
    """n > 1 without prefix caching (every sample computes the whole prompt in the same
    steps): the images are encoded once, and every sample sees them."""
    llm = LLM(vl_dir, max_model_len=512, max_num_seqs=4, num_gpu_blocks_override=128,
              enable_prefix_caching=False)
    model = llm.engine.runner.model
    calls = []
    encode = model.encode_images
    model.encode_images = lambda *a: calls.append(1) or encode(*a)
    ids = prompt([1, 2], None, [3])
    img = images((64, 64), seed=7)
    out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": img[0]}},
                       SamplingParams(n=3, temperature=0.0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(calls) == 1
    want = hf_generate(hf_vl, ids, img, 6)
    assert [c.token_ids for c in out.outputs] == [want] * 3


def test_async_scheduling_graphs_and_chunking_give_the_same_tokens(vl_dir):
    """Images with greedy, seeded and filtered sampling: the same tokens synchronously,
    with async scheduling, with async scheduling and (fake) graphs for the text steps and
    the encoder, and with prompts and images cut into 8-token steps."""
    ps = [{"prompt_token_ids": prompt([1, 2], None, [3, 4]),
           "multi_modal_data": {"image": images((64, 96), seed=1)[0]}},
          {"prompt_token_ids": [5, 6, 7, 8]},
          {"prompt_token_ids": prompt([9], None, [10], None, [11]),
           "multi_modal_data": {"image": images((64, 64), (96, 32), seed=2)}}]
    sp = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
          SamplingParams(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True),
          SamplingParams(temperature=0.7, top_p=0.9, seed=5, max_tokens=10, ignore_eos=True)]
    runs = []
    for kw in ({}, dict(async_scheduling=True),
               dict(async_scheduling=True, cudagraph_runtime="fake",
                    cudagraph_capture_sizes=[1, 2, 4, 8]),
               dict(max_num_batched_tokens=8)):
        llm = LLM(vl_dir, max_model_len=512, max_num_seqs=4, num_gpu_blocks_override=128, **kw)
        runs.append([o.outputs[0].token_ids for o in llm.generate(ps, sp, use_tqdm=False)])
        if "cudagraph_runtime" in kw:
            assert llm.engine.runner.encoder_graphs.num_graph_replays > 0
    assert all(r == runs[0] for r in runs[1:])


def test_an_image_too_large_for_max_model_len_is_named(vl_dir):
    llm = LLM(vl_dir, max_model_len=64, max_num_seqs=2, num_gpu_blocks_override=16)
    with pytest.raises(ValueError, match=r"\(64 of them for 1 images\)"):
        llm.generate({"prompt_token_ids": prompt([1], None, [2]),          # 256x256: 64 tokens
                      "multi_modal_data": {"image": images((256, 256))[0]}}, GREEDY,
                     use_tqdm=False)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8


def test_vllm_multimodal_limits_and_processor_kwargs(vl_dir):
    """vLLM's limit_mm_per_prompt and mm_processor_kwargs: more images than the limit is a
    ValueError naming it; max_pixels over preprocessor_config.json's resizes an image as
    transformers' processor does given the same keyword; bad values are named at start."""
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import \
            Qwen2VLImageProcessor as cls           # needs torchvision
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
            Qwen2VLImageProcessorPil as cls
    small = 64 * 64
    llm = LLM(vl_dir, max_model_len=512, max_num_seqs=2, num_gpu_blocks_override=64,
              limit_mm_per_prompt={"image": 1}, mm_processor_kwargs={"max_pixels": small})
    big = images((128, 192))
    grid = cls(**{**PREPROCESSOR, "max_pixels": small})(images=big,
                                                          return_tensors="pt")["image_grid_thw"]
    ids = prompt([1, 2], None, [3])
    one = SamplingParams(temperature=0.0, max_tokens=1)
    out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": big[0]}}, one,
                       use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == len(ids) - 1 + int(grid[0].prod()) // 4   # merge 2x2
    two = {"prompt_token_ids": prompt(None, [1], None),
           "multi_modal_data": {"image": images((64, 64), (64, 64))}}
    with pytest.raises(ValueError, match="2 images but limit_mm_per_prompt allows 1"):
        llm.generate(two, one, use_tqdm=False)
    assert llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": big[0]}}, one,
                        use_tqdm=False)[0].outputs[0].token_ids == out.outputs[0].token_ids
    for kwargs, message in [
            ({"limit_mm_per_prompt": {"video": 1}}, "take images only"),
            ({"limit_mm_per_prompt": {"image": -1}}, "must be an integer >= 0"),
            ({"limit_mm_per_prompt": "{bad"}, "limit_mm_per_prompt is not valid JSON"),
            ({"mm_processor_kwargs": {"fps": 2}}, "unknown \\['fps'\\]"),
            ({"mm_processor_kwargs": '{"max_pixels": 0}'}, "must be an integer >= 1")]:
        with pytest.raises(ValueError, match=message):
            LLM(vl_dir, **kwargs)
    # the CLI's flags take the JSON
    import argparse

    from fullgraph.entrypoints.cli_args import add_engine_args, engine_args_from
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    ns = parser.parse_args(["--model", vl_dir, "--limit-mm-per-prompt", '{"image": 3}',
                            "--mm-processor-kwargs", '{"min_pixels": 1024}'])
    model = engine_args_from(ns).create_engine_config().model
    assert (model.max_images_per_prompt, model.mm_processor_kwargs) == (3, (("min_pixels", 1024),))
