"""create_app(settings): the one place the application is wired together."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Final

import aiohttp
import aiojobs
import structlog
from aiohttp import web
from aiojobs.aiohttp import get_scheduler_from_app
from aiojobs.aiohttp import setup as setup_jobs

from server import keys
from server.accounts import Accounts
from server.chatlist import ChatList
from server.config import Settings
from server.cursor import CursorCodec
from server.demo import seed_demo, seed_demo_agents
from server.handlers.auth import auth_middleware
from server.handlers.errors import error_middleware
from server.handlers.hardening import body_middleware, security_headers
from server.hub import Hub
from server.inbox import Inbox
from server.integrations.ai import make_responder
from server.integrations.whatsapp import make_sender
from server.logging import RequestIds
from server.routes import add_routes, check_routes
from server.snapshot import Snapshot
from server.store import make_agent_store, make_store
from server.store.base import StoreError
from server.workers.ai import AiReplies
from server.workers.warmer import Warmer

log = structlog.get_logger(__name__)

# Background jobs (AI replies, WhatsApp sends) get this long to finish on shutdown; an LLM
# call can take seconds, and a reply cut off half-way would be lost, not retried.
JOBS_DRAIN_S: Final = 10.0
# At most this many AI replies and sends run at once; the rest wait their turn.
JOBS_LIMIT: Final = 200


def create_app(settings: Settings) -> web.Application:
    """The application for these settings; run it with web.run_app or a test client."""
    app = web.Application(
        # Errors answer in JSON; then who may call; only then is a body read (within the
        # route's own size limit, server/access.py).
        middlewares=[error_middleware, auth_middleware, body_middleware],
    )
    app[keys.SETTINGS] = settings
    app[keys.REQUEST_IDS] = RequestIds()
    app[keys.CURSORS] = CursorCodec(settings.secret_key.encode())
    app[keys.HUB] = Hub(settings.instance_id)
    app[keys.STREAMS] = weakref.WeakSet()
    window = settings.firestore_window if settings.store == "firestore" else None
    app[keys.SNAPSHOT] = Snapshot(complete=window is None, window=window)

    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(_accounts)
    setup_jobs(
        app,
        limit=JOBS_LIMIT,
        wait_timeout=JOBS_DRAIN_S,
        exception_handler=_job_failed,
    )
    app.cleanup_ctx.append(_inbox)
    app.cleanup_ctx.append(_warmer)
    app.on_shutdown.append(_close_streams)
    app.on_response_prepare.append(security_headers)
    add_routes(app, settings)
    app.on_startup.append(check_routes)
    return app


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


async def _accounts(app: web.Application) -> AsyncIterator[None]:
    """Agents, sessions and tokens, and the poller that keeps every cache current."""
    settings = app[keys.SETTINGS]
    store = make_agent_store(settings)
    await store.start()
    task: asyncio.Task[None] | None = None
    try:
        accounts = Accounts(store, settings, app[keys.HUB])
        if settings.demo:
            added = await seed_demo_agents(store, settings.demo_password)
            log.info("demo.agents_seeded", agents=added)
        try:
            await accounts.load()
        except StoreError as e:
            # Not fatal: the poller loads them as soon as the store answers.
            log.warning("accounts.load_failed", error=str(e))
        app[keys.ACCOUNTS] = accounts
        task = asyncio.create_task(accounts.run(), name="accounts-poller")
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
    sender = make_sender(settings, session)
    inbox = Inbox(store, app[keys.HUB], _spawner(app), sender)
    responder = make_responder(settings, session)
    if responder is not None:
        inbox.ai_reply = AiReplies(store, inbox, responder, settings).run
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
    """On shutdown, end every SSE stream at once so the server can stop promptly."""
    app[keys.HUB].close()
    streams = app[keys.STREAMS]
    for stream in list(streams):
        with contextlib.suppress(RuntimeError):
            stream.stop_streaming()


def _job_failed(scheduler: aiojobs.Scheduler, context: dict[str, Any]) -> None:
    """A background job raised: log it (the job itself records the user-visible failure)."""
    exc = context.get("exception")
    log.error("job.failed", message=context.get("message"), error=repr(exc), exc_info=exc)
