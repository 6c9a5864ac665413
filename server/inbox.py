"""The inbox: the domain operations handlers call, in the order the product promises.

Save first (durable), publish at once (every open dashboard sees it), then the slow work
(the AI reply, the WhatsApp send) as background jobs that never hold up the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog

from server.hub import Hub
from server.models import Conversation, Message, MessageError
from server.store.base import (
    UNSET,
    ChatStore,
    InboundMessage,
    Saved,
    StatusChange,
    StoreError,
    UnknownMessage,
    Unset,
)

log = structlog.get_logger(__name__)

# When a status names a message not stored yet, it is tried again after each of these
# delays (about 7.5 s in all): long enough for a slow send's answer to be stored.
LATE_STATUS_DELAYS_S: Final = (0.5, 1.0, 2.0, 4.0)
# At most this many statuses wait at once: statuses of messages this server never sent (the
# business's phone app, another tool) must not crowd the AI jobs out of the scheduler.
LATE_STATUSES_WAITING: Final = 50


@dataclass(slots=True, frozen=True)
class SendResult:
    """What WhatsApp said to an outbound message."""

    status: str  # "sent", or "failed" / "not_sent" with an error
    wa_message_id: str | None = None
    error: MessageError | None = None


class Sender(Protocol):
    """Sends a text message to a WhatsApp user."""

    async def send_text(self, to: str, text: str) -> SendResult:
        """Send `text` to the phone number `to`."""


class Responder(Protocol):
    """Writes the AI's reply to a conversation."""

    async def reply(self, conversation: Conversation, history: list[Message]) -> str | None:
        """The reply to send, or None to stay silent."""


Spawn = Callable[[Coroutine[Any, Any, Any]], Coroutine[Any, Any, Any]]


def message_event(saved: Saved) -> tuple[str, dict[str, Any]]:
    """The SSE event a stored message produces."""
    name = "new_conversation" if saved.new_conversation else "new_message"
    return name, {"conversation": saved.conversation.to_json(), "message": saved.message.to_json()}


class Inbox:
    """Receives, replies and updates: store, then hub, then background work."""

    def __init__(
        self,
        store: ChatStore,
        hub: Hub,
        spawn: Spawn,
        sender: Sender,
        ai_reply: Callable[[str, str], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.store = store
        self.hub = hub
        self._spawn = spawn
        self.sender = sender
        self.ai_reply = ai_reply
        # Statuses waiting in the background for their message to be stored.
        self._late_statuses = 0
        self._closing = asyncio.Event()

    def close(self) -> None:
        """Shutting down: background waits that can be dropped end now."""
        self._closing.set()

    def publish_message(self, saved: Saved) -> None:
        """Broadcast a stored message once (its id dedupes the change feed's copy)."""
        name, data = message_event(saved)
        self.hub.publish(
            name,
            data,
            dedupe_key=f"msg:{saved.message.id}",
            conversation_id=saved.conversation.id,
            user_id=saved.conversation.user_id,
        )

    def publish_conversation(self, conversation: Conversation) -> None:
        """Broadcast a changed conversation summary (read, status, AI switch, assignee)."""
        self.hub.publish(
            "conversation_updated",
            {"conversation": conversation.to_json()},
            dedupe_key=f"conv:{conversation.id}:{conversation.updated_at}",
            conversation_id=conversation.id,
            user_id=conversation.user_id,
        )

    def publish_status(self, change: StatusChange) -> None:
        """Broadcast a message's new delivery status."""
        message = change.message
        self.hub.publish(
            "message_status",
            {
                "conversation_id": message.conversation_id,
                "message_id": message.id,
                "status": message.status,
                "error": message.error.to_json() if message.error else None,
            },
            dedupe_key=f"status:{message.id}:{message.status}",
            conversation_id=message.conversation_id,
            user_id=change.conversation.user_id,
        )

    async def receive(self, inbound: InboundMessage) -> Saved | None:
        """A customer's message: save, broadcast, then ask the AI. None for a duplicate."""
        [saved] = await self.receive_all([inbound])
        return saved

    async def receive_all(self, inbounds: Sequence[InboundMessage]) -> list[Saved | None]:
        """Customers' messages of one delivery: each saved and broadcast at once, in order;
        then one AI job per conversation, for its last message, which sees them all (a
        customer's burst in one webhook gets one answer). None for each duplicate."""
        results: list[Saved | None] = []
        try:
            for inbound in inbounds:
                saved = await self.store.save_inbound(inbound)
                if saved is not None:
                    self.publish_message(saved)
                results.append(saved)
        finally:
            # Also when a later message could not be saved: Meta redelivers the whole
            # delivery then, and the messages stored already come back as duplicates.
            await self._ask_ai(results)
        return results

    async def _ask_ai(self, results: Sequence[Saved | None]) -> None:
        if self.ai_reply is None:
            return
        last: dict[str, Saved] = {}
        for saved in results:
            if saved is not None:
                last[saved.conversation.id] = saved
        for saved in last.values():
            if saved.conversation.ai_enabled:
                await self._spawn(self.ai_reply(saved.conversation.id, saved.message.id))

    async def apply_status(
        self, wa_message_id: str, status: str, error: MessageError | None
    ) -> StatusChange | None:
        """A WhatsApp delivery status; broadcast when it moved the message forward.

        A status for a message not stored (yet) is tried again in the background: it can
        overtake the answer of the send that stores the message's WhatsApp id (another
        instance may be sending it).
        """
        try:
            change = await self.store.apply_status(wa_message_id, status, error)
        except UnknownMessage:
            if self._late_statuses < LATE_STATUSES_WAITING:
                self._late_statuses += 1  # given back by the job when it ends
                try:
                    await self._spawn(self._apply_status_later(wa_message_id, status, error))
                except BaseException:
                    self._late_statuses -= 1
                    raise
            else:
                log.info("status.unmatched", wa_message_id=wa_message_id, status=status)
            return None
        if change is not None:
            self.publish_status(change)
        return change

    async def _apply_status_later(
        self, wa_message_id: str, status: str, error: MessageError | None
    ) -> None:
        try:
            await self._retry_status(wa_message_id, status, error)
        finally:
            self._late_statuses -= 1

    async def _retry_status(
        self, wa_message_id: str, status: str, error: MessageError | None
    ) -> None:
        for delay in LATE_STATUS_DELAYS_S:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
            if self._closing.is_set():
                log.info("status.dropped", wa_message_id=wa_message_id, reason="shutting down")
                return  # the delivery was answered 200: Meta will not send it again
            try:
                change = await self.store.apply_status(wa_message_id, status, error)
            except UnknownMessage:
                continue
            except StoreError as e:
                log.warning("status.retry_failed", wa_message_id=wa_message_id, error=str(e))
                return
            if change is not None:
                self.publish_status(change)
            log.info("status.applied_late", wa_message_id=wa_message_id, status=status)
            return
        # A message this server never sent (the business's phone app, another tool).
        log.info("status.unmatched", wa_message_id=wa_message_id, status=status)

    async def reply(
        self, conversation_id: str, text: str, *, sender: str, agent_id: str | None = None
    ) -> Saved:
        """An outbound reply: save as queued, broadcast, then send it in the background."""
        saved = await self.store.save_outbound(
            conversation_id,
            sender=sender,
            text=text,
            agent_id=agent_id,
            take_over=sender == "agent",
        )
        self.publish_message(saved)
        await self._spawn(self.deliver(saved.conversation, saved.message))
        return saved

    async def deliver(self, conversation: Conversation, message: Message) -> None:
        """Send a stored outbound message through WhatsApp and record the outcome."""
        try:
            result = await self.sender.send_text(conversation.phone, message.text or "")
        except Exception as e:
            # A bug in sending, not a WhatsApp answer: the message must not sit in "queued"
            # looking as if it were on its way.
            log.exception("whatsapp.send_error", conversation_id=conversation.id)
            result = SendResult("failed", error=MessageError("internal_error", repr(e)[:300]))
        try:
            change = await self.store.set_delivery(
                message.id,
                status=result.status,
                wa_message_id=result.wa_message_id,
                error=result.error,
            )
        except StoreError as e:
            # Sent (or refused) but not recorded: say so loudly with what we know.
            log.error(
                "whatsapp.outcome_not_stored",
                conversation_id=conversation.id,
                message_id=message.id,
                status=result.status,
                wa_message_id=result.wa_message_id,
                error=str(e),
            )
            return
        log.info(
            "whatsapp.sent" if result.status == "sent" else "whatsapp.not_sent",
            conversation_id=conversation.id,
            message_id=message.id,
            status=result.status,
            error_code=result.error.code if result.error else None,
        )
        if change is not None:
            self.publish_status(change)

    async def update(
        self,
        conversation_id: str,
        *,
        status: str | None = None,
        ai_enabled: bool | None = None,
        assignee: str | Unset | None = UNSET,
        mark_read: bool = False,
    ) -> Conversation:
        """Change a conversation and broadcast the new summary."""
        conversation = await self.store.update_conversation(
            conversation_id,
            status=status,
            ai_enabled=ai_enabled,
            assignee=assignee,
            mark_read=mark_read,
        )
        self.publish_conversation(conversation)
        return conversation
