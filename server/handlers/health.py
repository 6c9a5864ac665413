"""Liveness and readiness."""

from __future__ import annotations

from http import HTTPStatus

import structlog
from aiohttp import web

from server import keys
from server.store.base import StoreError

log = structlog.get_logger(__name__)


async def healthz(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready once the snapshot is warm and the store answers; degraded while it does not."""
    snapshot = request.app[keys.SNAPSHOT]
    store = request.app[keys.STORE]
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
        # The store's own words stay in the log: this answer is public.
        log.warning("readyz.store_unreachable", error=str(e))
        body["status"] = "degraded"
        body["error"] = "the store cannot be reached"
        return web.json_response(body, status=HTTPStatus.SERVICE_UNAVAILABLE)
    if not snapshot.fresh:
        body["status"] = "degraded"
        return web.json_response(body, status=HTTPStatus.SERVICE_UNAVAILABLE)
    return web.json_response(body)
