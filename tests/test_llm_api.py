"""The offline API's vLLM habits: prompt_token_ids=, Hugging Face ids from the local cache,
--tokenizer, --chat-template, --generation-config, and the progress bar."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from fullgraph import LLM, SamplingParams

KW = dict(max_model_len=128, max_num_seqs=4, num_gpu_blocks_override=64,
          attention_backend="sdpa")
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(hf_dir):
    return LLM(hf_dir, **KW)


def test_prompt_token_ids_keyword(llm):
    ids = [[5, 6, 7, 8], [9, 10]]
    expected = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in ids], GREEDY, use_tqdm=False)]
    got = llm.generate(prompt_token_ids=ids, sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == expected
    one = llm.generate(prompt_token_ids=ids[0], sampling_params=GREEDY, use_tqdm=False)
    assert one[0].outputs[0].token_ids == expected[0]
    with pytest.raises(ValueError, match="either prompts or prompt_token_ids"):
        llm.generate("x", GREEDY, prompt_token_ids=ids)
    with pytest.raises(ValueError, match="prompts must be a string, a prompt dict or a list"):
        llm.generate(123, GREEDY)


def _fake_hub_cache(root, repo_id: str, checkpoint: str) -> str:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/}."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(sha)
    shutil.copytree(checkpoint, os.path.join(repo, "snapshots", sha))
    return os.path.join(repo, "snapshots", sha)


def test_model_id_from_the_local_hugging_face_cache(hf_dir, llm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _fake_hub_cache(str(tmp_path), "someorg/tiny", hf_dir)
    cached = LLM("someorg/tiny", **KW)
    assert cached.engine.config.model.path == snapshot
    prompt = {"prompt_token_ids": [3, 4, 5]}
    assert (cached.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
            == llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids)
    with pytest.raises(ValueError, match=f"not in the local Hugging Face cache \\({tmp_path}\\)"):
        LLM("someorg/absent", **KW)


def test_separate_tokenizer_and_chat_template(hf_dir, tmp_path):
    model_dir = tmp_path / "model"
    tok_dir = tmp_path / "tok"
    shutil.copytree(hf_dir, model_dir)
    os.makedirs(tok_dir)
    for f in os.listdir(model_dir):
        if "token" in f or f.endswith(".jinja"):
            shutil.move(str(model_dir / f), tok_dir / f)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    llm = LLM(str(model_dir), tokenizer=str(tok_dir), chat_template=str(template), **KW)
    tok = llm.get_tokenizer()
    assert llm.engine.config.model.tokenizer == str(tok_dir)
    assert tok.get_vocab() == LLM(hf_dir, **KW).get_tokenizer().get_vocab()
    got = llm.engine.chat_prompt([{"role": "user", "content": "hello"}])[0]
    assert got == tok.encode("<<hello>>", add_special_tokens=False)
    inline = LLM(str(model_dir), tokenizer=str(tok_dir), chat_template="[{{ messages[0]['content'] }}]",
                 **KW)
    assert (inline.engine.chat_prompt([{"role": "user", "content": "x"}])[0]
            == tok.encode("[x]", add_special_tokens=False))
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        LLM(str(model_dir), tokenizer=str(tok_dir), chat_template="missing.jinja", **KW)


def test_generation_config_gives_the_default_sampling_params(hf_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(hf_dir, model_dir)
    recommended = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 7,
                   "do_sample": True}
    gen_file = model_dir / "generation_config.json"
    base = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    gen_file.write_text(json.dumps(base | recommended))
    sp = LLM(str(model_dir), **KW).get_default_sampling_params()
    assert (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens) == (0.6, 0.95, 20, 7)
    plain = LLM(str(model_dir), generation_config="none", **KW).get_default_sampling_params()
    assert (plain.temperature, plain.top_k, plain.max_tokens) == (1.0, -1, 16)
    with pytest.raises(ValueError, match="generation_config"):
        LLM(str(model_dir), generation_config=str(tmp_path / "nowhere"), **KW)


def test_progress_bar_reports_token_speeds(llm, capsys):
    llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 2, GREEDY, use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts: 100%" in err
    assert "est. speed input:" in err and "toks/s, output:" in err


def test_chat_template_options_as_transformers_renders_them(llm):
    """`LLM.chat` with vLLM's template options: a template of its own, template kwargs
    (Qwen3's `enable_thinking`), continuing the last message; the output's prompt is the
    rendered text, its ids that text's, as transformers renders and tokenizes it."""
    template = ("{%- if enable_thinking is defined and not enable_thinking %}{{- 'NT ' }}"
                "{%- endif %}" + llm.get_tokenizer().chat_template)
    messages = [{"role": "user", "content": "Simple is better"},
                {"role": "assistant", "content": "than complex"}]
    tok = llm.get_tokenizer()
    cases = [(dict(chat_template=template, chat_template_kwargs={"enable_thinking": False}),
              dict(chat_template=template, add_generation_prompt=True, enable_thinking=False)),
             (dict(add_generation_prompt=False, continue_final_message=True),
              dict(add_generation_prompt=False, continue_final_message=True))]
    for ours, theirs in cases:
        out = llm.chat(messages, GREEDY, use_tqdm=False, **ours)[0]
        text = tok.apply_chat_template(messages, tokenize=False, **theirs)
        assert out.prompt == text
        assert out.prompt_token_ids == tok.encode(text, add_special_tokens=False)
    assert llm.chat(messages, GREEDY, use_tqdm=False)[0].prompt.startswith("<|im_start|>")
    with pytest.raises(ValueError, match="add_generation_prompt=False"):
        llm.chat(messages, GREEDY, continue_final_message=True)
    with pytest.raises(ValueError, match="own argument"):
        llm.chat(messages, GREEDY, chat_template_kwargs={"add_generation_prompt": False})


def test_output_metrics_time_the_request(llm):
    """vLLM's request metrics: arrival, first scheduled, first and last token, finish, in
    that order (seconds on one monotonic clock)."""
    out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0]
    m = out.metrics
    assert (m["arrival_time"] <= m["first_scheduled_time"] < m["first_token_time"]
            < m["last_token_time"] <= m["finished_time"])


@pytest.mark.parametrize("value", ["1k", 1.5, True, 1, 10**9])
def test_max_model_len_out_of_range_or_not_an_integer_is_named(value):
    with pytest.raises(ValueError, match=f"max_model_len must be in \\[2, .*got {value!r}"):
        LLM("tiny-qwen3", max_model_len=value)


def test_vllm_dtype_spellings_on_the_cli():
    """vLLM's `--dtype half` / `float` parse (their engine values were already taken)."""
    import argparse

    from fullgraph.entrypoints.cli_args import add_engine_args
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    for spelling in ("half", "float", "bfloat16"):
        assert parser.parse_args(["--dtype", spelling]).dtype == spelling
