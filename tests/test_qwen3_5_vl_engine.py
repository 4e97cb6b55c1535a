"""Qwen3.5 with images end to end through `LLM.generate`: greedy tokens equal transformers'
Qwen3_5ForConditionalGeneration.generate on a tiny random checkpoint (float32, CPU), with
transformers' own image processor preparing the reference's inputs.

The sampled tokens' logprobs are compared too: on so small a model the greedy tokens hardly
depend on the rotary positions (a wrong MRoPE section or rope_delta leaves them unchanged),
the logprobs do. The reference is given `mm_token_type_ids` (which tokens are image tokens),
as its processor returns them: without them transformers falls back to plain positions."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fullgraph import LLM, SamplingParams
from test_vl_engine import END, IMAGE, PREPROCESSOR, START, hf_image_inputs, images, prompt

VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
              temporal_patch_size=2, spatial_merge_size=PREPROCESSOR["merge_size"],
              out_hidden_size=64, num_position_embeddings=16)


def make_checkpoint(path: str, seed: int = 0, moe: bool = False) -> str:
    """Gated DeltaNet and gated attention layers alternating; a partial rotary dimension of
    half the head, 8 frequencies. A small rope_theta turns even the last frequencies by a
    visible angle over these short prompts, and the section differs from transformers'
    default within those 8 frequencies, so the logprobs tell a wrong section, interleaving
    or rope_delta apart."""
    import transformers

    from fullgraph.models.presets import train_tokenizer
    tok = train_tokenizer(1024)
    tok.save_pretrained(path)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_num_key_heads=2, linear_num_value_heads=4,
                max_position_embeddings=1024, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 100.0,
                                 "partial_rotary_factor": 0.5, "mrope_section": [5, 1, 2],
                                 "mrope_interleaved": True})
    kind = "Qwen3_5Moe" if moe else "Qwen3_5"
    if moe:        # a sparse mixture of experts with a shared expert in every layer
        text |= dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     shared_expert_intermediate_size=48)
    cfg = getattr(transformers, f"{kind}Config")(
        vision_config=VISION, text_config=text, image_token_id=IMAGE,
        vision_start_token_id=START, vision_end_token_id=END,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    cfg.architectures = [f"{kind}ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForConditionalGeneration")(cfg).float()
    with torch.no_grad():
        for p in model.parameters():          # the (1 + w) norms too: w = 0 hides an offset
            p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(dict(PREPROCESSOR, image_processor_type="Qwen2VLImageProcessor"), f)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("qwen3_5-vl")))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import Qwen3_5ForConditionalGeneration
    model = Qwen3_5ForConditionalGeneration.from_pretrained(model_dir,
                                                            dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None      # ignore_eos, as our requests do
    return model


def hf_generate(model, ids, imgs, max_new_tokens):
    """transformers' greedy tokens and their logprobs, its processor expanding the
    placeholders. Image sizes here are whole merge blocks (no resize), where its PIL and
    torchvision backends agree."""
    input_ids, kwargs = torch.tensor([ids]), {}
    if imgs:
        input_ids, kwargs = hf_image_inputs(ids, imgs)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **kwargs)
    tokens = out.sequences[0, input_ids.shape[1]:]
    logits = torch.cat(out.logits)                                  # [new tokens, vocab]
    logprobs = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    return tokens.tolist(), logprobs.tolist()


def assert_matches(output, reference):
    """Our completion's tokens equal the reference's, their logprobs within float32 noise."""
    tokens, logprobs = reference
    completion = output.outputs[0]
    assert completion.token_ids == tokens
    ours = [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs)]
    assert ours == pytest.approx(logprobs, abs=1e-4)


GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)


def test_one_image_greedy_equals_transformers(model_dir, hf_model, hf_gdn_torch_paths):
    llm = LLM(model_dir, max_model_len=512, max_num_seqs=4, num_gpu_blocks_override=128)
    assert not llm.engine.config.cache.enable_prefix_caching     # a hybrid: state per request
    ids = prompt([1, 2, 3], None, [4, 5, 6, 7])
    imgs = images((64, 96))
    out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": imgs[0]}},
                       GREEDY, use_tqdm=False)[0]
    assert_matches(out, hf_generate(hf_model, ids, imgs, 8))


@pytest.mark.parametrize("graphs", [
    pytest.param({}, id="eager"),
    pytest.param(dict(cudagraph_runtime="fake", cudagraph_capture_sizes=[1, 2, 4, 8]),
                 id="fake-graphs"),      # steps without image rows replay captured graphs
])
def test_two_images_batched_with_text_and_chunked(model_dir, hf_model, hf_gdn_torch_paths,
                                                  graphs):
    llm = LLM(model_dir, max_model_len=512, max_num_seqs=4, num_gpu_blocks_override=128,
              max_num_batched_tokens=8, **graphs)   # prompts and images split across steps
    a = prompt([9, 8], None, [7], None, [6, 5])
    imgs = images((64, 96), (96, 64), seed=1)
    text = [11, 12, 13, 14, 15]
    outs = llm.generate([{"prompt_token_ids": a, "multi_modal_data": {"image": imgs}},
                         {"prompt_token_ids": text}], GREEDY, use_tqdm=False)
    assert_matches(outs[0], hf_generate(hf_model, a, imgs, 8))
    assert_matches(outs[1], hf_generate(hf_model, text, [], 8))
    if graphs:
        assert llm.engine.runner.dispatcher.num_graph_steps > 0
    # every request gave its recurrent-state slot back
    assert llm.engine.kv.state_slots.num_free == llm.engine.config.scheduler.max_num_seqs


def test_moe_variant_with_an_image(tmp_path, hf_gdn_torch_paths):
    """Qwen3_5MoeForConditionalGeneration: the same model class, experts from text_config."""
    from transformers import Qwen3_5MoeForConditionalGeneration
    path = make_checkpoint(str(tmp_path), moe=True)
    hf = Qwen3_5MoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    llm = LLM(path, max_model_len=512, max_num_seqs=4, num_gpu_blocks_override=128)
    ids = prompt([1, 2], None, [3, 4, 5])
    imgs = images((96, 64), seed=2)
    out = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": imgs[0]}},
                       GREEDY, use_tqdm=False)[0]
    assert_matches(out, hf_generate(hf, ids, imgs, 8))


def test_speculative_decoding_on_the_hybrid_with_images(model_dir, tmp_path,
                                                        hf_gdn_torch_paths):
    """EAGLE-3 on the hybrid vision-language target: a state slot per verified position and
    MRoPE rows for the drafts together; greedy tokens and logprobs equal transformers'."""
    from transformers import Qwen3_5ForConditionalGeneration
    from spec_pairs import agreeing_drafter, bigram_target
    target = bigram_target(str(tmp_path / "target"), source=model_dir, mix=0.5)
    drafter = agreeing_drafter(str(tmp_path / "drafter"), target)
    hf = Qwen3_5ForConditionalGeneration.from_pretrained(target, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    llm = LLM(target, max_model_len=512, max_num_seqs=4, num_gpu_blocks_override=128,
              max_num_batched_tokens=16, cudagraph_runtime="fake",
              cudagraph_capture_sizes=[1, 2, 4, 8, 16],
              speculative_config={"method": "eagle3", "model": drafter,
                                  "num_speculative_tokens": 3})
    a = prompt([9, 8], None, [7], None, [6, 5])
    imgs = images((64, 96), (96, 64), seed=1)
    text = [11, 12, 13, 14, 15]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": a, "multi_modal_data": {"image": imgs}},
                         {"prompt_token_ids": text}], params, use_tqdm=False)
    assert_matches(outs[0], hf_generate(hf, a, imgs, 24))
    assert_matches(outs[1], hf_generate(hf, text, [], 24))
    stats = llm.engine.stats
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert llm.engine.kv.state_slots.num_free == llm.engine.config.scheduler.max_num_seqs
