"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template."""
from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from fullgraph.engine.async_engine import EngineError, GenerationItem, GenerationStream
from fullgraph.entrypoints.server.errors import bad_request
from fullgraph.entrypoints.server.metrics import RequestTracker
from fullgraph.entrypoints.server.protocol import (ChatChoice, ChatCompletionChunk,
                                                   ChatCompletionRequest, ChatCompletionResponse,
                                                   ChatLogprobs, ChatMessage, ChatResponseMessage,
                                                   ChatStreamChoice, ChatTokenLogprob,
                                                   DeltaMessage, TopLogprob, UsageInfo)
from fullgraph.entrypoints.server.serving import (DONE, ServerState, check_extra_fields,
                                                  check_model, check_unsupported, clamp_logprob,
                                                  event_stream, json_response, now,
                                                  prompt_logprobs_body, run_to_end, sampling_params,
                                                  sse_error, stream_usage, submit, token_text,
                                                  usage, usage_info)
from fullgraph.outputs import CompletionOutput


def message_dict(i: int, m: ChatMessage, media_dir: str | None = None) -> dict:
    if m.content is None or isinstance(m.content, str):
        content = m.content or ""
    else:
        bad = [p.type for p in m.content if p.type not in ("text", "image_url")]
        if bad:
            raise bad_request(f"messages[{i}]: content parts of type {bad[0]!r} are not "
                              f"supported (text, image_url)", "messages")
        if all(p.type == "text" for p in m.content):
            content = "\n".join(p.text or "" for p in m.content)
        else:
            content = [{"type": "text", "text": p.text or ""} if p.type == "text" else
                       {"type": "image_url", "image_url": {"url": _image_source(
                           i, p.image_url.url if p.image_url else None, media_dir)}}
                       for p in m.content]
    d = {"role": m.role, "content": content}
    if m.name is not None:
        d["name"] = m.name
    return d


def template_kwargs(add_generation_prompt: bool, continue_final_message: bool,
                    chat_template_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A request's keyword arguments for the chat template. /v1/chat/completions and /tokenize
    both render with them, so /tokenize gives the ids generation runs. `continue_final_message`
    leaves the last message open for the model to continue (vLLM's field and 400)."""
    if continue_final_message and add_generation_prompt:
        raise bad_request("Cannot set both `continue_final_message` and "
                          "`add_generation_prompt` to True.", "continue_final_message")
    kwargs = dict(chat_template_kwargs or {})
    if continue_final_message:
        kwargs["continue_final_message"] = True
    return kwargs


def _response_role(body: ChatCompletionRequest) -> str:
    """The role of the generated message: the assistant's after the generation prompt, else
    the last message's, which the model goes on from (vLLM's `get_chat_request_role`)."""
    return "assistant" if body.add_generation_prompt else body.messages[-1].role


def _echo(body: ChatCompletionRequest, role: str) -> str:
    """What `echo` puts before the generated text: the last message's text if that message
    has the response's role (vLLM's rule; text parts joined by newlines), else nothing."""
    last = body.messages[-1]
    if not body.echo or last.role != role or last.content is None:
        return ""
    if isinstance(last.content, str):
        return last.content
    return "\n".join(p.text or "" for p in last.content if p.type == "text")


def _image_source(i: int, url: str | None, media_dir: str | None) -> str:
    """A data URL as it is, or a local file under `--allowed-local-media-path`; the server
    fetches nothing from the network."""
    where = "messages"
    if not url:
        raise bad_request(f"messages[{i}]: an image_url part needs image_url.url", where)
    if url.startswith("data:"):
        return url
    if url.startswith(("http://", "https://")):
        raise bad_request(f"messages[{i}]: image URLs are not fetched (no network access); "
                          f"send the image as a data: URL", where)
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("", "file"):
        raise bad_request(f"messages[{i}]: image URL scheme {scheme!r} is not supported (a "
                          f"data: URL, or file:// / a path under --allowed-local-media-path)",
                          where)
    path = url.removeprefix("file://")
    if media_dir is None:
        raise bad_request(f"messages[{i}]: local image paths need the server started with "
                          f"--allowed-local-media-path", where)
    real, root = os.path.realpath(path), os.path.realpath(media_dir)
    if os.path.commonpath([real, root]) != root:
        raise bad_request(f"messages[{i}]: {path!r} is outside --allowed-local-media-path",
                          where)
    return real


def _logprobs(c: CompletionOutput, start: int, top_n: int, as_ids: bool) -> ChatLogprobs:
    """`bytes` are the token's text's, whatever `token` is (`as_ids`: "token_id:{id}")."""
    content = []
    for tid, entry in zip(c.token_ids[start:], c.logprobs[start:]):
        s = entry.get(tid)
        text = (s.decoded_token if s else None) or ""
        tops = sorted(((t, e) for t, e in entry.items() if e.rank <= top_n),
                      key=lambda te: te[1].rank)
        content.append(ChatTokenLogprob(
            token=token_text(tid, text, as_ids),
            logprob=clamp_logprob(s.logprob if s else float("-inf")), bytes=list(text.encode()),
            top_logprobs=[TopLogprob(token=token_text(t, e.decoded_token, as_ids),
                                     logprob=clamp_logprob(e.logprob),
                                     bytes=list((e.decoded_token or "").encode()))
                          for t, e in tops]))
    return ChatLogprobs(content=content)


def _check_top_logprobs(body: ChatCompletionRequest, max_logprobs: int) -> None:
    """Chat's count is `top_logprobs` (`logprobs` is a bool): check it here, so the errors
    name it rather than the engine's `logprobs`."""
    n = body.top_logprobs
    if n is None:
        return
    if not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    if n < 0:
        raise bad_request(f"top_logprobs must be >= 0, got {n}", "top_logprobs")
    if n > max_logprobs:
        raise bad_request(f"top_logprobs={n} exceeds max_logprobs={max_logprobs} (the "
                          f"server's --max-logprobs)", "top_logprobs")


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest,
                                 request: Request) -> Response:
    check_model(state, body.model)
    check_extra_fields(body, "chat/completions")
    fmt = (body.response_format or {}).get("type", "text")
    check_unsupported(body, {"tools": bool(body.tools), "response_format": fmt != "text"})
    _check_top_logprobs(body, state.engine.config.max_logprobs)
    kwargs = tuple(sorted(template_kwargs(body.add_generation_prompt,
                                          body.continue_final_message,
                                          body.chat_template_kwargs).items()))
    messages = tuple(message_dict(i, m, state.allowed_media_path)
                     for i, m in enumerate(body.messages))
    max_tokens = body.max_completion_tokens or body.max_tokens
    top_n = body.top_logprobs or 0
    params = sampling_params(state, body, max_tokens, top_n if body.logprobs else None)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    try:       # rendered (and its images prepared) in a worker thread: no loop waits on it
        ids, mm = await asyncio.get_running_loop().run_in_executor(
            None, lambda: state.prepare_chat(list(messages), body.add_generation_prompt,
                                             **dict(kwargs)))
    except ValueError as e:
        raise bad_request(str(e), "messages") from None
    stream = await submit(state, [GenerationItem(rid, ids, params, mm)], "messages")
    tracker = state.metrics.tracker(body.n)
    role = _response_role(body)
    if body.stream:
        return event_stream(_stream(state, body, rid, stream, tracker, top_n, role), stream)
    outputs = await run_to_end(request, stream, tracker)
    if outputs is None:
        return Response(status_code=499)    # the client is gone; nobody reads this
    choices, echo = [], _echo(body, role)
    for i, out in enumerate(outputs):        # one choice per sample (`n`)
        c = out.outputs[0]
        choices.append(ChatChoice(
            index=i, message=ChatResponseMessage(role=role, content=echo + c.text),
            logprobs=(_logprobs(c, 0, top_n, body.return_tokens_as_token_ids)
                      if body.logprobs else None),
            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            token_ids=c.token_ids if body.return_token_ids else None))
    resp = ChatCompletionResponse(
        id=rid, created=now(), model=state.model_name, choices=choices,
        usage=usage(outputs, stream),
        prompt_token_ids=outputs[0].prompt_token_ids if body.return_token_ids else None,
        prompt_logprobs=prompt_logprobs_body(outputs[0]))
    return json_response(resp)


async def _stream(state: ServerState, body: ChatCompletionRequest, rid: str,
                  stream: GenerationStream, tracker: RequestTracker,
                  top_n: int, role: str) -> AsyncIterator[str]:
    """Each choice's role chunk first, then its echo (if any), then a chunk per token whose
    text is not held back; with continuous_usage_stats each carries its choice's usage so
    far (vLLM's)."""
    created = now()
    text, num_tokens = [""] * body.n, [0] * body.n      # sent so far, per choice
    final_usage, continuous = stream_usage(body)
    prompt_tokens = len(stream.prompt_token_ids[0])

    def chunk(choice: ChatStreamChoice | None, totals: UsageInfo | None = None,
              prompt_token_ids: list[int] | None = None) -> str:
        if choice and continuous:
            totals = usage_info(prompt_tokens, num_tokens[choice.index])
        c = ChatCompletionChunk(id=rid, created=created, model=state.model_name,
                                choices=[choice] if choice else [], usage=totals,
                                prompt_token_ids=prompt_token_ids)
        return f"data: {c.model_dump_json()}\n\n"

    # each choice's first chunk (its role) carries the prompt's ids, as vLLM sends them
    prompt_ids = stream.prompt_token_ids[0] if body.return_token_ids else None
    echo = _echo(body, role)
    try:
        for i in range(body.n):
            yield chunk(ChatStreamChoice(index=i, delta=DeltaMessage(role=role, content="")),
                        prompt_token_ids=prompt_ids)
        for i in range(body.n if echo else 0):
            yield chunk(ChatStreamChoice(index=i, delta=DeltaMessage(content=echo)))
        async for i, out in stream:
            tracker.observe(i, out)
            c = out.outputs[0]
            delta, new_ids = c.text[len(text[i]):], c.token_ids[num_tokens[i]:]
            lp = (_logprobs(c, num_tokens[i], top_n, body.return_tokens_as_token_ids)
                  if body.logprobs and new_ids else None)
            text[i], num_tokens[i] = c.text, len(c.token_ids)
            if not (delta or out.finished or (new_ids and (lp or body.return_token_ids))):
                continue    # a token whose text is held back (partial UTF-8, maybe a stop)
            yield chunk(ChatStreamChoice(
                index=i, delta=DeltaMessage(content=delta), logprobs=lp,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                token_ids=new_ids if body.return_token_ids else None))
        if final_usage:
            yield chunk(None, usage_info(prompt_tokens, sum(num_tokens)))
    except EngineError as e:
        yield sse_error(e)
    finally:
        stream.abort()      # no-op when finished; frees the blocks if the client left
    yield DONE
