"""The warmer: loads the snapshot from the store and keeps it current from the change feed.

The change feed is the only way the snapshot changes (and, through the broadcaster, the
only source of what dashboards are told).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from typing import Final

import structlog

from server.broadcaster import Broadcaster
from server.snapshot import Snapshot
from server.store.base import Change, ChatStore, StoreError
from server.workers.listener import ListenedStore, ListenerSupervisor

log = structlog.get_logger(__name__)

# First load retries: quick at first (a store still starting), then at most every 30 s.
BACKOFF_START_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0


class Warmer:
    """Owns the snapshot's lifecycle: first load, incremental changes, resync."""

    def __init__(self, store: ChatStore, snapshot: Snapshot, broadcaster: Broadcaster) -> None:
        self.store = store
        self.snapshot = snapshot
        self.broadcaster = broadcaster
        # The snapshot's bound (None: it holds every conversation) is what is loaded.
        self.window = snapshot.window
        self._unsubscribe: Callable[[], None] | None = None
        self._buffer: list[Change] | None = None
        self.loaded = asyncio.Event()
        # When the snapshot last changed (time.monotonic); None before the first load.
        self.changed_at: float | None = None
        # The listener's supervisor, for a store whose feed is a listener (Firestore).
        self.listener: ListenerSupervisor | None = None

    async def run(self) -> None:
        """Subscribe, load, then let the feed apply every later change (until cancelled).

        A store whose feed is a listener that needs looking after (Firestore) is handed to
        the ListenerSupervisor, which listens, loads, and resyncs after an outage.
        """
        self._unsubscribe = self.store.subscribe(self._on_changes)
        try:
            if isinstance(self.store, ListenedStore):
                self.listener = ListenerSupervisor(
                    self.store, self.snapshot, self.load_once, self.broadcaster.resync
                )
                await self.listener.run()
            else:
                await self.load()
                await asyncio.Event().wait()  # the feed does the rest; we stay to be cancelled
        finally:
            if self._unsubscribe is not None:
                self._unsubscribe()

    async def load(self) -> None:
        """(Re)load the whole snapshot, retrying with backoff while the store is down."""
        delay = BACKOFF_START_S
        while True:
            try:
                await self.load_once()
            except StoreError as e:
                log.warning("snapshot.load_failed", error=str(e), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                delay = min(BACKOFF_MAX_S, delay * 2) * random.uniform(0.8, 1.2)
                continue
            return

    async def load_once(self) -> None:
        """(Re)load the whole snapshot once; StoreError when the store cannot answer.

        Changes that arrive while the window is read are buffered and applied after it.
        """
        self._buffer = []
        started = time.perf_counter()
        try:
            conversations = await self.store.load_window(self.window)
        except BaseException:
            self._buffer = None
            raise
        complete = self.window is None or len(conversations) < self.window
        self.snapshot.load(conversations, complete=complete)
        buffered, self._buffer = self._buffer, None
        self.snapshot.apply(buffered)
        self.changed_at = time.monotonic()
        self.loaded.set()
        log.info(
            "snapshot.loaded",
            conversations=len(self.snapshot),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            store=self.store.name,
            complete=complete,
        )

    def _on_changes(self, changes: Sequence[Change]) -> None:
        """The feed's callback, on the event loop: apply at once so reads see every write."""
        if self._buffer is not None:
            self._buffer.extend(changes)  # a load is running; applied right after it
            return
        started = time.perf_counter()
        applied = self.snapshot.apply(changes)
        if applied:
            self.changed_at = time.monotonic()
        log.info(
            "snapshot.applied",
            changes=len(changes),
            applied=applied,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
