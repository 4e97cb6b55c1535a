"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure,
including FastAPI's own (validation -> 400, not 422; unknown route -> 404)."""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fullgraph.entrypoints.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> ErrorResponse:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code).model_dump(), status_code=status)


# The SamplingParams / make_request messages start with the field they are about.
_FIELDS = ("n", "temperature", "top_p", "top_k", "seed", "max_tokens", "stop_token_ids", "stop",
           "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "min_p", "min_tokens", "logit_bias", "bad_words",
           "allowed_token_ids", "prompt_logprobs")
_FIRST_WORD = re.compile(r"^(\w+)")


def param_of(message: str, prompt_field: str) -> str | None:
    """Best guess at which request field a ValueError message is about."""
    m = _FIRST_WORD.match(message)
    if m and m.group(1) in _FIELDS:
        return m.group(1)
    if "max_tokens" in message:
        return "max_tokens"
    if "prompt" in message or "chat template" in message:
        return prompt_field
    return None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            loc = err.get("loc", ())
            where = f" at character {loc[-1]}" if len(loc) > 1 else ""
            return f"malformed JSON body{where}: {detail}".rstrip(": "), None
    parts, param = [], None
    for err in errors[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if param is None and loc:
            param = loc[0]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code,
                              f"{exc.detail}: {request.method} {request.url.path}")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, f"internal server error: {exc!r}")
