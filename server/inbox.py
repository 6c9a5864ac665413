"""The inbox: the domain operations handlers call, in the order the product promises.

Save first (durable, with the work it owes recorded in the same write); the store's change
feed tells every open dashboard at once (server/broadcaster.py); then the slow work (the AI
reply, the WhatsApp send) runs in the outbox's lanes, never holding up the caller; see
server/workers/outbox.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import structlog

from server.models import Conversation, Message, MessageError
from server.store import rules
from server.store.base import (
    UNSET,
    ChatStore,
    InboundMessage,
    NotFound,
    Saved,
    StatusChange,
    StoreError,
    Task,
    UnknownMessage,
    Unset,
    Unstorable,
)
from server.workers.outbox import Outbox, room

log = structlog.get_logger(__name__)

# When a status names a message not stored yet, it is tried again after each of these
# delays (about 7.5 s in all): long enough for a slow send's answer to be stored.
LATE_STATUS_DELAYS_S: Final = (0.5, 1.0, 2.0, 4.0)
# A send's outcome that the store could not take is tried again after these delays: the
# message was sent (or refused), and leaving it "sending" would later mark it interrupted.
OUTCOME_RETRY_DELAYS_S: Final = (0.2, 1.0, 3.0)


@dataclass(slots=True, frozen=True)
class SendResult:
    """What WhatsApp said to an outbound message."""

    status: str  # "sent", or "failed" / "not_sent" with an error
    wa_message_id: str | None = None
    error: MessageError | None = None


class Sender(Protocol):
    """Sends a text message to a WhatsApp user."""

    async def send_text(self, to: str, text: str) -> SendResult:
        """Send `text` to `to`: a phone number, or a business-scoped user id."""


def recipient(conversation: Conversation) -> str:
    """Whom a reply goes to: the customer's number, or (a customer known only by their
    username) their business-scoped user id."""
    return conversation.phone or conversation.user_id


class Responder(Protocol):
    """Writes the AI's reply to a conversation."""

    async def reply(self, conversation: Conversation, history: list[Message]) -> str | None:
        """The reply to send, or None to stay silent."""


class Inbox:
    """Receives, replies and updates: the store (whose feed tells the dashboards), then the
    outbox."""

    def __init__(self, store: ChatStore, outbox: Outbox, sender: Sender) -> None:
        self.store = store
        self.outbox = outbox
        self.sender = sender
        self._closing = asyncio.Event()
        outbox.runners["send"] = self.deliver

    def close(self) -> None:
        """Shutting down: background waits that can be dropped end now."""
        self._closing.set()

    async def receive(self, inbound: InboundMessage) -> Saved | None:
        """A customer's message: save, broadcast, then ask the AI. None for a duplicate."""
        [saved] = await self.receive_all([inbound])
        return saved

    async def receive_all(self, inbounds: Sequence[InboundMessage]) -> list[Saved | None]:
        """Customers' messages of one delivery: each saved and broadcast at once, in order;
        then the AI work they owe, once per conversation (a burst's messages share one
        task, which answers the last and sees them all). None for each duplicate."""
        results: list[Saved | None] = []
        try:
            for inbound in inbounds:
                results.append(await self._save_inbound(inbound))
        finally:
            # Also when a later message could not be saved: what was saved owes its work.
            owed = {s.task.id: s.task for s in results if s is not None and s.task is not None}
            for task in owed.values():
                await self.outbox.submit(task)
        return results

    async def _save_inbound(self, inbound: InboundMessage) -> Saved | None:
        """Save one message; one the store refuses for what it holds (not an outage) is
        kept once as `unsupported` with the reason, so the rest of its batch stands."""
        try:
            return await self.store.save_inbound(inbound)
        except StoreError as e:
            if not isinstance(e, Unstorable):
                raise  # an outage or contention: the webhook answers 503, Meta redelivers
            refused: Exception = e
        except Exception as e:  # the store's encoders refused its content
            refused = e
        # Logged with the traceback: a value the parser let through that the store cannot
        # hold is a parser bug to fix, though no message is lost to it.
        log.warning(
            "webhook.message_not_stored",
            wa_message_id=inbound.wa_message_id,
            type=inbound.type,
            error=type(refused).__name__,
            exc_info=refused,
        )
        kept = dataclasses.replace(
            inbound,
            type="unsupported",
            text=None,
            media=None,
            user_name=None,
            extra={
                "original_type": inbound.type,
                "reason": f"the message could not be stored ({type(refused).__name__})",
            },
        )
        return await self.store.save_inbound(kept)

    async def apply_status(
        self, wa_message_id: str, status: str, error: MessageError | None
    ) -> StatusChange | None:
        """A WhatsApp delivery status; broadcast when it moved the message forward.

        A status for a message not stored (yet) is tried again in its own lane: it can
        overtake the answer of the send that stores the message's WhatsApp id (another
        instance may be sending it).
        """
        try:
            return await self.store.apply_status(wa_message_id, status, error)
        except UnknownMessage:
            lane = self.outbox.lanes.statuses
            if room(lane) > 0 and not lane.closed and not self._closing.is_set():
                await lane.spawn(self._retry_status(wa_message_id, status, error))
            else:
                log.info("status.unmatched", wa_message_id=wa_message_id, status=status)
            return None

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
                await self.store.apply_status(wa_message_id, status, error)
            except UnknownMessage:
                continue
            except StoreError as e:
                log.warning("status.retry_failed", wa_message_id=wa_message_id, error=str(e))
                return
            log.info("status.applied_late", wa_message_id=wa_message_id, status=status)
            return
        # A message this server never sent (the business's phone app, another tool).
        log.info("status.unmatched", wa_message_id=wa_message_id, status=status)

    async def reply(
        self,
        conversation_id: str,
        text: str,
        *,
        sender: str,
        agent_id: str | None = None,
        answers: str | None = None,
    ) -> Saved:
        """An outbound reply: saved as queued with its send, broadcast, then sent."""
        saved = await self.store.save_outbound(
            conversation_id,
            sender=sender,
            text=text,
            agent_id=agent_id,
            take_over=sender == "agent",
            answers=answers,
        )
        if saved.task is not None:
            await self.outbox.submit(saved.task)
        return saved

    async def retry(self, message_id: str) -> Saved:
        """Send a failed reply again (an agent's decision): queued, broadcast, sent."""
        saved = await self.store.retry_send(message_id)
        if saved.task is not None:
            await self.outbox.submit(saved.task)
        return saved

    async def deliver(self, task: Task) -> None:
        """Run a send task: the POST to WhatsApp once, its outcome recorded.

        The store records that the POST is under way before it starts; a task found in
        that state later (the process died mid-POST) is never sent again blindly, since
        WhatsApp has no idempotency key: it is marked failed as interrupted, and an agent
        decides (Retry).
        """
        try:
            message = await self.store.get_message(task.message_id)
            conversation = await self.store.get_conversation(task.conversation_id)
        except NotFound:
            await self.store.finish_task(task)
            return
        if task.state == "sending":
            log.warning("whatsapp.send_interrupted", message_id=message.id)
            await self._record(conversation, message, SendResult("failed", error=rules.INTERRUPTED))
            return
        if message.status != "queued":
            await self.store.finish_task(task)  # its outcome is in already
            return
        if not await self.store.mark_sending(task):
            return  # another instance holds it now
        try:
            result = await self.sender.send_text(recipient(conversation), message.text or "")
        except Exception as e:
            # A bug in sending, not a WhatsApp answer: the message must not sit in "queued"
            # looking as if it were on its way.
            log.exception("whatsapp.send_error", conversation_id=conversation.id)
            result = SendResult("failed", error=MessageError("internal_error", repr(e)[:300]))
        await self._record(conversation, message, result)

    async def _record(
        self, conversation: Conversation, message: Message, result: SendResult
    ) -> None:
        """Store a send's outcome (tried again while the store fails)."""
        for delay in (*OUTCOME_RETRY_DELAYS_S, None):
            try:
                await self.store.set_delivery(
                    message.id,
                    status=result.status,
                    wa_message_id=result.wa_message_id,
                    error=result.error,
                )
                break
            except StoreError as e:
                if delay is None:
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
                await asyncio.sleep(delay)
        log.info(
            "whatsapp.sent" if result.status == "sent" else "whatsapp.not_sent",
            conversation_id=conversation.id,
            message_id=message.id,
            status=result.status,
            error_code=result.error.code if result.error else None,
        )

    async def delete(self, conversation_id: str) -> Conversation:
        """Erase a conversation (a customer's request to be forgotten, say)."""
        conversation = await self.store.delete_conversation(conversation_id)
        log.info("conversation.deleted", conversation_id=conversation_id)
        return conversation

    async def update(
        self,
        conversation_id: str,
        *,
        status: str | None = None,
        ai_enabled: bool | None = None,
        assignee: str | Unset | None = UNSET,
        mark_read: bool = False,
    ) -> Conversation:
        """Change a conversation (the store's feed tells the dashboards)."""
        return await self.store.update_conversation(
            conversation_id,
            status=status,
            ai_enabled=ai_enabled,
            assignee=assignee,
            mark_read=mark_read,
        )
