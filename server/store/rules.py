"""The domain rules every store applies the same way: pure functions over the records.

Keeping them here means SQLite and Firestore cannot disagree about what a message does to
its conversation summary.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from server.models import (
    STATUS_RANK,
    Conversation,
    LastMessage,
    Media,
    Message,
    MessageError,
)
from server.store.base import (
    AiDisabled,
    Change,
    Draft,
    FeedMessage,
    InboundMessage,
    Leases,
    NotRetryable,
    Saved,
    StatusChange,
    Superseded,
    Task,
    TaskKind,
    Unset,
    WindowClosed,
    message_id_for_wamid,
    new_id,
)

# Messages that call for no answer of their own: a reaction is a reaction, and a system
# notice (the customer changed their number) was not written by the customer.
NO_REPLY_TYPES = frozenset({"reaction", "system"})
# What a send cut off mid-POST is marked with: WhatsApp has no idempotency key, so it may
# or may not have gone out; an agent decides whether to send it again.
INTERRUPTED = MessageError(
    code="interrupted",
    title="Sending was interrupted (the server stopped): it may not have reached the customer."
    " Retry to send it again.",
)


# Message types that carry a file; an agent's are uploaded to WhatsApp before the send.
OUTBOUND_MEDIA_TYPES = frozenset({"image", "audio", "video", "document", "sticker"})
# WhatsApp's size limits per media type (Cloud API media reference), in bytes.
MB = 1024 * 1024
MEDIA_LIMITS = {
    "image": 5 * MB,
    "sticker": 500 * 1024,
    "audio": 16 * MB,
    "video": 16 * MB,
    "document": 100 * MB,
}
# What WhatsApp accepts as an image or a video; any other file goes as a document.
IMAGE_TYPES = frozenset({"image/jpeg", "image/png"})
VIDEO_TYPES = frozenset({"video/mp4", "video/3gpp"})
AUDIO_TYPES = frozenset({"audio/aac", "audio/amr", "audio/mpeg", "audio/mp4", "audio/ogg"})


def media_type_for(mime_type: str) -> str:
    """The message type a file of this MIME type is sent as."""
    base = mime_type.split(";", 1)[0].strip().lower()
    if base in IMAGE_TYPES:
        return "image"
    if base in VIDEO_TYPES:
        return "video"
    if base in AUDIO_TYPES:
        return "audio"
    return "document"


def is_forward(current: str, new: str) -> bool:
    """True when a delivery status moves a message forward (statuses arrive out of order)."""
    return STATUS_RANK.get(new, -1) > STATUS_RANK.get(current, -1)


def inbound_message(inbound: InboundMessage, conversation_id: str) -> Message:
    """The stored form of a customer's message."""
    return Message(
        id=message_id_for_wamid(inbound.wa_message_id),
        conversation_id=conversation_id,
        direction="in",
        sender="user",
        type=inbound.type,
        text=inbound.text,
        at=inbound.at,
        status="received",
        # Media WhatsApp names by id is downloaded in the background (media_task).
        media=replace(inbound.media, state="pending")
        if inbound.media is not None and inbound.media.id
        else inbound.media,
        wa_message_id=inbound.wa_message_id,
        extra=inbound.extra,
    )


def open_conversation(
    inbound: InboundMessage, now: int, previous: Conversation | None = None
) -> Conversation:
    """A new open conversation for a customer who has none open (their name and number as
    known from their previous conversation when this message does not say)."""
    name, phone = customer(inbound, previous)
    return Conversation(
        id=new_id("c", now),
        user_id=inbound.user_id,
        user_name=name,
        phone=phone,
        channel=inbound.channel,
        status="open",
        unread_count=0,
        ai_enabled=True,
        assignee=None,
        created_at=min(now, inbound.at),
        last_activity=inbound.at,
        last_message=None,
        updated_at=now,
        phone_number_id=inbound.phone_number_id,
    )


def customer(inbound: InboundMessage, known: Conversation | None) -> tuple[str, str]:
    """The customer's name and number after this message: what it says, else what is
    known (a system message carries no name; a customer with a username, no number)."""
    if known is None:
        return inbound.display_name, inbound.phone
    return inbound.user_name or known.user_name, inbound.phone or known.phone


def with_customer(inbound: InboundMessage, conversation: Conversation) -> Conversation:
    """The conversation with the customer's name and number as this message tells them."""
    name, phone = customer(inbound, conversation)
    # Replies go out from the business number the customer last wrote to.
    number = inbound.phone_number_id or conversation.phone_number_id
    if (name, phone, number) == (
        conversation.user_name,
        conversation.phone,
        conversation.phone_number_id,
    ):
        return conversation
    return conversation.with_changes(user_name=name, phone=phone, phone_number_id=number)


def needs_new_conversation(latest: Conversation | None) -> bool:
    """A customer has at most one open conversation; writing after it is resolved opens one."""
    return latest is None or latest.status != "open"


def after_message(conversation: Conversation, message: Message, now: int) -> Conversation:
    """The summary after a message was added to the conversation."""
    newer = conversation.last_message is None or (message.at, message.id) >= (
        conversation.last_message.at,
        conversation.last_message.id,
    )
    changes: dict[str, Any] = {
        "last_activity": max(conversation.last_activity, message.at),
        "updated_at": max(now, conversation.updated_at + 1),
    }
    if newer:
        changes["last_message"] = LastMessage.of(message)
    if message.direction == "in":
        changes["unread_count"] = conversation.unread_count + 1
        changes["last_inbound_at"] = max(conversation.last_inbound_at or 0, message.at)
    elif message.sender == "agent":
        # An agent who answers has read the conversation and taken it over from the AI.
        changes["unread_count"] = 0
        changes["ai_enabled"] = False
    return conversation.with_changes(**changes)


def updated(
    conversation: Conversation,
    *,
    status: str | None,
    ai_enabled: bool | None,
    assignee: str | Unset | None,
    mark_read: bool,
    now: int,
) -> Conversation:
    """The summary after an agent changed its status, AI switch, assignee or unread count."""
    changes: dict[str, Any] = {"updated_at": max(now, conversation.updated_at + 1)}
    if status is not None:
        changes["status"] = status
    if ai_enabled is not None:
        changes["ai_enabled"] = ai_enabled
    if not isinstance(assignee, Unset):
        changes["assignee"] = assignee
    if mark_read:
        changes["unread_count"] = 0
    return conversation.with_changes(**changes)


def check_reply(conversation: Conversation, sender: str) -> None:
    """Refuse an AI reply once an agent took the conversation over (checked in the write)."""
    if sender == "ai" and not conversation.ai_enabled:
        raise AiDisabled(f"the AI is off for {conversation.id}")


def reply_time(conversation: Conversation, now: int) -> int:
    """When a reply is stamped: now, but always after what it answers.

    WhatsApp stamps inbound messages itself, so a fast reply can share their millisecond;
    the ids would then order it before the message it answers.
    """
    return max(now, conversation.last_activity + 1)


def outbound_message(
    conversation_id: str,
    sender: str,
    text: str,
    agent_id: str | None,
    now: int,
    failed: MessageError | None = None,
) -> Message:
    """The stored form of an AI or agent reply, queued for WhatsApp (or a note that is
    never sent, stored failed with why)."""
    return Message(
        id=new_id("m", now),
        conversation_id=conversation_id,
        direction="out",
        sender=sender,  # type: ignore[arg-type]
        type="text",
        text=text,
        at=now,
        status="failed" if failed else "queued",
        agent_id=agent_id,
        error=failed,
    )


# -- the outbox: work a commit owes, recorded in the same transaction -----------------


def ai_task_id(conversation_id: str) -> str:
    """One AI task per conversation: a newer message of the customer's replaces the older
    one's, so a burst gets one answer that sees it all."""
    return f"ai:{conversation_id}"


def send_task_id(message_id: str) -> str:
    """One send task per outbound message."""
    return f"send:{message_id}"


def wants_ai(conversation: Conversation, message: Message, ai_replies: bool) -> bool:
    """Whether a customer's message calls for an AI reply."""
    return ai_replies and conversation.ai_enabled and message.type not in NO_REPLY_TYPES


def ai_task(conversation: Conversation, message: Message, leases: Leases, now: int) -> Task:
    """The AI reply a customer's message owes, leased to this process."""
    return _new_task(ai_task_id(conversation.id), "ai", message, leases, now)


def media_task_id(message_id: str) -> str:
    """One download per inbound media message."""
    return f"media:{message_id}"


def wants_media(message: Message) -> bool:
    """Whether a stored message owes a download of its media."""
    return message.media is not None and message.media.state == "pending"


def media_task(message: Message, leases: Leases, now: int) -> Task:
    """The download an inbound media message owes, leased to this process."""
    return Task(
        id=media_task_id(message.id),
        kind="media",
        conversation_id=message.conversation_id,
        message_id=message.id,
        state="pending",
        owner=leases.owner,
        lease_until=now + leases.lease_ms,
        created_at=now,
    )


def with_media(message: Message, media: Media) -> Message:
    """The message with its media's new state (downloaded, or failed with why)."""
    return replace(message, media=media)


def check_window(conversation: Conversation, draft: Draft, now: int) -> None:
    """Refuse free-form messages once the customer-service window has closed: WhatsApp
    delivers only templates then (131047), so nothing else is stored or sent."""
    if draft.type == "template":
        return
    closes = conversation.window_closes_at
    if closes is None or now >= closes:
        raise WindowClosed(
            "the customer last wrote more than 24 hours ago: only a template message can"
            " reach them now"
        )


def agent_message(conversation_id: str, draft: Draft, agent_id: str | None, now: int) -> Message:
    """The stored form of an agent's message (text, media, template, reaction), queued."""
    return Message(
        id=draft.id or new_id("m", now),
        conversation_id=conversation_id,
        direction="out",
        sender="agent",
        type=draft.type,
        text=draft.text,
        at=now,
        status="queued",
        agent_id=agent_id,
        media=draft.media,
        extra=draft.extra or None,
    )


def send_task(message: Message, leases: Leases, now: int) -> Task:
    """The WhatsApp send a stored reply owes, leased to this process."""
    return _new_task(send_task_id(message.id), "send", message, leases, now)


def _new_task(task_id: str, kind: TaskKind, message: Message, leases: Leases, now: int) -> Task:
    return Task(
        id=task_id,
        kind=kind,
        conversation_id=message.conversation_id,
        message_id=message.id,
        state="pending",
        owner=leases.owner,
        lease_until=now + leases.lease_ms,
        created_at=now,
    )


def check_answer(task: Task | None, sender: str, answers: str | None) -> None:
    """An AI reply (or the note of its failure) is stored only while it answers the
    conversation's pending AI task: a newer message, or another instance, may have taken it."""
    if sender == "agent" or answers is None:
        return
    if task is None or task.message_id != answers:
        raise Superseded("a newer message is waiting for the AI, or it was answered")


def claimable(task: Task, owner: str, now: int, steal: bool) -> bool:
    """Whether this process may take the task: its lease ran out (or it is ours, or the
    store is ours alone and every lease in it is from a process that has ended)."""
    return steal or task.owner == owner or task.lease_until <= now


def leased(task: Task, leases: Leases, now: int, **changes: object) -> Task:
    """The task held by this process for another lease."""
    return replace(
        task,
        owner=leases.owner,
        lease_until=now + leases.lease_ms,
        **changes,  # type: ignore[arg-type]
    )


def retried(message: Message) -> Message:
    """A failed reply queued again for sending; only a failed (or unsent) reply can be."""
    if message.direction != "out" or message.sender not in ("agent", "ai"):
        raise NotRetryable("only an agent's or the AI's reply can be sent again")
    if message.status not in ("failed", "not_sent"):
        raise NotRetryable(f"the reply is {message.status}, not failed")
    return replace(message, status="queued", error=None, attempt=message.attempt + 1)


def task_to_doc(task: Task) -> dict[str, Any]:
    """A task as a flat document."""
    return {
        "id": task.id,
        "kind": task.kind,
        "conversation_id": task.conversation_id,
        "message_id": task.message_id,
        "state": task.state,
        "owner": task.owner,
        "lease_until": task.lease_until,
        "created_at": task.created_at,
        "attempts": task.attempts,
    }


def task_from_doc(d: dict[str, Any]) -> Task:
    """A task from its flat document."""
    return Task(
        id=d["id"],
        kind=d["kind"],
        conversation_id=d["conversation_id"],
        message_id=d["message_id"],
        state=d["state"],
        owner=d.get("owner") or "",
        lease_until=int(d.get("lease_until") or 0),
        created_at=int(d.get("created_at") or 0),
        attempts=int(d.get("attempts") or 0),
    )


def after_status(conversation: Conversation, message: Message, now: int) -> Conversation:
    """The summary after a message's delivery status changed (its list tick)."""
    last = conversation.last_message
    if last is None or last.id != message.id:
        return conversation
    return conversation.with_changes(
        last_message=LastMessage.of(message), updated_at=max(now, conversation.updated_at + 1)
    )


def with_delivery(
    message: Message, status: str, wa_message_id: str | None, error: MessageError | None
) -> Message | None:
    """The message with a new delivery outcome, or None when that would move it backwards."""
    if not is_forward(message.status, status):
        return None
    return replace(
        message,
        status=status,
        wa_message_id=wa_message_id or message.wa_message_id,
        error=error if error is not None else message.error,
    )


# -- what each write tells the change feed (both stores) -------------------------------


def saved_changes(saved: Saved | None) -> list[Change]:
    """A new message (a customer's, a reply, a note) and its conversation."""
    if saved is None:
        return []
    carried = FeedMessage(saved.message, new=True, new_conversation=saved.new_conversation)
    return [Change(saved.conversation, messages=(carried,))]


def status_changes(change: StatusChange | None) -> list[Change]:
    """A message's new delivery status (its conversation's tick, when it is the latest)."""
    if change is None:
        return []
    return [Change(change.conversation, messages=(FeedMessage(change.message, new=False),))]


def conversation_changes(conversation: Conversation) -> list[Change]:
    """A conversation changed by an agent (read, status, AI switch, assignee)."""
    return [Change(conversation)]


# The flat document form shared by both stores: plain JSON types, times as integer ms.


def conversation_to_doc(c: Conversation) -> dict[str, Any]:
    """A conversation summary as a flat document."""
    return {
        "id": c.id,
        "user_id": c.user_id,
        "user_name": c.user_name,
        "phone": c.phone,
        "channel": c.channel,
        "status": c.status,
        "unread_count": c.unread_count,
        "ai_enabled": c.ai_enabled,
        "assignee": c.assignee,
        "created_at": c.created_at,
        "last_activity": c.last_activity,
        "updated_at": c.updated_at,
        "last_inbound_at": c.last_inbound_at,
        "last_message": last_message_to_doc(c.last_message) if c.last_message else None,
        "phone_number_id": c.phone_number_id,
    }


def last_message_to_doc(m: LastMessage) -> dict[str, Any]:
    """A last-message summary as a plain dict."""
    return {
        "id": m.id,
        "type": m.type,
        "text": m.text,
        "direction": m.direction,
        "sender": m.sender,
        "at": m.at,
        "status": m.status,
    }


def conversation_from_doc(d: dict[str, Any]) -> Conversation:
    """A conversation summary from its flat document."""
    lm = d.get("last_message")
    return Conversation(
        id=d["id"],
        user_id=d["user_id"],
        user_name=d.get("user_name") or "",
        phone=d.get("phone") or "",
        channel=d.get("channel") or "whatsapp",
        status=d.get("status") or "open",
        unread_count=int(d.get("unread_count") or 0),
        ai_enabled=bool(d.get("ai_enabled", True)),
        assignee=d.get("assignee"),
        created_at=int(d["created_at"]),
        last_activity=int(d["last_activity"]),
        updated_at=int(d.get("updated_at") or 0),
        last_inbound_at=int(d["last_inbound_at"]) if d.get("last_inbound_at") else None,
        phone_number_id=d.get("phone_number_id"),
        last_message=LastMessage(
            id=lm["id"],
            type=lm["type"],
            text=lm.get("text"),
            direction=lm["direction"],
            sender=lm["sender"],
            at=int(lm["at"]),
            status=lm.get("status") or "received",
        )
        if lm
        else None,
    )


def message_to_doc(m: Message) -> dict[str, Any]:
    """A message as a flat document."""
    return {
        "id": m.id,
        "conversation_id": m.conversation_id,
        "direction": m.direction,
        "sender": m.sender,
        "agent_id": m.agent_id,
        "type": m.type,
        "text": m.text,
        "media": m.media.to_json() if m.media else None,
        "at": m.at,
        "status": m.status,
        "error": m.error.to_json() if m.error else None,
        "wa_message_id": m.wa_message_id,
        "extra": m.extra,
        "attempt": m.attempt,
    }


def message_from_doc(d: dict[str, Any]) -> Message:
    """A message from its flat document."""
    media = d.get("media")
    error = d.get("error")
    return Message(
        id=d["id"],
        conversation_id=d["conversation_id"],
        direction=d["direction"],
        sender=d["sender"],
        agent_id=d.get("agent_id"),
        type=d["type"],
        text=d.get("text"),
        media=Media(**media) if media else None,
        at=int(d["at"]),
        status=d["status"],
        error=MessageError(code=error["code"], title=error["title"]) if error else None,
        wa_message_id=d.get("wa_message_id"),
        extra=d.get("extra"),
        attempt=int(d.get("attempt") or 0),
    )
