"""AI replies: one background job per inbound message, never blocking the webhook."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final

import structlog

from server.config import Settings
from server.inbox import Inbox, Responder
from server.integrations.ai import AiError
from server.models import MessageError
from server.store.base import AiDisabled, ChatStore, NotFound

if TYPE_CHECKING:
    from server.metrics import Metrics

log = structlog.get_logger(__name__)

# Messages that call for no answer of their own: a reaction is a reaction.
NO_REPLY_TYPES: Final = frozenset({"reaction"})
FAILED_NOTE: Final = "The AI could not reply to this message. An agent should answer."


class AiReplies:
    """Builds the context, asks the responder, saves and sends its reply.

    When a customer sends several messages in a row, the job of the last one answers them
    all (it sees them in its context) and the earlier jobs stand down. Arrival order comes
    from the jobs themselves, not from timestamps: WhatsApp stamps messages in whole
    seconds, so two quick messages can tie or sort either way.
    """

    def __init__(
        self,
        store: ChatStore,
        inbox: Inbox,
        responder: Responder,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.inbox = inbox
        self.responder = responder
        self.settings = settings
        self.metrics = metrics
        # The newest message whose job is running, per conversation (this instance only).
        self._latest: dict[str, str] = {}
        # Conversations where a job stood down for a newer one, which must then answer
        # even when its own message (a reaction) would not call for a reply.
        self._owed: set[str] = set()

    async def run(self, conversation_id: str, message_id: str) -> None:
        """Reply to the message `message_id` of a conversation; a failure is recorded."""
        self._latest[conversation_id] = message_id
        started = time.perf_counter()
        outcome = "error"
        try:
            outcome = await self._reply(conversation_id, message_id)
        except asyncio.CancelledError:
            outcome = "cancelled"
            log.warning("ai.cancelled", conversation_id=conversation_id, message_id=message_id)
            raise
        finally:
            if self._latest.get(conversation_id) == message_id:
                del self._latest[conversation_id]
            if self.metrics is not None:
                self.metrics.ai_job(outcome, time.perf_counter() - started)

    def _superseded(self, conversation_id: str, message_id: str) -> bool:
        """True when a newer message's job took over; that job then owes the reply."""
        latest = self._latest.get(conversation_id)
        if latest is None or latest == message_id:
            # None: the newer job already finished, so it either answered or left it to us.
            return False
        self._owed.add(conversation_id)
        return True

    async def _reply(self, conversation_id: str, message_id: str) -> str:
        """Reply, or stand down; returns the outcome (metrics count jobs by it)."""
        started = time.perf_counter()
        try:
            conversation = await self.store.get_conversation(conversation_id)
        except NotFound:
            return "skipped"
        if not conversation.ai_enabled:
            self._owed.discard(conversation_id)
            return "skipped"
        history, _ = await self.store.list_messages(
            conversation_id, self.settings.ai_context_messages, None
        )
        trigger = next((m for m in history if m.id == message_id), None)
        if self._superseded(conversation_id, message_id):
            return "superseded"
        owed = conversation_id in self._owed
        self._owed.discard(conversation_id)
        if not owed and (trigger is None or trigger.type in NO_REPLY_TYPES):
            return "skipped"
        try:
            text = await self.responder.reply(conversation, history)
        except AiError as e:
            await self._record_failure(conversation_id, message_id, e.code, str(e), e.attempts)
            return "failed"
        except Exception as e:
            # A bug, not an outage: logged with its traceback, and still shown to the agents
            # so the customer is not left waiting on a reply that will never come.
            log.exception("ai.error", conversation_id=conversation_id, message_id=message_id)
            await self._record_failure(conversation_id, message_id, "internal_error", repr(e), 1)
            return "failed"
        if not text:
            return "skipped"
        if self._superseded(conversation_id, message_id):
            log.info("ai.discarded", conversation_id=conversation_id, reason="newer_message")
            return "superseded"
        # An agent may have taken over while the model was thinking: theirs is the answer.
        # The store checks it in the same transaction that would save the reply.
        try:
            saved = await self.inbox.reply(conversation_id, text, sender="ai")
        except AiDisabled:
            log.info("ai.discarded", conversation_id=conversation_id, reason="ai_disabled")
            return "discarded"
        log.info(
            "ai.replied",
            conversation_id=conversation_id,
            message_id=saved.message.id,
            in_reply_to=message_id,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return "replied"

    async def _record_failure(
        self, conversation_id: str, message_id: str, code: str, detail: str, attempts: int
    ) -> None:
        """Keep the failure in the conversation, where every agent sees it, and log it."""
        log.warning(
            "ai.failed",
            conversation_id=conversation_id,
            message_id=message_id,
            code=code,
            attempts=attempts,
            error=detail[:300],
        )
        # A system note, never sent to WhatsApp: stored, broadcast, then marked failed with
        # the reason, through the same store calls and events as any outbound message.
        saved = await self.store.save_outbound(conversation_id, sender="system", text=FAILED_NOTE)
        self.inbox.publish_message(saved)
        error = MessageError(
            code=code, title=f"AI reply failed after {attempts} attempt(s): {detail[:300]}"
        )
        change = await self.store.set_delivery(saved.message.id, status="failed", error=error)
        if change is not None:
            self.inbox.publish_status(change)
