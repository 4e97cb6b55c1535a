"""POST /tokenize and POST /detokenize, with vLLM's request and response shapes.

/tokenize takes the completions form `{"prompt": text}` or the chat form `{"messages": [...]}`
and returns the ids the matching generation endpoint would run; /detokenize turns ids back
into text. Both call the tokenizer on the event loop: `ServerState.tokenizer` says why that
is safe while the engine thread uses it.
"""
from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from fullgraph.entrypoints.server.chat import message_dict, template_kwargs
from fullgraph.entrypoints.server.errors import bad_request
from fullgraph.entrypoints.server.protocol import (DetokenizeRequest, DetokenizeResponse,
                                                   TokenizeChatRequest,
                                                   TokenizeCompletionRequest, TokenizeResponse)
from fullgraph.entrypoints.server.serving import ServerState, check_extra_fields, check_model


def _parse(model: type[BaseModel], body: dict[str, Any]):
    try:
        return model.model_validate(body)
    except ValidationError as e:    # -> the app's 400 handler, which names the field
        raise RequestValidationError(e.errors(include_url=False)) from None


def parse_tokenize(body: dict[str, Any]) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The form is chosen by which of `prompt` / `messages` the body has (exactly one; a
    field sent as null counts as absent)."""
    has_prompt, has_messages = (body.get(k) is not None for k in ("prompt", "messages"))
    if has_prompt and has_messages:
        raise bad_request("send either prompt (text) or messages (chat), not both", "messages")
    if not (has_prompt or has_messages):
        raise bad_request("a tokenize request needs prompt (text) or messages (chat)", "prompt")
    body = {k: v for k, v in body.items() if k not in ("prompt", "messages") or v is not None}
    return _parse(TokenizeChatRequest if has_messages else TokenizeCompletionRequest, body)


def tokenize(state: ServerState, body: dict[str, Any]) -> TokenizeResponse:
    req = parse_tokenize(body)
    check_model(state, req.model)
    check_extra_fields(req, "tokenize")
    if isinstance(req, TokenizeChatRequest):
        ids = _chat_ids(state, req)
    else:
        ids = state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    strs = state.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=state.engine.config.model.max_model_len,
                            tokens=ids, token_strs=strs)


def _chat_ids(state: ServerState, req: TokenizeChatRequest) -> list[int]:
    if req.add_special_tokens:
        raise bad_request("add_special_tokens=true is not supported with messages (the chat "
                          "template writes the special tokens, as for /v1/chat/completions)",
                          "add_special_tokens")
    kwargs = template_kwargs(req.add_generation_prompt, req.continue_final_message,
                             req.chat_template_kwargs)
    messages = [message_dict(i, m, state.allowed_media_path)
                for i, m in enumerate(req.messages)]
    try:
        return state.render_chat(messages, req.add_generation_prompt, **kwargs)
    except ValueError as e:
        raise bad_request(str(e), "messages") from None


def detokenize(state: ServerState, body: dict[str, Any]) -> DetokenizeResponse:
    req = _parse(DetokenizeRequest, body)
    check_model(state, req.model)
    check_extra_fields(req, "detokenize")
    vocab = state.engine.config.model.vocab_size
    for i, t in enumerate(req.tokens):
        if not 0 <= t < vocab:   # the tokenizer would drop it silently
            raise bad_request(f"tokens[{i}] = {t} is outside the vocabulary [0, {vocab})",
                              "tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(req.tokens))
