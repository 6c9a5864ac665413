"""The listener's supervisor: keeps a store's realtime listener alive, and honest when it is not.

The Firestore client's listener cannot be trusted to look after itself: on a lost
connection it reconnects in a tight loop that burns a whole core, and errors it does not
retry close it without telling anyone. So the supervisor

- starts the listener, then loads the snapshot;
- checks every CHECK_INTERVAL_S that the listener is still streaming and that the store
  answers a one-document health read, and moves the listener on to a newer start when
  its result set has grown (the store hands over with no gap);
- writes a heartbeat that the listener must deliver back; a listener that died, or went
  silent while it says it streams, is replaced by one that catches up from its last read
  time: a blip costs no reload and no `resync`;
- every REPAIR_EVERY_S re-reads the most recently committed conversations and delivers
  any version some path missed (anti-entropy, counted in `firestore.repaired`);
- only after OUTAGE_AFTER consecutive failures declares an outage: marks the snapshot
  stale (pages are still served, with `"stale": true`, and /readyz says degraded), stops
  the listener so it cannot spin, and probes the store with exponential backoff and
  jitter;
- once the store answers, listens again, reloads the snapshot and tells every SSE client to
  `resync` (events during the outage were never seen here, so they cannot be replayed).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, runtime_checkable

import structlog

from server.snapshot import Snapshot
from server.store.base import StoreError

log = structlog.get_logger(__name__)

# How often a healthy listener is checked. It bounds how long a dead listener goes unnoticed
# (and how long the client may spin before it is stopped) at the price of one document read
# a second per instance (about 86,000 reads a day, a few cents).
CHECK_INTERVAL_S: Final = 1.0
# Outage probes: soon after a blip, then at most every 3 s, so the end of an outage is
# noticed within seconds; a probe is one failed connection attempt, which costs nothing.
BACKOFF_START_S: Final = 0.5
BACKOFF_MAX_S: Final = 3.0
# Jitter spreads the probes of many instances that lost the store at the same moment.
JITTER: Final = 0.2
# Consecutive failed checks (health reads, listener replacements) before an outage is
# declared: one slow read or one dropped stream is a blip, not an outage.
OUTAGE_AFTER: Final = 3
# How often the anti-entropy pass runs (REPAIR_READS document reads each time).
REPAIR_EVERY_S: Final = 120.0


@runtime_checkable
class ListenedStore(Protocol):
    """A store whose change feed is a listener that must be supervised (Firestore)."""

    name: str

    @property
    def listening(self) -> bool:
        """True while the listener streams."""

    async def listen(self) -> None:
        """Start a new listener (stopping any old one)."""

    async def unlisten(self) -> None:
        """Stop the listener."""

    @property
    def needs_advance(self) -> bool:
        """True when the listener should move on to a newer start (its result set grew)."""

    async def advance(self) -> None:
        """Replace the listener by one from a newer start, with no gap between the two."""

    async def recover(self) -> None:
        """Ping through fresh connections, which replace the old ones once they answer."""

    async def catch_up(self) -> None:
        """Replace the listener by one starting from its last read time (no reload)."""

    @property
    def stalled(self) -> bool:
        """True when the listener has not delivered this instance's heartbeat in time."""

    async def heartbeat(self) -> None:
        """Write this instance's heartbeat when one is due; its listener must deliver it."""

    async def repair(self) -> int:
        """Deliver recently committed versions that no path delivered; how many."""

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""


class ListenerSupervisor:
    """Runs until cancelled: listen, load, watch; on failure back off, listen again, resync."""

    def __init__(
        self,
        store: ListenedStore,
        snapshot: Snapshot,
        load: Callable[[], Awaitable[None]],
        resync: Callable[[], None],
    ) -> None:
        self.store = store
        self.snapshot = snapshot
        self._load = load
        self._resync = resync
        # Listeners replaced without an outage (died, or silent).
        self.replacements = 0
        self.outages = 0
        # Listens started after the first (each outage ends with one).
        self.restarts = 0
        self._listened = False
        # True from an outage of a ready snapshot until the snapshot is fresh again.
        self._served_stale = False

    async def run(self) -> None:
        """Supervise the listener until cancelled (the warmer's task owns this coroutine)."""
        delay = BACKOFF_START_S
        probe = self.store.ping
        try:
            while True:
                try:
                    await probe()
                    await self.store.listen()
                    if self._listened:
                        self.restarts += 1
                    self._listened = True
                    await self._load()
                except Exception as e:
                    if not isinstance(e, StoreError):  # a bug: logged, handled as an outage
                        log.exception("firestore.listen_error")
                    await self._outage(str(e))
                    log.info("firestore.probe_failed", error=str(e), retry_in_s=round(delay, 2))
                    await asyncio.sleep(_jittered(delay))
                    delay = min(BACKOFF_MAX_S, delay * 2)
                    probe = self.store.recover
                    continue
                if self._served_stale:
                    self._served_stale = False
                    log.info("firestore.recovered", outages=self.outages)
                    # Events of the outage were never seen here: dashboards must reload.
                    self._resync()
                delay = BACKOFF_START_S
                reason = await self._watch()
                await self._outage(reason)
                probe = self.store.recover
        finally:
            await asyncio.shield(self.store.unlisten())

    @property
    def up(self) -> bool:
        """True while the listener streams and the snapshot follows it."""
        return self.store.listening and self.snapshot.ready and self.snapshot.fresh

    async def _watch(self) -> str:
        """Return why the store is out (it never returns while the store answers)."""
        loop = asyncio.get_running_loop()
        failures = 0
        last_error = ""
        next_repair = loop.time()
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            if failures >= OUTAGE_AFTER:
                return last_error
            try:
                await self.store.ping()
                if not self.store.listening or self.store.stalled:
                    why = "stalled" if self.store.listening else "stopped"
                    log.warning("firestore.listener_lost", why=why)
                    await self.store.catch_up()
                    self.replacements += 1
                await self.store.heartbeat()
                if loop.time() >= next_repair:
                    next_repair = loop.time() + REPAIR_EVERY_S
                    repaired = await self.store.repair()
                    log.info("firestore.repaired", conversations=repaired)
            except StoreError as e:
                failures += 1
                last_error = str(e)
                log.warning("firestore.check_failed", error=last_error, failures=failures)
                # Stop the listener at once: against an unreachable store its client
                # reconnects in a loop that burns a core. If the next check passes, a new
                # one catches up from where this one stopped: no reload, no resync.
                await self.store.unlisten()
                continue
            failures = 0
            if self.store.needs_advance:
                try:
                    await self.store.advance()
                except Exception as e:
                    # The old listener goes on; the next check tries again (and a store
                    # that is really down fails its health read).
                    log.warning("firestore.advance_failed", error=str(e), exc_info=True)

    async def _outage(self, reason: str) -> None:
        """Serve the last good snapshot as stale and stop the listener so it cannot spin."""
        snapshot = self.snapshot
        if snapshot.fresh or not snapshot.ready:
            self.outages += 1
            log.warning("firestore.outage", reason=reason, snapshot_ready=snapshot.ready)
        snapshot.fresh = False
        self._served_stale = self._served_stale or snapshot.ready
        await self.store.unlisten()


def _jittered(delay: float) -> float:
    return delay * random.uniform(1 - JITTER, 1 + JITTER)
