"""Who may call what: the auth middleware, and signing in and out.

Every route declares a Policy (server/routes.py). The middleware finds the caller:

- a Bearer token: the machine token (LIVECHAT_API_TOKEN, for integrations and scripts) or
  an agent's personal API token. Bearer requests cannot be forged by another site, so they
  need no origin check;
- else the session cookie the dashboard's sign-in sets (HttpOnly, SameSite=Lax). A browser
  sends it with requests other sites make too, so a cookie-authenticated POST, PATCH or
  DELETE must be JSON (a cross-site form cannot send that without the site's consent) and
  come from this server's own origin (`Origin`, or `Sec-Fetch-Site: same-origin`). The one
  route that takes files takes them as a multipart form, from this origin only.

The machine token is never accepted as a cookie: people sign in as themselves.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

import structlog
from aiohttp import hdrs, web

from server import keys
from server.access import Access
from server.accounts import SESSION_TTL_MS, Principal, SignInRefused
from server.handlers.errors import BadRequest, Handler, json_error, read_json

log = structlog.get_logger(__name__)

COOKIE: Final = "livechat_session"
UNSAFE_METHODS: Final = frozenset({"POST", "PATCH", "PUT", "DELETE"})
MAX_EMAIL: Final = 254
MAX_PASSWORD: Final = 256


def client_address(request: web.Request) -> str:
    """The caller's address: behind LIVECHAT_PROXY_HOPS proxies, from X-Forwarded-For."""
    hops = request.app[keys.SETTINGS].proxy_hops
    if hops:
        forwarded = [part.strip() for part in request.headers.get("X-Forwarded-For", "").split(",")]
        forwarded = [part for part in forwarded if part]
        if forwarded:
            return forwarded[-hops] if len(forwarded) >= hops else forwarded[0]
    return request.remote or "unknown"


def same_origin(request: web.Request, *, uploads: bool = False) -> bool:
    """True when a browser write comes from this server's own page, as JSON (or, where the
    route takes files, as a multipart form: then the origin alone must vouch for it)."""
    ctype = request.content_type
    if ctype != "application/json" and not (uploads and ctype == "multipart/form-data"):
        return False
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None:
        scheme, sep, authority = origin.partition("://")
        return (
            bool(sep)
            and scheme.lower() in ("http", "https")
            and authority.lower() == request.host.lower()
        )
    return request.headers.get("Sec-Fetch-Site") == "same-origin"


def _unauthorized(message: str) -> web.Response:
    return json_error(
        HTTPStatus.UNAUTHORIZED,
        "unauthorized",
        message,
        headers={"WWW-Authenticate": 'Bearer realm="livechat"'},
    )


def _too_many(wait: int) -> web.Response:
    return json_error(
        HTTPStatus.TOO_MANY_REQUESTS,
        "too_many_attempts",
        "too many unknown credentials from this address; try again later",
        headers={"Retry-After": str(wait)},
    )


def _cross_origin() -> web.Response:
    return json_error(
        HTTPStatus.FORBIDDEN,
        "cross_origin",
        "a signed-in browser write must be a JSON request from this server's own page",
    )


async def authenticate(request: web.Request) -> Principal | web.Response:
    """The caller, or the answer that refuses it (401, or 429 for an address that sprays)."""
    accounts = request.app[keys.ACCOUNTS]
    header = request.headers.get(hdrs.AUTHORIZATION)
    if header is not None:
        scheme, _, value = header.partition(" ")
        raw = value.strip()
        if scheme.lower() != "bearer" or not raw:
            return _unauthorized("send 'Authorization: Bearer <token>' or sign in")
        found = accounts.machine(raw)
        if found is not None:
            return found
        lookup = accounts.from_bearer
    else:
        raw = request.cookies.get(COOKIE, "")
        if not raw:
            return _unauthorized("sign in, or send 'Authorization: Bearer <token>'")
        lookup = accounts.from_cookie
    address = client_address(request)
    principal = await lookup(raw)
    if principal is not None:
        return principal
    wait = accounts.credential_wait(address)
    if wait is not None:
        return _too_many(wait)
    accounts.refused_credential(address)
    return _unauthorized("that credential is not valid (signed out, expired or revoked)")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Enforce each route's declared access; unknown /api/ paths need an agent too."""
    policy = request.app[keys.ROUTES].get(request.match_info.route)
    if policy is not None:
        access = policy.access
    else:
        # No route matched (a 404 or 405 follows): answer as a protected route would, so an
        # anonymous caller learns nothing about which API paths exist.
        access = Access.AGENT if request.path.startswith("/api/") else Access.OPEN
    if access is Access.OPEN:
        return await handler(request)
    found = await authenticate(request)
    if isinstance(found, web.Response):
        return found
    if access is Access.ADMIN and not found.is_admin:
        return json_error(HTTPStatus.FORBIDDEN, "forbidden", "this needs an admin")
    uploads = policy is not None and policy.max_upload is not None
    if (
        found.kind == "session"
        and request.method in UNSAFE_METHODS
        and not same_origin(request, uploads=uploads)
    ):
        log.warning("auth.cross_origin", path=request.path, method=request.method)
        return _cross_origin()
    request[keys.PRINCIPAL] = found
    return await handler(request)


def _set_session_cookie(request: web.Request, response: web.Response, value: str) -> None:
    settings = request.app[keys.SETTINGS]
    response.set_cookie(
        COOKIE,
        value,
        httponly=True,
        samesite="Lax",
        secure=settings.env == "production" or request.secure,
        max_age=SESSION_TTL_MS // 1000,
        path="/",
    )


async def login(request: web.Request) -> web.Response:
    """POST /api/auth/login {"email", "password"}: a session cookie for the dashboard."""
    browser = hdrs.ORIGIN in request.headers or "Sec-Fetch-Site" in request.headers
    if request.content_type != "application/json" or (browser and not same_origin(request)):
        # A script may sign in without an Origin; a page of another site may not.
        return _cross_origin()
    body = await read_json(request)
    unknown = set(body) - {"email", "password"}
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}", "invalid_field")
    email, password = body.get("email"), body.get("password")
    if not isinstance(email, str) or not email.strip() or len(email) > MAX_EMAIL:
        raise BadRequest(f"email must be a string of 1 to {MAX_EMAIL} characters", "invalid_email")
    if not isinstance(password, str) or not password or len(password) > MAX_PASSWORD:
        raise BadRequest(
            f"password must be a string of 1 to {MAX_PASSWORD} characters", "invalid_password"
        )
    try:
        principal, value = await request.app[keys.ACCOUNTS].sign_in(
            email, password, client_address(request)
        )
    except SignInRefused as e:
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
        return json_error(HTTPStatus(e.status), e.code, str(e), headers=headers)
    response = web.json_response(principal.to_json())
    _set_session_cookie(request, response, value)
    return response


async def logout(request: web.Request) -> web.Response:
    """POST /api/auth/logout: the session ends on every instance; the cookie is cleared."""
    await request.app[keys.ACCOUNTS].sign_out(request[keys.PRINCIPAL])
    response = web.json_response({"ok": True})
    response.del_cookie(COOKIE, path="/")
    return response


async def me(request: web.Request) -> web.Response:
    """GET /api/auth/me: who is signed in."""
    return web.json_response(request[keys.PRINCIPAL].to_json())
