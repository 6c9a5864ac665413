"""create_app(settings): the one place the application is wired together."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, Final

import aiohttp
import aiojobs
import structlog
from aiohttp import web
from aiojobs.aiohttp import get_scheduler_from_app
from aiojobs.aiohttp import setup as setup_jobs

from server import keys
from server.chatlist import ChatList
from server.config import Settings
from server.cursor import CursorCodec
from server.demo import seed_demo
from server.handlers import auth, chats, events, health, webhook
from server.handlers.errors import error_middleware
from server.handlers.metrics import metrics_handler
from server.hub import Hub
from server.inbox import Inbox
from server.integrations.ai import make_responder
from server.integrations.whatsapp import make_sender
from server.logging import RequestIds
from server.metrics import CountingSender, Metrics, State
from server.shutdown import Shutdown, stop_accepting
from server.snapshot import Snapshot
from server.store import make_store
from server.workers.ai import AiReplies
from server.workers.warmer import Warmer

log = structlog.get_logger(__name__)

# At most this many AI replies and sends run at once; the rest wait their turn.
JOBS_LIMIT: Final = 200


def create_app(settings: Settings) -> web.Application:
    """The application for these settings; run it with web.run_app or a test client."""
    app = web.Application(
        middlewares=[error_middleware, auth.auth_middleware],
        client_max_size=4 * 1024 * 1024,  # WhatsApp batches up to 3 MB of updates
    )
    app[keys.SETTINGS] = settings
    app[keys.REQUEST_IDS] = RequestIds()
    app[keys.CURSORS] = CursorCodec(settings.secret_key.encode())
    app[keys.HUB] = Hub(settings.instance_id)
    app[keys.STREAMS] = weakref.WeakSet()
    window = settings.firestore_window if settings.store == "firestore" else None
    app[keys.SNAPSHOT] = Snapshot(complete=window is None, window=window)
    app[keys.SHUTDOWN] = Shutdown()
    app[keys.METRICS] = metrics = Metrics()
    metrics.watch(
        State(app[keys.HUB], app[keys.SNAPSHOT], lambda: app.get(keys.WARMER), _jobs(app))
    )

    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(_store)
    # On shutdown, running jobs (AI replies, WhatsApp sends) get this long to finish.
    setup_jobs(
        app,
        limit=JOBS_LIMIT,
        wait_timeout=settings.shutdown_timeout_s,
        exception_handler=_job_failed,
    )
    app.cleanup_ctx.append(_inbox)
    app.cleanup_ctx.append(_warmer)
    app.on_shutdown.append(_close_streams)
    _routes(app, settings)
    return app


def _routes(app: web.Application, settings: Settings) -> None:
    r = app.router
    r.add_get("/healthz", health.healthz)
    r.add_get("/readyz", health.readyz)
    r.add_post("/api/auth/session", auth.create_session)
    r.add_delete("/api/auth/session", auth.delete_session)
    r.add_get("/api/auth/session", auth.session_status)
    r.add_get("/api/live-chat/unified-chats", chats.unified_chats)
    r.add_get("/api/live-chat/events", events.events)
    r.add_get("/api/live-chat/conversations/{id}", chats.get_conversation)
    r.add_patch("/api/live-chat/conversations/{id}", chats.patch_conversation)
    r.add_get("/api/live-chat/conversations/{id}/messages", chats.list_messages)
    r.add_post("/api/live-chat/conversations/{id}/messages", chats.post_message)
    r.add_post("/api/live-chat/conversations/{id}/read", chats.mark_read)
    r.add_get("/webhooks/whatsapp", webhook.verify)
    r.add_post("/webhooks/whatsapp", webhook.receive)
    if settings.metrics_port is None:
        r.add_get("/metrics", metrics_handler(app[keys.METRICS]))
    static = Path(settings.static_dir)
    if static.is_dir():
        r.add_get("/", _index)
        r.add_static("/static/", static, append_version=False)


async def _index(request: web.Request) -> web.FileResponse:
    """The dashboard's single page."""
    path = Path(request.app[keys.SETTINGS].static_dir) / "index.html"
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    """One client session for every outbound call (WhatsApp, the AI), reused."""
    async with aiohttp.ClientSession(raise_for_status=False) as session:
        app[keys.HTTP] = session
        yield


async def _store(app: web.Application) -> AsyncIterator[None]:
    """Open the store first and close it last: everything else uses it."""
    store = make_store(app[keys.SETTINGS])
    await store.start()
    app[keys.STORE] = store
    app[keys.CHATLIST] = ChatList(app[keys.SNAPSHOT], store, app[keys.CURSORS])
    try:
        if app[keys.SETTINGS].demo:
            added = await seed_demo(store, app[keys.SETTINGS].demo_conversations)
            log.info("demo.seeded", conversations=added, store=store.name)
        yield
    finally:
        await store.close()


def _spawner(app: web.Application) -> Any:
    async def spawn(coro: Coroutine[Any, Any, Any]) -> None:
        scheduler = get_scheduler_from_app(app)
        if scheduler is None or scheduler.closed:
            coro.close()
            log.warning("job.refused", reason="shutting down")
            return
        await scheduler.spawn(coro)

    return spawn


async def _inbox(app: web.Application) -> AsyncIterator[None]:
    """The inbox with its WhatsApp sender and AI replies."""
    settings = app[keys.SETTINGS]
    session = app[keys.HTTP]
    store = app[keys.STORE]
    metrics = app[keys.METRICS]
    sender = CountingSender(make_sender(settings, session), metrics)
    inbox = Inbox(store, app[keys.HUB], _spawner(app), sender)
    responder = make_responder(settings, session)
    if responder is not None:
        inbox.ai_reply = AiReplies(store, inbox, responder, settings, metrics).run
    app[keys.INBOX] = inbox
    try:
        yield
    finally:
        inbox.close()  # before the jobs drain: statuses still waiting give up at once


async def _warmer(app: web.Application) -> AsyncIterator[None]:
    """The background worker that keeps the snapshot warm; cancelled and awaited on exit."""
    warmer = Warmer(app[keys.STORE], app[keys.SNAPSHOT], app[keys.INBOX])
    app[keys.WARMER] = warmer
    task = asyncio.create_task(warmer.run(), name="snapshot-warmer")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _close_streams(app: web.Application) -> None:
    """On shutdown, end every SSE stream at once so the server can stop promptly (a server
    stopped by a signal did this already, before its jobs drained)."""
    stop_accepting(app)


def _jobs(app: web.Application) -> Callable[[], tuple[int, int]]:
    def counts() -> tuple[int, int]:
        scheduler = get_scheduler_from_app(app)
        if scheduler is None:
            return 0, 0
        return scheduler.active_count, scheduler.pending_count

    return counts


def _job_failed(scheduler: aiojobs.Scheduler, context: dict[str, Any]) -> None:
    """A background job raised: log it (the job itself records the user-visible failure)."""
    exc = context.get("exception")
    log.error("job.failed", message=context.get("message"), error=repr(exc), exc_info=exc)
