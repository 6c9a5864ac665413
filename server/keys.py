"""Every web.AppKey (and request key) of the application, in one place."""

from __future__ import annotations

import weakref

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
from server.logging import RequestIds
from server.snapshot import Snapshot
from server.store.base import ChatStore
from server.workers.outbox import Outbox
from server.workers.warmer import Warmer

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
# Open SSE responses, so shutdown can stop each one (aiohttp-sse's graceful-shutdown pattern).
STREAMS: web.AppKey[weakref.WeakSet[EventSourceResponse]] = web.AppKey("streams")

# Who the request comes from, set by the auth middleware on every route that is not open.
PRINCIPAL = web.RequestKey("principal", Principal)
