"""The broadcaster: the one way into the hub. It turns the store's change feed into events.

Every committed write reaches the change feed exactly once, whether this process made it
or another instance did (the store drops a second copy by version): so what dashboards are
told is decided here, once, for both stores and for every instance, and nothing else
publishes a conversation's events.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.hub import Hub
from server.models import Conversation, Message
from server.store.base import Change


def status_event(conversation: Conversation, message: Message) -> dict[str, Any]:
    """The `message_status` event's data."""
    return {
        "conversation_id": conversation.id,
        "message_id": message.id,
        "status": message.status,
        "error": message.error.to_json() if message.error else None,
        "attempt": message.attempt,
        # Once sent, WhatsApp's id: what customers' reactions and quotes will name.
        "wa_message_id": message.wa_message_id,
    }


class Broadcaster:
    """Subscribed to the store's feed; publishes each change's events to the hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def on_changes(self, changes: Sequence[Change]) -> None:
        """The feed's callback, on the event loop."""
        for change in changes:
            if change.announce:
                self._publish(change)

    def _publish(self, change: Change) -> None:
        conversation = change.conversation
        where = {"conversation_id": conversation.id, "user_id": conversation.user_id}
        if change.removed:
            self.hub.publish("conversation_deleted", {"conversation_id": conversation.id}, **where)
            return
        summary = conversation.to_json()
        for carried in change.messages:
            message = carried.message
            if carried.new:
                name = "new_conversation" if carried.new_conversation else "new_message"
                self.hub.publish(
                    name, {"conversation": summary, "message": message.to_json()}, **where
                )
            elif message.direction == "in":
                # A customer's message whose media was downloaded (or could not be), or
                # that was marked read: open panes replace their copy.
                data = {"conversation_id": conversation.id, "message": message.to_json()}
                self.hub.publish("message_updated", data, **where)
            else:
                self.hub.publish("message_status", status_event(conversation, message), **where)
        if not change.messages:
            self.hub.publish("conversation_updated", {"conversation": summary}, **where)
        if change.missed:
            self.hub.publish("conversation_resync", {"conversation_id": conversation.id}, **where)

    def resync(self) -> None:
        """Every dashboard must reload: changes happened that this process never saw (an
        outage of the store)."""
        self.hub.publish("resync", {})
