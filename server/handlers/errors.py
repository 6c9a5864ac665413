"""JSON errors and the middleware that maps domain errors to HTTP answers."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Final

import structlog
from aiohttp import web

from server import keys
from server.cursor import InvalidCursor
from server.integrations.templates import TemplateError
from server.media import MediaStoreError, TooLarge
from server.metrics import UNMATCHED
from server.store.base import (
    NotFound,
    NotRetryable,
    SearchUnavailable,
    StoreUnavailable,
    WindowClosed,
)

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


# Answered while the server stops: the probes, and what an operator watches.
ALWAYS_ANSWERED: Final = frozenset({"/healthz", "/readyz", "/metrics"})


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give each request an id for its log lines, answer every failure in JSON, count it."""
    # A caller's id joins our log lines to theirs; bounded, since the caller chooses it.
    # Ours need only be unique, not secret: a counter per process (random bytes cost a
    # system call on every request).
    app = request.app
    request_id = request.headers.get("X-Request-ID", "")[:64] or app[keys.REQUEST_IDS]()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else UNMATCHED
    request[keys.REQUEST_ID] = request_id
    request[keys.ROUTE] = route
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    status: int | None = None
    response: web.StreamResponse
    try:
        if app[keys.SHUTDOWN].stopping and request.path not in ALWAYS_ANSWERED:
            response = _stopping()
        else:
            response = await _answer(request, handler)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        elapsed = time.perf_counter() - started
        if status is not None:  # None: cancelled, the client never gets an answer
            app[keys.METRICS].request(request.method, route, status, elapsed)
        if elapsed > 1 and request.path != "/api/live-chat/events":
            log.warning("request.slow", path=request.path, duration_ms=round(elapsed * 1000, 3))
        structlog.contextvars.unbind_contextvars("request_id")


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
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
    except SearchUnavailable as e:
        return json_error(HTTPStatus.NOT_IMPLEMENTED, "message_search_unavailable", str(e))
    except WindowClosed as e:
        # Refused before WhatsApp is called: it would answer 131047.
        return json_error(HTTPStatus.UNPROCESSABLE_ENTITY, "window_closed", str(e))
    except TemplateError as e:
        return json_error(HTTPStatus.UNPROCESSABLE_ENTITY, e.code, str(e))
    except TooLarge as e:
        return json_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "file_too_large", str(e))
    except MediaStoreError as e:
        log.warning("media.store_failed", path=request.path, error=str(e))
        return json_error(
            HTTPStatus.SERVICE_UNAVAILABLE,
            "media_store_unavailable",
            "the file could not be stored; try again shortly",
            headers={"Retry-After": "2"},
        )
    except web.HTTPException as e:
        if e.status >= 400 and e.content_type != "application/json":
            return json_error(HTTPStatus(e.status), _code(e.status), e.reason)
        raise
    except ConnectionError:
        raise  # the client went away: there is no one to answer
    except Exception:
        # A bug: never a plain-text traceback to the caller; the log has it, with the
        # request id the caller can quote.
        request_id = request[keys.REQUEST_ID]
        log.exception(
            "request.failed", path=request.path, method=request.method, request_id=request_id
        )
        return json_error(
            HTTPStatus.INTERNAL_SERVER_ERROR,
            "internal_error",
            f"the server failed on this request (request id {request_id})",
        )


def _stopping() -> web.Response:
    return json_error(
        HTTPStatus.SERVICE_UNAVAILABLE,
        "shutting_down",
        "this server is stopping; try again",
        headers={"Retry-After": "1", "Connection": "close"},
    )


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
