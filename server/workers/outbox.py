"""The outbox: the work the store owes (AI replies, WhatsApp sends), run in separate lanes.

The store is the queue. A customer's message records the AI reply it owes, and a reply
the send it owes, in the same transaction as the message itself (server/store/rules.py,
"the outbox"). This process runs that work at once, in the lane of its kind, holding a
lease on it that it renews while the work runs. Whatever a crash, a deploy or a full lane
leaves behind is found by the sweeper: at start-up (on the embedded store every lease is
then from an ended process, so all of it at once) and then every few seconds, for any task
whose lease ran out. On Firestore several instances sweep the same queue; a lease is taken
in a transaction, so no task runs in two places at once.

Each kind of work has its own lane: an agent waiting for their reply to reach WhatsApp
never queues behind AI calls stuck on a slow provider, and neither waits for late statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

import aiojobs
import structlog

from server.store.base import ChatStore, StoreError, Task, TaskKind

log = structlog.get_logger(__name__)

Runner = Callable[[Task], Coroutine[Any, Any, None]]

# Lane sizes. Sends: Graph answers in well under a second and allows 80 messages a second
# per number; 64 at once keeps every agent's reply moving while a few retry. AI: each call
# waits on the provider for seconds; 200 at once is the most a provider's rate limit
# plausibly allows, and what is past it waits in the store, not in memory. Late statuses:
# they only wait for a send's answer to be stored; statuses of messages this server never
# sent (the business's phone app) must not pile up.
SEND_JOBS: Final = 64
AI_JOBS: Final = 200
STATUS_JOBS: Final = 50
# Media downloads: each moves up to 100 MB through memory (a document's limit); 8 at once
# keeps a burst of photos quick and the memory bounded.
MEDIA_JOBS: Final = 8
# Jobs queued in memory beyond a lane's running ones; past this the store keeps the task
# and the sweeper brings it back when the lane has room.
PENDING_JOBS: Final = 1_000
# The sweeper looks for abandoned work this often, and never takes more than a lane can
# start at once.
SWEEP_INTERVAL_S: Final = 5.0


@dataclass(slots=True)
class Lanes:
    """One job scheduler per kind of background work, each with its own limit."""

    sends: aiojobs.Scheduler
    ai: aiojobs.Scheduler
    statuses: aiojobs.Scheduler
    media: aiojobs.Scheduler

    @classmethod
    def create(
        cls, handler: Callable[[aiojobs.Scheduler, dict[str, Any]], None] | None = None
    ) -> Lanes:
        """The three lanes (on the running event loop)."""

        def lane(limit: int) -> aiojobs.Scheduler:
            return aiojobs.Scheduler(
                limit=limit, pending_limit=PENDING_JOBS, exception_handler=handler
            )

        return cls(
            sends=lane(SEND_JOBS),
            ai=lane(AI_JOBS),
            statuses=lane(STATUS_JOBS),
            media=lane(MEDIA_JOBS),
        )

    def all(self) -> tuple[aiojobs.Scheduler, ...]:
        """Every lane."""
        return (self.sends, self.ai, self.statuses, self.media)

    async def close(self, timeout_s: float) -> None:
        """Let running jobs finish within `timeout_s` (all lanes at once); cancel the rest."""
        await asyncio.gather(*(lane.wait_and_close(timeout_s) for lane in self.all()))


def room(lane: aiojobs.Scheduler) -> int:
    """How many more jobs the lane can start at once."""
    limit = lane.limit or SEND_JOBS
    return max(0, limit - lane.active_count - lane.pending_count)


class Outbox:
    """Runs the store's tasks in their lanes, renews their leases and sweeps for the rest."""

    def __init__(
        self,
        store: ChatStore,
        lanes: Lanes,
        *,
        lease_s: float,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
    ) -> None:
        self.store = store
        self.lanes = lanes
        self.runners: dict[str, Runner] = {}
        # Renew well before a lease runs out: three chances per lease.
        self._renew_every_s = lease_s / 3
        # The loop wakes at least as often as renewals fall due: waking only once per lease
        # would let short leases run out under the running jobs, and the next sweep would
        # take them again (counting a resume that never happened).
        self._sweep_interval_s = min(sweep_interval_s, self._renew_every_s)
        # Tasks this process is running (an AI task may run twice at once: a newer
        # message's job starts while the older one's finishes).
        self._held: Counter[str] = Counter()
        self._closing = False

    def _lane(self, task: Task) -> aiojobs.Scheduler:
        if task.kind == "send":
            return self.lanes.sends
        if task.kind == "media":
            return self.lanes.media
        return self.lanes.ai

    async def submit(self, task: Task) -> bool:
        """Run a task this process holds, in its lane; False when it was left to the
        sweeper (shutting down, no runner for its kind, or its lane is full)."""
        runner = self.runners.get(task.kind)
        lane = self._lane(task)
        if runner is None or self._closing or lane.closed:
            return False
        if lane.pending_count >= PENDING_JOBS:
            log.warning("outbox.lane_full", kind=task.kind, task_id=task.id)
            return False
        self._held[task.id] += 1
        try:
            await lane.spawn(self._run(runner, task))
        except BaseException:
            self._release(task.id)
            raise
        return True

    async def _run(self, runner: Runner, task: Task) -> None:
        try:
            await runner(task)
        finally:
            self._release(task.id)

    def _release(self, task_id: str) -> None:
        self._held[task_id] -= 1
        if self._held[task_id] <= 0:
            del self._held[task_id]

    async def run(self) -> None:
        """Sweep at start-up, then renew leases and sweep again on a timer, until cancelled."""
        steal = self.store.exclusive
        loop = asyncio.get_running_loop()
        next_renewal = loop.time() + self._renew_every_s
        while True:
            try:
                await self.sweep(steal=steal)
                steal = False
            except StoreError as e:
                log.warning("outbox.sweep_failed", error=str(e))
            await asyncio.sleep(self._sweep_interval_s)
            if loop.time() >= next_renewal:
                next_renewal = loop.time() + self._renew_every_s
                await self._renew()

    async def sweep(self, *, steal: bool = False) -> int:
        """Take the tasks whose lease ran out (all with `steal`) and run them; how many."""
        if self._closing:
            return 0  # draining on the way out: a task taken now could not run
        taken = 0
        kinds: tuple[tuple[TaskKind, aiojobs.Scheduler], ...] = (
            ("send", self.lanes.sends),
            ("ai", self.lanes.ai),
            ("media", self.lanes.media),
        )
        for kind, lane in kinds:
            if kind not in self.runners:
                continue
            free = room(lane)
            if free == 0:
                continue
            tasks = await self.store.claim_tasks(limit=free, steal=steal, kind=kind)
            for task in tasks:
                if task.id in self._held:
                    continue  # running here already; its lease was just renewed
                if await self.submit(task):
                    taken += 1
        if taken:
            log.info("outbox.resumed", tasks=taken, steal=steal)
        return taken

    async def _renew(self) -> None:
        held = list(self._held)
        if not held:
            return
        try:
            await self.store.renew_tasks(held)
        except StoreError as e:
            log.warning("outbox.renew_failed", tasks=len(held), error=str(e))

    async def close(self, drain_s: float) -> None:
        """Shutting down: running jobs get `drain_s` to finish; the work of any cut off
        stays in the store, and its leases are given up so another instance takes it."""
        self._closing = True
        held = list(self._held)  # before the drain: a job cut off forgets its task
        await self.lanes.close(drain_s)
        self._held.clear()
        if held:
            with contextlib.suppress(StoreError):
                await self.store.release_tasks(held)
            log.info("outbox.left_pending", tasks=len(held))
