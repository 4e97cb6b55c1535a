"""What completions and chat share: server state, request -> SamplingParams, admission,
and running a generation to its end (or until the client goes away)."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from fullgraph.engine.async_engine import (AsyncLLMEngine, EngineError, EngineStopped,
                                           GenerationItem, GenerationStream)
from fullgraph.entrypoints.server.errors import APIError, bad_request, error_body, param_of
from fullgraph.entrypoints.server.metrics import RequestTracker, ServerMetrics
from fullgraph.entrypoints.server.protocol import SamplingFields, UsageInfo
from fullgraph.outputs import RequestOutput
from fullgraph.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
_LOGPROB_FLOOR = -9999.0   # -inf is not JSON; vLLM clamps the same way


def clamp_logprob(lp: float) -> float:
    """-inf as OpenAI writes it; NaN (logits of broken weights) stays NaN, which
    `json_response` and the stream's chunks write as null."""
    return max(lp, _LOGPROB_FLOOR)


def json_response(body: BaseModel) -> Response:
    """A response model as JSON the way the stream writes its chunks (pydantic: NaN and
    infinities as null), so a non-finite logprob is null in both, not a 500 (the standard
    library's encoder refuses them)."""
    return Response(body.model_dump_json(), media_type="application/json")


@dataclass(slots=True)
class ServerState:
    engine: AsyncLLMEngine
    model_name: str
    metrics: ServerMetrics
    api_key: str | None
    created: int
    allowed_media_path: str | None = None   # local image files chat requests may name

    @property
    def tokenizer(self):
        """The engine's tokenizer, which handlers may call from the event loop while the
        engine thread uses it too (/tokenize, /detokenize, completions' echo).

        That is safe because nothing mutates it after loading. It is a `tokenizers` (Rust)
        tokenizer behind transformers' fast-tokenizer class; encode, decode,
        convert_ids_to_tokens and DecodeStream take only shared borrows of the Rust object,
        which any number of threads may hold at once. The one way to make two threads
        collide ("RuntimeError: Already borrowed") is a call that reconfigures it:
        transformers' encode writes truncation, padding or `encode_special_tokens` only when
        a call asks for a value other than the current one (transformers 5.x,
        `TokenizersBackend.set_truncation_and_padding` and `_encode_plus`), and neither the
        engine nor this server ever asks for anything but the defaults (no truncation, no
        padding, no `split_special_tokens`). Rendering a chat template is Jinja on Python
        objects plus such an encode. `tests/test_server.py::test_tokenize_while_generating`
        exercises both threads at once."""
        return self.engine.engine.tokenizer

    def render_chat(self, messages: list[dict], add_generation_prompt: bool,
                    **template_kwargs) -> list[int]:
        """Chat-template ids exactly as the engine thread makes them for a chat request,
        image placeholders expanded. `LLMEngine.chat_prompt` reads only the tokenizer (see
        `tokenizer`), the frozen config and the image processor's config, so the event loop
        may call it; ValueError if the template fails or an image cannot be read."""
        engine = self.engine.engine
        ids, images = engine.chat_prompt(messages, add_generation_prompt, **template_kwargs)
        return ids if images is None else engine.mm_processor.expanded_ids(ids, images)

    # The prompts are prepared in worker threads, so neither the event loop nor the
    # engine's step loop waits for a long one (a megabytes-long prompt held every running
    # request up for seconds while the engine thread tokenized it); the same thread-safety
    # argument as `render_chat`, and the image processor holds only its config.
    def prepare_chat(self, messages: list[dict], add_generation_prompt: bool,
                     **template_kwargs) -> tuple[list[int], Any]:
        """(prompt ids, MultiModalInputs or None) of a chat request: the template, and its
        images' decoding and preprocessing (the ids then expanded)."""
        engine = self.engine.engine
        ids, images = engine.chat_prompt(messages, add_generation_prompt, **template_kwargs)
        return engine.mm_processor.process(ids, images) if images else (ids, None)

    def tokenize(self, prompt: str) -> list[int]:
        """A completion's text prompt, as the engine tokenizes it."""
        return self.engine.engine.tokenize(prompt)


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model `{model}` does not exist; this server serves "
                            f"`{state.model_name}`", param="model", code="model_not_found")


# vLLM's fields for structured output (constrained decoding), which this server does not
# implement: a 400 as for response_format, not unconstrained text
_STRUCTURED_OUTPUT = ("structured_outputs", "guided_json", "guided_regex", "guided_choice",
                      "guided_grammar")


def check_extra_fields(body: BaseModel, endpoint: str) -> None:
    """Fields the protocol does not know: a 400 for structured output's, a warning for the
    rest (ignored, as vLLM ignores them)."""
    extra = body.model_extra or {}
    for name in _STRUCTURED_OUTPUT:
        if extra.get(name) is not None:
            raise bad_request(f"{name} (structured output) is not supported by this server",
                              name)
    if extra:
        logger.warning("%s: ignoring unknown fields %s", endpoint, sorted(extra))


def check_unsupported(body: SamplingFields, asked: dict[str, object]) -> None:
    """400 for features we do not implement (`asked`: name -> sent at a non-neutral value)
    and for fields that do not go with `stream` either way."""
    for name, on in asked.items():
        if on:
            raise bad_request(f"{name} is not supported by this server", name)
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    if body.stream and body.prompt_logprobs is not None and body.prompt_logprobs != 0:
        # no chunk carries them: a 400 (vLLM's message and rule: 0 asks for none of them)
        raise bad_request("`prompt_logprobs` are not available when `stream=True`.",
                          "prompt_logprobs")


def sampling_params(state: ServerState, body: SamplingFields, max_tokens: int | None,
                    logprobs: int | None) -> SamplingParams:
    """The request's fields; those it leaves out take the model's recommended values (its
    generation_config.json, `--generation-config`), else OpenAI's defaults, as vLLM does."""
    asked = dict(n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                 seed=body.seed, max_tokens=max_tokens, stop=body.stop,
                 stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos,
                 logprobs=logprobs, skip_special_tokens=body.skip_special_tokens,
                 include_stop_str_in_output=body.include_stop_str_in_output,
                 presence_penalty=body.presence_penalty,
                 frequency_penalty=body.frequency_penalty,
                 repetition_penalty=body.repetition_penalty, min_p=body.min_p,
                 min_tokens=body.min_tokens, logit_bias=body.logit_bias,
                 bad_words=body.bad_words, allowed_token_ids=body.allowed_token_ids,
                 prompt_logprobs=body.prompt_logprobs,
                 truncate_prompt_tokens=body.truncate_prompt_tokens)
    recommended = dict(state.engine.config.model.sampling_defaults)
    # max_tokens None is meaningful (chat: the rest of the context), not "left out"
    merged = ({"temperature": 1.0, "max_tokens": None} | recommended
              | {k: v for k, v in asked.items() if v is not None})
    try:
        return SamplingParams(**merged)
    except ValueError as e:
        raise bad_request(str(e), param_of(str(e), "prompt")) from None


async def submit(state: ServerState, items: list[GenerationItem],
                 prompt_field: str) -> GenerationStream:
    """Admit all items or raise: ValueError -> 400, a dead engine -> 503."""
    try:
        return await state.engine.submit(items)
    except ValueError as e:
        raise bad_request(str(e), param_of(str(e), prompt_field)) from None
    except EngineError as e:
        raise APIError(503, str(e)) from None


async def collect(stream: GenerationStream, tracker: RequestTracker) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(stream.request_ids)
    async for index, out in stream:
        tracker.observe(index, out)
        if out.finished:
            finals[index] = out
    return finals


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def event_stream(events, stream: GenerationStream) -> StreamingResponse:
    """A server-sent-events response; the background abort covers a client gone before the
    generator ever ran."""
    return StreamingResponse(events, media_type="text/event-stream",
                             background=BackgroundTask(stream.abort))


async def run_to_end(request: Request, stream: GenerationStream,
                     tracker: RequestTracker) -> list[RequestOutput] | None:
    """Outputs of a non-streamed call; None if the client disconnected first (its requests
    are aborted, freeing their KV blocks)."""
    consumer = asyncio.ensure_future(collect(stream, tracker))
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not consumer.done():     # the client left (or this handler is being cancelled)
            stream.abort()
        consumer.cancel()
        watcher.cancel()
        # cancel() only asks: a task is done once it has run its cancellation, and reading
        # its result before then raises InvalidStateError. Wait for both (asyncio.wait
        # never raises their exceptions).
        await asyncio.wait({consumer, watcher})
    if consumer.cancelled():
        return None
    try:
        return consumer.result()
    except EngineError as e:
        raise APIError(503 if isinstance(e, EngineStopped) else 500, str(e)) from None


def prompt_logprobs_body(out: RequestOutput) -> list | None:
    """vLLM's `prompt_logprobs` of a response: None, then {token id: entry} per prompt token."""
    if out.prompt_logprobs is None:
        return None
    return [None if e is None else
            {t: {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank,
                 "decoded_token": lp.decoded_token} for t, lp in e.items()}
            for e in out.prompt_logprobs]


def token_text(token_id: int, decoded: str | None, as_id: bool) -> str:
    """A logprobs entry's token: its text, or "token_id:{id}" with the request's
    `return_tokens_as_token_ids` (vLLM's), which identifies even a token whose bytes are not
    whole UTF-8 text on their own."""
    return f"token_id:{token_id}" if as_id else decoded or ""


def usage_info(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def usage(outputs: list[RequestOutput], stream: GenerationStream) -> UsageInfo:
    """Each prompt counted once, however many samples it has (as OpenAI counts)."""
    return usage_info(sum(len(p) for p in stream.prompt_token_ids),
                      sum(len(o.outputs[0].token_ids) for o in outputs))


def stream_usage(body: SamplingFields) -> tuple[bool, bool]:
    """(a final usage chunk, usage in every chunk) for a streamed request: `stream_options`'
    include_usage and continuous_usage_stats, the second only with the first (vLLM's)."""
    opts = body.stream_options
    final = opts is not None and opts.include_usage
    return final, final and opts.continuous_usage_stats


def sse_error(e: Exception) -> str:
    return f"data: {error_body(500, str(e)).model_dump_json()}\n\n"


def now() -> int:
    return int(time.time())
