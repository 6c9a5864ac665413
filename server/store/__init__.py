"""Stores: the ChatStore protocol and its SQLite and Firestore implementations, and the
AgentStore (agents, sessions, personal tokens) beside each."""

from __future__ import annotations

from server.config import Settings
from server.store.agents import AgentStore
from server.store.base import ChatStore


def make_store(settings: Settings) -> ChatStore:
    """The store the settings name."""
    if settings.store == "firestore":
        from server.store.firestore import FirestoreStore

        return FirestoreStore(settings)
    from server.store.sqlite import SqliteStore

    return SqliteStore(settings.db)


def make_agent_store(settings: Settings) -> AgentStore:
    """The agents' store, in the same database as the chat store."""
    if settings.store == "firestore":
        from server.store.agents_firestore import FirestoreAgents

        return FirestoreAgents(settings)
    from server.store.agents_sqlite import SqliteAgents

    return SqliteAgents(settings.db)
