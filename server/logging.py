"""structlog set-up: JSON lines for log pipelines, a readable console in a terminal."""

from __future__ import annotations

import itertools
import logging
import secrets
import sys
from typing import Any

import orjson
import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(log_format: str = "console", level: str = "info") -> None:
    """Configure structlog once for the process; every line has event, level, timestamp."""
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: Any
    factory: Any
    if log_format == "json":
        # Every request and broadcast logs a line: orjson and a bytes logger halve its cost.
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = structlog.BytesLoggerFactory(file=sys.stdout.buffer)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
        factory = structlog.WriteLoggerFactory(file=sys.stdout)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # aiohttp's own access log repeats what our request lines say; keep its errors only.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


class RequestIds:
    """Request ids: this app's random prefix, then a counter."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4) + "-"
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        """The next id."""
        return f"{self._prefix}{next(self._counter):x}"
