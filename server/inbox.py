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
from typing import Any, Final, Protocol

import structlog

from server.media import MediaStore, MediaStoreError
from server.models import Conversation, Message, MessageError, preview
from server.store import rules
from server.store.base import (
    UNSET,
    ChatStore,
    Draft,
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
# Opening a conversation looks this far back for the customer's newest message to mark read.
RECEIPT_LOOKBACK: Final = 20
# The typing indicator is a courtesy: the AI's reply never waits longer than this for it.
TYPING_TIMEOUT_S: Final = 3.0


async def read_media(media: MediaStore, key: str) -> bytes | None:
    """The bytes of a stored media file (read off the event loop), or None."""
    path = await media.local_path(key)
    if path is None:
        return None
    try:
        return await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:
        return None


@dataclass(slots=True, frozen=True)
class SendResult:
    """What WhatsApp said to an outbound message."""

    status: str  # "sent", or "failed" / "not_sent" with an error
    wa_message_id: str | None = None
    error: MessageError | None = None


class DeliveryError(Exception):
    """A call to WhatsApp other than a send failed; `error` says why in an agent's words,
    `transient` whether another try may help."""

    def __init__(self, error: MessageError, *, transient: bool = False) -> None:
        super().__init__(error.title)
        self.error = error
        self.transient = transient


class Sender(Protocol):
    """Sends messages to WhatsApp users and tells WhatsApp what agents read."""

    async def send_text(self, to: str, text: str) -> SendResult:
        """Send `text` to `to`: a phone number, or a business-scoped user id."""

    async def send_message(
        self, to: str, message: Message, *, number: str | None, media_id: str | None = None
    ) -> SendResult:
        """Send a stored reply of any kind from the business number `number`."""

    async def upload_media(
        self, data: bytes, mime_type: str, filename: str | None, *, number: str | None
    ) -> str:
        """Upload a file for a send; its WhatsApp media id (DeliveryError otherwise)."""

    async def mark_read(
        self, wa_message_id: str, *, number: str | None, typing: bool = False
    ) -> bool:
        """Mark a customer's message read (and show typing); whether WhatsApp took it."""


def recipient(conversation: Conversation) -> str:
    """Whom a reply goes to: the customer's number, or (a customer known only by their
    username) their business-scoped user id."""
    return conversation.phone or conversation.user_id


class Responder(Protocol):
    """Writes the AI's reply to a conversation."""

    async def reply(self, conversation: Conversation, history: list[Message]) -> str | None:
        """The reply to send, or None to stay silent."""


def quoted(message: Message) -> dict[str, Any]:
    """A short copy of a message another one quotes, shown above the reply."""
    text = message.text
    if text is None and message.media is not None:
        text = message.media.caption or message.media.filename
    return {
        "id": message.id,
        "sender": message.sender,
        "type": message.type,
        "text": preview(text),
    }


class Inbox:
    """Receives, replies and updates: the store (whose feed tells the dashboards), then the
    outbox."""

    def __init__(
        self,
        store: ChatStore,
        outbox: Outbox,
        sender: Sender,
        media: MediaStore | None = None,
        *,
        read_receipts: bool = True,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.sender = sender
        self.media = media
        self.read_receipts = read_receipts
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
            owed = {
                task.id: task
                for s in results
                if s is not None
                for task in (s.task, s.media_task)
                if task is not None
            }
            for task in owed.values():
                await self.outbox.submit(task)
        return results

    async def _save_inbound(self, inbound: InboundMessage) -> Saved | None:
        """Save one message; one the store refuses for what it holds (not an outage) is
        kept once as `unsupported` with the reason, so the rest of its batch stands."""
        try:
            return await self.store.save_inbound(await self._with_quote(inbound))
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

    async def _with_quote(self, inbound: InboundMessage) -> InboundMessage:
        """A reply to an earlier message carries a copy of what it quotes, so the thread
        shows it above the reply even when the quoted message is pages back."""
        reply_to = (inbound.extra or {}).get("reply_to")
        if not isinstance(reply_to, str):
            return inbound
        target = await self.store.find_message(reply_to)
        if target is None:
            return inbound
        return dataclasses.replace(
            inbound, extra={**(inbound.extra or {}), "quoted": quoted(target)}
        )

    async def apply_status(
        self, wa_message_id: str, status: str, error: MessageError | None
    ) -> StatusChange | None:
        """A WhatsApp delivery status (the store's feed tells the dashboards when it moved
        the message forward).

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
        media_id = None
        if message.type in rules.OUTBOUND_MEDIA_TYPES and message.media is not None:
            # Uploading again is harmless (an unused upload expires at WhatsApp), so it
            # comes before the mark: a crash during it leaves the send to be tried again.
            try:
                media_id = await self._upload(conversation, message)
            except DeliveryError as e:
                status = "not_sent" if e.error.code == "not_configured" else "failed"
                await self._record(conversation, message, SendResult(status, error=e.error))
                return
        if not await self.store.mark_sending(task):
            return  # another instance holds it now
        try:
            result = await self.sender.send_message(
                recipient(conversation),
                message,
                number=conversation.phone_number_id,
                media_id=media_id,
            )
        except Exception as e:
            # A bug in sending, not a WhatsApp answer: the message must not sit in "queued"
            # looking as if it were on its way.
            log.exception("whatsapp.send_error", conversation_id=conversation.id)
            result = SendResult("failed", error=MessageError("internal_error", repr(e)[:300]))
        await self._record(conversation, message, result)

    async def _upload(self, conversation: Conversation, message: Message) -> str:
        """Upload an agent's file from the media store to WhatsApp; its media id."""
        media = message.media
        assert media is not None
        data = None
        if self.media is not None:
            try:
                data = await read_media(self.media, message.id)
            except MediaStoreError as e:
                raise DeliveryError(MessageError("media_store", str(e)), transient=True) from e
        if data is None:
            raise DeliveryError(MessageError("media_missing", "the attached file is not stored"))
        return await self.sender.upload_media(
            data,
            media.mime_type or "application/octet-stream",
            media.filename,
            number=conversation.phone_number_id,
        )

    async def send(self, conversation_id: str, draft: Draft, *, agent_id: str | None) -> Saved:
        """An agent's message of any kind: checked against the customer-service window,
        saved as queued with its send (taking over from the AI), broadcast, then sent."""
        saved = await self.store.save_agent_message(conversation_id, draft, agent_id=agent_id)
        if saved.task is not None:
            await self.outbox.submit(saved.task)
        return saved

    async def read(self, conversation_id: str) -> Conversation:
        """An agent opened the conversation: its unread count goes to 0 on every dashboard
        and, unless read receipts are off, the customer sees blue ticks.

        Marking the newest message read marks the earlier ones with it (WhatsApp), so one
        receipt goes out per newly read message: the store moves that message to `read`,
        and only the write that moved it sends the receipt (two dashboards opening the
        conversation at once send one).
        """
        conversation = await self.update(conversation_id, mark_read=True)
        if not self.read_receipts:
            return conversation
        latest, _ = await self.store.list_messages(conversation_id, RECEIPT_LOOKBACK, None)
        newest = next((m for m in reversed(latest) if m.direction == "in"), None)
        if newest is None or newest.wa_message_id is None or newest.status != "received":
            return conversation
        change = await self.store.set_delivery(newest.id, status="read")
        if change is None:
            return conversation
        lane = self.outbox.lanes.statuses
        if room(lane) > 0 and not lane.closed and not self._closing.is_set():
            await lane.spawn(
                self.sender.mark_read(newest.wa_message_id, number=conversation.phone_number_id)
            )
        return conversation

    async def show_typing(self, conversation: Conversation, message_id: str) -> None:
        """The customer sees "typing…" while the AI prepares its answer to their message
        (WhatsApp shows it until the reply, or for 25 s; it marks the message read)."""
        try:
            message = await self.store.get_message(message_id)
        except NotFound:
            return
        if message.wa_message_id is None or message.direction != "in":
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TYPING_TIMEOUT_S):
                await self.sender.mark_read(
                    message.wa_message_id, number=conversation.phone_number_id, typing=True
                )

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
