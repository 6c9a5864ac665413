"""create_app(settings): the one place the application is wired together."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Final

import aiohttp
import aiojobs
import structlog
from aiohttp import web

from server import keys
from server.accounts import Accounts
from server.broadcaster import Broadcaster
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
from server.integrations.templates import TemplateCatalog
from server.integrations.whatsapp import WhatsAppClient, make_sender
from server.logging import RequestIds
from server.media import MediaIndex, make_media_store
from server.metrics import CountingSender, Metrics, State
from server.replies import Replies
from server.routes import add_routes, check_routes
from server.shutdown import Shutdown, stop_accepting
from server.snapshot import Snapshot
from server.store import make_agent_store, make_store
from server.store.base import StoreError
from server.workers.ai import AiReplies
from server.workers.media import MediaDownloads
from server.workers.outbox import Lanes, Outbox
from server.workers.warmer import Warmer

log = structlog.get_logger(__name__)

# Outbound connections per pool. WhatsApp sends and AI calls each have their own pool, so
# AI calls stuck on a slow provider never hold the connections an agent's reply needs.
WHATSAPP_CONNECTIONS: Final = 64
AI_CONNECTIONS: Final = 200


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
    window = settings.firestore_window if settings.store == "firestore" else settings.sqlite_window
    app[keys.SNAPSHOT] = Snapshot(window=window)
    app[keys.MEDIA_INDEX] = MediaIndex()
    app[keys.SHUTDOWN] = Shutdown()
    app[keys.METRICS] = metrics = Metrics()
    metrics.watch(
        State(app[keys.HUB], app[keys.SNAPSHOT], lambda: app.get(keys.WARMER), _jobs(app))
    )

    app.cleanup_ctx.append(_http_sessions)
    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(_accounts)
    app.cleanup_ctx.append(_media)
    app.cleanup_ctx.append(_outbox)
    app.cleanup_ctx.append(_inbox)
    app.cleanup_ctx.append(_templates)
    app.cleanup_ctx.append(_sweeper)
    app.cleanup_ctx.append(_warmer)
    app.on_shutdown.append(_close_streams)
    app.on_response_prepare.append(security_headers)
    add_routes(app, settings)
    app.on_startup.append(check_routes)
    return app


async def _http_sessions(app: web.Application) -> AsyncIterator[None]:
    """One client session per outbound service (WhatsApp, the AI), each with its own pool."""
    whatsapp = aiohttp.ClientSession(
        raise_for_status=False, connector=aiohttp.TCPConnector(limit=WHATSAPP_CONNECTIONS)
    )
    ai = aiohttp.ClientSession(
        raise_for_status=False, connector=aiohttp.TCPConnector(limit=AI_CONNECTIONS)
    )
    async with whatsapp, ai:
        app[keys.HTTP] = whatsapp
        app[keys.AI_HTTP] = ai
        yield


async def _store(app: web.Application) -> AsyncIterator[None]:
    """Open the store first and close it last: everything else uses it."""
    store = make_store(app[keys.SETTINGS])
    await store.start()
    app[keys.STORE] = store
    # The one way into the hub: every committed write, this process's or another
    # instance's, reaches the feed once and is told to the dashboards from there.
    broadcaster = Broadcaster(app[keys.HUB])
    app[keys.BROADCASTER] = broadcaster
    store.subscribe(broadcaster.on_changes)
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
        async with _background(accounts.run(), "accounts-poller"):
            yield
    finally:
        await store.close()


async def _media(app: web.Application) -> AsyncIterator[None]:
    """The media store (its client may look up credentials: not on the event loop)."""
    app[keys.MEDIA] = await asyncio.to_thread(make_media_store, app[keys.SETTINGS])
    yield


async def _outbox(app: web.Application) -> AsyncIterator[None]:
    """The lanes of background work and the outbox that feeds them; on the way out,
    running jobs get LIVECHAT_SHUTDOWN_TIMEOUT and what is left stays pending in the store
    (a server stopped by a signal has drained them already: server/shutdown.py)."""
    settings = app[keys.SETTINGS]
    outbox = Outbox(app[keys.STORE], Lanes.create(_job_failed), lease_s=settings.outbox_lease_s)
    app[keys.OUTBOX] = outbox
    try:
        yield
    finally:
        await outbox.close(settings.shutdown_timeout_s)


async def _inbox(app: web.Application) -> AsyncIterator[None]:
    """The inbox with its WhatsApp sender, AI replies and media downloads."""
    settings = app[keys.SETTINGS]
    store = app[keys.STORE]
    outbox = app[keys.OUTBOX]
    whatsapp = make_sender(settings, app[keys.HTTP])
    sender = CountingSender(whatsapp, app[keys.METRICS])
    inbox = Inbox(
        store,
        outbox,
        sender,
        app[keys.MEDIA],
        # Without WhatsApp there is nobody to send blue ticks to.
        read_receipts=settings.read_receipts and settings.whatsapp_configured,
    )
    responder = make_responder(settings, app[keys.AI_HTTP])
    if responder is not None:
        replies = AiReplies(store, inbox, responder, settings, app[keys.METRICS])
        outbox.runners["ai"] = replies.run
    outbox.runners["media"] = MediaDownloads(store, inbox, app[keys.MEDIA], whatsapp).run
    client = whatsapp if isinstance(whatsapp, WhatsAppClient) else None
    app[keys.TEMPLATES] = TemplateCatalog(client, settings.whatsapp_business_account_id)
    app[keys.INBOX] = inbox
    try:
        yield
    finally:
        inbox.close()  # before the jobs drain: statuses still waiting give up at once


@contextlib.asynccontextmanager
async def _background(work: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """Run `work` as a task for the app's lifetime; cancel and await it on the way out."""
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _templates(app: web.Application) -> AsyncIterator[None]:
    """The template catalog, and its refresher (on template webhooks)."""
    catalog = app[keys.TEMPLATES]
    app[keys.REPLIES] = Replies(app[keys.STORE], app[keys.INBOX], app[keys.MEDIA], catalog)
    async with _background(catalog.run(), "template-refresher"):
        yield


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    """The outbox's sweeper: resumes what a crash or a deploy left."""
    async with _background(app[keys.OUTBOX].run(), "outbox-sweeper"):
        yield


async def _warmer(app: web.Application) -> AsyncIterator[None]:
    """The background worker that keeps the snapshot warm."""
    warmer = Warmer(app[keys.STORE], app[keys.SNAPSHOT], app[keys.BROADCASTER])
    app[keys.WARMER] = warmer
    async with _background(warmer.run(), "snapshot-warmer"):
        yield


async def _close_streams(app: web.Application) -> None:
    """On shutdown, end every SSE stream at once so the server can stop promptly (a server
    stopped by a signal did this already, before its jobs drained)."""
    stop_accepting(app)


def _jobs(app: web.Application) -> Callable[[], dict[str, tuple[int, int]]]:
    def counts() -> dict[str, tuple[int, int]]:
        outbox = app.get(keys.OUTBOX)
        if outbox is None:
            return {}
        lanes = {"sends": outbox.lanes.sends, "ai": outbox.lanes.ai}
        lanes["statuses"] = outbox.lanes.statuses
        return {name: (lane.active_count, lane.pending_count) for name, lane in lanes.items()}

    return counts


def _job_failed(scheduler: aiojobs.Scheduler, context: dict[str, Any]) -> None:
    """A background job raised: log it (the job itself records the user-visible failure)."""
    exc = context.get("exception")
    log.error("job.failed", message=context.get("message"), error=repr(exc), exc_info=exc)
