"""The warmer: loads the snapshot from the store and keeps it current from the change feed.

The change feed is the only way the snapshot changes (and, through the broadcaster, the
only source of what dashboards are told).
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import Callable, Sequence
from typing import Final

import structlog

from server.broadcaster import Broadcaster
from server.snapshot import Row, Snapshot
from server.store.base import Change, ChatStore, StoreError
from server.workers.listener import ListenedStore, ListenerSupervisor

log = structlog.get_logger(__name__)

# First load retries: quick at first (a store still starting), then at most every 30 s.
BACKOFF_START_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0
# The window is read by keyset in chunks of this many conversations: each chunk's entries
# become rows and are dropped before the next is read, so the load never holds a second
# copy of the window (5,000 entries are about 4 MB while they live).
LOAD_CHUNK: Final = 5_000


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
            gc.unfreeze()

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
        Then the loaded rows are frozen out of the cyclic garbage collector: they live
        until the conversation changes, and a full collection that walks them stalls every
        request (105 ms with 200,000 rows held, 18 ms with the 20,000 of the default
        window, on the benchmark's machine; docs/BENCHMARKS.md). Rows made later are
        collected as usual.
        """
        self._buffer = []
        started = time.perf_counter()
        rows: list[Row] = []
        try:
            after: tuple[int, str] | None = None
            while self.window is None or len(rows) < self.window:
                size = (
                    LOAD_CHUNK if self.window is None else min(LOAD_CHUNK, self.window - len(rows))
                )
                chunk = await self.store.snapshot_entries(after, size)
                rows += [Row.from_entry(e) for e in chunk]
                if len(chunk) < size:
                    break
                after = (chunk[-1].last_activity, chunk[-1].id)
        except BaseException:
            self._buffer = None
            raise
        complete = self.window is None or len(rows) < self.window
        self.snapshot.load_rows(rows, complete=complete)
        del rows
        buffered, self._buffer = self._buffer, None
        self.snapshot.apply(buffered)
        # O(1): the collector's generations are moved to its permanent one, not walked.
        gc.freeze()
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
