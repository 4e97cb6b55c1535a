"""The OpenAI-compatible server: a real uvicorn process on 127.0.0.1 and a free port, talked to
with the official `openai` client, checked token for token against the offline `LLM`."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")   # a test dependency (the GPU image lacks it)
from prometheus_client.parser import text_string_to_metric_families

import fullgraph
from fullgraph import LLM, SamplingParams
from fullgraph.engine.args import EngineArgs

MODEL = "tiny-qwen3"
MAX_LEN = 512
# The default backend, as users run it (flex: the CPU's gathered path, graphs on a GPU).
ENGINE_FLAGS = ["--max-model-len", str(MAX_LEN), "--max-num-seqs", "32",
                "--num-gpu-blocks-override", "512"]
ENGINE_KW = dict(max_model_len=MAX_LEN, max_num_seqs=32, num_gpu_blocks_override=512)
TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def offline() -> LLM:
    # Built first: it also writes the preset checkpoint the server will load.
    return LLM(MODEL, **ENGINE_KW)


@dataclass(frozen=True)
class ServerProcess:
    url: str
    log: Path       # the server's stdout and stderr


def spawn_server(log_path: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`fullgraph serve MODEL` in a subprocess on a free port, once healthy: (process, url)."""
    port = _free_port()
    with open(log_path, "w") as log:     # the child keeps its own descriptor
        proc = subprocess.Popen(   # the model as a positional argument, as `vllm serve MODEL`
            [sys.executable, "-m", "fullgraph.entrypoints.server.cli", MODEL,
             "--host", "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning",
             *ENGINE_FLAGS, *flags], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not become healthy:\n{log_path.read_text()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server_process(offline, tmp_path_factory) -> ServerProcess:
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    proc, url = spawn_server(log_path)
    try:
        yield ServerProcess(url, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def server(server_process) -> str:
    return server_process.url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=TIMEOUT,
                         max_retries=0)


def success_by_reason(server: str) -> dict[str, float]:
    """fullgraph:request_success_total by finished_reason."""
    fam = metrics(server)["__families__"]["fullgraph:request_success"]
    return {s.labels["finished_reason"]: s.value for s in fam.samples
            if s.name.endswith("_total")}


def metrics(server: str) -> dict[str, float]:
    """Sample name -> value (labels dropped: one model, one value per name) plus the
    parsed families under '__families__'."""
    text = httpx.get(f"{server}/metrics", timeout=10).text
    out: dict = {"__families__": {}}
    for fam in text_string_to_metric_families(text):
        out["__families__"][fam.name] = fam
        for s in fam.samples:
            if s.name.endswith("_bucket") or "finished_reason" in s.labels:
                continue
            out[s.name] = s.value
    return out


def wait_for(cond, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


# ---------------------------------------------------------------- happy paths
def test_health_and_models(server, client):
    assert httpx.get(f"{server}/health", timeout=5).status_code == 200
    assert httpx.head(f"{server}/health", timeout=5).status_code == 200
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completions_match_offline(client, offline):
    prompts = ["Once upon a time", "The cat sat on", "Hello, world!"]
    want = offline.generate(prompts, greedy(24), use_tqdm=False)
    resp = client.completions.create(model=MODEL, prompt=prompts, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    for c, w in zip(resp.choices, want):
        assert c.token_ids == w.outputs[0].token_ids
        assert c.text == w.outputs[0].text
        assert c.finish_reason == "length"
    assert resp.usage.completion_tokens == 3 * 24
    assert resp.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 3 * 24


def test_completions_stream_match_offline(client, offline):
    prompts = ["Large language models", "Paris is the capital"]
    want = offline.generate(prompts, greedy(20), use_tqdm=False)
    stream = client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True})
    text, ids, finish, usage = ["", ""], [[], []], [None, None], None
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
            continue
        for c in chunk.choices:
            assert finish[c.index] is None, "a chunk after the finishing one"
            text[c.index] += c.text
            ids[c.index] += c.token_ids
            finish[c.index] = c.finish_reason
    for i, w in enumerate(want):
        assert ids[i] == w.outputs[0].token_ids
        assert text[i] == w.outputs[0].text
        assert finish[i] == "length"
    assert usage is not None and usage.completion_tokens == 40


def test_token_id_prompts(client, offline):
    want = offline.generate([{"prompt_token_ids": [5, 6, 7, 8]},
                             {"prompt_token_ids": [100, 200]}], greedy(8), use_tqdm=False)
    resp = client.completions.create(model=MODEL, prompt=[[5, 6, 7, 8], [100, 200]],
                                     max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    assert [c.token_ids for c in resp.choices] == [w.outputs[0].token_ids for w in want]
    single = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=8,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert single.choices[0].text == want[0].outputs[0].text
    assert single.usage.prompt_tokens == 4


def test_chat_matches_offline(client, offline):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France?"}]
    want = offline.chat(messages, greedy(16), use_tqdm=False)[0]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                          temperature=0, extra_body={"ignore_eos": True,
                                                                     "return_token_ids": True})
    c = resp.choices[0]
    assert c.message.role == "assistant"
    assert c.message.content == want.outputs[0].text
    assert c.token_ids == want.outputs[0].token_ids
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
    assert resp.usage.completion_tokens == 16

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert not any("role" in ch.choices[0].delta.model_fields_set for ch in chunks[1:]
                   if ch.choices)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want.outputs[0].text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == 16


def test_chat_max_tokens_defaults_to_rest_of_context(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0,
        extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.total_tokens == MAX_LEN


def test_truncate_prompt_tokens(client, offline):
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens run, as offline."""
    prompt = "The quick brown fox jumps over the lazy dog"
    want = offline.generate([prompt], greedy(6, truncate_prompt_tokens=4),
                            use_tqdm=False)[0]
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True,
                                                 "truncate_prompt_tokens": 4})
    ids = offline.get_tokenizer().encode(prompt, add_special_tokens=False)
    assert resp.choices[0].prompt_token_ids == ids[-4:] == want.prompt_token_ids
    assert resp.choices[0].token_ids == want.outputs[0].token_ids
    assert resp.usage.prompt_tokens == 4


def test_stop_strings_and_seed(client, offline):
    base = offline.generate(["The quick brown fox"], greedy(24), use_tqdm=False)[0].outputs[0]
    stop = base.text[len(base.text) // 2:][:3]
    want = offline.generate(["The quick brown fox"], greedy(24, stop=[stop]),
                            use_tqdm=False)[0].outputs[0]
    resp = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=24,
                                     temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "stop" == want.finish_reason
    assert resp.choices[0].text == want.text and stop not in want.text
    # A seed makes sampling reproducible, and equal to the offline API's.
    sp = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    want = offline.generate(["Tell me a story"], sp, use_tqdm=False)[0].outputs[0]
    for _ in range(2):
        resp = client.completions.create(model=MODEL, prompt="Tell me a story", max_tokens=12,
                                         temperature=1.0, seed=1234,
                                         extra_body={"ignore_eos": True})
        assert resp.choices[0].text == want.text


def test_logprobs(client, offline):
    want = offline.generate(["Hello there"], greedy(6, logprobs=3), use_tqdm=False)[0].outputs[0]
    resp = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6,
                                     temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset[0] == 0
    for pos, (tid, got) in enumerate(zip(want.token_ids, lp.token_logprobs)):
        assert got == pytest.approx(want.logprobs[pos][tid].logprob, abs=1e-4)
        assert 3 <= len(lp.top_logprobs[pos]) <= 4
        assert max(lp.top_logprobs[pos].values()) == pytest.approx(got, abs=1e-4)  # greedy

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content


def test_echo(client):
    resp = client.completions.create(model=MODEL, prompt="Echo this", max_tokens=4,
                                     temperature=0, echo=True, extra_body={"ignore_eos": True})
    plain = client.completions.create(model=MODEL, prompt="Echo this", max_tokens=4,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert resp.choices[0].text == "Echo this" + plain.choices[0].text


# ---------------------------------------------------------------- concurrency, disconnects
def test_32_concurrent_streams(server, offline):
    n, max_tokens = 32, 24
    prompts = [f"Request number {i} says" for i in range(n)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens, ignore_eos=True)
              for i in range(n)]
    want = offline.generate(prompts, params, use_tqdm=False)
    steps0 = metrics(server)["fullgraph:engine_steps_total"]

    async def one(client: openai.AsyncOpenAI, i: int):
        stream = await client.completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=max_tokens, temperature=1.0, seed=i,
            stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
        ids, text, finish = [], "", None
        async for chunk in stream:
            for c in chunk.choices:
                ids += c.token_ids
                text += c.text
                finish = c.finish_reason
        return ids, text, finish

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused",
                                      timeout=TIMEOUT, max_retries=0) as client:
            return await asyncio.wait_for(
                asyncio.gather(*[one(client, i) for i in range(n)]), TIMEOUT)
    results = asyncio.run(main())
    for (ids, text, finish), w in zip(results, want):
        assert ids == w.outputs[0].token_ids     # none lost, none duplicated, right order
        assert text == w.outputs[0].text
        assert finish == "length"
    steps = metrics(server)["fullgraph:engine_steps_total"] - steps0
    assert steps < n * max_tokens / 4, f"{steps} steps for {n} requests: not batched"


def _start_long_stream(server: str, client: httpx.Client):
    body = {"model": MODEL, "prompt": "A very long story:", "max_tokens": 480,
            "temperature": 0, "ignore_eos": True, "stream": True}
    return client.stream("POST", f"{server}/v1/completions", json=body)


def test_disconnect_mid_stream_frees_blocks(server):
    before, aborts_before = metrics(server), success_by_reason(server)["abort"]
    with httpx.Client(timeout=TIMEOUT) as http:
        with _start_long_stream(server, http) as resp:
            assert resp.status_code == 200
            # Not `for ... break`: closing the line iterator closes the connection.
            lines = resp.iter_lines()
            data = [line for line in (next(lines) for _ in range(6)) if line]
            assert len(data) == 3 and all(d.startswith("data: {") for d in data)
            assert metrics(server)["fullgraph:num_requests_running"] == 1
            assert metrics(server)["fullgraph:kv_cache_usage_perc"] > 0
    # Closing the connection aborts the request and frees its blocks.
    assert wait_for(lambda: metrics(server)["fullgraph:request_aborted_total"]
                    == before["fullgraph:request_aborted_total"] + 1)
    after = metrics(server)
    assert after["fullgraph:num_requests_running"] == 0
    assert after["fullgraph:kv_cache_usage_perc"] == 0
    assert after["fullgraph:num_free_blocks"] == after["fullgraph:num_blocks"]
    made = after["fullgraph:generation_tokens_total"] - before["fullgraph:generation_tokens_total"]
    assert made < 480
    assert success_by_reason(server)["abort"] == aborts_before + 1


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_disconnect_non_streamed_request_aborts(server_process, endpoint):
    server = server_process.url
    log_before = server_process.log.read_text()
    before, aborts_before = metrics(server), success_by_reason(server)["abort"]
    body = {"model": MODEL, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    if endpoint == "completions":
        body["prompt"] = "Another long story:"
    else:
        body["messages"] = [{"role": "user", "content": "Tell me a long story"}]
    # The client gives up long before 400 tokens (about a second here) are generated.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/{endpoint}", json=body, timeout=httpx.Timeout(5, read=0.05))
    aborted = before["fullgraph:request_aborted_total"] + 1
    assert wait_for(lambda: metrics(server)["fullgraph:request_aborted_total"] == aborted)
    after = metrics(server)
    assert after["fullgraph:num_requests_running"] == 0
    assert after["fullgraph:kv_cache_usage_perc"] == 0
    assert after["fullgraph:num_free_blocks"] == after["fullgraph:num_blocks"]
    made = after["fullgraph:generation_tokens_total"] - before["fullgraph:generation_tokens_total"]
    assert made < 400
    assert success_by_reason(server)["abort"] == aborts_before + 1
    # The handler saw the disconnect and returned quietly: nothing was logged for it (a
    # result read before the cancelled task finished logged InvalidStateError here).
    new_log = server_process.log.read_text()[len(log_before):]
    assert "Traceback" not in new_log and "InvalidStateError" not in new_log, new_log


# ---------------------------------------------------------------- bad input
BAD_COMPLETIONS = [
    ({"temperature": -1}, 400, "temperature", "temperature"),
    ({"top_p": 1.5}, 400, "top_p", "top_p"),
    ({"max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ({"n": 0}, 400, "n", "n must be at least 1"),
    ({"n": 33}, 400, "n", "exceeds max_num_seqs"),
    ({"logprobs": 50}, 400, "logprobs", "max_logprobs"),
    ({"temperature": "hot"}, 400, "temperature", "temperature"),
    ({"presence_penalty": 2.5}, 400, "presence_penalty", "[-2, 2]"),
    ({"logit_bias": {"100000": 5}}, 400, "logit_bias", "outside the vocabulary"),
    ({"extra_body": {"repetition_penalty": 0}}, 400, "repetition_penalty", "> 0"),
    ({"extra_body": {"min_tokens": 10}}, 400, "min_tokens", "max_tokens"),
    ({"extra_body": {"prompt_logprobs": 99}}, 400, "prompt_logprobs", "max_logprobs"),
    ({"extra_body": {"top_k": -5}}, 400, "top_k", "top_k"),
    ({"model": "gpt-4"}, 404, "model", "gpt-4"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": [1, 2, 10**6]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": [7] * 600}, 400, "prompt", "600"),
    ({"prompt": [7] * 100, "max_tokens": 450}, 400, "max_tokens", "512"),
    ({"prompt": {"text": 1}}, 400, "prompt", "prompt must be"),
    ({"seed": 2**64}, 400, "seed", "seed"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", "stream=true"),
    ({"suffix": "tail"}, 400, "suffix", "not supported"),
    # vLLM's structured output: refused, not ignored (the text would be unconstrained)
    ({"extra_body": {"guided_json": {"type": "object"}}}, 400, "guided_json", "not supported"),
    ({"extra_body": {"structured_outputs": {"regex": "a+"}}}, 400, "structured_outputs",
     "not supported"),
]


@pytest.mark.parametrize("override,status,param,needle", BAD_COMPLETIONS,
                         ids=[str(i) for i in range(len(BAD_COMPLETIONS))])
def test_bad_completion_requests(client, override, status, param, needle):
    kwargs = {"model": MODEL, "prompt": "hello", "max_tokens": 4, **override}
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**kwargs)
    err = info.value
    assert err.status_code == status
    body = err.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error"
    assert body["param"] == param
    assert needle in body["message"]
    if "max_tokens" in override and "prompt" in override:
        assert "100" in body["message"] and "450" in body["message"]    # names both numbers
    if status == 404:
        assert body["code"] == "model_not_found"


BAD_CHAT = [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": "nope"}, 404, "model"),
    ({"n": 0}, 400, "n"),
    ({"max_tokens": 1000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ({"guided_choice": ["yes", "no"]}, 400, "guided_choice"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
]


@pytest.mark.parametrize("override,status,param", BAD_CHAT,
                         ids=[str(i) for i in range(len(BAD_CHAT))])
def test_bad_chat_requests(server, override, status, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            **override}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["message"]


@pytest.mark.parametrize("raw", [b'{"model": "tiny-qwen3", "prompt": "hi",', b"[1, 2]",
                                 b"not json at all", b'{"prompt": "hi", "temperature": NaN}',
                                 b'{"prompt": "hi", "top_p": Infinity}'])
def test_malformed_json(server, raw):
    r = httpx.post(f"{server}/v1/completions", content=raw, timeout=TIMEOUT,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]


def test_unknown_route_and_server_keeps_serving(server, client):
    r = httpx.get(f"{server}/v1/nothing-here", timeout=TIMEOUT)
    assert r.status_code == 404 and "/v1/nothing-here" in r.json()["error"]["message"]
    # After all the bad input above, nothing is left behind and good requests still work.
    assert wait_for(lambda: metrics(server)["fullgraph:num_requests_running"] == 0)
    resp = client.completions.create(model=MODEL, prompt="still alive?", max_tokens=3,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 3
    assert httpx.get(f"{server}/health", timeout=5).status_code == 200


@pytest.mark.parametrize("top,needle", [(EngineArgs().max_logprobs + 1, "max_logprobs"),
                                         (-1, ">= 0")])
def test_chat_top_logprobs_errors_name_top_logprobs(client, top, needle):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, logprobs=True, top_logprobs=top)
    err = info.value.response.json()["error"]
    assert err["param"] == "top_logprobs"
    assert f"top_logprobs={top}" in err["message"] or f"got {top}" in err["message"]
    assert "top_logprobs" in err["message"] and needle in err["message"]


# ---------------------------------------------------------------- /tokenize, /detokenize, probes
def post(server: str, path: str, body) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, timeout=TIMEOUT)


def test_ping_and_version(server):
    for method in ("GET", "POST"):
        r = httpx.request(method, f"{server}/ping", timeout=5)
        assert r.status_code == 200, method
    assert httpx.put(f"{server}/ping", timeout=5).status_code == 405
    r = httpx.get(f"{server}/version", timeout=5)
    assert r.status_code == 200 and r.json() == {"version": fullgraph.__version__}


def test_tokenize_prompt_matches_completions(server, client, offline):
    prompt = "Tokenize me, please: héllo wörld 123"
    r = post(server, "/tokenize", {"prompt": prompt})
    assert r.status_code == 200
    got = r.json()
    gen = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                    extra_body={"return_token_ids": True})
    assert got["tokens"] == gen.choices[0].prompt_token_ids       # what generation runs
    assert got["count"] == len(got["tokens"]) == gen.usage.prompt_tokens
    assert got["max_model_len"] == MAX_LEN and got["token_strs"] is None
    strs = post(server, "/tokenize", {"model": MODEL, "prompt": prompt,
                                      "return_token_strs": True}).json()
    assert strs["tokens"] == got["tokens"]
    assert strs["token_strs"] == offline.get_tokenizer().convert_ids_to_tokens(got["tokens"])
    r = post(server, "/detokenize", {"model": MODEL, "tokens": got["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": prompt}
    # The vocabulary's last id is accepted, the next one is not.
    vocab = client.models.list().data[0].vocab_size
    assert post(server, "/detokenize", {"tokens": [vocab - 1]}).status_code == 200
    r = post(server, "/detokenize", {"tokens": [5, vocab]})
    assert r.status_code == 400
    assert f"tokens[1] = {vocab} is outside" in r.json()["error"]["message"]


def test_tokenize_chat_matches_chat_completions(server, client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"}]
    got = post(server, "/tokenize", {"messages": messages}).json()
    assert post(server, "/tokenize", {"messages": messages, "prompt": None}).json() == got
    gen = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                         extra_body={"return_token_ids": True})
    assert got["tokens"] == gen.prompt_token_ids
    assert got["count"] == gen.usage.prompt_tokens
    # Without the generation prompt: the same conversation without the assistant header.
    bare = post(server, "/tokenize", {"messages": messages,
                                      "add_generation_prompt": False}).json()["tokens"]
    assert 0 < len(bare) < len(got["tokens"]) and got["tokens"][:len(bare)] == bare
    # continue_final_message leaves the last (assistant) message open.
    prefill = [*messages, {"role": "assistant", "content": "Hello"}]
    texts = {}
    for cont in (False, True):
        ids = post(server, "/tokenize", {"messages": prefill, "add_generation_prompt": False,
                                         "continue_final_message": cont}).json()["tokens"]
        texts[cont] = post(server, "/detokenize", {"tokens": ids}).json()["prompt"]
    assert texts[True].endswith("Hello") and not texts[False].endswith("Hello")
    assert texts[False].startswith(texts[True])


def test_tokenize_while_generating(server, offline):
    """The event loop tokenizes while the engine thread decodes a stream with the same
    tokenizer (`ServerState.tokenizer` says why that is safe)."""
    tok = offline.get_tokenizer()
    texts = [f"Sentence {i} is {'quite ' * i}long." for i in range(48)]
    body = {"model": MODEL, "prompt": "Go on:", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}

    async def main():
        async with httpx.AsyncClient(base_url=server, timeout=TIMEOUT) as http:
            async def generate() -> int:
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    return sum([len(json.loads(line[6:])["choices"][0]["token_ids"])
                                async for line in r.aiter_lines()
                                if line.startswith("data: {")])

            async def round_trip(text: str) -> tuple[list[int], str]:
                await asyncio.sleep(0.01)
                ids = (await http.post("/tokenize", json={"prompt": text})).json()["tokens"]
                back = (await http.post("/detokenize", json={"tokens": ids})).json()["prompt"]
                return ids, back
            return await asyncio.gather(generate(), *[round_trip(t) for t in texts])
    generated, *results = asyncio.run(main())
    assert generated == 200
    for text, (ids, back) in zip(texts, results):
        assert ids == tok.encode(text) and back == text


USER = {"role": "user", "content": "hi"}
BAD_TOKENIZE = [
    ({}, 400, "prompt", "prompt (text) or messages (chat)"),
    ({"prompt": None}, 400, "prompt", "prompt (text) or messages (chat)"),
    ({"prompt": ""}, 400, "prompt", "at least 1"),
    ({"prompt": 5}, 400, "prompt", "string"),
    ({"prompt": ["a", "b"]}, 400, "prompt", "string"),
    ({"prompt": "hi", "messages": [USER]}, 400, "messages", "not both"),
    ({"prompt": "hi", "add_special_tokens": "yes"}, 400, "add_special_tokens", "boolean"),
    ({"prompt": "hi", "return_token_strs": 1}, 400, "return_token_strs", "boolean"),
    ({"prompt": "hi", "model": "nope"}, 404, "model", "nope"),
    ({"messages": []}, 400, "messages", "at least 1"),
    ({"messages": "hi"}, 400, "messages", "list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages",
     "image_url"),
    ({"messages": [USER], "add_special_tokens": True}, 400, "add_special_tokens",
     "not supported"),
    ({"messages": [USER], "continue_final_message": True}, 400, "continue_final_message",
     "Cannot set both"),
    ({"messages": [USER], "chat_template_kwargs": "x"}, 400, "chat_template_kwargs",
     "dictionary"),
]
BAD_DETOKENIZE = [
    ({}, 400, "tokens", "required"),
    ({"tokens": []}, 400, "tokens", "at least 1"),
    ({"tokens": [1, 10**6]}, 400, "tokens", "outside the vocabulary"),
    ({"tokens": [-1]}, 400, "tokens", "outside the vocabulary"),
    ({"tokens": ["1"]}, 400, "tokens", "integer"),
    ({"tokens": [1.5]}, 400, "tokens", "integer"),
    ({"tokens": [True]}, 400, "tokens", "integer"),
    ({"tokens": "1 2"}, 400, "tokens", "list"),
    ({"tokens": [1], "model": "nope"}, 404, "model", "nope"),
]


@pytest.mark.parametrize("path,body,status,param,needle",
                         [("/tokenize", *case) for case in BAD_TOKENIZE]
                         + [("/detokenize", *case) for case in BAD_DETOKENIZE],
                         ids=[f"tokenize-{i}" for i in range(len(BAD_TOKENIZE))]
                         + [f"detokenize-{i}" for i in range(len(BAD_DETOKENIZE))])
def test_bad_tokenizer_requests(server, path, body, status, param, needle):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert param in err["message"] and needle in err["message"], err["message"]


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
@pytest.mark.parametrize("raw", [b"[1, 2]", b"not json", b'{"prompt": "hi",'])
def test_tokenizer_endpoints_malformed_json(server, path, raw):
    r = httpx.post(f"{server}{path}", content=raw, timeout=TIMEOUT,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]


# ---------------------------------------------------------------- metrics
def test_metrics_parse(server, client):
    client.completions.create(model=MODEL, prompt="metrics please", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    m = metrics(server)
    fams = m["__families__"]
    for name in ["fullgraph:num_requests_running", "fullgraph:num_requests_waiting",
                 "fullgraph:kv_cache_usage_perc", "fullgraph:prompt_tokens",
                 "fullgraph:generation_tokens", "fullgraph:time_to_first_token_seconds",
                 "fullgraph:inter_token_latency_seconds", "fullgraph:cudagraph_replays",
                 "fullgraph:eager_fallbacks", "fullgraph:request_success"]:
        assert name in fams, name
    assert fams["fullgraph:time_to_first_token_seconds"].type == "histogram"
    assert m["fullgraph:time_to_first_token_seconds_count"] >= 1
    assert m["fullgraph:inter_token_latency_seconds_count"] >= 4
    assert m["fullgraph:generation_tokens_total"] >= 5
    assert m["fullgraph:engine_steps_total"] > 0
    if torch.cuda.is_available():   # steps replay captured graphs
        assert m["fullgraph:cudagraph_replays_total"] > 0
    else:   # eager by configuration: nothing captured, so no replays and no "fallbacks"
        assert m["fullgraph:cudagraph_replays_total"] == m["fullgraph:eager_fallbacks_total"] == 0
    reasons = success_by_reason(server)
    assert set(reasons) == {"stop", "length", "abort"}
    assert reasons["length"] >= 1
    assert reasons["abort"] == m["fullgraph:request_aborted_total"]    # the engine's count


def test_request_phase_metrics(server, client):
    """vLLM's per-request histograms: queue, prefill, decode and inference time from the
    engine's timestamps (inference = prefill + decode), prompt and generated token counts;
    one finished request adds one observation to each."""
    phases = ["queue", "prefill", "decode", "inference"]
    names = [f"fullgraph:request_{p}_time_seconds" for p in phases] + [
        "fullgraph:request_prompt_tokens", "fullgraph:request_generation_tokens"]
    before = metrics(server)
    client.completions.create(model=MODEL, prompt=list(range(10, 17)), max_tokens=5,
                              temperature=0, extra_body={"ignore_eos": True})
    after = metrics(server)
    for name in names:
        assert after["__families__"][name].type == "histogram", name
    delta = {name: (after[f"{name}_count"] - before.get(f"{name}_count", 0),
                    after[f"{name}_sum"] - before.get(f"{name}_sum", 0)) for name in names}
    assert all(count == 1 for count, _ in delta.values()), delta
    assert delta["fullgraph:request_prompt_tokens"][1] == 7
    assert delta["fullgraph:request_generation_tokens"][1] == 5
    queue, prefill, decode, inference = (delta[n][1] for n in names[:4])
    assert queue >= 0 and prefill > 0 and decode > 0
    assert inference == pytest.approx(prefill + decode, abs=1e-6)


@pytest.mark.parametrize("load", [["--concurrency", "4"], ["--request-rate", "200"]])
def test_bench_serve(server, tmp_path, load):
    import argparse

    from fullgraph.entrypoints.bench import serve as bench
    parser = argparse.ArgumentParser()
    bench.add_args(parser)
    ns = parser.parse_args(["--base-url", server, "--num-prompts", "8", "--input-len", "16",
                            "--output-len", "8", "--out", str(tmp_path), *load])
    assert bench.main(ns) == 0
    report = json.loads((tmp_path / "bench_serve.json").read_text())
    assert report["completed"] == 8 and report["failed"] == 0, report["errors"]
    assert report["model"] == MODEL
    assert report["total_output_tokens"] == 8 * 8
    assert report["total_input_tokens"] == 8 * 16
    for key in ["ttft_s", "itl_s", "e2e_s"]:
        assert report[key]["p50"] <= report[key]["p99"]
    assert report["output_throughput_tok_s"] > 0
    assert (tmp_path / "bench_serve.png").stat().st_size > 1000


def test_server_log_has_no_tracebacks(server_process):
    """After every request above (bad ones, disconnects, concurrent streams) the server
    logged no traceback."""
    log = server_process.log.read_text()
    assert "Traceback" not in log and "Task was destroyed" not in log, log


@pytest.fixture(scope="module")
def inproc():
    """A second server, uvicorn in a thread of this process, with an API key and an engine
    the test can break."""
    from conftest import served
    from fullgraph.engine.args import EngineArgs
    from fullgraph.engine.async_engine import AsyncLLMEngine
    from fullgraph.engine.engine import LLMEngine

    engine = AsyncLLMEngine(LLMEngine.from_engine_args(EngineArgs(model=MODEL, **ENGINE_KW)))
    with served(engine, api_key="sesame") as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        yield engine, http


AUTH = {"Authorization": "Bearer sesame"}


def test_api_key(inproc):
    _, http = inproc
    r = http.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert http.get("/v1/models", headers=AUTH).status_code == 200
    for path, body in [("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5]})]:
        r = http.post(path, json=body)        # behind the key, as in vLLM
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert http.post(path, json=body, headers=AUTH).status_code == 200, path
    for path in ["/health", "/metrics", "/ping", "/version"]:     # probes need no key
        assert http.get(path).status_code == 200, path
    assert http.post("/ping").status_code == 200
    # the key before the body (vLLM's middleware order): a malformed body without it is a 401
    for path in ["/v1/completions", "/v1/chat/completions", "/tokenize",
                 "/update_weights_from_disk", "/reset_prefix_cache"]:
        r = http.post(path, content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    r = http.post("/v1/completions", content=b"{not json", headers=AUTH)
    assert r.status_code == 400


def test_prompts_are_prepared_off_the_engine_thread(inproc, monkeypatch):
    """Completions' text prompts are tokenized and chat prompts rendered in worker threads:
    a megabytes-long prompt tokenized on the engine thread held up every running request."""
    import threading
    engine, http = inproc
    seen = []
    for name in ("tokenize", "chat_prompt"):
        real = getattr(engine.engine, name)

        def spy(*args, real=real, **kwargs):
            seen.append(threading.current_thread())
            return real(*args, **kwargs)
        monkeypatch.setattr(engine.engine, name, spy)
    body = {"model": MODEL, "max_tokens": 2, "ignore_eos": True}
    r = http.post("/v1/completions", json=body | {"prompt": "hi there"}, headers=AUTH)
    assert r.status_code == 200
    r = http.post("/v1/chat/completions", headers=AUTH,
                  json=body | {"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert len(seen) == 2 and engine._thread not in seen


def test_request_success_counts_what_the_engine_finished(inproc):
    """request_success_total{stop, length} are the engine's counts: a request that finishes
    while nobody reads its outputs (its client leaving as it ends) is counted too, and stop +
    length = request_finished_total."""
    from fullgraph.engine.async_engine import GenerationItem
    engine, http = inproc

    def counts() -> tuple[dict[str, float], float]:
        fams = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
        total = [s.value for s in fams["fullgraph:request_finished"].samples
                 if s.name.endswith("_total")][0]
        return {s.labels["finished_reason"]: s.value
                for s in fams["fullgraph:request_success"].samples
                if s.name.endswith("_total")}, total

    before, finished = counts()

    async def unread():
        """Submit and never read the stream (its outputs wait on this blocked loop)."""
        await engine.submit([GenerationItem("unread", [5, 6, 7], SamplingParams(
            max_tokens=3, ignore_eos=True))])
        deadline = time.monotonic() + TIMEOUT
        while counts()[1] == finished and time.monotonic() < deadline:
            time.sleep(0.05)
        return counts()

    after, total = asyncio.run(unread())
    assert total == finished + 1
    assert after["length"] == before["length"] + 1 and after["stop"] == before["stop"]
    assert after["stop"] + after["length"] == total


def test_step_error_is_reported_and_server_survives(inproc, monkeypatch):
    engine, http = inproc

    def broken_step():
        raise RuntimeError("simulated device failure")
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "ignore_eos": True}
    monkeypatch.setattr(engine.engine, "step", broken_step)
    r = http.post("/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and "simulated device failure" in err["message"]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True},
                     headers=AUTH) as resp:
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert "simulated device failure" in json.loads(events[-2][6:])["error"]["message"]
    assert events[-1] == "data: [DONE]"
    monkeypatch.undo()
    r = http.post("/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert http.get("/health").status_code == 200
    # The engine thread publishes its snapshot just after it hands out the outputs.
    assert wait_for(lambda: engine.snapshot.kv_usage == 0 == engine.snapshot.num_running)
    assert engine.snapshot.step_errors == 2


def test_nan_logprobs_are_null_not_a_500(inproc):
    """Broken weights (a NaN norm: what a diverged RL policy loads) give NaN logprobs; a
    response writes them as null, as the stream's chunks do, instead of failing with a 500
    (the standard library's JSON encoder refuses NaN)."""
    engine, http = inproc
    norm = engine.engine.runner.model.model.norm.weight
    saved = norm.detach().clone()
    norm.data.fill_(float("nan"))
    try:
        r = http.post("/v1/completions", headers=AUTH, json={
            "model": MODEL, "prompt": "hi", "max_tokens": 2, "logprobs": 1, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["logprobs"]["token_logprobs"] == [None, None]
        r = http.post("/v1/chat/completions", headers=AUTH, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "logprobs": True, "top_logprobs": 1, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert [c["logprob"] for c in r.json()["choices"][0]["logprobs"]["content"]] == [None] * 2
    finally:
        norm.data.copy_(saved)


# ---------------------------------------------------------------- `fullgraph serve` arguments
def test_serve_model_positional_or_flag():
    import argparse

    from fullgraph.entrypoints.cli import build_parser
    from fullgraph.entrypoints.server import cli as serve_cli

    def parse(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        serve_cli.add_serve_args(parser)
        return parser.parse_args(argv)

    def model(*argv: str) -> str:
        ns = parse(*argv)
        serve_cli.resolve_model(ns)
        return ns.model

    assert model("some/dir") == "some/dir"                   # as `vllm serve MODEL`
    assert model("--port", "9000", "some/dir", "--max-num-seqs", "4") == "some/dir"
    assert model("--model", "some/dir") == "some/dir"
    assert model("same", "--model", "same") == "same"
    assert model() == EngineArgs().model
    with pytest.raises(ValueError, match=r"'a' \(positional MODEL\) and 'b' \(--model\)"):
        model("a", "--model", "b")
    # `fullgraph serve MODEL`; main resolves the model before it loads anything.
    ns = build_parser().parse_args(["serve", "some/dir"])
    assert ns.func is serve_cli.main and ns.model_tag == "some/dir"
    with pytest.raises(ValueError, match="two models given"):
        serve_cli.main(parse("a", "--model", "b"))


def test_unset_fields_take_the_models_recommended_sampling():
    """Fields a request leaves out come from the model's generation_config.json
    (`--generation-config`), as vLLM's server does; fields it sends win."""
    from types import SimpleNamespace

    from fullgraph.entrypoints.server.protocol import ChatCompletionRequest
    from fullgraph.entrypoints.server.serving import sampling_params
    model = SimpleNamespace(sampling_defaults=(("temperature", 0.6), ("top_k", 20),
                                               ("top_p", 0.95)))
    state = SimpleNamespace(engine=SimpleNamespace(config=SimpleNamespace(model=model)))
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], top_p=0.5)
    sp = sampling_params(state, body, None, None)
    assert (sp.temperature, sp.top_k, sp.top_p) == (0.6, 20, 0.5)
    model.sampling_defaults = ()
    sp = sampling_params(state, body, None, None)
    assert (sp.temperature, sp.top_k, sp.top_p) == (1.0, -1, 0.5)
    assert sp.max_tokens is None        # chat's default: the rest of the context


def test_n_samples_per_prompt(client, offline):
    """Completions: prompt i's sample j is choice i * n + j, each equal to the offline API's
    sample; the prompt is counted once in usage. Chat streams its n choices by index."""
    sp = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    prompts = ["The cat", "Hello there"]
    want = offline.generate(prompts, sp, use_tqdm=False)
    resp = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6,
                                     temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [c.text for o in want for c in o.outputs]
    assert resp.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in want)
    assert resp.usage.completion_tokens == 4 * 6
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=5,
              temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    streamed = {0: "", 1: "", 2: ""}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[i] for i in range(3)] == [c.message.content for c in whole.choices]


def test_penalties_bias_and_min_p_match_offline(client, offline):
    fields = dict(presence_penalty=0.8, frequency_penalty=0.5, logit_bias={"42": 4.0})
    extra = dict(repetition_penalty=1.3, min_p=0.05, ignore_eos=True)
    sp = SamplingParams(temperature=0.9, seed=3, max_tokens=8,
                        logit_bias={42: 4.0}, presence_penalty=0.8, frequency_penalty=0.5,
                        repetition_penalty=1.3, min_p=0.05, ignore_eos=True)
    want = offline.generate(["The quick brown fox"], sp, use_tqdm=False)[0].outputs[0]
    resp = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=8,
                                     temperature=0.9, seed=3, extra_body=extra, **fields)
    assert resp.choices[0].text == want.text


def test_echo_with_logprobs_scores_the_prompt(client, offline):
    """echo + logprobs: the prompt's tokens with their logprobs (None first), then the
    completion's, as OpenAI and vLLM return them."""
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2,
                        prompt_logprobs=2)
    want = offline.generate(["Once upon a time"], sp, use_tqdm=False)[0]
    resp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4,
                                     temperature=0, echo=True, logprobs=2,
                                     extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    n_prompt = len(want.prompt_token_ids)
    assert len(lp.tokens) == n_prompt + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = [e[t].logprob for t, e in zip(want.prompt_token_ids[1:],
                                             want.prompt_logprobs[1:])]
    assert lp.token_logprobs[1:n_prompt] == pytest.approx(expected, abs=1e-5)
    # each echoed position's top_logprobs holds its prompt token (vLLM's), as a generated
    # position holds its sample, beside the top 2
    for i in range(1, len(lp.tokens)):
        assert lp.top_logprobs[i][lp.tokens[i]] == lp.token_logprobs[i]
        assert 2 <= len(lp.top_logprobs[i]) <= 3
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset)
    # the vLLM field: prompt_logprobs on the choice
    raw = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=1,
                                    extra_body={"prompt_logprobs": 2})
    plp = raw.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == n_prompt
    assert plp[1][str(want.prompt_token_ids[1])]["logprob"] == pytest.approx(expected[0],
                                                                              abs=1e-5)


# ---------------------------------------------------------------- scoring, streaming extras
def _prompt_ids(server: str, text: str) -> list[int]:
    return post(server, "/tokenize", {"prompt": text}).json()["tokens"]


def _reference_prompt_logprobs(client, ids: list[int]) -> list[float]:
    """The logprobs of ids[1:] as the `prompt_logprobs` field returns them."""
    ref = client.completions.create(model=MODEL, prompt=ids, max_tokens=1,
                                    extra_body={"prompt_logprobs": 0})
    plp = ref.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    return [e[str(t)]["logprob"] for t, e in zip(ids[1:], plp[1:])]


def test_echo_max_tokens_0_scores_the_prompt(server, client):
    """echo + max_tokens 0, the usual way to score a prompt (vLLM's echo_without_generation):
    the echoed prompt only, with the logprobs `prompt_logprobs` gives, nothing generated."""
    ids = _prompt_ids(server, "Once upon a time there was")
    expected = _reference_prompt_logprobs(client, ids)
    text = post(server, "/detokenize", {"tokens": ids}).json()["prompt"]
    resp = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True,
                                     logprobs=0, extra_body={"return_token_ids": True})
    c = resp.choices[0]
    assert c.text == text and c.finish_reason == "length"
    assert c.logprobs.token_logprobs[0] is None and len(c.logprobs.tokens) == len(ids)
    assert c.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert c.logprobs.top_logprobs[1:] == [{t: v} for t, v in zip(c.logprobs.tokens[1:],
                                                                  c.logprobs.token_logprobs[1:])]
    assert "".join(c.logprobs.tokens) == text
    assert c.model_extra["token_ids"] == [] and c.model_extra["prompt_token_ids"] == ids
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(ids), 0)
    plain = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=0,
                                      echo=True)
    assert plain.choices[0].text == "Once upon a time" and plain.choices[0].logprobs is None
    assert plain.usage.completion_tokens == 0

    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True,
                                            logprobs=0, stream=True,
                                            stream_options={"include_usage": True}))
    choices = [ch.choices[0] for ch in chunks if ch.choices]
    assert "".join(ch.text for ch in choices) == text
    assert choices[-1].finish_reason == "length"
    got = [lp for ch in choices for lp in ch.logprobs.token_logprobs]
    assert len(got) == len(ids) and got[0] is None
    assert got[1:] == pytest.approx(expected, abs=1e-5)
    assert chunks[-1].usage.completion_tokens == 0


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_0_without_echo_is_rejected(server, client, stream):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 0, "stream": stream}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "max_tokens" and "echo" in err["message"]
    resp = client.completions.create(model=MODEL, prompt="still here?", max_tokens=2,
                                     extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 2


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "hello"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
def test_stream_with_prompt_logprobs_is_rejected(server, path, body):
    """No chunk carries prompt_logprobs: a 400, as vLLM gives, not null in every chunk."""
    r = post(server, path, {"model": MODEL, "max_tokens": 2, "stream": True,
                            "prompt_logprobs": 1, **body})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "prompt_logprobs"
    assert "stream" in err["message"]
    assert post(server, path, {"model": MODEL, "max_tokens": 2, **body}).status_code == 200
    # 0 asks for none of them: accepted, as vLLM does
    assert post(server, path, {"model": MODEL, "max_tokens": 2, "stream": True,
                               "prompt_logprobs": 0, **body}).status_code == 200


def test_a_request_may_not_replace_the_chat_template(server):
    """chat_template_kwargs reach the template as variables, never as the template (vLLM
    needs --trust-request-chat-template for that); scoring with min_tokens is a 400 too."""
    r = post(server, "/v1/chat/completions", {
        "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
        "chat_template_kwargs": {"chat_template": "INJECTED {{ messages[0]['content'] }}"}})
    assert r.status_code == 400 and "chat_template" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 0,
                                         "echo": True, "min_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"


def test_stream_return_token_ids_sends_prompt_ids_first(client):
    """Each choice's first chunk carries the prompt's ids, later chunks null (vLLM's)."""
    kw = dict(model=MODEL, prompt=["The cat", "Hello there"], n=2, max_tokens=3,
              temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
    whole = client.completions.create(**kw)
    sent: dict[int, list] = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            sent.setdefault(c.index, []).append(c.model_extra["prompt_token_ids"])
    assert sorted(sent) == [0, 1, 2, 3]
    for c in whole.choices:
        assert sent[c.index][0] == c.model_extra["prompt_token_ids"]
        assert len(sent[c.index]) > 1 and all(ids is None for ids in sent[c.index][1:])

    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=3,
              temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
    want = client.chat.completions.create(**kw).model_extra["prompt_token_ids"]
    assert want
    chat: dict[int, list] = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            chat.setdefault(c.index, []).append(chunk.model_extra["prompt_token_ids"])
    assert sorted(chat) == [0, 1]
    for ids in chat.values():
        assert ids[0] == want and len(ids) > 1 and all(x is None for x in ids[1:])


# ---------------------------------------------------------------- vLLM's chat and logprobs extras
CONTINUED = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]
CONTINUE = {"add_generation_prompt": False, "continue_final_message": True}


def test_chat_continue_final_message(server, client):
    """Chat completions render continue_final_message as /tokenize does (the last message
    left open) and go on from it; with add_generation_prompt it is vLLM's 400."""
    ids = post(server, "/tokenize", {"messages": CONTINUED, **CONTINUE}).json()["tokens"]
    assert post(server, "/detokenize", {"tokens": ids}).json()["prompt"].endswith("Sure")
    resp = client.chat.completions.create(
        model=MODEL, messages=CONTINUED, max_tokens=6, temperature=0,
        extra_body={**CONTINUE, "ignore_eos": True, "return_token_ids": True})
    assert resp.prompt_token_ids == ids
    assert resp.choices[0].message.role == "assistant"
    plain = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert resp.choices[0].message.content == plain.choices[0].text
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": CONTINUED,
                                              "max_tokens": 1, "continue_final_message": True,
                                              "add_generation_prompt": True})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "continue_final_message"
    assert err["message"] == ("Cannot set both `continue_final_message` and "
                              "`add_generation_prompt` to True.")


def test_chat_echo(client):
    """echo puts the last message before the generated text when that message has the
    response's role: the assistant's after the generation prompt, else the last message's
    own (vLLM's rule), streamed or not."""
    kw = dict(model=MODEL, max_tokens=4, temperature=0)
    extra = {**CONTINUE, "ignore_eos": True}
    plain = client.chat.completions.create(messages=CONTINUED, extra_body=extra, **kw)
    echoed = client.chat.completions.create(messages=CONTINUED,
                                            extra_body={**extra, "echo": True}, **kw)
    text = echoed.choices[0].message.content
    assert text == "Sure" + plain.choices[0].message.content
    stream = client.chat.completions.create(messages=CONTINUED, stream=True,
                                            extra_body={**extra, "echo": True}, **kw)
    deltas = [ch.choices[0].delta.content for ch in stream if ch.choices]
    assert deltas[:2] == ["", "Sure"] and "".join(deltas) == text
    # After the generation prompt a last user message is not the response's role.
    user = [{"role": "user", "content": "hi"}]
    base = {"ignore_eos": True}
    want = client.chat.completions.create(messages=user, extra_body=base, **kw)
    got = client.chat.completions.create(messages=user, extra_body={**base, "echo": True}, **kw)
    assert got.choices[0].message.content == want.choices[0].message.content
    # Without it the response has the last message's role, so that message is echoed.
    base["add_generation_prompt"] = False
    want = client.chat.completions.create(messages=user, extra_body=base, **kw)
    got = client.chat.completions.create(messages=user, extra_body={**base, "echo": True}, **kw)
    assert got.choices[0].message.role == want.choices[0].message.role == "user"
    assert got.choices[0].message.content == "hi" + want.choices[0].message.content


def test_return_tokens_as_token_ids(client):
    """return_tokens_as_token_ids names logprobs' tokens "token_id:{id}" (vLLM's), in
    top_logprobs too, streamed or not; logprobs, text and text offsets stay as they were."""
    extra = {"ignore_eos": True, "return_token_ids": True}
    kw = dict(model=MODEL, prompt="Hello there", max_tokens=5, temperature=0, logprobs=2,
              echo=True)
    plain = client.completions.create(extra_body=extra, **kw).choices[0]
    as_ids = {**extra, "return_tokens_as_token_ids": True}
    c = client.completions.create(extra_body=as_ids, **kw).choices[0]
    ids = c.model_extra["prompt_token_ids"] + c.model_extra["token_ids"]
    lp = c.logprobs
    assert lp.tokens == [f"token_id:{t}" for t in ids]
    assert c.text == plain.text and lp.text_offset == plain.logprobs.text_offset
    assert lp.token_logprobs == plain.logprobs.token_logprobs
    assert lp.top_logprobs[0] is None
    for top, want in zip(lp.top_logprobs[1:], plain.logprobs.top_logprobs[1:]):
        assert all(k.startswith("token_id:") for k in top)
        assert set(want.values()) <= set(top.values())
    n_prompt = len(c.model_extra["prompt_token_ids"])
    for token, got, top in zip(lp.tokens[n_prompt:], lp.token_logprobs[n_prompt:],
                               lp.top_logprobs[n_prompt:]):
        assert top[token] == got == max(top.values())     # greedy: the sampled is the top
    streamed = [t for ch in client.completions.create(stream=True, extra_body=as_ids, **kw)
                for t in ch.choices[0].logprobs.tokens]
    assert streamed == lp.tokens

    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
              temperature=0, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(extra_body=extra, **kw).choices[0]
    c = client.chat.completions.create(extra_body=as_ids, **kw).choices[0]
    content = c.logprobs.content
    assert [t.token for t in content] == [f"token_id:{t}" for t in c.model_extra["token_ids"]]
    assert [t.top_logprobs[0].token for t in content] == [t.token for t in content]  # greedy
    assert all(len(t.top_logprobs) == 2 for t in content)
    assert all(x.token.startswith("token_id:") for t in content for x in t.top_logprobs)
    # bytes stay the token text's; the logprobs are unchanged
    assert [t.bytes for t in content] == [t.bytes for t in plain.logprobs.content]
    assert [t.logprob for t in content] == [t.logprob for t in plain.logprobs.content]
    streamed = [t.token for ch in client.chat.completions.create(stream=True, extra_body=as_ids,
                                                                 **kw)
                if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert streamed == [t.token for t in content]


def test_continuous_usage_stats(server, client):
    """stream_options.continuous_usage_stats (with include_usage): every chunk carries its
    choice's usage so far, its prompt's tokens and the tokens it has generated (vLLM's)."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
        stream=True, stream_options=opts, extra_body={"ignore_eos": True}))
    assert all(ch.usage is not None for ch in chunks)
    final = chunks[-1].usage
    assert chunks[-1].choices == [] and final.completion_tokens == 6
    done = [ch.usage.completion_tokens for ch in chunks]
    assert done[0] == 0 and done == sorted(done) and chunks[-2].usage == final
    assert all(ch.usage.prompt_tokens == final.prompt_tokens and ch.usage.total_tokens
               == ch.usage.prompt_tokens + ch.usage.completion_tokens for ch in chunks)

    prompts = ["The cat", "Hello there, how are you"]
    chunks = list(client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=5, temperature=0, stream=True,
        stream_options=opts, extra_body={"ignore_eos": True}))
    assert all(ch.usage is not None for ch in chunks)
    lens = [len(_prompt_ids(server, p)) for p in prompts]
    per_choice: dict[int, list] = {0: [], 1: []}
    for ch in chunks[:-1]:
        u = ch.usage
        assert u.prompt_tokens == lens[ch.choices[0].index]
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
        per_choice[ch.choices[0].index].append(u.completion_tokens)
    assert all(d == sorted(d) and d[-1] == 5 for d in per_choice.values())
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == sum(lens)
    # only with include_usage, as in vLLM
    chunks = list(client.completions.create(
        model=MODEL, prompt="The cat", max_tokens=3, temperature=0, stream=True,
        stream_options={"continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    assert chunks and all(ch.usage is None for ch in chunks)


def test_sigterm_drains_then_fails_what_is_left(tmp_path):
    """On SIGTERM the server stops accepting, gives the requests in flight --shutdown-timeout
    seconds, then stops the engine: a stream still running ends with an error event and
    [DONE] (uvicorn alone cut it off mid-message), a waiting call gets a JSON 503."""
    import signal
    import threading
    proc, url = spawn_server(tmp_path / "server.log", "--shutdown-timeout", "0")
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 500, "ignore_eos": True}
    waiting = {}
    plain = threading.Thread(target=lambda: waiting.update(
        r=httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT)))
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True},
                          timeout=TIMEOUT) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            plain.start()
            time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        plain.join(TIMEOUT)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rest[-1] == "data: [DONE]" and "error" in json.loads(rest[-2][6:]), rest[-3:]
    assert waiting["r"].status_code == 503 and "shut down" in waiting["r"].json()["error"][
        "message"]


def test_serve_freezes_what_start_up_made(monkeypatch):
    """`fullgraph serve` collects once and freezes the start-up objects before it serves, so
    Python's full collections no longer scan the model and engine (a pause for every running
    request)."""
    import gc

    import uvicorn

    from fullgraph.entrypoints.cli import build_parser
    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: seen.update(
        frozen=gc.get_freeze_count(), host=sockets[0].getsockname()[0]))
    ns = build_parser().parse_args(["serve", MODEL, "--host", "127.0.0.1", "--port", "0",
                                    "--max-num-seqs", "2", "--num-gpu-blocks-override", "16"])
    try:
        assert ns.func(ns) == 0
    finally:
        gc.unfreeze()
    assert seen["host"] == "127.0.0.1" and seen["frozen"] > 10000
