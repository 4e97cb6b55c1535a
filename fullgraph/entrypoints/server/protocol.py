"""Request and response bodies of the OpenAI-compatible API (pydantic models).

Requests accept unknown fields (clients send `user`, `metadata`, ...): they are logged and
ignored, as vLLM does. Non-OpenAI sampling fields (`top_k`, `ignore_eos`, ...) use vLLM's
names, so `extra_body={...}` written for vLLM works here.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class _Request(BaseModel):
    # NaN / Infinity are accepted by Python's JSON parser but are never valid parameters.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(_Request):
    """Fields shared by completions and chat completions."""
    model: str | None = None            # None: the served model
    temperature: float | None = None    # None: 1.0, OpenAI's default
    top_p: float | None = None
    n: int = 1
    seed: int | None = Field(None, ge=-2**63, lt=2**63)    # the sampler's generators are int64
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None      # token id (a JSON string) -> bias
    # Extensions (vLLM names), sent with the client's extra_body.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None   # the prompt's last k tokens (-1: what fits)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False      # add token ids to choices (vLLM's name)
    return_tokens_as_token_ids: bool = False    # logprobs' tokens as "token_id:{id}"


class CompletionRequest(SamplingFields):
    # str | list[str] | list[int] | list[list[int]]: checked by hand for clearer messages.
    prompt: Any = None
    max_tokens: int | None = 16         # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ImageURL(_Request):
    url: str
    detail: str | None = None


class ContentPart(_Request):
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None       # None: the rest of the context, as vLLM
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = False      # prepend the last message, if it has the response's role


# ---------------------------------------------------------------- responses
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """One entry of vLLM's `prompt_logprobs` (keyed by token id)."""
    logprob: float
    rank: int
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None           # streamed: in the first chunk only
    prompt_logprobs: PromptLogprobs | None = None       # with the `prompt_logprobs` field


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None       # with the `prompt_logprobs` field


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _role_once(self, handler):
        """The role only in the chunk that has one (the first), as OpenAI and vLLM send it."""
        data = handler(self)
        if data.get("role") is None:
            data.pop("role", None)
        return data


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None       # return_token_ids: each choice's first


# ---------------------------------------------------------------- tokenizer endpoints (vLLM's)
class _StrictRequest(_Request):
    # No coercion: "5" or 5.0 is not a token id, "yes" not a bool.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


class TokenizeCompletionRequest(_StrictRequest):
    """POST /tokenize with a text prompt: ids as `/v1/completions` would see them."""
    model: str | None = None
    prompt: str = Field(min_length=1)
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_StrictRequest):
    """POST /tokenize with messages: ids as `/v1/chat/completions` would see them."""
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False    # the chat template writes the special tokens
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_StrictRequest):
    model: str | None = None
    tokens: list[int] = Field(min_length=1)


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
