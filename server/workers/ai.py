"""AI replies: one background job per inbound message, never blocking the webhook."""

from __future__ import annotations

from server.config import Settings
from server.inbox import Inbox, Responder
from server.store.base import ChatStore


class AiReplies:
    """Builds the context, asks the responder, saves and sends its reply."""

    def __init__(
        self, store: ChatStore, inbox: Inbox, responder: Responder, settings: Settings
    ) -> None:
        self.store = store
        self.inbox = inbox
        self.responder = responder
        self.settings = settings

    async def run(self, conversation_id: str, message_id: str) -> None:
        """Reply to the message `message_id` of a conversation."""
        conversation = await self.store.get_conversation(conversation_id)
        if not conversation.ai_enabled:
            return
        history, _ = await self.store.list_messages(
            conversation_id, self.settings.ai_context_messages, None
        )
        text = await self.responder.reply(conversation, history)
        if text:
            await self.inbox.reply(conversation_id, text, sender="ai")
