"""AI replies: one task per conversation in the outbox, run in the AI lane.

A customer's message records the AI reply it owes (rules.ai_task) in the same write; a newer
message of theirs moves that task to itself, so the job of an older one stands down and a
burst gets one answer that sees it all. The reply is stored only while it still answers the
task (the store checks that in the write that completes it), so a job that ran twice (two
instances after a lease expired, or a restart mid-call) answers once.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final

import structlog

from server.config import Settings
from server.inbox import Inbox, Responder
from server.integrations.ai import AiError
from server.models import MessageError
from server.store.base import AiDisabled, ChatStore, NotFound, Superseded, Task

if TYPE_CHECKING:
    from server.metrics import Metrics

log = structlog.get_logger(__name__)

FAILED_NOTE: Final = "The AI could not reply to this message. An agent should answer."


class AiReplies:
    """Builds the context, asks the responder, saves and sends its reply."""

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

    async def run(self, task: Task) -> None:
        """Answer the customer's message the task names; a failure is recorded."""
        started = time.perf_counter()
        outcome = "error"
        try:
            outcome = await self._reply(task)
        except asyncio.CancelledError:
            outcome = "cancelled"  # shutdown cut it: the task stays pending in the store
            log.warning(
                "ai.cancelled", conversation_id=task.conversation_id, message_id=task.message_id
            )
            raise
        finally:
            if self.metrics is not None:
                self.metrics.ai_job(outcome, time.perf_counter() - started)

    async def _reply(self, task: Task) -> str:
        """Reply, or stand down; the outcome (metrics count jobs by it)."""
        started = time.perf_counter()
        conversation_id, message_id = task.conversation_id, task.message_id
        try:
            conversation = await self.store.get_conversation(conversation_id)
        except NotFound:
            await self.store.finish_task(task)
            return "skipped"
        if not conversation.ai_enabled:
            await self.store.finish_task(task)  # an agent took over, or it was turned off
            return "skipped"
        history, _ = await self.store.list_messages(
            conversation_id, self.settings.ai_context_messages, None
        )
        # The customer sees "typing…" while the model thinks (bounded: never delays it).
        await self.inbox.show_typing(conversation, message_id)
        try:
            text = await self.responder.reply(conversation, history)
        except AiError as e:
            await self._record_failure(task, e.code, str(e), e.attempts)
            return "failed"
        except Exception as e:
            # A bug, not an outage: logged with its traceback, and still shown to the agents
            # so the customer is not left waiting on a reply that will never come.
            log.exception("ai.error", conversation_id=conversation_id, message_id=message_id)
            await self._record_failure(task, "internal_error", repr(e), 1)
            return "failed"
        if not text:
            await self.store.finish_task(task)
            return "skipped"
        # An agent may have taken over, or a newer message arrived, while the model was
        # thinking: the store checks both in the same write that would save the reply.
        try:
            saved = await self.inbox.reply(conversation_id, text, sender="ai", answers=message_id)
        except AiDisabled:
            log.info("ai.discarded", conversation_id=conversation_id, reason="ai_disabled")
            await self.store.finish_task(task)
            return "discarded"
        except Superseded:
            log.info("ai.discarded", conversation_id=conversation_id, reason="superseded")
            return "superseded"
        log.info(
            "ai.replied",
            conversation_id=conversation_id,
            message_id=saved.message.id,
            in_reply_to=message_id,
            attempt=task.attempts,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return "replied"

    async def _record_failure(self, task: Task, code: str, detail: str, attempts: int) -> None:
        """Keep the failure in the conversation, where every agent sees it, and log it."""
        log.warning(
            "ai.failed",
            conversation_id=task.conversation_id,
            message_id=task.message_id,
            code=code,
            attempts=attempts,
            error=detail[:300],
        )
        # A system note, never sent to WhatsApp, stored failed with the reason in the
        # write that completes the task.
        error = MessageError(
            code=code, title=f"AI reply failed after {attempts} attempt(s): {detail[:300]}"
        )
        try:
            await self.store.save_outbound(
                task.conversation_id,
                sender="system",
                text=FAILED_NOTE,
                answers=task.message_id,
                failed=error,
            )
        except Superseded:
            pass  # a newer message is waiting for the AI; its job speaks for both
