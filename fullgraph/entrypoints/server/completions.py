"""POST /v1/completions: `n` choices per prompt (prompt i's sample j is choice i * n + j),
streamed or not."""
from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fullgraph.engine.async_engine import EngineError, GenerationItem, GenerationStream
from fullgraph.entrypoints.server.errors import bad_request
from fullgraph.entrypoints.server.metrics import RequestTracker
from fullgraph.entrypoints.server.protocol import (CompletionChoice, CompletionLogprobs,
                                                   CompletionRequest, CompletionResponse,
                                                   UsageInfo)
from fullgraph.entrypoints.server.serving import (DONE, ServerState, check_model, event_stream,
                                                  check_unsupported, clamp_logprob, now,
                                                  prompt_logprobs_body, run_to_end,
                                                  sampling_params, sse_error, submit, usage,
                                                  warn_unknown_fields)
from fullgraph.outputs import CompletionOutput


def normalize_prompts(prompt) -> list[str | list[int]]:
    """str | list[str] | list[int] | list[list[int]] -> one engine prompt per choice."""
    def is_ids(x) -> bool:
        return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in x)
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if is_ids(prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt) or all(is_ids(p) and p for p in prompt):
            return list(prompt)
    if prompt is None or prompt == []:
        raise bad_request("prompt is required and must not be empty", "prompt")
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a "
                      "list of lists of token ids", "prompt")


@dataclass(slots=True)
class _Choice:
    """What has been sent of one streamed choice."""
    text: str = ""
    num_tokens: int = 0
    offset: int = 0     # text_offset of the next token
    started: bool = False


def _logprobs(c: CompletionOutput, start: int, offset: int) -> tuple[CompletionLogprobs, int]:
    lp = CompletionLogprobs()
    for tid, entry in zip(c.token_ids[start:], c.logprobs[start:]):
        sampled = entry.get(tid)
        token = (sampled.decoded_token if sampled else None) or ""
        lp.tokens.append(token)
        lp.token_logprobs.append(clamp_logprob(sampled.logprob) if sampled else None)
        lp.top_logprobs.append({(e.decoded_token or ""): clamp_logprob(e.logprob)
                                for e in sorted(entry.values(), key=lambda e: e.rank)})
        lp.text_offset.append(offset)
        offset += len(token)
    return lp, offset


async def create_completion(state: ServerState, body: CompletionRequest,
                            request: Request) -> Response:
    check_model(state, body.model)
    warn_unknown_fields(body, "completions")
    prompts = normalize_prompts(body.prompt)
    check_unsupported(body, {"suffix": bool(body.suffix), "best_of": (body.best_of or 1) > 1})
    params = sampling_params(state, body, body.max_tokens, body.logprobs)
    if body.echo and body.logprobs is not None and body.prompt_logprobs is None:
        # echo's logprobs cover the prompt too: its tokens' logprobs, computed for this
        params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
    rid = f"cmpl-{uuid.uuid4().hex}"
    items = [GenerationItem(f"{rid}-{i}", p, params) for i, p in enumerate(prompts)]
    stream = await submit(state, items, "prompt")
    # one choice per sample: prompt i's sample j is choice i * n + j (OpenAI's order)
    echo = [_prompt_text(state, p) if body.echo else "" for p in prompts for _ in range(body.n)]
    tracker = state.metrics.tracker(len(stream.request_ids))
    if body.stream:
        return event_stream(_stream(state, body, rid, stream, tracker, echo), stream)
    outputs = await run_to_end(request, stream, tracker)
    if outputs is None:
        return Response(status_code=499)    # the client is gone; nobody reads this
    choices = []
    for i, out in enumerate(outputs):
        c = out.outputs[0]
        lp = None
        if body.logprobs is not None:
            lp = _echo_logprobs(state, out, body.logprobs) if body.echo else CompletionLogprobs()
            lp = _extend(lp, _logprobs(c, 0, len(echo[i]))[0])
        choices.append(CompletionChoice(
            index=i, text=echo[i] + c.text, logprobs=lp, finish_reason=c.finish_reason,
            stop_reason=c.stop_reason, token_ids=c.token_ids if body.return_token_ids else None,
            prompt_token_ids=out.prompt_token_ids if body.return_token_ids else None,
            prompt_logprobs=prompt_logprobs_body(out) if body.prompt_logprobs is not None
            else None))
    resp = CompletionResponse(id=rid, created=now(), model=state.model_name, choices=choices,
                              usage=usage(outputs, stream))
    return JSONResponse(resp.model_dump())


def _echo_logprobs(state: ServerState, out, top_n: int) -> CompletionLogprobs:
    """The prompt's part of echo's logprobs, in the completions format: every prompt token,
    its logprob (None for the first, as OpenAI and vLLM give it) and the top `top_n`."""
    lp, offset = CompletionLogprobs(), 0
    decode = state.tokenizer.decode
    for tid, entry in zip(out.prompt_token_ids, out.prompt_logprobs):
        token = decode([tid])
        lp.tokens.append(token)
        lp.token_logprobs.append(None if entry is None else clamp_logprob(entry[tid].logprob))
        lp.top_logprobs.append(None if entry is None else {
            (e.decoded_token or ""): clamp_logprob(e.logprob)
            for e in sorted(entry.values(), key=lambda e: e.rank) if e.rank <= top_n})
        lp.text_offset.append(offset)
        offset += len(token)
    return lp


def _extend(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=a.tokens + b.tokens,
                              token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs,
                              text_offset=a.text_offset + b.text_offset)


def _prompt_text(state: ServerState, prompt: str | list[int]) -> str:
    if isinstance(prompt, str):
        return prompt
    return state.tokenizer.decode(prompt, skip_special_tokens=False)


async def _stream(state: ServerState, body: CompletionRequest, rid: str,
                  stream: GenerationStream, tracker: RequestTracker,
                  echo: list[str]) -> AsyncIterator[str]:
    created, sent = now(), [_Choice(offset=len(e)) for e in echo]
    completion_tokens = [0] * len(echo)
    try:
        async for i, out in stream:
            tracker.observe(i, out)
            c, s = out.outputs[0], sent[i]
            delta, new_ids = c.text[len(s.text):], c.token_ids[s.num_tokens:]
            lp = None
            if body.logprobs is not None and new_ids:
                lp, s.offset = _logprobs(c, s.num_tokens, s.offset)
            if not s.started:
                delta, s.started = echo[i] + delta, True
                if body.echo and body.logprobs is not None:
                    lp = _extend(_echo_logprobs(state, out, body.logprobs),
                                 lp or CompletionLogprobs())
            s.text, s.num_tokens = c.text, len(c.token_ids)
            completion_tokens[i] = len(c.token_ids)
            if not (delta or out.finished or (new_ids and (lp or body.return_token_ids))):
                continue    # a token whose text is held back (partial UTF-8, maybe a stop)
            choice = CompletionChoice(
                index=i, text=delta, logprobs=lp, finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                token_ids=new_ids if body.return_token_ids else None)
            chunk = CompletionResponse(id=rid, created=created, model=state.model_name,
                                       choices=[choice])
            yield f"data: {chunk.model_dump_json()}\n\n"
        if body.stream_options and body.stream_options.include_usage:
            prompt_tokens = sum(len(p) for p in stream.prompt_token_ids)
            done = sum(completion_tokens)
            chunk = CompletionResponse(id=rid, created=created, model=state.model_name,
                                       choices=[], usage=UsageInfo(
                                           prompt_tokens=prompt_tokens, completion_tokens=done,
                                           total_tokens=prompt_tokens + done))
            yield f"data: {chunk.model_dump_json()}\n\n"
    except EngineError as e:
        yield sse_error(e)
    finally:
        stream.abort()      # no-op when all finished; frees the blocks if the client left
    yield DONE
