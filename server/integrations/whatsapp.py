"""The WhatsApp Cloud API client that sends AI and agent replies."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any, Final

import aiohttp
import structlog

from server.config import Settings
from server.inbox import Sender, SendResult
from server.integrations.http import post_json
from server.models import MessageError

log = structlog.get_logger(__name__)

NOT_CONFIGURED = MessageError(
    code="not_configured",
    title="WhatsApp is not configured (WHATSAPP_TOKEN, WHATSAPP_PHONE_NUMBER_ID): not delivered",
)

OUTSIDE_WINDOW: Final = 131047
# What an agent should read for the errors they can act on (Meta's titles are terse).
ERROR_TITLES: Final[dict[int, str]] = {
    OUTSIDE_WINDOW: (
        "Outside the 24-hour customer-service window: more than 24 hours since the customer's"
        " last message, so only a template message can be sent"
    ),
    130429: "WhatsApp throughput limit reached; retried and still refused",
    131056: "Too many messages to this customer in a short time; retried and still refused",
    131048: "Refused by WhatsApp's spam protection: too many messages were blocked or reported",
    131026: "Undeliverable: the number may not be on WhatsApp, or must accept new terms",
    190: "The WhatsApp access token has expired or is invalid (WHATSAPP_TOKEN)",
}
# Graph API codes that are worth another try (WhatsApp Cloud API error-code reference).
TRANSIENT_CODES: Final = frozenset({1, 2, 130429, 131000, 131016, 131056})
# Retrying these cannot help: the window is closed, the number is blocked, the token is bad.
PERMANENT_CODES: Final = frozenset({OUTSIDE_WINDOW, 131048, 131026, 190})
PAIR_RATE_LIMIT: Final = 131056
# Tries after the first. Sends run as background jobs, so a short bounded wait is fine.
MAX_RETRIES: Final = 3
# Transient failures back off 0.5, 1, 2 s (with jitter); 131056 (about one message per 6 s
# to one customer) asks for 4^n s, so it waits 4, 16 s and gives up after that.
BACKOFF_BASE_S: Final = 0.5
PAIR_BACKOFF_S: Final = (4.0, 16.0)
# Graph answers a send in well under a second; 15 s means it is not coming.
SEND_TIMEOUT_S: Final = 15.0


def describe_error(code: int | str, title: str | None) -> str:
    """A readable title for a WhatsApp error code (ours for the ones an agent acts on)."""
    if isinstance(code, int) and code in ERROR_TITLES:
        return ERROR_TITLES[code]
    return title or f"WhatsApp error {code}"


class OfflineSender:
    """Without credentials nothing is sent: messages are stored and marked not delivered."""

    async def send_text(self, to: str, text: str) -> SendResult:
        """Never sends; says so."""
        return SendResult(status="not_sent", error=NOT_CONFIGURED)


class _Retry(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(self, error: MessageError, delay_s: float | None = None) -> None:
        super().__init__(error.title)
        self.error = error
        self.delay_s = delay_s


class WhatsAppClient:
    """Sends text messages through the Cloud API: POST {base}/{phone_number_id}/messages."""

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        *,
        max_retries: int = MAX_RETRIES,
        backoff_base_s: float = BACKOFF_BASE_S,
        pair_backoff_s: Sequence[float] = PAIR_BACKOFF_S,
        timeout_s: float = SEND_TIMEOUT_S,
    ) -> None:
        self._session = session
        self._url = (
            f"{settings.whatsapp_api_base.rstrip('/')}/{settings.whatsapp_phone_number_id}/messages"
        )
        self._headers = {"Authorization": f"Bearer {settings.whatsapp_token}"}
        self._max_retries = max_retries
        self._backoff_base_s = backoff_base_s
        self._pair_backoff_s = tuple(pair_backoff_s)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def send_text(self, to: str, text: str) -> SendResult:
        """Send `text` to `to` (a phone number, or a business-scoped user id); transient
        failures are retried, bounded."""
        payload: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            **addressee(to),
            "type": "text",
            "text": {"preview_url": False, "body": text},
        }
        attempt = 0
        while True:
            try:
                return await self._post(payload)
            except _Retry as retry:
                delay = self._delay(retry, attempt)
                if delay is None:
                    return SendResult(status="failed", error=retry.error)
                log.warning(
                    "whatsapp.retry",
                    attempt=attempt + 1,
                    error_code=retry.error.code,
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
                attempt += 1

    def _delay(self, retry: _Retry, attempt: int) -> float | None:
        """How long to wait before the next attempt, or None when there is none."""
        if retry.error.code == PAIR_RATE_LIMIT:
            if attempt >= min(self._max_retries, len(self._pair_backoff_s)):
                return None
            return self._pair_backoff_s[attempt]
        if attempt >= self._max_retries:
            return None
        if retry.delay_s is not None:
            return retry.delay_s
        return self._backoff_base_s * (2.0**attempt) * random.uniform(0.8, 1.2)

    async def _post(self, payload: dict[str, Any]) -> SendResult:
        """One attempt: a result, or _Retry when the failure is worth another try."""
        try:
            reply = await post_json(self._session, self._url, payload, self._headers, self._timeout)
        except TimeoutError as e:
            raise _Retry(MessageError("timeout", "WhatsApp did not answer in time")) from e
        except aiohttp.ClientError as e:
            raise _Retry(
                MessageError("network", f"could not reach WhatsApp ({type(e).__name__})")
            ) from e
        status, body = reply.status, reply.body
        # Meta rarely sends Retry-After; when it does, wait at most a minute.
        retry_after = min(reply.retry_after_s, 60.0) if reply.retry_after_s is not None else None
        if 200 <= status < 300:
            wamid = _wamid(body)
            if wamid is None:
                return SendResult(
                    status="failed",
                    error=MessageError("invalid_response", "WhatsApp accepted but sent no id"),
                )
            return SendResult(status="sent", wa_message_id=wamid)
        error = _graph_error(status, body)
        if _transient(status, error.code):
            raise _Retry(error, retry_after)
        return SendResult(status="failed", error=error)


def addressee(to: str) -> dict[str, str]:
    """How a send names its recipient: `to` with a phone number, `recipient` with a
    business-scoped user id (a customer with a username whose number WhatsApp withholds;
    the Cloud API takes `to` first when both are given)."""
    if any(ch.isalpha() for ch in to):  # "US.13491208655302741918"
        return {"recipient": to}
    return {"to": "".join(ch for ch in to if ch.isdigit())}


def make_sender(settings: Settings, session: aiohttp.ClientSession) -> Sender:
    """The sender the settings allow: the Cloud API with credentials, else offline."""
    if settings.whatsapp_configured:
        return WhatsAppClient(settings, session)
    return OfflineSender()


def _transient(status: int, code: int | str) -> bool:
    """Whether another attempt may succeed: transient codes, 429 and 5xx, never the rest."""
    if code in TRANSIENT_CODES:
        return True
    if code in PERMANENT_CODES:
        return False
    return status == 429 or status >= 500


def _wamid(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[0], dict):
        return None
    wamid = messages[0].get("id")
    return wamid if isinstance(wamid, str) and wamid else None


def _graph_error(status: int, body: Any) -> MessageError:
    """The error of a Graph API answer, with its code (an HTTP code when it gave none)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return MessageError(f"http_{status}", f"WhatsApp answered HTTP {status}")
    code = error.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        code = f"http_{status}"
    message = error.get("message")
    data = error.get("error_data")
    details = data.get("details") if isinstance(data, dict) else None
    title = " ".join(p for p in (message, details) if isinstance(p, str) and p) or None
    return MessageError(code, describe_error(code, title[:300] if title else None))
