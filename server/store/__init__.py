"""Stores: the ChatStore protocol and its SQLite and Firestore implementations."""

from __future__ import annotations

from server.config import Settings
from server.store.base import ChatStore


def make_store(settings: Settings) -> ChatStore:
    """The store the settings name."""
    if settings.store == "firestore":
        from server.store.firestore import FirestoreStore

        return FirestoreStore(settings)
    from server.store.sqlite import SqliteStore

    return SqliteStore(settings.db)
