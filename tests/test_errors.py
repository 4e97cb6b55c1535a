"""Bad input gets a ValueError naming the problem and loses nothing else."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from fullgraph import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-qwen3", max_model_len=64, max_num_seqs=4, block_size=4,
               num_gpu_blocks_override=11)     # 10 usable blocks = 40 tokens


@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"n": 0}, "n must be at least 1"),
    ({"presence_penalty": 2.5}, "presence_penalty must be in \\[-2, 2\\]"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"min_p": 1.5}, "min_p must be in \\[0, 1\\]"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias token id"),
    ({"logit_bias": {5: "big"}}, "logit_bias value"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias token ids must be >= 0"),
    ({"bad_words": "word"}, "bad_words"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": -1}, "logprobs"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("inf")}, "top_p"),
    ({"seed": 2**64}, "seed"),
    ({"max_tokens": "5"}, "max_tokens must be an integer"),
    ({"max_tokens": 2.5}, "max_tokens must be an integer"),
    ({"top_k": 1.5}, "top_k must be an integer"),
    ({"stop": 5}, "stop must be a string or a list"),
    ({"logprobs": True}, "logprobs must be an integer"),
    ({"temperature": "0.5"}, "temperature must be a finite number"),
    ({"ignore_eos": "yes"}, "ignore_eos must be true or false"),
    ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"stop_token_ids": 7}, "stop_token_ids"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("name", sorted(SamplingParams.field_names()))
def test_every_sampling_field_is_type_checked(name):
    """A value of no sensible type for any field (including ones added later) is a ValueError
    naming that field, not a TypeError inside a step."""
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: object()})


def test_sampling_params_accept_numpy_scalars():
    import numpy as np
    sp = SamplingParams(max_tokens=np.int64(5), temperature=np.float32(0.5), top_k=np.int32(3))
    assert (sp.max_tokens, sp.top_k) == (5, 3) and type(sp.max_tokens) is int


@pytest.mark.parametrize("prompt, match", [
    ("", "empty"),
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": [1, 10**9]}, "outside the vocabulary"),
    ({"prompt_token_ids": [1, -3]}, "outside the vocabulary"),
    ({"prompt_token_ids": list(range(1, 70))}, "max_model_len"),
    ({"prompt_token_ids": "oops"}, "list of integers"),
    (42, "a prompt must be"),
])
def test_bad_prompts_raise_and_lose_nothing(llm, prompt, match):
    good = {"prompt_token_ids": [5, 6, 7]}
    expected = llm.generate([good], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match=match) as err:
        llm.generate([good, prompt, good], GREEDY, use_tqdm=False)
    assert "prompt 1" in str(err.value)
    assert not llm.engine.has_unfinished_requests()      # nothing was half-admitted
    again = llm.generate([good, good], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [expected, expected]


def test_request_that_can_never_fit_the_kv_cache(llm):
    too_big = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    # the block the override counts but no request gets is named (block 0, the null block)
    with pytest.raises(ValueError, match="KV-cache blocks .* the cache has 10 usable of 11 "
                                         "\\(block 0 is reserved, the null block"):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], too_big, use_tqdm=False)
    assert llm.engine.kv.pool.num_free == 10
    assert llm.generate(["hi"], GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"


def test_too_many_logprobs(llm):
    with pytest.raises(ValueError, match="max_logprobs"):
        llm.generate(["hi"], SamplingParams(logprobs=1000), use_tqdm=False)


def test_wrong_number_of_sampling_params(llm):
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)


def test_max_tokens_is_capped_by_the_context():
    llm = LLM("tiny-qwen3", max_model_len=64, max_num_seqs=2, num_gpu_blocks_override=16)
    out = llm.generate([{"prompt_token_ids": list(range(1, 31))}],
                       SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 64 - 30 and out.finish_reason == "length"


def _preset_copy(tmp_path):
    src = LLM("tiny-qwen3", max_model_len=32, num_gpu_blocks_override=8).engine.config.model.path
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_missing_model_directory(tmp_path):
    with pytest.raises(ValueError, match="not a local directory, a built-in preset"):
        LLM(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        LLM(str(tmp_path))


def test_malformed_config(tmp_path):
    d = _preset_copy(tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed config.json"):
        LLM(str(d))


def test_unknown_architecture(tmp_path):
    d = _preset_copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MysteryForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown architecture 'MysteryForCausalLM'.*Qwen3ForCausalLM"):
        LLM(str(d))


def test_missing_weights(tmp_path):
    d = _preset_copy(tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LLM(str(d), num_gpu_blocks_override=8)


def test_incomplete_weights(tmp_path):
    from safetensors.torch import load_file, save_file
    d = _preset_copy(tmp_path)
    weights = load_file(d / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, d / "model.safetensors")
    with pytest.raises(ValueError, match="missing weights.*layers.1.mlp.gate_up_proj.weight:up_proj"):
        LLM(str(d), num_gpu_blocks_override=8)


def test_corrupt_weights(tmp_path):
    d = _preset_copy(tmp_path)
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read weights"):
        LLM(str(d), num_gpu_blocks_override=8)


def test_bad_engine_args():
    with pytest.raises(ValueError, match="max_model_len"):
        LLM("tiny-qwen3", max_model_len=10**7)
    with pytest.raises(ValueError, match="block_size"):
        LLM("tiny-qwen3", block_size=12)
    with pytest.raises(ValueError, match="attention backend"):
        LLM("tiny-qwen3", attention_backend="magic", num_gpu_blocks_override=8)
    with pytest.raises(TypeError, match="unexpected"):
        LLM("tiny-qwen3", not_an_arg=1)


def test_vllm_engine_arguments_run_or_say_what_differs():
    """vLLM scripts' engine arguments with one meaning here are taken by LLM() as by the CLI
    (the same greedy tokens as without them); values fullgraph cannot honor are a ValueError
    naming the argument and why."""
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    plain = LLM("tiny-qwen3", num_gpu_blocks_override=16).generate(["Hello"], greedy,
                                                                  use_tqdm=False)
    vllm = LLM("tiny-qwen3", num_gpu_blocks_override=16, tensor_parallel_size=1,
               trust_remote_code=True, enable_chunked_prefill=True, kv_cache_dtype="auto",
               tokenizer_mode="auto", swap_space=4)
    assert (vllm.generate(["Hello"], greedy, use_tqdm=False)[0].outputs[0].token_ids
            == plain[0].outputs[0].token_ids)
    for kwargs, words in [(dict(tensor_parallel_size=2), "one GPU"),
                          (dict(quantization="awq"), "unquantized"),
                          (dict(kv_cache_dtype="fp8"), "model's dtype"),
                          (dict(enable_lora=True), "LoRA"),
                          (dict(enable_chunked_prefill=False), "always chunked")]:
        name = next(iter(kwargs))
        with pytest.raises(ValueError, match=f"^{name}=.*{words}"):
            LLM("tiny-qwen3", **kwargs)
