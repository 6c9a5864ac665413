"""The ChatStore protocol: what every store (SQLite, Firestore) must do, and its records."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from server.models import Conversation, Media, Message, MessageError

log = structlog.get_logger(__name__)


class StoreError(Exception):
    """The store could not do what was asked."""


class NotFound(StoreError):
    """No such conversation or message."""


class UnknownMessage(NotFound):
    """No stored message carries this WhatsApp message id (or not yet: a status can arrive
    before the send's answer has stored the id)."""


class AiDisabled(StoreError):
    """An AI reply to a conversation an agent has taken over: it is not stored."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now (an outage, not a bad request)."""


@dataclass(slots=True, frozen=True)
class InboundMessage:
    """A customer's message as the webhook parsed it, before it is stored."""

    wa_message_id: str
    user_id: str
    user_name: str
    phone: str
    type: str
    text: str | None
    at: int
    media: Media | None = None
    extra: dict[str, Any] | None = None
    channel: str = "whatsapp"


@dataclass(slots=True, frozen=True)
class Saved:
    """A stored message and its conversation summary as of that write."""

    conversation: Conversation
    message: Message
    new_conversation: bool = False


@dataclass(slots=True, frozen=True)
class StatusChange:
    """A delivery status that moved an outbound message forward."""

    conversation: Conversation
    message: Message


@dataclass(slots=True, frozen=True)
class Change:
    """One entry of the change feed: a conversation summary after a committed write.

    `removed` means the conversation was deleted, so the snapshot must drop it. `local`
    means this process made the write and has published its event already; other changes
    came from elsewhere (another instance) and the warmer publishes them. `messages` are
    the messages written (or given a new delivery status) since the version this process
    saw before, whole (the summary holds only a preview of the latest), when the feed
    carries them: this instance's SSE clients then get the very events the writer sent.
    """

    conversation: Conversation
    removed: bool = False
    local: bool = False
    messages: tuple[FeedMessage, ...] = ()


@dataclass(slots=True, frozen=True)
class FeedMessage:
    """A message a change carries: new (`new_conversation` if it opened the conversation),
    or already known with a new delivery status."""

    message: Message
    new_conversation: bool = False


ChangeListener = Callable[[Sequence[Change]], None]


class ChangeFeed:
    """A store's subscribers: each is called on the event loop with every batch of changes."""

    def __init__(self) -> None:
        self._listeners: list[ChangeListener] = []

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        """Add a listener; returns the call that removes it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def emit(self, changes: Sequence[Change]) -> None:
        """Tell every listener (a listener may unsubscribe while being told).

        A listener that raises is logged and the others are still told: the write behind
        the changes has committed, and its caller must not see it fail.
        """
        for listener in list(self._listeners):
            try:
                listener(changes)
            except Exception:
                log.exception("feed.listener_failed", changes=len(changes))

    def clear(self) -> None:
        """Forget every listener (the store is closing)."""
        self._listeners.clear()


class Unset:
    """Marks an argument that was not given (None is a meaningful value)."""


UNSET = Unset()


class ChatStore(Protocol):
    """The source of truth for users, conversations and messages."""

    name: str

    async def start(self) -> None:
        """Open connections and create what is missing."""

    async def close(self) -> None:
        """Release every resource; no listener is called after this returns."""

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        """Call `listener` on the event loop after each commit; returns the unsubscribe."""

    async def load_window(self, limit: int | None) -> list[Conversation]:
        """The newest `limit` conversations (all when None), newest activity first."""

    async def page_after(
        self,
        after: tuple[int, str] | None,
        limit: int,
        status: str | None,
        *,
        assignee: str | Unset | None = UNSET,
    ) -> list[Conversation]:
        """Conversations after the keyset `(last_activity, id)`, in list order (assigned to
        `assignee`, None: unassigned, when given)."""

    async def count(self, status: str | None, *, assignee: str | Unset | None = UNSET) -> int:
        """How many conversations there are (with that status and assignee)."""

    async def get_conversation(self, conversation_id: str) -> Conversation:
        """One conversation summary; NotFound when there is none."""

    async def list_messages(
        self, conversation_id: str, limit: int, before: tuple[int, str] | None
    ) -> tuple[list[Message], bool]:
        """A page of messages older than `before`, oldest first, and whether more exist."""

    async def save_inbound(self, inbound: InboundMessage) -> Saved | None:
        """Store a customer's message and its summary at once; None if already stored."""

    async def save_outbound(
        self,
        conversation_id: str,
        *,
        sender: str,
        text: str,
        agent_id: str | None = None,
        take_over: bool = False,
    ) -> Saved:
        """Store an AI or agent reply as queued; an agent's reply turns the AI off."""

    async def set_delivery(
        self,
        message_id: str,
        *,
        status: str,
        wa_message_id: str | None = None,
        error: MessageError | None = None,
    ) -> StatusChange | None:
        """Record the outcome of sending an outbound message (never moves it backwards)."""

    async def apply_status(
        self, wa_message_id: str, status: str, error: MessageError | None
    ) -> StatusChange | None:
        """Apply a WhatsApp status; None when not newer than what is stored, UnknownMessage
        when no stored message carries that id."""

    async def update_conversation(
        self,
        conversation_id: str,
        *,
        status: str | None = None,
        ai_enabled: bool | None = None,
        assignee: str | Unset | None = UNSET,
        mark_read: bool = False,
    ) -> Conversation:
        """Change a conversation's status, AI switch, assignee or unread count."""

    async def import_conversations(
        self, conversations: Sequence[Conversation], messages: Sequence[Message]
    ) -> None:
        """Bulk-load conversations with their messages (demo data, benchmarks)."""


def message_id_for_wamid(wa_message_id: str) -> str:
    """A document-safe message id derived from a WhatsApp message id (which may hold '/')."""
    return "wa_" + hashlib.sha256(wa_message_id.encode()).hexdigest()[:32]


def new_id(prefix: str, at_ms: int) -> str:
    """A new id that sorts by creation time: prefix, 12 hex digits of ms, 8 random."""
    return f"{prefix}_{at_ms:012x}{os.urandom(4).hex()}"
