"""GET/POST /webhooks/whatsapp: the WhatsApp Cloud API webhook."""

from __future__ import annotations

import hmac
import time
from http import HTTPStatus
from typing import Final

import structlog
from aiohttp import web

from server import keys
from server.handlers.errors import json_error
from server.integrations.whatsapp_webhook import ParseError, parse_body, signature_ok
from server.models import now_ms

log = structlog.get_logger(__name__)

# Only this much of a parse error goes into the log line and the answer.
MAX_REASON_CHARS: Final = 300


async def verify(request: web.Request) -> web.StreamResponse:
    """The subscription handshake: echo hub.challenge when the verify token matches."""
    expected = request.app[keys.SETTINGS].whatsapp_verify_token
    token = request.query.get("hub.verify_token", "")
    challenge = request.query.get("hub.challenge", "")
    if (
        expected
        and request.query.get("hub.mode") == "subscribe"
        and hmac.compare_digest(token.encode(), expected.encode())
        and challenge
    ):
        log.info("webhook.verified")
        return web.Response(text=challenge, content_type="text/plain")
    log.warning("webhook.verify_refused", mode=request.query.get("hub.mode", "")[:20])
    return json_error(HTTPStatus.FORBIDDEN, "forbidden", "verification token does not match")


async def receive(request: web.Request) -> web.StreamResponse:
    """Deliveries of messages and statuses: verify, parse, save each, then answer 200.

    200 means every message of the body that can be kept is committed: Meta never sends
    it again. A store outage answers 503 (Meta redelivers; what was saved comes back as
    duplicates); a broken envelope 400; one bad message never costs the rest of its batch.
    """
    started = time.perf_counter()
    raw = await request.read()
    secret = request.app[keys.SETTINGS].whatsapp_app_secret
    metrics = request.app[keys.METRICS]
    if not signature_ok(secret, raw, request.headers.get("X-Hub-Signature-256")):
        reason = "no_secret_configured" if not secret else "bad_signature"
        log.warning("webhook.unauthorized", reason=reason, body_bytes=len(raw))
        metrics.webhook_refused.labels("bad_signature").inc()
        return json_error(
            HTTPStatus.UNAUTHORIZED, "invalid_signature", "X-Hub-Signature-256 is missing or wrong"
        )
    try:
        parsed = parse_body(raw, received_ms=now_ms())
    except ParseError as e:
        reason = str(e)[:MAX_REASON_CHARS]
        log.warning("webhook.malformed", reason=reason, body_bytes=len(raw))
        metrics.webhook_refused.labels("malformed").inc()
        return json_error(HTTPStatus.BAD_REQUEST, "invalid_webhook", reason)
    for reason in parsed.refused:
        log.warning("webhook.refused", reason=reason[:MAX_REASON_CHARS])
    if parsed.template_updates:
        request.app[keys.TEMPLATES].changed()  # approved, rejected, paused: read them again
    inbox = request.app[keys.INBOX]
    duplicates = (await inbox.receive_all(parsed.messages)).count(None)
    metrics.webhook_messages.labels("received").inc(len(parsed.messages) - duplicates)
    metrics.webhook_messages.labels("duplicate").inc(duplicates)
    applied = 0
    for status in parsed.statuses:
        if await inbox.apply_status(status.wa_message_id, status.status, status.error):
            applied += 1
    log.info(
        "webhook.received",
        messages=len(parsed.messages),
        statuses=len(parsed.statuses),
        statuses_applied=applied,
        duplicates=duplicates,
        ignored=parsed.ignored,
        template_updates=parsed.template_updates,
        refused=len(parsed.refused),
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
    )
    return web.json_response({"ok": True})
