"""structlog set-up: JSON lines for log pipelines, a readable console in a terminal.

Our own events, aiohttp's and asyncio's records (through the standard library's logging)
and the access log all go through one chain, to stdout: under LOG_FORMAT=json every line
is one JSON object with `timestamp`, `level` and `event` (and `request_id` within a
request). Exceptions are structured fields without local variables; the values of the
configured secrets never reach a line, whoever logged it; customers' identifiers are
written as a keyed hash.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import secrets
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, Final

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Shorter values are not redacted: replacing them would mangle ordinary words, and no real
# secret is that short (production refuses to start without long ones).
MIN_SECRET_CHARS: Final = 8
REDACTED: Final = "[redacted]"
# Marks the handler this module installs, so configuring again replaces it.
HANDLER_NAME: Final = "livechat"
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
        """The event with each customer identifier hashed."""
        for field in CUSTOMER_FIELDS.intersection(event):
            value = event[field]
            if isinstance(value, str) and not value.startswith("h:"):
                event[field] = self.hashed(value)
        return event


def configure_logging(
    log_format: str = "console",
    level: str = "info",
    *,
    secret_values: Iterable[str] = (),
    redact_key: bytes | None = None,
) -> None:
    """Configure logging once for the process: structlog, and the stdlib's records too.

    `redact_key` keys the hash of customer identifiers (the server's secret key, so every
    instance writes the same hash for one customer); a random one when not given.
    """
    threshold = LEVELS.get(level, logging.INFO)
    hidden = _secrets(secret_values)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        CustomerIds(redact_key or secrets.token_bytes(32)),
    ]
    tail: list[Any]
    stdlib_tail: list[Any]
    factory: Any
    if log_format == "json":
        exceptions = structlog.processors.ExceptionRenderer(
            ExceptionDictTransformer(show_locals=False)
        )
        # Every request and broadcast logs a line: orjson and a bytes logger halve its cost.
        tail = [exceptions, structlog.processors.JSONRenderer(serializer=orjson.dumps)]
        stdlib_tail = [exceptions, structlog.processors.JSONRenderer(serializer=_json_text)]
        factory = structlog.BytesLoggerFactory(file=sys.stdout.buffer)
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stdout.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        tail = stdlib_tail = [renderer]
        factory = structlog.WriteLoggerFactory(file=sys.stdout)
    if hidden:
        tail = [*tail, Redactor(hidden)]
        stdlib_tail = [*stdlib_tail, Redactor(hidden)]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *stdlib_tail],
    )
    handler = StdoutHandler()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    # aiohttp's access records: the access log below writes ours, with the request id.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _json_text(value: Any, **_: Any) -> str:
    return orjson.dumps(value).decode()


def _secrets(values: Iterable[str]) -> tuple[str, ...]:
    found = {v for v in values if v and len(v) >= MIN_SECRET_CHARS}
    # As written in a JSON string too (a quote or a non-ASCII character is escaped there).
    found |= {orjson.dumps(v).decode()[1:-1] for v in found}
    return tuple(sorted(found, key=len, reverse=True))


class Redactor:
    """The last processor: the configured secrets' values, replaced in the rendered line."""

    def __init__(self, values: tuple[str, ...]) -> None:
        self.text = values
        self.raw = tuple(v.encode() for v in values)

    def __call__(self, logger: Any, name: str, line: Any) -> Any:
        """The line with every secret replaced."""
        if isinstance(line, bytes):
            for value in self.raw:
                if value in line:
                    line = line.replace(value, REDACTED.encode())
        elif isinstance(line, str):
            for text in self.text:
                if text in line:
                    line = line.replace(text, REDACTED)
        return line


class StdoutHandler(logging.Handler):
    """Writes formatted records to the current sys.stdout, one line each."""

    def emit(self, record: logging.LogRecord) -> None:
        """Format and write one record."""
        try:
            line = self.format(record)
            stream = sys.stdout
            stream.write(line + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def new_request_id() -> str:
    """A random request id, for a request that never reached the app (a malformed one)."""
    return secrets.token_hex(6)


class RequestIds:
    """Request ids: this app's random prefix, then a counter."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4) + "-"
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        """The next id."""
        return f"{self._prefix}{next(self._counter):x}"
