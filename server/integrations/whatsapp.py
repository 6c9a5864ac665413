"""The WhatsApp Cloud API client: replies of every kind, media, read receipts, templates."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import structlog

from server.config import Settings
from server.inbox import DeliveryError, SendResult
from server.integrations.http import post_json
from server.models import Message, MessageError

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
# A media transfer (up to 100 MB for a document) takes longer than a send.
MEDIA_TIMEOUT_S: Final = 120.0
# What an expired media URL answers (it is signed and short-lived): ask for a new one.
EXPIRED_STATUSES: Final = frozenset({401, 403, 404, 410})
# Message types an agent can send as a file.
OUTBOUND_MEDIA: Final = frozenset({"image", "audio", "video", "document", "sticker"})
# At 100 templates a page, enough for any business account (Meta allows 250 by default).
TEMPLATE_PAGES: Final = 20


def describe_error(code: int | str, title: str | None) -> str:
    """A readable title for a WhatsApp error code (ours for the ones an agent acts on)."""
    if isinstance(code, int) and code in ERROR_TITLES:
        return ERROR_TITLES[code]
    return title or f"WhatsApp error {code}"


class GraphError(DeliveryError):
    """A Graph API call other than a send failed; `error` says why in an agent's words."""


class MediaExpired(GraphError):
    """A media URL that no longer answers (WhatsApp's expire about 5 minutes after they are
    issued): ask for the media id's URL again."""


class OfflineSender:
    """Without credentials nothing is sent: messages are stored and marked not delivered."""

    async def send_text(self, to: str, text: str) -> SendResult:
        """Never sends; says so."""
        return SendResult(status="not_sent", error=NOT_CONFIGURED)

    async def send_message(
        self, to: str, message: Message, *, number: str | None, media_id: str | None = None
    ) -> SendResult:
        """Never sends; says so."""
        return SendResult(status="not_sent", error=NOT_CONFIGURED)

    async def upload_media(
        self, data: bytes, mime_type: str, filename: str | None, *, number: str | None
    ) -> str:
        """Nothing to upload to."""
        raise GraphError(NOT_CONFIGURED)

    async def mark_read(
        self, wa_message_id: str, *, number: str | None, typing: bool = False
    ) -> bool:
        """Nothing to tell."""
        return False

    async def media_info(self, media_id: str, *, number: str | None) -> MediaInfo:
        """Nothing to ask."""
        raise GraphError(NOT_CONFIGURED)

    async def download(self, url: str, *, number: str | None, max_bytes: int) -> bytes:
        """Nothing to download from."""
        raise GraphError(NOT_CONFIGURED)


class _Retry(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(self, error: MessageError, delay_s: float | None = None) -> None:
        super().__init__(error.title)
        self.error = error
        self.delay_s = delay_s


@dataclass(slots=True, frozen=True)
class MediaInfo:
    """What `GET /{media-id}` answers: where the bytes are (for about 5 minutes) and what
    they should be."""

    url: str
    mime_type: str | None
    sha256: str | None
    file_size: int | None


class WhatsAppClient:
    """The Cloud API: sends (POST {base}/{phone_number_id}/messages), media uploads and
    downloads, read receipts and typing, from whichever business number a conversation
    belongs to, each with its token."""

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        *,
        max_retries: int = MAX_RETRIES,
        backoff_base_s: float = BACKOFF_BASE_S,
        pair_backoff_s: Sequence[float] = PAIR_BACKOFF_S,
        timeout_s: float = SEND_TIMEOUT_S,
        media_timeout_s: float = MEDIA_TIMEOUT_S,
    ) -> None:
        self._session = session
        self._base = settings.whatsapp_api_base.rstrip("/")
        numbers = settings.numbers
        self._tokens = {n.id: n.token for n in numbers}
        self._default = numbers[0].id if numbers else ""
        self._shared_token = settings.whatsapp_token
        self._max_retries = max_retries
        self._backoff_base_s = backoff_base_s
        self._pair_backoff_s = tuple(pair_backoff_s)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._media_timeout = aiohttp.ClientTimeout(total=media_timeout_s)

    def _number(self, number: str | None) -> tuple[str, dict[str, str]]:
        """The number to act from (the default one when the conversation has none) and the
        headers with its token."""
        chosen = number or self._default
        token = self._tokens.get(chosen) or self._shared_token or ""
        return chosen, {"Authorization": f"Bearer {token}"}

    async def send_text(self, to: str, text: str) -> SendResult:
        """Send `text` to `to` (a phone number, or a business-scoped user id) from the
        default number; transient failures are retried, bounded."""
        content = {"type": "text", "text": {"preview_url": False, "body": text}}
        return await self._send(to, content, None)

    async def send_message(
        self, to: str, message: Message, *, number: str | None, media_id: str | None = None
    ) -> SendResult:
        """Send a stored reply (text, media uploaded as `media_id`, template, reaction),
        with `context` when it answers a message, from `number`."""
        return await self._send(to, message_content(message, media_id), number)

    async def _send(self, to: str, content: dict[str, Any], number: str | None) -> SendResult:
        chosen, headers = self._number(number)
        payload: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            **addressee(to),
            **content,
        }
        url = f"{self._base}/{chosen}/messages"
        attempt = 0
        while True:
            try:
                return await self._post(url, payload, headers)
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

    async def _post(self, url: str, payload: dict[str, Any], headers: dict[str, str]) -> SendResult:
        """One attempt: a result, or _Retry when the failure is worth another try."""
        try:
            reply = await post_json(self._session, url, payload, headers, self._timeout)
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

    # -- media -------------------------------------------------------------------------

    async def upload_media(
        self, data: bytes, mime_type: str, filename: str | None, *, number: str | None
    ) -> str:
        """Upload a file (POST /{phone-number-id}/media, multipart); its media id.
        GraphError when WhatsApp refuses it (transient failures are retried, bounded)."""
        chosen, headers = self._number(number)
        url = f"{self._base}/{chosen}/media"
        attempt = 0
        while True:
            form = aiohttp.FormData()
            form.add_field("messaging_product", "whatsapp")
            form.add_field("type", mime_type)
            form.add_field("file", data, content_type=mime_type, filename=filename or "file")
            try:
                async with self._session.post(
                    url, data=form, headers=headers, timeout=self._media_timeout
                ) as resp:
                    body = await _json_body(resp)
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError) as e:
                error = MessageError(
                    "network", f"could not upload to WhatsApp ({type(e).__name__})"
                )
                status, body = 0, None
            else:
                if (
                    200 <= status < 300
                    and isinstance(body, dict)
                    and isinstance(body.get("id"), str)
                ):
                    return str(body["id"])
                error = _graph_error(status, body)
            if (status == 0 or _transient(status, error.code)) and attempt < self._max_retries:
                await asyncio.sleep(self._backoff_base_s * (2.0**attempt))
                attempt += 1
                continue
            raise GraphError(error)

    async def media_info(self, media_id: str, *, number: str | None) -> MediaInfo:
        """Where a media id's bytes are now (GET /{media-id}): a URL that expires."""
        _, headers = self._number(number)
        url = f"{self._base}/{media_id}"
        try:
            async with self._session.get(url, headers=headers, timeout=self._timeout) as resp:
                body = await _json_body(resp)
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as e:
            raise GraphError(
                MessageError("network", f"could not reach WhatsApp ({type(e).__name__})"),
                transient=True,
            ) from e
        if not 200 <= status < 300 or not isinstance(body, dict):
            error = _graph_error(status, body)
            raise GraphError(error, transient=_transient(status, error.code))
        media_url = body.get("url")
        if not isinstance(media_url, str) or not media_url:
            raise GraphError(MessageError("invalid_response", "WhatsApp gave no media URL"))
        size = body.get("file_size")
        return MediaInfo(
            url=media_url,
            mime_type=body.get("mime_type") if isinstance(body.get("mime_type"), str) else None,
            sha256=body.get("sha256") if isinstance(body.get("sha256"), str) else None,
            file_size=int(size) if isinstance(size, int | str) and str(size).isdigit() else None,
        )

    async def download(self, url: str, *, number: str | None, max_bytes: int) -> bytes:
        """The bytes at a media URL (with the bearer token, as WhatsApp requires), at most
        `max_bytes`. MediaExpired when the URL no longer answers."""
        _, headers = self._number(number)
        try:
            async with self._session.get(url, headers=headers, timeout=self._media_timeout) as resp:
                if resp.status in EXPIRED_STATUSES:
                    raise MediaExpired(
                        MessageError(f"http_{resp.status}", "the media URL has expired"),
                        transient=True,
                    )
                if not 200 <= resp.status < 300:
                    body = await _json_body(resp)
                    error = _graph_error(resp.status, body)
                    raise GraphError(error, transient=_transient(resp.status, error.code))
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise GraphError(_too_large(max_bytes))
                data = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    data += chunk
                    if len(data) > max_bytes:
                        raise GraphError(_too_large(max_bytes))
                return bytes(data)
        except (TimeoutError, aiohttp.ClientError) as e:
            raise GraphError(
                MessageError("network", f"the download failed ({type(e).__name__})"),
                transient=True,
            ) from e

    # -- read receipts, typing ------------------------------------------------------------

    async def mark_read(
        self, wa_message_id: str, *, number: str | None, typing: bool = False
    ) -> bool:
        """Mark a customer's message read (blue ticks; earlier ones with it), optionally
        showing the typing indicator (until the reply, or 25 s). One attempt: a receipt
        that does not go through is not worth holding anything up for."""
        chosen, headers = self._number(number)
        payload: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "status": "read",
            "message_id": wa_message_id,
        }
        if typing:
            payload["typing_indicator"] = {"type": "text"}
        try:
            reply = await post_json(
                self._session, f"{self._base}/{chosen}/messages", payload, headers, self._timeout
            )
        except (TimeoutError, aiohttp.ClientError) as e:
            log.info("whatsapp.read_receipt_failed", error=type(e).__name__)
            return False
        if not 200 <= reply.status < 300:
            log.info(
                "whatsapp.read_receipt_failed", error=_graph_error(reply.status, reply.body).code
            )
            return False
        return True

    # -- templates ------------------------------------------------------------------------

    async def templates(self, account_id: str) -> list[dict[str, Any]]:
        """Every message template of a WhatsApp Business Account, page after page."""
        _, headers = self._number(None)
        url: str | None = f"{self._base}/{account_id}/message_templates"
        params: dict[str, str] | None = {
            "fields": "name,status,language,category,components",
            "limit": "100",
        }
        found: list[dict[str, Any]] = []
        for _ in range(TEMPLATE_PAGES):
            if url is None:
                break
            try:
                async with self._session.get(
                    url, params=params, headers=headers, timeout=self._timeout
                ) as resp:
                    body = await _json_body(resp)
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError) as e:
                raise GraphError(
                    MessageError("network", f"could not reach WhatsApp ({type(e).__name__})"),
                    transient=True,
                ) from e
            if not 200 <= status < 300 or not isinstance(body, dict):
                raise GraphError(_graph_error(status, body))
            data = body.get("data")
            if isinstance(data, list):
                found.extend(t for t in data if isinstance(t, dict))
            paging = body.get("paging")
            following = paging.get("next") if isinstance(paging, dict) else None
            url, params = (following, None) if isinstance(following, str) else (None, None)
        return found


def message_content(message: Message, media_id: str | None = None) -> dict[str, Any]:
    """The type-specific part of a Cloud API send for a stored reply, with its `context`
    when it answers a customer's message."""
    extra = message.extra or {}
    content: dict[str, Any]
    if message.type == "reaction":
        content = {
            "type": "reaction",
            # An empty emoji removes the reaction.
            "reaction": {"message_id": extra.get("reacted_to"), "emoji": message.text or ""},
        }
    elif message.type == "template":
        template = extra.get("template") or {}
        components: list[dict[str, Any]] = []
        for section, key in (("header", "header_parameters"), ("body", "parameters")):
            values = template.get(key) or []
            if values:
                components.append(
                    {"type": section, "parameters": [{"type": "text", "text": v} for v in values]}
                )
        body: dict[str, Any] = {
            "name": template.get("name"),
            "language": {"code": template.get("language")},
        }
        if components:
            body["components"] = components
        content = {"type": "template", "template": body}
    elif message.type in OUTBOUND_MEDIA and media_id is not None:
        media = message.media
        part: dict[str, Any] = {"id": media_id}
        caption = media.caption if media is not None else None
        if caption and message.type in ("image", "video", "document"):
            part["caption"] = caption
        if message.type == "document" and media is not None and media.filename:
            part["filename"] = media.filename
        content = {"type": message.type, message.type: part}
    else:
        content = {"type": "text", "text": {"preview_url": False, "body": message.text or ""}}
    if reply_to := extra.get("reply_to"):
        content["context"] = {"message_id": reply_to}
    return content


async def _json_body(resp: aiohttp.ClientResponse) -> Any:
    try:
        return await resp.json(content_type=None)
    except ValueError:
        return None


def _too_large(max_bytes: int) -> MessageError:
    return MessageError("too_large", f"the file is larger than {max_bytes // (1024 * 1024)} MB")


def addressee(to: str) -> dict[str, str]:
    """How a send names its recipient: `to` with a phone number, `recipient` with a
    business-scoped user id (a customer with a username whose number WhatsApp withholds;
    the Cloud API takes `to` first when both are given)."""
    if any(ch.isalpha() for ch in to):  # "US.13491208655302741918"
        return {"recipient": to}
    return {"to": "".join(ch for ch in to if ch.isdigit())}


def make_sender(
    settings: Settings, session: aiohttp.ClientSession
) -> WhatsAppClient | OfflineSender:
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
