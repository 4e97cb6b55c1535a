"""Weights updated between requests, as a reinforcement-learning loop does between rollouts
(`LLM.update_weights`, `LLM.reset_prefix_cache`): an engine loaded with one checkpoint and
given another's tensors (a transformers model's state dict, whole or in part) generates what
transformers generates with those weights, under emulated graphs (the update must land in the
tensors the captured steps read) and with prefix caching on (the cached prompts' KV came from
the old weights)."""
from __future__ import annotations

import pytest
import torch

from conftest import hf_greedy, make_hf_checkpoint, make_hybrid_checkpoint
from fullgraph import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
# longer than a block, so the second run would hit the first run's cached prefix blocks
PROMPTS = [list(range(5, 45)), list(range(100, 137))]
KW = dict(max_model_len=128, max_num_seqs=4, num_gpu_blocks_override=64, block_size=16,
          enable_prefix_caching=True, cudagraph_runtime="fake",
          cudagraph_capture_sizes=[1, 2, 4])


def tokens(llm: LLM) -> list[list[int]]:
    outs = llm.generate(sampling_params=GREEDY, prompt_token_ids=PROMPTS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[str, str]:
    return (make_hf_checkpoint(str(tmp_path_factory.mktemp("old")), seed=0),
            make_hf_checkpoint(str(tmp_path_factory.mktemp("new")), seed=1))


def test_a_whole_state_dict_gives_the_new_checkpoint_tokens(checkpoints):
    from transformers import Qwen3ForCausalLM
    old, new = checkpoints
    hf_new = Qwen3ForCausalLM.from_pretrained(new, dtype=torch.float32).eval()
    llm = LLM(old, **KW)
    before = tokens(llm)
    llm.update_weights(hf_new.state_dict())
    after = tokens(llm)
    assert after == [hf_greedy(hf_new, p, GREEDY.max_tokens) for p in PROMPTS]
    assert after != before


def test_a_part_of_the_weights_and_named_parameters(checkpoints):
    """Only some tensors (layer 0's MLP and every q_proj, a shard of our merged qkv), given
    as (name, tensor) pairs that still require grad, as a trainer's parameters do."""
    from transformers import Qwen3ForCausalLM
    old, new = checkpoints
    hf_old = Qwen3ForCausalLM.from_pretrained(old, dtype=torch.float32).eval()
    hf_new = Qwen3ForCausalLM.from_pretrained(new, dtype=torch.float32)
    part = [(n, p) for n, p in hf_new.named_parameters()
            if ".layers.0.mlp." in n or "q_proj" in n]
    assert all(p.requires_grad for _, p in part)
    llm = LLM(old, **KW)
    tokens(llm)
    llm.update_weights(iter(part))
    hf_old.load_state_dict({n: p.detach() for n, p in part}, strict=False)
    assert tokens(llm) == [hf_greedy(hf_old, p, GREEDY.max_tokens) for p in PROMPTS]


def test_after_a_stop_token_under_async_scheduling(checkpoints):
    """With async scheduling the step after a request's stop token is launched before the
    stop is known; the engine reads it at once, so none is in flight when `generate`
    returns and the update runs."""
    from transformers import Qwen3ForCausalLM
    old, new = checkpoints
    hf_new = Qwen3ForCausalLM.from_pretrained(new, dtype=torch.float32).eval()
    llm = LLM(old, **KW, async_scheduling=True)
    stop = tokens(llm)[0][2]
    params = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[stop])
    out = llm.generate(sampling_params=params, prompt_token_ids=PROMPTS[:1], use_tqdm=False)
    assert out[0].outputs[0].finish_reason == "stop"
    assert llm.engine._inflight is None         # the step launched past the stop was read
    llm.update_weights(hf_new.state_dict())
    assert tokens(llm) == [hf_greedy(hf_new, p, GREEDY.max_tokens) for p in PROMPTS]


def test_bad_names_and_shapes_and_unfinished_requests_are_clear_errors(checkpoints):
    old, _ = checkpoints
    llm = LLM(old, **KW)
    before = tokens(llm)
    with pytest.raises(ValueError, match="model.layers.0.nope.weight"):
        llm.update_weights({"model.layers.0.nope.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"model.norm.weight.*\(3,\)"):
        llm.update_weights({"model.norm.weight": torch.zeros(3)})
    llm.engine.add_request("running", PROMPTS[0], GREEDY)
    with pytest.raises(ValueError, match="between requests"):
        llm.update_weights({})
    assert llm.reset_prefix_cache() is False
    llm.engine.abort_request("running")
    assert tokens(llm) == before                # nothing changed, the engine runs on
    assert llm.reset_prefix_cache() is True


def test_a_bad_update_copies_nothing(checkpoints):
    """All or nothing: the new checkpoint's tensors with a bad one last (a name the model has
    no place for, a wrong shape, not a tensor) are a ValueError naming it, and the engine
    still generates the old weights' tokens; a directory of safetensors updates too."""
    from transformers import Qwen3ForCausalLM
    old, new = checkpoints
    hf_old, hf_new = (Qwen3ForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
                      for p in (old, new))
    llm = LLM(old, **KW)
    want_old = [hf_greedy(hf_old, p, GREEDY.max_tokens) for p in PROMPTS]
    assert tokens(llm) == want_old
    state = list(hf_new.state_dict().items())
    for bad, match in [(("model.layers.0.nope.weight", torch.zeros(3)), "nope"),
                       (("model.norm.weight", torch.zeros(3)), "model.norm.weight.*shape"),
                       (("model.norm.weight", [1.0]), "model.norm.weight.*must be a tensor")]:
        with pytest.raises(ValueError, match=match):
            llm.update_weights(state + [bad])
        assert tokens(llm) == want_old
    llm.update_weights(new)
    assert tokens(llm) == [hf_greedy(hf_new, p, GREEDY.max_tokens) for p in PROMPTS]


def test_the_hybrid_zero_centered_norms_follow_their_weights(tmp_path, hf_gdn_torch_paths):
    """Qwen3.5's (1 + w) norms run from a float32 scale computed from the weight: an update
    refreshes it in place, where the emulated graphs read it."""
    from transformers import Qwen3_5ForCausalLM
    old = make_hybrid_checkpoint(str(tmp_path / "old"), seed=0)
    new = make_hybrid_checkpoint(str(tmp_path / "new"), seed=1)
    hf_new = Qwen3_5ForCausalLM.from_pretrained(new, dtype=torch.float32).eval()
    from fullgraph.layers.norm import ZeroCenteredRMSNorm
    llm = LLM(old, **{**KW, "enable_prefix_caching": False})
    tokens(llm)
    norms = [m for m in llm.engine.runner.model.modules() if isinstance(m, ZeroCenteredRMSNorm)]
    scales = [m.scale for m in norms]
    llm.update_weights(hf_new.state_dict())
    assert tokens(llm) == [hf_greedy(hf_new, p, GREEDY.max_tokens) for p in PROMPTS]
    # the GPU kernels read `scale` (CUDA graphs: at its captured address)
    assert all(m.scale is s and torch.equal(s, 1.0 + m.weight.float())
               for m, s in zip(norms, scales))


def test_the_server_updates_weights_from_disk_between_requests(checkpoints, tmp_path):
    """SGLang's /update_weights_from_disk and vLLM's /reset_prefix_cache: a request in flight
    finishes on the old weights, one sent while the update waits runs on the new ones, and a
    bad directory is a 400 that leaves the server serving."""
    import asyncio
    import json

    import httpx
    from safetensors.torch import save_file
    from transformers import Qwen3ForCausalLM

    from conftest import served
    from fullgraph.engine.args import EngineArgs
    from fullgraph.engine.async_engine import AsyncLLMEngine
    from fullgraph.engine.engine import LLMEngine
    old, new = checkpoints
    refs = {path: Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for path in (old, new)}
    kw = {k: v for k, v in KW.items() if k != "cudagraph_runtime"} | {"max_model_len": 512}
    engine = AsyncLLMEngine(LLMEngine.from_engine_args(EngineArgs(model=old, **kw)))

    def body(max_tokens: int, **more) -> dict:
        return {"model": old, "prompt": PROMPTS[0], "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True, "return_token_ids": True, **more}

    async def scenario(url: str):
        """The update is sent once the first request has streamed a token (so it is in
        flight), the last request once the update waits behind it."""
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async with client.stream("POST", "/v1/completions",
                                     json=body(400, stream=True)) as running:
                chunks = running.aiter_lines()
                streamed = []
                while not streamed:
                    line = await anext(chunks)
                    if line.startswith("data: {"):
                        streamed += json.loads(line[6:])["choices"][0]["token_ids"]
                update = asyncio.create_task(client.post("/update_weights_from_disk",
                                                         json={"model_path": new}))
                await asyncio.sleep(0.05)
                after = asyncio.create_task(client.post("/v1/completions", json=body(8)))
                async for line in chunks:
                    if line.startswith("data: {"):
                        streamed += json.loads(line[6:])["choices"][0]["token_ids"]
            return streamed, await update, await after

    async def abort_and_update(url: str):
        """An update back to the old weights with abort_all_requests, sent once a long
        request has streamed a token: (that request's token ids, then its finish reason)."""
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async with client.stream("POST", "/v1/completions",
                                     json=body(400, stream=True)) as running:
                got, update = [], None
                async for line in running.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    got += choice["token_ids"]
                    if choice["finish_reason"] is not None:
                        got.append(choice["finish_reason"])
                    elif update is None:
                        update = asyncio.create_task(client.post(
                            "/update_weights_from_disk",
                            json={"model_path": old, "abort_all_requests": True}))
            return got, await update

    with served(engine) as url:
        streamed, update, after = asyncio.run(scenario(url))
        assert update.status_code == 200 and update.json()["success"] is True
        assert streamed == hf_greedy(refs[old], PROMPTS[0], 400)
        assert after.json()["choices"][0]["token_ids"] == hf_greedy(refs[new], PROMPTS[0], 8)
        # failures in SGLang's shape; a bad tensor after a good one copies nothing
        (tmp_path / "empty").mkdir()
        (tmp_path / "bad").mkdir()
        good = refs[old].state_dict()["model.layers.0.mlp.down_proj.weight"]
        save_file({"model.layers.0.mlp.down_proj.weight": good.clone(),
                   "model.norm.weight": torch.zeros(3)}, str(tmp_path / "bad" / "w.safetensors"))
        for path, words in ((str(tmp_path / "missing"), str(tmp_path / "missing")),
                            (str(tmp_path / "empty"), str(tmp_path / "empty")),
                            (str(tmp_path / "bad"), "model.norm.weight")):
            r = httpx.post(f"{url}/update_weights_from_disk", json={"model_path": path})
            assert r.status_code == 400 and r.json()["success"] is False
            assert words in r.json()["message"]
        r = httpx.post(f"{url}/reset_prefix_cache")
        assert r.status_code == 200 and r.json() == {"success": True}
        again = httpx.post(f"{url}/v1/completions", json=body(8), timeout=120)
        assert again.json()["choices"][0]["token_ids"] == hf_greedy(refs[new], PROMPTS[0], 8)
        # SGLang's abort_all_requests: the request in flight ends as aborted, not awaited
        aborted, update = asyncio.run(abort_and_update(url))
        assert update.json()["success"] is True and aborted[-1] == "abort"
        assert 0 < len(aborted) - 1 < 400
        back = httpx.post(f"{url}/v1/completions", json=body(8), timeout=120)
        assert back.json()["choices"][0]["token_ids"] == hf_greedy(refs[old], PROMPTS[0], 8)


def test_a_tied_lm_head_alone_is_skipped_with_a_warning(checkpoints):
    """The presets tie the LM head to the embedding: `lm_head.weight` is skipped (vLLM's
    rule), which an update naming it without the embedding is told; with it, no warning."""
    import logging
    old, new = checkpoints
    llm = LLM(old, **KW)
    before = tokens(llm)
    head = torch.randn_like(llm.engine.runner.model.lm_head.weight)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("fullgraph").addHandler(handler)
    try:
        llm.update_weights({"lm_head.weight": head})
        assert tokens(llm) == before
        assert any("update embed_tokens.weight" in r.getMessage() for r in records)
        records.clear()
        llm.update_weights({"lm_head.weight": head, "model.embed_tokens.weight": head})
        assert not records and tokens(llm) != before
    finally:
        logging.getLogger("fullgraph").removeHandler(handler)
