"""Liveness and readiness."""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web

from server import keys
from server.store.base import StoreError


async def healthz(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready once the snapshot is warm and the store answers; 503 while it does not, and
    from the moment the server starts stopping."""
    snapshot = request.app[keys.SNAPSHOT]
    store = request.app[keys.STORE]
    if request.app[keys.SHUTDOWN].stopping:
        # First thing on a stop signal: load balancers take this instance out of rotation.
        return web.json_response({"status": "stopping"}, status=HTTPStatus.SERVICE_UNAVAILABLE)
    body = {
        "status": "ok",
        "snapshot": {
            "ready": snapshot.ready,
            "fresh": snapshot.fresh,
            "conversations": len(snapshot),
        },
        "store": store.name,
        "sse_clients": request.app[keys.HUB].clients,
    }
    if not snapshot.ready:
        body["status"] = "starting"
        return web.json_response(
            body, status=HTTPStatus.SERVICE_UNAVAILABLE, headers={"Retry-After": "1"}
        )
    try:
        await store.ping()
    except StoreError as e:
        body["status"] = "degraded"
        body["error"] = str(e)
        return web.json_response(body, status=HTTPStatus.SERVICE_UNAVAILABLE)
    if not snapshot.fresh:
        body["status"] = "degraded"
        return web.json_response(body, status=HTTPStatus.SERVICE_UNAVAILABLE)
    return web.json_response(body)
