"""JSON errors and the middleware that maps domain errors to HTTP answers."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web

from server import keys
from server.cursor import InvalidCursor
from server.store.base import NotFound, NotRetryable, StoreUnavailable

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(ValueError):
    """The request is malformed; the message says what to fix."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


def json_error(
    status: HTTPStatus, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """`{"error": {"code", "message"}}` with the status."""
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give each request an id for its log lines, and answer every failure in JSON."""
    # A caller's id joins our log lines to theirs; bounded, since the caller chooses it.
    # Ours need only be unique, not secret: a counter per process (random bytes cost a
    # system call on every request).
    request_id = request.headers.get("X-Request-ID", "")[:64] or request.app[keys.REQUEST_IDS]()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    try:
        return await handler(request)
    except BadRequest as e:
        return json_error(HTTPStatus.BAD_REQUEST, e.code, str(e))
    except InvalidCursor as e:
        return json_error(HTTPStatus.BAD_REQUEST, "invalid_cursor", str(e))
    except NotFound as e:
        return json_error(HTTPStatus.NOT_FOUND, "not_found", str(e))
    except StoreUnavailable as e:
        log.warning("store.unavailable", path=request.path, error=str(e))
        return json_error(
            HTTPStatus.SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the store cannot be reached; try again shortly",
            headers={"Retry-After": "2"},
        )
    except NotRetryable as e:
        return json_error(HTTPStatus.CONFLICT, "not_retryable", str(e))
    except web.HTTPException as e:
        if e.status >= 400 and e.content_type != "application/json":
            return json_error(HTTPStatus(e.status), _code(e.status), e.reason)
        raise
    except Exception:
        # A bug: never a plain-text traceback to the caller; the log has it, with the
        # request id the caller can quote.
        log.exception(
            "request.failed", path=request.path, method=request.method, request_id=request_id
        )
        return json_error(
            HTTPStatus.INTERNAL_SERVER_ERROR,
            "internal_error",
            f"the server failed on this request (request id {request_id})",
        )
    finally:
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        if duration_ms > 1000 and request.path != "/api/live-chat/events":
            log.warning("request.slow", path=request.path, duration_ms=duration_ms)
        structlog.contextvars.unbind_contextvars("request_id")


def _code(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_")
    except ValueError:
        return "error"


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or BadRequest saying what is wrong with it.

    The body middleware has read it already, within the route's size and time limits.
    """
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}", "invalid_json") from e
    except RecursionError as e:  # nesting deeper than any real request: refuse it whole
        raise BadRequest("body is nested too deeply", "invalid_json") from e
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object", "invalid_json")
    return body
