"""Stores: the ChatStore protocol and its SQLite and Firestore implementations, and the
AgentStore (agents, sessions, personal tokens) beside each."""

from __future__ import annotations

from server.config import Settings
from server.store.agents import AgentStore
from server.store.base import ChatStore, Leases


def make_store(settings: Settings) -> ChatStore:
    """The store the settings name, holding its work under this instance's name."""
    leases = Leases(owner=settings.instance_id, lease_ms=int(settings.outbox_lease_s * 1000))
    ai_replies = settings.ai_provider != "off"
    if settings.store == "firestore":
        from server.store.firestore import FirestoreStore

        return FirestoreStore(settings, leases, ai_replies=ai_replies)
    from server.store.sqlite import SqliteStore

    return SqliteStore(settings.db, leases, ai_replies=ai_replies)


def make_agent_store(settings: Settings) -> AgentStore:
    """The agents' store, in the same database as the chat store."""
    if settings.store == "firestore":
        from server.store.agents_firestore import FirestoreAgents

        return FirestoreAgents(settings)
    from server.store.agents_sqlite import SqliteAgents

    return SqliteAgents(settings.db)
