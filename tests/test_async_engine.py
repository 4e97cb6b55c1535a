"""AsyncLLMEngine: one engine thread, asyncio callers; no HTTP here."""
from __future__ import annotations

import asyncio
import time

import pytest

from fullgraph import LLM, SamplingParams
from fullgraph.engine.args import EngineArgs
from fullgraph.engine.async_engine import (AsyncLLMEngine, ChatPrompt, EngineError,
                                           GenerationItem)
from fullgraph.engine.engine import LLMEngine

ENGINE_KW = dict(max_model_len=256, max_num_seqs=16, num_gpu_blocks_override=256,
                 attention_backend="sdpa")
TIMEOUT = 60.0


def _new_engine() -> AsyncLLMEngine:
    return AsyncLLMEngine(LLMEngine.from_engine_args(EngineArgs(model="tiny-qwen3", **ENGINE_KW)))


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM("tiny-qwen3", **ENGINE_KW)


@pytest.fixture(scope="module")
def aengine():
    engine = _new_engine()
    yield engine
    engine.shutdown()
    assert not engine._thread.is_alive()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def _generate(engine: AsyncLLMEngine, items: list[GenerationItem]):
    stream = await engine.submit(items)
    finals, seen = [None] * len(items), [0] * len(items)
    async for i, out in stream:
        n = len(out.outputs[0].token_ids)
        assert n >= seen[i], "token lists are cumulative"
        seen[i] = n
        if out.finished:
            finals[i] = out
    return finals


def _wait_until(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_matches_offline_and_batches(aengine, offline):
    prompts = [f"The dog number {i} ran" for i in range(8)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=12, ignore_eos=True)
              for i in range(8)]
    want = offline.generate(prompts, params, use_tqdm=False)
    steps0 = aengine.snapshot.steps

    async def main():
        # Eight separate callers: the loop must batch them.
        return await asyncio.gather(*[
            _generate(aengine, [GenerationItem(f"t-batch-{i}", p, sp)])
            for i, (p, sp) in enumerate(zip(prompts, params))])
    got = [r[0] for r in run(main())]
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].text == w.outputs[0].text
        assert g.outputs[0].finish_reason == "length"
    assert _wait_until(lambda: aengine.snapshot.num_running == 0)
    assert aengine.snapshot.steps - steps0 < 8 * 12, "requests were not batched together"


def test_chat_prompt_matches_offline(aengine, offline):
    messages = [{"role": "user", "content": "What is two plus two?"}]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = offline.chat(messages, sp, use_tqdm=False)[0]
    got = run(_generate(aengine, [GenerationItem("t-chat", ChatPrompt(tuple(messages)), sp)]))[0]
    assert got.prompt_token_ids == want.prompt_token_ids
    assert got.outputs[0].token_ids == want.outputs[0].token_ids


def test_bad_input_admits_nothing(aengine):
    sp = SamplingParams(temperature=0, max_tokens=4)
    items = [GenerationItem("t-ok", "hello", sp), GenerationItem("t-bad", "", sp)]
    with pytest.raises(ValueError, match="prompt 1: the prompt is empty"):
        run(aengine.submit(items))
    with pytest.raises(ValueError, match=r"maximum context length is 256.*250 in max_tokens"):
        run(aengine.submit([GenerationItem("t-long", [5] * 10,
                                           SamplingParams(max_tokens=250))]))
    with pytest.raises(ValueError, match="distinct"):
        run(aengine.submit([GenerationItem("t-dup", "a", sp), GenerationItem("t-dup", "b", sp)]))
    with pytest.raises(ValueError, match="chat template"):
        run(aengine.submit([GenerationItem("t-chat-bad", ChatPrompt(({"role": "user"},)), sp)]))
    assert _wait_until(lambda: aengine.snapshot.num_running + aengine.snapshot.num_waiting == 0)
    # The ids of rejected items are free again and the engine still works.
    out = run(_generate(aengine, [GenerationItem("t-ok", "hello", sp)]))[0]
    assert len(out.outputs[0].token_ids) >= 1


def test_abort_frees_blocks(aengine):
    sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    aborted0 = aengine.snapshot.aborted_requests

    async def main():
        stream = await aengine.submit([GenerationItem("t-abort", "Once upon a time", sp)])
        async for _, out in stream:
            if len(out.outputs[0].token_ids) >= 3:
                break
        stream.abort()
        return out
    out = run(main())
    assert not out.finished
    assert _wait_until(lambda: aengine.snapshot.aborted_requests == aborted0 + 1)
    snap = aengine.snapshot
    assert snap.num_running == 0 and snap.kv_usage == 0.0
    assert snap.num_free_blocks == snap.num_blocks
    assert "t-abort" not in aengine.engine.requests


def test_step_error_fails_requests_and_loop_survives(aengine, monkeypatch):
    real_step = aengine.engine.step
    calls = []

    def failing_step():
        calls.append(1)
        raise RuntimeError("boom")
    monkeypatch.setattr(aengine.engine, "step", failing_step)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with pytest.raises(EngineError, match="boom"):
        run(_generate(aengine, [GenerationItem("t-err", "hello", sp)]))
    assert calls and aengine.is_alive
    # the error reaches the caller before the engine thread publishes its snapshot
    assert _wait_until(lambda: aengine.snapshot.step_errors >= 1)
    monkeypatch.setattr(aengine.engine, "step", real_step)
    out = run(_generate(aengine, [GenerationItem("t-after-err", "hello", sp)]))[0]
    assert len(out.outputs[0].token_ids) == 8
    assert _wait_until(lambda: aengine.snapshot.kv_usage == 0.0)


def test_idle_loop_sleeps(aengine, monkeypatch):
    assert _wait_until(lambda: aengine.snapshot.num_running == 0)
    calls = []
    real = aengine.engine.has_unfinished_requests

    def counting():
        calls.append(1)
        return real()
    monkeypatch.setattr(aengine.engine, "has_unfinished_requests", counting)
    time.sleep(0.3)
    # A spinning loop would poll thousands of times; a blocked one at most once.
    assert len(calls) <= 2
    steps = aengine.snapshot.steps
    time.sleep(0.1)
    assert aengine.snapshot.steps == steps


def test_cancelled_caller_is_aborted(aengine):
    sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    aborted0 = aengine.snapshot.aborted_requests

    async def main():
        task = asyncio.ensure_future(
            aengine.submit([GenerationItem("t-cancel", "hello there", sp)]))
        await asyncio.sleep(0)      # the add is queued; cancel before it is admitted
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    run(main())
    # Admitted after the caller left, then aborted (not run to its 200 tokens).
    assert _wait_until(lambda: aengine.snapshot.aborted_requests == aborted0 + 1)
    assert _wait_until(lambda: aengine.snapshot.num_running == 0)
    assert "t-cancel" not in aengine.engine.requests


def test_shutdown_fails_inflight_and_refuses_new():
    engine = _new_engine()
    sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        stream = await engine.submit([GenerationItem("t-sd", "hello", sp)])
        got = []
        with pytest.raises(EngineError, match="shut down"):
            async for _, out in stream:
                got.append(out)
                if len(got) == 2:
                    await asyncio.to_thread(engine.shutdown)
        assert len(got) >= 2
        with pytest.raises(EngineError):
            await engine.submit([GenerationItem("t-sd2", "hello", sp)])
    try:
        run(main())
        assert not engine.is_alive and not engine._thread.is_alive()
        assert not engine.engine.requests
    finally:
        engine.shutdown()
