"""structlog set-up: JSON lines for log pipelines, a readable console in a terminal."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import secrets
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import orjson
import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


# Fields that name a customer: their WhatsApp id (a phone number), their number, and
# WhatsApp message ids (which carry the number, base64-encoded). Logged as a keyed hash:
# lines about one customer still match each other, but do not say who the customer is.
CUSTOMER_FIELDS: Final = frozenset(
    {"user_id", "phone", "wa_id", "to", "recipient_id", "wa_message_id", "from"}
)
HASHED_CHARS: Final = 16


class CustomerIds:
    """A structlog processor: customer identifiers become `h:` and a keyed hash."""

    def __init__(self, key: bytes) -> None:
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)

    def hashed(self, value: str) -> str:
        """The logged form of one identifier."""
        mac = self._keyed.copy()
        mac.update(value.encode())
        return "h:" + mac.hexdigest()[:HASHED_CHARS]

    def __call__(
        self, logger: Any, name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for field in CUSTOMER_FIELDS.intersection(event):
            value = event[field]
            if isinstance(value, str) and not value.startswith("h:"):
                event[field] = self.hashed(value)
        return event


def configure_logging(
    log_format: str = "console", level: str = "info", redact_key: bytes | None = None
) -> None:
    """Configure structlog once for the process; every line has event, level, timestamp.

    `redact_key` keys the hash of customer identifiers (the server's secret key, so every
    instance writes the same hash for one customer); a random one when not given.
    """
    redact = CustomerIds(redact_key or secrets.token_bytes(32))
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        *shared,
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
    # The standard library's loggers (aiohttp's own errors, the client libraries') go
    # through the same processors, so they are lines like ours: JSON in production. The
    # access log repeats what our request lines say; warnings and errors only.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer()
            if log_format == "json"
            else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
    )
    handler = logging.StreamHandler(sys.stdout if log_format == "json" else sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


class RequestIds:
    """Request ids: this app's random prefix, then a counter."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4) + "-"
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        """The next id."""
        return f"{self._prefix}{next(self._counter):x}"
