"""Liveness and readiness."""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web

from server import keys


async def healthz(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready once the snapshot is warm, and for as long as it is: an instance whose store is
    unreachable still serves its last good list (marked stale), so it says `degraded` but
    stays in the load balancer. Every instance loses the store at once in an outage; were
    they all taken out, nobody would get the stale list. No store read per probe. 503 from
    the moment the server starts stopping."""
    snapshot = request.app[keys.SNAPSHOT]
    if request.app[keys.SHUTDOWN].stopping:
        # First thing on a stop signal: load balancers take this instance out of rotation.
        return web.json_response({"status": "stopping"}, status=HTTPStatus.SERVICE_UNAVAILABLE)
    body = {
        "status": "ok" if snapshot.fresh else "degraded",
        "snapshot": {
            "ready": snapshot.ready,
            "fresh": snapshot.fresh,
            "conversations": len(snapshot),
        },
        "store": request.app[keys.STORE].name,
        "sse_clients": request.app[keys.HUB].clients,
    }
    if not snapshot.ready:
        body["status"] = "starting"
        return web.json_response(
            body, status=HTTPStatus.SERVICE_UNAVAILABLE, headers={"Retry-After": "1"}
        )
    return web.json_response(body)
