"""Every route of the application, each with what it needs (server/access.py).

A route added anywhere without a Policy stops the app at start-up (check_routes), so a new
endpoint cannot be left open by forgetting to protect it.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from server import keys
from server.access import API_BODY, WEBHOOK_BODY, Access, Policy, UndeclaredRoute
from server.config import Settings
from server.handlers import agents, auth, chats, events, health, media, replies, webhook
from server.handlers.errors import Handler
from server.handlers.metrics import metrics_handler

OPEN = Policy(Access.OPEN)
AGENT = Policy(Access.AGENT)
ADMIN = Policy(Access.ADMIN)
# An agent's message: JSON, or a file in a multipart form (WhatsApp's largest: a 100 MB
# document), streamed to the handler.
MESSAGE = Policy(Access.AGENT, max_upload=replies.MAX_FILE + API_BODY)


def add_routes(app: web.Application, settings: Settings) -> None:
    """Add every route with its Policy."""
    table: dict[AbstractRoute, Policy] = {}
    app[keys.ROUTES] = table
    r = app.router

    def add(method: str, path: str, handler: Handler, policy: Policy) -> None:
        table[r.add_route(method, path, handler)] = policy

    add("GET", "/healthz", health.healthz, OPEN)
    add("GET", "/readyz", health.readyz, OPEN)
    add("POST", "/api/auth/login", auth.login, OPEN)
    add("POST", "/api/auth/logout", auth.logout, AGENT)
    add("GET", "/api/auth/me", auth.me, AGENT)
    add("GET", "/api/agents", agents.list_agents, AGENT)
    add("POST", "/api/agents", agents.add_agent, ADMIN)
    add("PATCH", "/api/agents/{id}", agents.update_agent, ADMIN)
    add("GET", "/api/live-chat/unified-chats", chats.unified_chats, AGENT)
    add("GET", "/api/live-chat/search", chats.search_messages, AGENT)
    add("GET", "/api/live-chat/events", events.events, AGENT)
    add("GET", "/api/live-chat/conversations/{id}", chats.get_conversation, AGENT)
    add("PATCH", "/api/live-chat/conversations/{id}", chats.patch_conversation, AGENT)
    add("GET", "/api/live-chat/conversations/{id}/messages", chats.list_messages, AGENT)
    add("POST", "/api/live-chat/conversations/{id}/messages", chats.post_message, MESSAGE)
    add(
        "POST",
        "/api/live-chat/conversations/{id}/messages/{message_id}/retry",
        chats.retry_message,
        AGENT,
    )
    # Erasing a customer's conversation cannot be undone: admins only.
    add("DELETE", "/api/live-chat/conversations/{id}", chats.delete_conversation, ADMIN)
    add("POST", "/api/live-chat/conversations/{id}/read", chats.mark_read, AGENT)
    add("GET", "/api/live-chat/media/{message_id}", media.get_media, AGENT)
    add("GET", "/api/live-chat/templates", chats.list_templates, AGENT)
    add("GET", "/api/live-chat/numbers", chats.list_numbers, AGENT)
    # The webhook is open to the internet and proves itself by its signature.
    add("GET", "/webhooks/whatsapp", webhook.verify, OPEN)
    add("POST", "/webhooks/whatsapp", webhook.receive, Policy(Access.OPEN, WEBHOOK_BODY))
    if settings.metrics_port is None:
        # On the main port the metrics need a credential (the machine token, for a
        # scraper); on a port of their own (server/serve.py) they need none.
        add("GET", "/metrics", metrics_handler(app[keys.METRICS]), AGENT)
    static = Path(settings.static_dir)
    if static.is_dir():
        add("GET", "/", _index, OPEN)
        for route in r.add_static("/static/", static, append_version=False):
            table[route] = OPEN


async def _index(request: web.Request) -> web.FileResponse:
    """The dashboard's single page."""
    path = Path(request.app[keys.SETTINGS].static_dir) / "index.html"
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


async def check_routes(app: web.Application) -> None:
    """on_startup: refuse to start while any route lacks a Policy."""
    table = app[keys.ROUTES]
    missing = [
        f"{route.method} {route.resource.canonical if route.resource else '?'}"
        for route in app.router.routes()
        if route not in table
    ]
    if missing:
        raise UndeclaredRoute(
            "routes without an access policy (declare them in server/routes.py): "
            + ", ".join(missing)
        )
