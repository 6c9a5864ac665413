"""Serving the app from this process: listen, then stop gracefully on SIGTERM or SIGINT.

The order on a stop signal (README, Operations):

1. stop accepting: `/readyz` answers 503 at once, other new requests get a 503 that says to
   try again, every SSE stream ends (server/shutdown.py);
2. running background jobs get LIVECHAT_SHUTDOWN_TIMEOUT seconds to finish; a second
   signal cuts them at once;
3. the listening sockets close, requests still in flight get REQUESTS_GRACE_S, then the
   store listener, the stores and the HTTP client close (the app's cleanup contexts).

The process then exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Final

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from server import keys
from server.app import create_app
from server.config import Settings
from server.handlers.metrics import metrics_handler
from server.logging import new_request_id
from server.shutdown import cut_jobs, drain, stop_accepting

log = structlog.get_logger(__name__)
access_log = structlog.get_logger("access")

STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
# Requests still running once the jobs are done (they had the drain to finish already): a
# webhook takes milliseconds on SQLite and well under a second on Firestore.
REQUESTS_GRACE_S: Final = 3.0
# A path is logged cut to this: the client chooses it.
LOGGED_PATH_CHARS: Final = 200


async def serve(settings: Settings, *, listening: Callable[[], None] | None = None) -> None:
    """Serve the app for `settings` until a stop signal, then stop gracefully.

    `listening` is called once the sockets accept connections.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            log.warning("server.signal", signal=signum.name, action="cut_jobs")
            hurry.set()
        else:
            log.info("server.signal", signal=signum.name, action="stop")
            stop.set()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    app = create_app(settings)
    runner = web.AppRunner(app, access_log_class=AccessLog, shutdown_timeout=REQUESTS_GRACE_S)
    metrics_runner: web.AppRunner | None = None
    try:
        await runner.setup()  # opens the store, seeds the demo, starts the warmer
        if settings.metrics_port is not None:
            metrics_app = web.Application()
            metrics_app.router.add_get("/metrics", metrics_handler(app[keys.METRICS]))
            metrics_runner = web.AppRunner(metrics_app, access_log=None)
            await metrics_runner.setup()
        if not stop.is_set():
            await web.TCPSite(runner, settings.host, settings.port).start()
            if metrics_runner is not None:
                host = settings.metrics_host or settings.host
                await web.TCPSite(metrics_runner, host, settings.metrics_port).start()
            log.info(
                "server.listening",
                host=settings.host,
                port=settings.port,
                metrics_port=settings.metrics_port,
                store=settings.store,
            )
            if listening is not None:
                listening()
            await stop.wait()
        started = time.monotonic()
        stop_accepting(app)
        await _drain(app, settings.shutdown_timeout_s, hurry)
    finally:
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
    log.info("server.stopped", duration_s=round(time.monotonic() - started, 3))


class AccessLog(AbstractAccessLogger):
    """One `http.request` line per answered request, failed ones inside aiohttp included."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Method, route, path (never the query: it can carry tokens), status, duration."""
        request_id = request.get(keys.REQUEST_ID) or request.headers.get("X-Request-ID", "")[:64]
        access_log.info(
            "http.request",
            request_id=request_id or new_request_id(),
            method=request.method,
            # None: the request never reached the app (aiohttp refused it).
            route=request.get(keys.ROUTE),
            path=request.path[:LOGGED_PATH_CHARS],
            status=response.status,
            bytes=response.body_length,
            duration_ms=round(time * 1000, 3),
        )


async def _drain(app: web.Application, within_s: float, hurry: asyncio.Event) -> None:
    """Let the jobs finish within the bound, or until a second signal cuts them."""
    draining = asyncio.ensure_future(drain(app, within_s))
    hurried = asyncio.ensure_future(hurry.wait())
    try:
        await asyncio.wait({draining, hurried}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hurried.cancel()
        if not draining.done():
            draining.cancel()
            await asyncio.gather(draining, return_exceptions=True)
            await cut_jobs(app)
    if not draining.cancelled():
        draining.result()  # a failure of the drain itself is a bug: raise it
