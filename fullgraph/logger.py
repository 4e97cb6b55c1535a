"""The `fullgraph` logger's handler: timestamped lines on stderr, as vLLM prints them.

`import fullgraph` installs it once (turn that off with FULLGRAPH_CONFIGURE_LOGGING=0 and
configure logging yourself); the CLI's `--log-level` sets its level. Only the `fullgraph`
logger is configured, never the root logger, so an application's own logging setup and
uvicorn's stay as they are; the handler's records do not propagate to the root logger (as
vLLM's), so a root handler the application installs does not print them twice.
"""
from __future__ import annotations

import logging
import os

LEVELS = ("debug", "info", "warning", "error", "critical")
_FORMAT = "%(levelname)s %(asctime)s.%(msecs)03d [%(name)s] %(message)s"
_DATE_FORMAT = "%m-%d %H:%M:%S"


def parse_level(text: str) -> int:
    """A level name (any case) -> its number; ValueError naming the choices otherwise."""
    if text.lower() not in LEVELS:
        raise ValueError(f"unknown log level {text!r}; choose one of {', '.join(LEVELS)}")
    return getattr(logging, text.upper())


def configure_logging(level: str | None = None) -> None:
    """Give the `fullgraph` logger its handler (once) and set its level: `level`, else
    FULLGRAPH_LOGGING_LEVEL, else INFO."""
    log = logging.getLogger("fullgraph")
    if os.environ.get("FULLGRAPH_CONFIGURE_LOGGING", "1") == "0":
        return
    if not any(getattr(h, "_fullgraph", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, _DATE_FORMAT))
        handler._fullgraph = True
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(parse_level(level or os.environ.get("FULLGRAPH_LOGGING_LEVEL", "info")))
