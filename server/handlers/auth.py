"""One auth check in front of every /api/ route: the API token, as a Bearer header or cookie.

Until agent accounts exist the token is shared by the team (LIVECHAT_API_TOKEN). The
dashboard trades it for an HttpOnly cookie so EventSource, which cannot set headers, works.
"""

from __future__ import annotations

import hmac
from http import HTTPStatus

from aiohttp import web

from server import keys
from server.handlers.errors import Handler, json_error, read_json

COOKIE = "livechat_token"
OPEN_PATHS = frozenset({"/api/auth/session"})
# Outside /api/ but behind the token too (unless served on a port of its own).
PROTECTED_PATHS = frozenset({"/metrics"})
# A working day and then some: agents sign in once a day, not once an hour.
COOKIE_MAX_AGE_S = 7 * 24 * 3600


def token_ok(request: web.Request, presented: str | None) -> bool:
    """True when `presented` is the configured API token (constant-time compare)."""
    expected = request.app[keys.SETTINGS].api_token
    if not expected or not presented:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


def presented_token(request: web.Request) -> str | None:
    """The token the request carries, from the Authorization header or the cookie."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return request.cookies.get(COOKIE)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse /api/ requests (and /metrics) without the token; everything else passes."""
    path = request.path
    if (path.startswith("/api/") and path not in OPEN_PATHS) or path in PROTECTED_PATHS:
        if not token_ok(request, presented_token(request)):
            return json_error(
                HTTPStatus.UNAUTHORIZED,
                "unauthorized",
                "sign in: send the API token as 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="livechat"'},
            )
    return await handler(request)


async def create_session(request: web.Request) -> web.Response:
    """Sign in: check the token and set it as an HttpOnly cookie."""
    body = await read_json(request)
    token = body.get("token")
    if not isinstance(token, str) or not token_ok(request, token):
        return json_error(HTTPStatus.UNAUTHORIZED, "invalid_token", "that token is not valid")
    response = web.json_response({"ok": True})
    response.set_cookie(
        COOKIE,
        token,
        httponly=True,
        samesite="Strict",
        max_age=COOKIE_MAX_AGE_S,
        secure=request.app[keys.SETTINGS].env == "production",
        path="/",
    )
    return response


async def delete_session(request: web.Request) -> web.Response:
    """Sign out: forget the cookie."""
    response = web.json_response({"ok": True})
    response.del_cookie(COOKIE, path="/")
    return response


async def session_status(request: web.Request) -> web.Response:
    """Whether the request is signed in, as `{"signed_in": bool}`.

    Always 200: the dashboard asks this before sign-in, and a 401 would put an error in
    the browser's console for what is the normal state of a new visitor.
    """
    # The middleware lets this path through (it is where one signs in), so check here.
    signed_in = token_ok(request, presented_token(request))
    return web.json_response({"signed_in": signed_in})
