"""Limits on request bodies, and the security headers every answer carries."""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Final

import structlog
from aiohttp import web

from server import keys
from server.access import API_BODY
from server.handlers.errors import Handler, json_error

log = structlog.get_logger(__name__)

BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The dashboard is one page of our own files: no inline script or style, no other origin,
# never inside a frame (clickjacking). The favicon is a data: URL.
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none';"
    " form-action 'self'; frame-ancestors 'none'"
)
# Browsers remember to use https for two years (HSTS preload lists ask for at least one).
HSTS: Final = "max-age=63072000; includeSubDomains"
# What the Server header says: no framework or version for a scanner to match.
SERVER_NAME: Final = "livechat"


@web.middleware
async def body_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read a request's body before its handler, within the route's size and a time limit.

    Too large: 413 before anything is read when Content-Length says so, else as soon as the
    limit is passed; the connection then closes after aiohttp has read and discarded what
    the client still sends (for at most its lingering time, 10 s), so the client can read
    the answer instead of having its writes reset. Not all there within
    LIVECHAT_BODY_TIMEOUT: 408, and the connection is closed at once (what is still on its
    way is never read).
    """
    if request.method not in BODY_METHODS and not request.body_exists:
        return await handler(request)
    policy = request.app[keys.ROUTES].get(request.match_info.route)
    limit = policy.max_body if policy is not None else API_BODY
    length = request.content_length
    if (
        policy is not None
        and policy.max_upload is not None
        and request.content_type.startswith("multipart/")
    ):
        # A file upload: streamed to the handler, which reads it in bounded chunks.
        if length is not None and length > policy.max_upload:
            return _last_on_connection(_too_large(policy.max_upload))
        return await handler(request)
    if length is not None and length > limit:
        return _last_on_connection(_too_large(limit))
    limited = request.clone(client_max_size=limit)
    timeout = request.app[keys.SETTINGS].body_timeout_s
    try:
        async with asyncio.timeout(timeout):
            await limited.read()
    except web.HTTPRequestEntityTooLarge:
        return _last_on_connection(_too_large(limit))
    except TimeoutError:
        log.warning("request.body_timeout", path=request.path, timeout_s=timeout)
        answer = json_error(
            HTTPStatus.REQUEST_TIMEOUT,
            "body_timeout",
            f"the request body did not arrive within {timeout:g} s",
        )
        return await _last_answer(request, answer)
    return await handler(limited)


def _too_large(limit: int) -> web.Response:
    return json_error(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        "body_too_large",
        f"the body is larger than {limit} bytes",
    )


def _last_on_connection(response: web.Response) -> web.Response:
    """`response`, after which the connection is not reused."""
    response.force_close()
    return response


async def _last_answer(request: web.Request, response: web.Response) -> web.Response:
    """Send `response`, then close the connection at once (its request's body unread)."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()  # sends what is buffered (the answer), then closes
    return response


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the headers every answer of the app carries."""
    headers = response.headers
    headers["Server"] = SERVER_NAME
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["Content-Security-Policy"] = CSP
    headers["X-Frame-Options"] = "DENY"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    if request.app[keys.SETTINGS].env == "production":
        headers["Strict-Transport-Security"] = HSTS
    cache = headers.get("Cache-Control", "")
    if request.path.startswith("/api/") and "no-store" not in cache and "private" not in cache:
        # Answers full of customers' names, numbers and messages: no cache may keep them.
        # A handler that allows only the agent's own browser to keep an answer says
        # `private` (a media file, which never changes once kept).
        headers["Cache-Control"] = "no-store"
