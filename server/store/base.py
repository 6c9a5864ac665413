"""The ChatStore protocol: what every store (SQLite, Firestore) must do, and its records."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import structlog

from server.models import Conversation, Media, Message, MessageError, dumps
from server.search import Query

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


class Unstorable(StoreError):
    """The store refused what the record holds (too large, an invalid value): the same
    write would fail again, unlike an outage."""


class Superseded(StoreError):
    """An AI reply to a message that is no longer the one to answer: a newer message of
    the customer's is waiting, or the work was already done. It is not stored."""


class NotRetryable(StoreError):
    """Only a failed reply can be sent again."""


class SearchUnavailable(StoreError):
    """The store cannot search message text (Firestore has no full-text search)."""


class WindowClosed(StoreError):
    """Free-form messages to a customer whose customer-service window has closed: WhatsApp
    refuses them (131047), so they are refused before they are stored or sent."""


# ai: an AI reply owed; send: a WhatsApp send owed; media: an inbound media file to
# download into the media store.
TaskKind = Literal["ai", "send", "media"]
# pending: waiting (or running, for an AI reply); sending: its POST to WhatsApp may be
# under way, so it must never be repeated blindly (WhatsApp has no idempotency key).
TaskState = Literal["pending", "sending"]


@dataclass(slots=True, frozen=True)
class Task:
    """Work a commit owes: an AI reply to a customer's message, or a WhatsApp send.

    Written in the same transaction as the message that causes it, so it survives any
    crash; done (deleted) in the same transaction as its outcome. `owner` holds its lease
    until `lease_until` (ms): until then no other instance takes it.
    """

    id: str
    kind: TaskKind
    conversation_id: str
    message_id: str
    state: TaskState
    owner: str
    lease_until: int
    created_at: int
    attempts: int = 0


@dataclass(slots=True, frozen=True)
class Leases:
    """Who this process is when it holds work, and for how long a lease lasts."""

    owner: str = "local"
    # A lease outlives any one step of a job (an AI call: 20 s per attempt; a send: 15 s)
    # and is renewed while the job runs; after a crash the work waits at most this long
    # before another instance takes it (a restarted embedded store takes it at once).
    lease_ms: int = 60_000


@dataclass(slots=True, frozen=True)
class InboundMessage:
    """A customer's message as the webhook parsed it, before it is stored.

    `user_id` is the identity the customer is stored under when the store knows them by
    none of their `identities` yet: their phone number in digits, or their business-scoped
    user id (BSUID) when WhatsApp withholds the number (customers with a username).
    `identities` are every way this message addresses them (`phone:<digits>`,
    `bsuid:<id>`): a later message carrying another of them finds the same customer.
    `user_name` is None when the message carries no profile name (system messages): a known
    name is then kept, never overwritten.
    """

    wa_message_id: str
    user_id: str
    user_name: str | None
    phone: str
    type: str
    text: str | None
    at: int
    media: Media | None = None
    extra: dict[str, Any] | None = None
    channel: str = "whatsapp"
    identities: tuple[str, ...] = ()
    # The business number the message was sent to (`metadata.phone_number_id`).
    phone_number_id: str | None = None

    @property
    def display_name(self) -> str:
        """The name a new customer is shown with: their profile name, else their number."""
        return self.user_name or self.phone or self.user_id


@dataclass(slots=True, frozen=True)
class Draft:
    """What an agent sends, before it is stored: text, a media file already in the media
    store, a template (its rendered text in `text`), or a reaction (`text` is the emoji).

    `extra` carries what the send needs besides: `reply_to` (the WhatsApp id of the
    message answered, sent as `context`), `quoted` (a preview of it), `reacted_to` and
    `removed` for a reaction, `template` (name, language, parameters).
    """

    type: str
    text: str | None
    media: Media | None = None
    extra: dict[str, Any] | None = None
    # The message's id when it was chosen before the write (its file is stored under it).
    id: str | None = None


@dataclass(slots=True, frozen=True)
class Saved:
    """A stored message and its conversation summary as of that write, and the work it
    owes (an AI reply, a send), already recorded and leased to this process."""

    conversation: Conversation
    message: Message
    new_conversation: bool = False
    task: Task | None = None
    # The download an inbound media message owes (rules.media_task).
    media_task: Task | None = None


@dataclass(slots=True, frozen=True)
class StatusChange:
    """A delivery status that moved an outbound message forward."""

    conversation: Conversation
    message: Message


@dataclass(slots=True, frozen=True)
class Change:
    """One entry of the change feed: a conversation summary after a committed write.

    The feed is the one source of what dashboards are told (server/broadcaster.py): every
    committed write reaches it once, made here or by another instance. `messages` are the
    messages the write added (or gave a new delivery status), whole; `removed` means the
    conversation was deleted; `missed` that messages were written that this process never
    received (another instance's burst, merged by the listener): open panes must reload.
    `announce` is False for bulk imports, which the snapshot takes but nobody is told of.
    """

    conversation: Conversation
    removed: bool = False
    messages: tuple[FeedMessage, ...] = ()
    missed: bool = False
    announce: bool = True


@dataclass(slots=True, frozen=True)
class FeedMessage:
    """A message a change carries: `new` (and `new_conversation` if it opened the
    conversation), or already known with a new delivery status."""

    message: Message
    new: bool = True
    new_conversation: bool = False


ChangeListener = Callable[[Sequence[Change]], None]


class ListEntry(NamedTuple):
    """A conversation as the list serves it: its place in list order and its JSON. A named
    tuple: a page past the window makes 31 of them (a third of a frozen dataclass's cost)."""

    id: str
    last_activity: int
    body: bytes

    @classmethod
    def of(cls, conversation: Conversation) -> ListEntry:
        """The entry of a conversation summary."""
        return cls(conversation.id, conversation.last_activity, dumps(conversation.to_json()))

    @property
    def cursor_key(self) -> tuple[int, str]:
        """The `(last_activity, id)` a cursor after this entry encodes."""
        return (self.last_activity, self.id)


@dataclass(slots=True, frozen=True)
class SnapshotEntry:
    """A conversation as the snapshot holds it: its place, filters, version and JSON."""

    id: str
    last_activity: int
    status: str
    updated_at: int
    user_name: str
    phone: str
    phone_number_id: str | None
    body: bytes
    assignee: str | None = None

    @classmethod
    def of(cls, c: Conversation) -> SnapshotEntry:
        """The entry of a conversation summary."""
        return cls(
            c.id,
            c.last_activity,
            c.status,
            c.updated_at,
            c.user_name,
            c.phone,
            c.phone_number_id,
            dumps(c.to_json()),
            c.assignee,
        )


@dataclass(slots=True, frozen=True)
class MessageHit:
    """A message a search found, with its conversation as the list shows it. `position`
    orders hits newest first (larger is newer) and is what a cursor after it keeps."""

    position: int
    message: Message
    conversation: ListEntry


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
    """The source of truth for users, conversations, messages and the work they owe."""

    name: str
    # True when no other process can use the store while this one runs (the embedded
    # store locks its file): every lease found at start-up is then from an ended process.
    exclusive: bool

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
        self, after: tuple[int, str] | None, limit: int, status: str | None
    ) -> list[Conversation]:
        """Conversations after the keyset `(last_activity, id)`, in list order."""

    async def count(self, status: str | None) -> int:
        """How many conversations there are (with that status)."""

    async def list_entries(
        self,
        after: tuple[int, str] | None,
        limit: int,
        status: str | None,
        number: str | None = None,
        *,
        assignee: str | Unset | None = UNSET,
    ) -> list[ListEntry]:
        """Like `page_after`, as the list serves them (prepared JSON where the store keeps
        it), optionally only those written to one business number or assigned to one agent
        (None: to nobody): the pages past the snapshot's window."""

    async def snapshot_entries(
        self, after: tuple[int, str] | None, limit: int
    ) -> list[SnapshotEntry]:
        """The conversations after a keyset in list order, as the snapshot holds them (the
        window is loaded in chunks of these)."""

    async def totals(self) -> dict[str, int] | None:
        """Conversations per status when the store keeps the counts (a read of a few rows);
        None when it would have to count them (the list then says what its window holds)."""

    async def search_customers(
        self,
        query: Query,
        after: tuple[int, str] | None,
        limit: int,
        status: str | None,
        number: str | None = None,
        *,
        assignee: str | Unset | None = UNSET,
    ) -> list[ListEntry]:
        """Conversations whose customer's name or number matches (server/search.py), after
        the keyset, in list order."""

    async def count_entries(
        self,
        query: Query | None,
        status: str | None,
        number: str | None,
        *,
        assignee: str | Unset | None = UNSET,
    ) -> int:
        """How many conversations `search_customers` (or, without a query, `list_entries`)
        finds in all."""

    async def search_messages(
        self, query: Query, before: int | None, limit: int
    ) -> list[MessageHit]:
        """Messages whose text matches, newest first, older than the hit at `before`;
        SearchUnavailable when the store cannot search text."""

    async def get_conversation(self, conversation_id: str) -> Conversation:
        """One conversation summary; NotFound when there is none."""

    async def list_messages(
        self, conversation_id: str, limit: int, before: tuple[int, str] | None
    ) -> tuple[list[Message], bool]:
        """A page of messages older than `before`, oldest first, and whether more exist."""

    async def save_inbound(self, inbound: InboundMessage) -> Saved | None:
        """Store a customer's message and its summary at once, with the AI reply it owes
        (a task, when the AI answers this conversation); None if already stored."""

    async def save_outbound(
        self,
        conversation_id: str,
        *,
        sender: str,
        text: str,
        agent_id: str | None = None,
        take_over: bool = False,
        answers: str | None = None,
        failed: MessageError | None = None,
    ) -> Saved:
        """Store a reply as queued, with its send task, in one write.

        An AI reply (and the note of its failure, stored `failed` and never sent) must
        answer the conversation's AI task for message `answers` and completes it:
        Superseded otherwise, AiDisabled once an agent took over. An agent's reply drops
        the AI task and, with `take_over`, turns the AI off.
        """

    async def set_delivery(
        self,
        message_id: str,
        *,
        status: str,
        wa_message_id: str | None = None,
        error: MessageError | None = None,
    ) -> StatusChange | None:
        """Record the outcome of sending an outbound message (never moves it backwards),
        completing its send task."""

    async def get_message(self, message_id: str) -> Message:
        """One message; NotFound when there is none."""

    # -- media, rich replies ---------------------------------------------------------------

    async def find_message(self, wa_message_id: str) -> Message | None:
        """The stored message WhatsApp knows by this id, or None."""

    async def save_agent_message(
        self, conversation_id: str, draft: Draft, *, agent_id: str | None = None
    ) -> Saved:
        """Store an agent's message (text, media, template, reaction) as queued with its
        send task, in one write: it takes the conversation over from the AI. WindowClosed
        when only a template may reach the customer now."""

    async def set_media(self, message_id: str, media: Media) -> StatusChange | None:
        """Record where a message's media stands (downloaded, or failed with the reason),
        completing its media task; None when the message is gone."""

    async def claim_tasks(self, *, limit: int, kind: TaskKind, steal: bool = False) -> list[Task]:
        """Take up to `limit` tasks of a kind whose lease ran out (every one with `steal`,
        for a store no other process can use), leasing them to this process, oldest first."""

    async def mark_sending(self, task: Task) -> bool:
        """Record that the send's POST is about to start; False when this process no
        longer holds the task (another took it, or it is done)."""

    async def renew_tasks(self, task_ids: Sequence[str]) -> None:
        """Extend the leases this process still holds on these tasks."""

    async def release_tasks(self, task_ids: Sequence[str]) -> None:
        """Give up the leases this process holds (shutting down): others may take them."""

    async def finish_task(self, task: Task) -> None:
        """Drop a task that needs no more work (the AI is off; nothing to say), if it is
        still the same task (an AI task for the same message)."""

    async def retry_send(self, message_id: str) -> Saved:
        """Queue a failed reply again, with a new send task; NotRetryable otherwise."""

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

    async def delete_conversation(self, conversation_id: str) -> Conversation:
        """Erase a conversation with its messages and the work they owe; every instance
        drops it from its list (the feed carries the deletion). NotFound if none."""

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
