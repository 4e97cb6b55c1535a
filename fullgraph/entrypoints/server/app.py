"""The FastAPI app: routes, API-key check, error handlers. `build_app(async_engine)`."""
from __future__ import annotations

import os
import secrets
import time
from typing import Any

from fastapi import APIRouter, Body, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import fullgraph
from fullgraph.engine.async_engine import AsyncLLMEngine
from fullgraph.entrypoints.server.chat import create_chat_completion
from fullgraph.entrypoints.server.completions import create_completion
from fullgraph.entrypoints.server.errors import error_response, install_error_handlers
from fullgraph.entrypoints.server.metrics import ServerMetrics
from fullgraph.entrypoints.server.protocol import (ChatCompletionRequest, CompletionRequest,
                                                   VersionResponse)
from fullgraph.entrypoints.server.serving import ServerState
from fullgraph.entrypoints.server.tokenization import detokenize, tokenize


class _APIKey:
    """`--api-key` as an ASGI middleware (vLLM's order): a request to a protected path
    without the key is a 401 before its body is read, so a malformed body is not a 400."""
    PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/update_weights_from_disk",
                 "/reset_prefix_cache")

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.PROTECTED):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(got, self.expected):
                response = error_response(
                    401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                    code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _update_failed(message: str) -> JSONResponse:
    return JSONResponse({"success": False, "message": message}, status_code=400)


def build_app(engine: AsyncLLMEngine, api_key: str | None = None,
              allowed_media_path: str | None = None) -> FastAPI:
    """The caller owns `engine` (starts it, and shuts it down after the server stops).
    `allowed_media_path`: a directory whose image files chat requests may name."""
    name = engine.config.model.name
    state = ServerState(engine=engine, model_name=name,
                        metrics=ServerMetrics(lambda: engine.snapshot, name,
                                              engine.config.model.max_model_len),
                        api_key=api_key, created=int(time.time()),
                        allowed_media_path=allowed_media_path)
    app = FastAPI(title="fullgraph", description="OpenAI-compatible fullgraph server")
    app.state.server = state
    install_error_handlers(app)

    if api_key:
        app.add_middleware(_APIKey, key=api_key)
    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def models() -> JSONResponse:
        card = {"id": name, "object": "model", "created": state.created, "owned_by": "fullgraph",
                "root": engine.config.model.path,
                "max_model_len": engine.config.model.max_model_len,
                "vocab_size": engine.config.model.vocab_size}     # for `bench serve` prompts
        return JSONResponse({"object": "list", "data": [card]})

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, body, request)

    app.include_router(v1)

    # vLLM's tokenizer endpoints (and the weight endpoints below): outside /v1, but behind
    # --api-key as vLLM has them.
    tok = APIRouter()

    @tok.post("/tokenize")
    async def tokenize_route(body: dict[str, Any] = Body()) -> JSONResponse:
        return JSONResponse(tokenize(state, body).model_dump())

    @tok.post("/detokenize")
    async def detokenize_route(body: dict[str, Any] = Body()) -> JSONResponse:
        return JSONResponse(detokenize(state, body).model_dump())

    # Weights, for reinforcement-learning loops that serve their policy: SGLang's
    # /update_weights_from_disk and vLLM's /reset_prefix_cache. Each waits for the requests
    # in flight to finish (an update with SGLang's abort_all_requests aborts them); requests
    # sent meanwhile run after it. The update answers in SGLang's shape, failures too: a 400
    # with {"success": false, "message": ...}, the weights as they were.
    @tok.post("/update_weights_from_disk")
    async def update_weights_from_disk(body: dict[str, Any] = Body()) -> JSONResponse:
        path, abort = body.get("model_path"), body.get("abort_all_requests", False)
        if not isinstance(path, str) or not os.path.isdir(path):
            return _update_failed(f"model_path must be a directory on the server holding "
                                  f"*.safetensors weights, got {path!r}")
        if not isinstance(abort, bool):
            return _update_failed(f"abort_all_requests must be true or false, got {abort!r}")
        try:
            await engine.call_when_idle(lambda e: e.update_weights(path), abort_running=abort)
        except ValueError as e:
            return _update_failed(str(e))
        return JSONResponse({"success": True, "message": f"weights loaded from {path}"})

    @tok.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> JSONResponse:
        return JSONResponse(
            {"success": await engine.call_when_idle(lambda e: e.reset_prefix_cache())})

    app.include_router(tok)

    # Probes and version: no key, like /health and /metrics.
    @app.api_route("/health", methods=["GET", "HEAD"])   # load balancers probe with HEAD
    async def health() -> Response:
        if not engine.is_alive:
            return error_response(503, "the engine loop is not running")
        return Response(status_code=200)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:       # vLLM's (SageMaker's) name for /health
        return await health()

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse(VersionResponse(version=fullgraph.__version__).model_dump())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
