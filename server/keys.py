"""Every web.AppKey (and request key) of the application, in one place."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute
from aiohttp_sse import EventSourceResponse

from server.access import Policy
from server.accounts import Accounts, Principal
from server.broadcaster import Broadcaster
from server.chatlist import ChatList
from server.config import Settings
from server.cursor import CursorCodec
from server.hub import Hub
from server.inbox import Inbox
from server.integrations.templates import TemplateCatalog
from server.logging import RequestIds
from server.media import MediaIndex, MediaStore
from server.metrics import Metrics
from server.replies import Replies
from server.snapshot import Snapshot
from server.store.base import ChatStore
from server.workers.outbox import Outbox
from server.workers.warmer import Warmer

if TYPE_CHECKING:
    from server.shutdown import Shutdown

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", ChatStore)
SNAPSHOT = web.AppKey("snapshot", Snapshot)
HUB = web.AppKey("hub", Hub)
BROADCASTER = web.AppKey("broadcaster", Broadcaster)
CURSORS = web.AppKey("cursors", CursorCodec)
INBOX = web.AppKey("inbox", Inbox)
WARMER = web.AppKey("warmer", Warmer)
# Outbound HTTP: WhatsApp's pool, and the AI provider's apart from it.
HTTP = web.AppKey("http", aiohttp.ClientSession)
AI_HTTP = web.AppKey("ai_http", aiohttp.ClientSession)
OUTBOX = web.AppKey("outbox", Outbox)
CHATLIST = web.AppKey("chatlist", ChatList)
REQUEST_IDS = web.AppKey("request_ids", RequestIds)
ACCOUNTS = web.AppKey("accounts", Accounts)
# Each route's declared Policy (server/routes.py), read by the auth middleware.
ROUTES: web.AppKey[dict[AbstractRoute, Policy]] = web.AppKey("routes")
# Media files (inbound downloads, agents' attachments) and what the media route knows.
MEDIA = web.AppKey("media", MediaStore)
MEDIA_INDEX = web.AppKey("media_index", MediaIndex)
TEMPLATES = web.AppKey("templates", TemplateCatalog)
REPLIES = web.AppKey("replies", Replies)
# The id of a request, for the access log line written after its answer.
REQUEST_ID = web.RequestKey("request_id", str)
# Its route as the router knows it (`/api/live-chat/conversations/{id}`), for the same line.
ROUTE = web.RequestKey("route", str)
METRICS = web.AppKey("metrics", Metrics)
# Set by the first stop signal (server/shutdown.py imports this module, hence no type here).
SHUTDOWN: web.AppKey[Shutdown] = web.AppKey("shutdown")
# Open SSE responses, so shutdown can stop each one (aiohttp-sse's graceful-shutdown pattern).
STREAMS: web.AppKey[weakref.WeakSet[EventSourceResponse]] = web.AppKey("streams")

# Who the request comes from, set by the auth middleware on every route that is not open.
PRINCIPAL = web.RequestKey("principal", Principal)
