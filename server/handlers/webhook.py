"""GET/POST /webhooks/whatsapp: the WhatsApp Cloud API webhook."""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web

from server.handlers.errors import json_error


async def verify(request: web.Request) -> web.StreamResponse:
    """The subscription handshake."""
    return json_error(HTTPStatus.NOT_IMPLEMENTED, "not_implemented", "webhook is being built")


async def receive(request: web.Request) -> web.StreamResponse:
    """Deliveries of messages and statuses."""
    return json_error(HTTPStatus.NOT_IMPLEMENTED, "not_implemented", "webhook is being built")
