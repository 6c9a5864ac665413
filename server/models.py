"""Conversation and Message: the domain records and their JSON shapes (the API's)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal

import orjson

Direction = Literal["in", "out"]
Sender = Literal["user", "ai", "agent", "system"]
Status = Literal["open", "resolved"]

CONVERSATION_STATUSES: Final = ("open", "resolved")
MESSAGE_TYPES: Final = frozenset(
    {
        "text",
        "image",
        "audio",
        "video",
        "document",
        "location",
        "interactive",
        "reaction",
        "template",
        "unsupported",
        "system",
    }
)
# Delivery states, ranked so a late status never moves a message backwards.
# "failed" outranks everything: WhatsApp sends it last, after any "sent".
STATUS_RANK: Final = {
    "received": 0,
    "queued": 1,
    "not_sent": 2,
    "sent": 3,
    "delivered": 4,
    "read": 5,
    "played": 6,
    "failed": 7,
}
# The list shows a preview, not the whole text: it keeps the snapshot within its memory
# budget (1 KiB a conversation) and the page small; the full text is one click away.
PREVIEW_CHARS: Final = 140
# WhatsApp's customer-service window: a customer's message opens (or renews) 24 hours in
# which free-form messages may be sent; after it only an approved template may (131047).
SERVICE_WINDOW_MS: Final = 24 * 3600 * 1000


def now_ms() -> int:
    """The current time in milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def iso(ms: int) -> str:
    """ISO 8601 UTC with milliseconds and Z, the one time format of the API."""
    return f"{_iso_second(ms // 1000)}.{ms % 1000:03d}Z"


@functools.lru_cache(maxsize=512)
def _iso_second(second: int) -> str:
    # Every summary and message carries several times, mostly of the last few minutes:
    # formatting each second once saves a gmtime and a strftime per field. 512 seconds
    # cover live traffic and keep the cache small beside the snapshot.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def parse_iso(value: str) -> int:
    """Milliseconds since the epoch from an ISO 8601 string (what iso() writes)."""
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def preview(text: str | None) -> str | None:
    """The start of a message text, as the chat list shows it."""
    if text is None or len(text) <= PREVIEW_CHARS:
        return text
    return text[: PREVIEW_CHARS - 1] + "…"


# Where a message's media stands: on its way into the media store, kept there, or given
# up on (with the reason). None: a reference only (imported data), never downloaded.
MEDIA_STATES: Final = ("pending", "ready", "failed")


@dataclass(slots=True, frozen=True)
class Media:
    """A message's media: WhatsApp's reference (a media id, its MIME type and hash) and,
    once the bytes are in the media store, its state there and size."""

    id: str | None = None
    mime_type: str | None = None
    caption: str | None = None
    filename: str | None = None
    # The SHA-256 WhatsApp gives for the bytes (the webhook's `sha256`); checked on download.
    sha256: str | None = None
    state: str | None = None
    size: int | None = None
    # Why the bytes could not be kept (state "failed"), in words an agent can read.
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The API shape."""
        return {
            "id": self.id,
            "mime_type": self.mime_type,
            "caption": self.caption,
            "filename": self.filename,
            "sha256": self.sha256,
            "state": self.state,
            "size": self.size,
            "error": self.error,
        }


@dataclass(slots=True, frozen=True)
class MessageError:
    """Why WhatsApp (or the AI) could not deliver a message."""

    code: int | str
    title: str

    def to_json(self) -> dict[str, Any]:
        """The API shape."""
        return {"code": self.code, "title": self.title}


@dataclass(slots=True, frozen=True)
class Message:
    """One message of a conversation, inbound or outbound."""

    id: str
    conversation_id: str
    direction: Direction
    sender: Sender
    type: str
    text: str | None
    at: int
    status: str
    agent_id: str | None = None
    media: Media | None = None
    error: MessageError | None = None
    wa_message_id: str | None = None
    # Type-specific extras (location coordinates, reply ids, reaction target, raw type).
    extra: dict[str, Any] | None = None
    # How many times an agent sent a failed reply again: a retry's statuses start over
    # ("queued" after "failed"), and clients keep the newest attempt's.
    attempt: int = 0

    def to_json(self) -> dict[str, Any]:
        """The API shape."""
        return {
            "id": self.id,
            "conversation_id": self.conversation_id,
            "direction": self.direction,
            "sender": self.sender,
            "agent_id": self.agent_id,
            "type": self.type,
            "text": self.text,
            "media": self.media.to_json() if self.media else None,
            "at": iso(self.at),
            "status": self.status,
            "error": self.error.to_json() if self.error else None,
            "wa_message_id": self.wa_message_id,
            "extra": self.extra,
            "attempt": self.attempt,
        }


@dataclass(slots=True, frozen=True)
class LastMessage:
    """The summary of a conversation's latest message, as the chat list shows it."""

    id: str
    type: str
    text: str | None
    direction: Direction
    sender: Sender
    at: int
    status: str = "received"

    @classmethod
    def of(cls, message: Message) -> LastMessage:
        """The summary of a message."""
        text = message.text
        if text is None and message.media is not None:
            text = message.media.caption
        return cls(
            id=message.id,
            type=message.type,
            text=preview(text),
            direction=message.direction,
            sender=message.sender,
            at=message.at,
            status=message.status,
        )

    def to_json(self) -> dict[str, Any]:
        """The API shape."""
        return {
            "id": self.id,
            "type": self.type,
            "text": self.text,
            "direction": self.direction,
            "sender": self.sender,
            "at": iso(self.at),
            "status": self.status,
        }


@dataclass(slots=True, frozen=True)
class Conversation:
    """A conversation summary: what the unified chat list shows for one conversation."""

    id: str
    user_id: str
    user_name: str
    phone: str
    channel: str
    status: str
    unread_count: int
    ai_enabled: bool
    assignee: str | None
    created_at: int
    last_activity: int
    last_message: LastMessage | None
    # Milliseconds of the last write; orders changes of one conversation across instances.
    updated_at: int = field(default=0)
    # When the customer last wrote: WhatsApp's 24-hour window for free text starts here.
    last_inbound_at: int | None = None
    # The business number the customer wrote to (WhatsApp's phone_number_id): replies go
    # out from it. None for conversations from before numbers were recorded.
    phone_number_id: str | None = None

    @property
    def window_closes_at(self) -> int | None:
        """When the customer-service window closes (ms): free text is refused after it."""
        if self.last_inbound_at is None:
            return None
        return self.last_inbound_at + SERVICE_WINDOW_MS

    def to_json(self) -> dict[str, Any]:
        """The API shape."""
        return {
            "id": self.id,
            "user_id": self.user_id,
            "user_name": self.user_name,
            "phone": self.phone,
            "channel": self.channel,
            "status": self.status,
            "unread_count": self.unread_count,
            "ai_enabled": self.ai_enabled,
            "assignee": self.assignee,
            "created_at": iso(self.created_at),
            "last_activity": iso(self.last_activity),
            "last_inbound_at": iso(self.last_inbound_at) if self.last_inbound_at else None,
            "window_closes_at": iso(closes) if (closes := self.window_closes_at) else None,
            "phone_number_id": self.phone_number_id,
            "last_message": self.last_message.to_json() if self.last_message else None,
        }

    def with_changes(self, **changes: Any) -> Conversation:
        """A copy with some fields changed."""
        return replace(self, **changes)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, the one encoding of every response body and event."""
    # orjson: the list, every event and every snapshot row go through here; it is several
    # times faster than the standard library and writes the same compact UTF-8. Its bytes
    # keep a 4 KiB allocation whatever their length: an exact copy is what a row may hold.
    return bytes(memoryview(orjson.dumps(value)))
