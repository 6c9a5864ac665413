"""The WhatsApp Cloud API client that sends AI and agent replies."""

from __future__ import annotations

import aiohttp

from server.config import Settings
from server.inbox import Sender, SendResult
from server.models import MessageError

NOT_CONFIGURED = MessageError(
    code="not_configured",
    title="WhatsApp is not configured (WHATSAPP_TOKEN, WHATSAPP_PHONE_NUMBER_ID): not delivered",
)


class OfflineSender:
    """Without credentials nothing is sent: messages are stored and marked not delivered."""

    async def send_text(self, to: str, text: str) -> SendResult:
        """Never sends; says so."""
        return SendResult(status="not_sent", error=NOT_CONFIGURED)


def make_sender(settings: Settings, session: aiohttp.ClientSession) -> Sender:
    """The sender the settings allow."""
    return OfflineSender()
