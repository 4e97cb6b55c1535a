"""`fullgraph serve`: load the engine, serve the OpenAI-compatible API with uvicorn."""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import socket
import sys
import time

from fullgraph.entrypoints.cli_args import add_engine_args, engine_args_from

logger = logging.getLogger(__name__)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0-65535, got {text!r}")
    return port


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    default = p.get_default("model")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help=f"the model to serve, as in `vllm serve MODEL` (or --model MODEL; "
                        f"default: {default})")
    # --model's default becomes None, so that resolve_model can tell "--model not given"
    # from "--model given the default's value"; the default itself is kept beside it.
    p.set_defaults(model=None, serve_default_model=default)
    g = p.add_argument_group("server")
    g.add_argument("--served-model-name", default=None,
                   help="the model id the server answers to (default: --model)")
    g.add_argument("--disable-log-stats", action="store_true",
                   help="no periodic throughput / KV-usage log line")
    g.add_argument("--shutdown-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="on SIGINT / SIGTERM, how long the requests in flight may take to "
                        "finish; then the rest fail (a stream ends with an error event)")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (0.0.0.0 for every interface)")
    g.add_argument("--port", type=_port, default=8000)
    g.add_argument("--api-key", default=None,
                   help="if set, /v1/*, /tokenize and /detokenize need 'Authorization: "
                        "Bearer <key>'")
    g.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="chat requests may name image files under DIR (file:// or a path); "
                        "otherwise images come as data: URLs")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])


def resolve_model(ns: argparse.Namespace) -> None:
    """Set `ns.model` from the positional MODEL or --model (ValueError if they differ), else
    the engine's default model."""
    tag, flag = getattr(ns, "model_tag", None), getattr(ns, "model", None)
    if tag is not None and flag is not None and tag != flag:
        raise ValueError(f"two models given: {tag!r} (positional MODEL) and {flag!r} "
                         f"(--model); give one of them")
    ns.model = tag or flag or getattr(ns, "serve_default_model", None)


def freeze_startup_objects() -> None:
    """Collect once, then keep what start-up made (modules, the model, the engine) out of
    every later collection (`gc.freeze`): otherwise each full collection scans all of it, a
    pause for every running request (docs/benchmarks.md, thirtieth session, measures one).
    The server owns its process, so nothing else's garbage is frozen."""
    gc.collect()
    gc.freeze()


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads (vLLM's order): a port in use is an
    error at once, not after the model and its graphs have loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets that say TCP,
    # and with Nagle's algorithm on, a stream's small chunks waited for the client's delayed
    # ACK on a reused connection
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen()
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def draining_server(config, engine, drain_s: float):
    """uvicorn's server whose shutdown lets the engine drain first: new connections are
    refused at once, the requests in flight get `drain_s` seconds to finish, then the engine
    stops and fails the rest, so their streams end with an error event and `[DONE]` and
    waiting calls answer with an error, before uvicorn closes what is left (on its own it
    cut them off after its graceful timeout, streams mid-message)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            for server in self.servers:
                server.close()
            deadline = time.monotonic() + drain_s
            while not engine.snapshot.idle and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(engine.shutdown)
            await super().shutdown(sockets)

    return DrainingServer(config)


def main(ns: argparse.Namespace) -> int:
    resolve_model(ns)       # before engine_args_from: the engine reads ns.model

    import uvicorn

    from fullgraph.engine.async_engine import AsyncLLMEngine
    from fullgraph.engine.engine import LLMEngine
    from fullgraph.entrypoints.server.app import build_app

    args = engine_args_from(ns)      # flags checked before the socket is taken
    sock = listening_socket(ns.host, ns.port)
    try:
        engine = AsyncLLMEngine(LLMEngine.from_engine_args(args))
        try:
            app = build_app(engine, api_key=ns.api_key,
                            allowed_media_path=ns.allowed_local_media_path)
            freeze_startup_objects()
            logger.info("serving %s on http://%s:%d", engine.config.model.name, ns.host,
                        sock.getsockname()[1])
            config = uvicorn.Config(app, log_level=ns.uvicorn_log_level,
                                    timeout_graceful_shutdown=5)
            draining_server(config, engine, ns.shutdown_timeout).run(sockets=[sock])
        finally:
            engine.shutdown()
    finally:
        sock.close()
    return 0


if __name__ == "__main__":      # python -m fullgraph.entrypoints.server.cli MODEL ...
    from fullgraph.entrypoints.cli import main as cli_main
    sys.exit(cli_main(["serve", *sys.argv[1:]]))
