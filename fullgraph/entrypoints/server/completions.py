"""POST /v1/completions: `n` choices per prompt (prompt i's sample j is choice i * n + j),
streamed or not."""
from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from fullgraph.engine.async_engine import EngineError, GenerationItem, GenerationStream
from fullgraph.entrypoints.server.errors import bad_request
from fullgraph.entrypoints.server.metrics import RequestTracker
from fullgraph.entrypoints.server.protocol import (CompletionChoice, CompletionLogprobs,
                                                   CompletionRequest, CompletionResponse)
from fullgraph.entrypoints.server.serving import (DONE, ServerState, check_extra_fields,
                                                  check_model, check_unsupported, clamp_logprob,
                                                  event_stream, json_response, now,
                                                  prompt_logprobs_body, run_to_end, sampling_params,
                                                  sse_error, stream_usage, submit, token_text,
                                                  usage, usage_info)
from fullgraph.outputs import CompletionOutput, Logprob, RequestOutput


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


def _logprobs(c: CompletionOutput, start: int, offset: int,
              as_ids: bool) -> tuple[CompletionLogprobs, int]:
    """The completion's logprobs from token `start` on; `text_offset` counts the tokens' text
    even when `as_ids` names them "token_id:{id}"."""
    lp = CompletionLogprobs()
    for tid, entry in zip(c.token_ids[start:], c.logprobs[start:]):
        sampled = entry.get(tid)
        text = (sampled.decoded_token if sampled else None) or ""
        lp.tokens.append(token_text(tid, text, as_ids))
        lp.token_logprobs.append(clamp_logprob(sampled.logprob) if sampled else None)
        lp.top_logprobs.append(_tops(entry, as_ids))
        lp.text_offset.append(offset)
        offset += len(text)
    return lp, offset


def _tops(entry: dict[int, Logprob], as_ids: bool, top_n: int | None = None,
          actual: int | None = None) -> dict[str, float]:
    """One position's `top_logprobs`, most likely first: token -> logprob for every entry, or
    for those ranked 1..top_n and the position's `actual` token (a prompt token; vLLM's
    echoed positions hold it, as a sampled position holds its sample)."""
    ranked = sorted(entry.items(), key=lambda te: te[1].rank)
    return {token_text(t, e.decoded_token, as_ids): clamp_logprob(e.logprob)
            for t, e in ranked if top_n is None or e.rank <= top_n or t == actual}


async def create_completion(state: ServerState, body: CompletionRequest,
                            request: Request) -> Response:
    check_model(state, body.model)
    check_extra_fields(body, "completions")
    prompts = normalize_prompts(body.prompt)
    check_unsupported(body, {"suffix": bool(body.suffix), "best_of": (body.best_of or 1) > 1})
    score_only = _echo_without_generation(body)
    params = sampling_params(state, body, 1 if score_only else body.max_tokens, body.logprobs)
    if body.echo and body.logprobs is not None and body.prompt_logprobs is None:
        # echo's logprobs cover the prompt too: its tokens' logprobs, computed for this
        params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
    rid = f"cmpl-{uuid.uuid4().hex}"
    loop = asyncio.get_running_loop()       # text prompts tokenized in a worker thread
    ids = [p if isinstance(p, list) else await loop.run_in_executor(None, state.tokenize, p)
           for p in prompts]
    items = [GenerationItem(f"{rid}-{i}", p, params) for i, p in enumerate(ids)]
    stream = await submit(state, items, "prompt")
    # one choice per sample: prompt i's sample j is choice i * n + j (OpenAI's order)
    echo = [_prompt_text(state, p) if body.echo else "" for p in prompts for _ in range(body.n)]
    tracker = state.metrics.tracker(len(stream.request_ids))
    if body.stream:
        return event_stream(_stream(state, body, rid, stream, tracker, echo, score_only),
                            stream)
    outputs = await run_to_end(request, stream, tracker)
    if outputs is None:
        return Response(status_code=499)    # the client is gone; nobody reads this
    if score_only:
        outputs = [_without_generation(out) for out in outputs]
    choices, as_ids = [], body.return_tokens_as_token_ids
    for i, out in enumerate(outputs):
        c = out.outputs[0]
        lp = None
        if body.logprobs is not None:
            lp = (_echo_logprobs(state, out, body.logprobs, as_ids) if body.echo
                  else CompletionLogprobs())
            lp = _extend(lp, _logprobs(c, 0, len(echo[i]), as_ids)[0])
        choices.append(CompletionChoice(
            index=i, text=echo[i] + c.text, logprobs=lp, finish_reason=c.finish_reason,
            stop_reason=c.stop_reason, token_ids=c.token_ids if body.return_token_ids else None,
            prompt_token_ids=out.prompt_token_ids if body.return_token_ids else None,
            prompt_logprobs=prompt_logprobs_body(out) if body.prompt_logprobs is not None
            else None))
    resp = CompletionResponse(id=rid, created=now(), model=state.model_name, choices=choices,
                              usage=usage(outputs, stream))
    return json_response(resp)


def _echo_without_generation(body: CompletionRequest) -> bool:
    """echo with max_tokens 0 scores the prompt (vLLM's `echo_without_generation`): the
    engine needs max_tokens >= 1, so it runs with 1 and `_without_generation` drops that
    token from the response. max_tokens 0 without echo asks for nothing: a 400 that says
    what 0 is for, rather than the engine's bare range error."""
    if body.max_tokens != 0:
        return False
    if not body.echo:
        raise bad_request("max_tokens must be at least 1, got 0 (0 is only allowed with "
                          "echo=true, to score the prompt)", "max_tokens")
    if body.min_tokens:
        raise bad_request(f"min_tokens must be 0 with max_tokens 0 (echo scores the prompt), "
                          f"got {body.min_tokens}", "min_tokens")
    return True


def _without_generation(out: RequestOutput) -> RequestOutput:
    """`out` as if nothing had been generated, for echo with max_tokens 0: no text, token or
    logprob, finish_reason "length" (the 0-token limit, whatever ended the hidden token)."""
    c = out.outputs[0]
    c = dataclasses.replace(c, text="", token_ids=[], cumulative_logprob=None,
                            logprobs=None if c.logprobs is None else [],
                            finish_reason="length", stop_reason=None)
    return dataclasses.replace(out, outputs=[c])


def _echo_logprobs(state: ServerState, out, top_n: int, as_ids: bool) -> CompletionLogprobs:
    """The prompt's part of echo's logprobs, in the completions format: every prompt token,
    its logprob (None for the first, as OpenAI and vLLM give it) and the top `top_n`."""
    lp, offset = CompletionLogprobs(), 0
    decode = state.tokenizer.decode
    for tid, entry in zip(out.prompt_token_ids, out.prompt_logprobs):
        text = decode([tid])
        lp.tokens.append(token_text(tid, text, as_ids))
        lp.token_logprobs.append(None if entry is None else clamp_logprob(entry[tid].logprob))
        lp.top_logprobs.append(None if entry is None else _tops(entry, as_ids, top_n, tid))
        lp.text_offset.append(offset)
        offset += len(text)
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
                  echo: list[str], score_only: bool) -> AsyncIterator[str]:
    """One chunk per choice and token whose text is not held back; a choice's first chunk
    carries the echoed prompt (and its logprobs) and, with return_token_ids, the prompt's
    ids, as vLLM sends them. With continuous_usage_stats each chunk carries its choice's
    usage so far: its prompt's tokens and the tokens it has generated (vLLM's)."""
    created, sent = now(), [_Choice(offset=len(e)) for e in echo]
    final_usage, continuous = stream_usage(body)
    as_ids = body.return_tokens_as_token_ids
    try:
        async for i, out in stream:
            tracker.observe(i, out)
            if score_only:
                out = _without_generation(out)
            c, s = out.outputs[0], sent[i]
            delta, new_ids = c.text[len(s.text):], c.token_ids[s.num_tokens:]
            lp = None
            if body.logprobs is not None and new_ids:
                lp, s.offset = _logprobs(c, s.num_tokens, s.offset, as_ids)
            first = not s.started
            if first:
                delta = echo[i] + delta
                if body.echo and body.logprobs is not None:
                    lp = _extend(_echo_logprobs(state, out, body.logprobs, as_ids),
                                 lp or CompletionLogprobs())
            s.text, s.num_tokens = c.text, len(c.token_ids)
            if not (delta or out.finished or (new_ids and (lp or body.return_token_ids))):
                continue    # a token whose text is held back (partial UTF-8, maybe a stop)
            s.started = True    # only once sent: the echo and prompt ids go in a sent chunk
            ids = body.return_token_ids
            choice = CompletionChoice(
                index=i, text=delta, logprobs=lp, finish_reason=c.finish_reason,
                stop_reason=c.stop_reason, token_ids=new_ids if ids else None,
                prompt_token_ids=out.prompt_token_ids if ids and first else None)
            chunk = CompletionResponse(
                id=rid, created=created, model=state.model_name, choices=[choice],
                usage=usage_info(len(out.prompt_token_ids), s.num_tokens) if continuous else None)
            yield f"data: {chunk.model_dump_json()}\n\n"
        if final_usage:
            chunk = CompletionResponse(
                id=rid, created=created, model=state.model_name, choices=[],
                usage=usage_info(sum(len(p) for p in stream.prompt_token_ids),
                                 sum(s.num_tokens for s in sent)))
            yield f"data: {chunk.model_dump_json()}\n\n"
    except EngineError as e:
        yield sse_error(e)
    finally:
        stream.abort()      # no-op when all finished; frees the blocks if the client left
    yield DONE
