"""The production store: Cloud Firestore (or its emulator).

Data model (DESIGN.md "Stores"):

- `users/{user_id}`: name, phone, channel, created_at, and `latest_conversation_id`, so the
  one-open-conversation rule is a read of the user document inside the save transaction.
  Reading it also serialises two concurrent first messages of one customer: both
  transactions read and write the same document, so one retries and sees the other's
  conversation instead of opening a second one.
- `users/{user_id}/conversations/{conversation_id}`: the summary, in the flat form of
  server/store/rules.py (times as integer ms), with its own id in the `id` field: a
  collection-group query finds it by id and orders ties by it like the snapshot does.
- `users/{user_id}/conversations/{conversation_id}/messages/{message_id}`.
- `wamids/{message_id_for_wamid(wamid)}`: `{"path": <message document path>}`. A small
  top-level index: it makes a redelivered webhook a one-document read (and a `create()` that
  fails even if the customer's conversation changed in between), and it finds the message a
  WhatsApp status names without a collection-group index on `wa_message_id`.

A conversation document also holds its last few messages whole in `feed_messages` (each
written, or given a new delivery status, with the version that wrote it; the summary keeps
only a 140-character preview): another instance that sees the change on its listener sends
its SSE clients the very events the writer sent (`new_message`, `message_status`), without
reading a message, even when its listener merged several quick writes into one change.

Reads and writes use the AsyncClient; the window of newest conversations is read once by
keyset (in chunks). The change feed carries this process's commits as soon as they are
acknowledged (so a read right after a write sees it, as with SQLite), and everything else
from a collection-group listener on the sync Client (the only one with listeners) over the
conversations committed recently (`feed_at`, the commit time, after a mark), moved to a
newer mark as it grows; see _Feed. A version reaches the feed once, however many ways it
arrives.
server/workers/listener.py supervises it. Its callback runs on the client's thread: it only
converts documents and hands them to the event loop, and it never raises, because a
callback that raises kills the listener for good without telling anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

import structlog
from google.api_core import exceptions as gexc
from google.cloud import firestore
from google.cloud.firestore_v1 import FieldFilter, async_transactional

from server.config import Settings
from server.models import Conversation, Message, MessageError, now_ms
from server.store import rules
from server.store.base import (
    UNSET,
    Change,
    ChangeFeed,
    ChangeListener,
    FeedMessage,
    InboundMessage,
    NotFound,
    Saved,
    StatusChange,
    StoreError,
    StoreUnavailable,
    UnknownMessage,
    Unset,
    message_id_for_wamid,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

USERS: Final = "users"
# The field every conversation write sets to Firestore's commit time; the listener's.
FEED_AT: Final = "feed_at"
CONVERSATIONS: Final = "conversations"
MESSAGES: Final = "messages"
WAMIDS: Final = "wamids"
# A document that never exists: reading it is the cheapest round trip (one read).
HEALTH_DOC: Final = "_livechat/health"

# Every store call gives up after this long: a webhook must answer Meta long before Meta's
# own 20 s timeout, and a page past the window must not hang while Firestore is down.
OP_TIMEOUT_S: Final = 10.0
# A health read answers in milliseconds when Firestore is up (an unreachable one fails at
# once). The first read of a freshly started emulator takes about 2 s: allow for it.
PING_TIMEOUT_S: Final = 5.0
# A listener's first snapshot: the changes of the last MARK_MARGIN_MS, normally in well
# under a second; a freshly started emulator takes a few seconds to answer at all.
FIRST_SNAPSHOT_TIMEOUT_S: Final = 30.0
# How far before this machine's "now" the first listener's mark is set: it covers a
# difference between this clock and Firestore's (the window, read right after, covers what
# came before). A listener that replaces another starts at the other's last read time,
# Firestore's own clock: no margin, no gap.
MARK_MARGIN_MS: Final = 10_000
# Once a listener's result set holds this many conversations it moves to a newer mark:
# the client's per-change sort stays cheap (about 8 us a document).
RELISTEN_DOCS: Final = 1_000
# ...but never sooner than this after it started, so that a burst of changes cannot make
# it re-listen at every check.
ADVANCE_AFTER_MS: Final = 10_000
# The window is loaded by keyset in chunks of this many documents.
LOAD_CHUNK: Final = 1_000
# Messages a conversation's document carries whole (see _document): more than a listener
# merges into one change of a conversation at any realistic message rate.
FEED_MESSAGES_KEPT: Final = 5
# Echoes of local writes kept: enough for every write that can still be waiting for its
# commit's answer (OP_TIMEOUT_S at the highest write rates).
ECHOES_KEPT: Final = 10_000
# Versions remembered to drop a change delivered twice (by two listeners in a hand-over).
VERSIONS_KEPT: Final = 100_000
# Stopping a listener normally takes well under a second (the library waits up to 1 s for
# its thread); past this it is stuck and left behind on its daemon thread.
STOP_TIMEOUT_S: Final = 5.0
# (conversation id, updated_at) pairs this process wrote, to mark their echo on the feed as
# local. A bulk import of 20,000 conversations fits; an evicted pair only means the hub
# dedupes the event instead (by message id or by conversation version).
LOCAL_WRITES: Final = 50_000
# Firestore accepts at most 500 writes in one batch.
BATCH_WRITES: Final = 500
# Batches committed at once by a bulk import: enough to hide round trips, few enough not
# to trip the emulator's (or Firestore's) write throttling.
BATCH_CONCURRENCY: Final = 4

# Writes of one customer's documents are serialised in this process. The emulator's locks
# deadlock two transactions that read and then write the same document until a 10 s lock
# timeout (Firestore itself aborts one and retries it); serialising them here costs
# nothing, as one customer's messages arrive one after another anyway. Striped: bounded
# memory, and two busy customers rarely share a stripe.
LOCK_STRIPES: Final = 256
# Where conversations live (id -> document path): ids never move, so a path found once is
# good forever. Enough for every conversation that is active at once.
PATHS_CACHED: Final = 20_000
# A transaction aborted by contention (or a lock timeout) is run again, at most this often.
TRANSACTION_ATTEMPTS: Final = 3

# The versions marked local by the transaction running in this task (see _transact).
_MARKS: ContextVar[list[Conversation] | None] = ContextVar("firestore_marks", default=None)

_UNAVAILABLE: Final = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.RetryError,
    gexc.InternalServerError,
    gexc.Unknown,
    gexc.Cancelled,
)


@dataclass(slots=True)
class Reads:
    """Documents read, as Firestore bills them: each one a get, a query or the listener
    returned; a query that returns nothing costs one, an aggregation one per 1,000 entries."""

    listener: int = 0
    direct: int = 0
    health: int = 0


class _Feed:
    """One listener (one `on_snapshot` watch) and what it delivered so far.

    It listens to the conversations whose last commit (`feed_at`, Firestore's commit time)
    is after its `mark`: a result set that starts with a few documents and grows by one per
    conversation changed since. A commit that lands late (after its writer gave up waiting)
    still has a later `feed_at`, so no listener misses it. The Python client re-sorts the
    whole result set on every change it delivers, and the cost of a listener to Firestore
    grows with it too, so once it has grown the store moves to a newer mark
    (FirestoreStore.advance). Callbacks of a feed that was stopped are ignored on the loop,
    so a watch being shut down can never apply a stale change.
    """

    def __init__(self, generation: int, loop: asyncio.AbstractEventLoop, *, mark: datetime) -> None:
        self.generation = generation
        self.mark = mark
        self.started = now_ms()
        # Written on the client's thread (one assignment): Firestore's time of its latest
        # snapshot; every commit up to it has been delivered.
        self.read_time: datetime | None = None
        self.first: asyncio.Future[None] = loop.create_future()
        self.watch: Any = None
        self.client: Any = None
        self.failed: str | None = None
        self.pushes = 0
        # Written on the client's thread (an int assignment): documents in the result set.
        self.size = 0

    @property
    def alive(self) -> bool:
        """The watch streams and its callback never failed."""
        return self.failed is None and self.watch is not None and bool(self.watch.is_active)


class FirestoreStore:
    """ChatStore on Cloud Firestore: AsyncClient for reads and writes, a listener for the feed."""

    name = "firestore"

    def __init__(self, settings: Settings) -> None:
        self.project = settings.google_cloud_project
        self.emulator_host = settings.firestore_emulator_host
        self._db: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers = ChangeFeed()
        # The listeners, oldest first: one, or two while advance() hands over to a new one.
        self._feeds: list[_Feed] = []
        self._generation = 0
        # The version (updated_at) of each conversation the feed delivered last: a change
        # delivered by two listeners during a hand-over reaches the subscribers once.
        self._versions: OrderedDict[str, int] = OrderedDict()
        self._local: OrderedDict[tuple[str, int], None] = OrderedDict()
        # The latest echoes of local writes, in case their write fails after all (_unmark).
        self._echoed: OrderedDict[tuple[str, int], Change] = OrderedDict()
        self._paths: OrderedDict[str, str] = OrderedDict()
        self._locks = [asyncio.Lock() for _ in range(LOCK_STRIPES)]
        self._closed = False
        self.reads = Reads()
        # Clients replaced by recover(), with when: closed once no call can still use them.
        self._retired: list[tuple[float, Any]] = []
        # Serialises listen/unlisten (the supervisor and close may race on shutdown).
        self._feed_lock = asyncio.Lock()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Create the clients (no network yet: Firestore is reached on the first call)."""
        self._loop = asyncio.get_running_loop()
        if self.emulator_host:
            # The one environment write of the server: the client library reads the
            # emulator address only from the environment, when a client is created.
            os.environ["FIRESTORE_EMULATOR_HOST"] = self.emulator_host
        self._db = firestore.AsyncClient(project=self.project)

    async def close(self) -> None:
        """Stop the listener and forget every subscriber; nothing is called after this."""
        self._closed = True
        self._subscribers.clear()
        await self.unlisten()
        clients = [client for _, client in self._retired]
        self._retired.clear()
        if self._db is not None:
            clients.append(self._db)
            self._db = None
        for client in clients:
            await _close_async_channel(client)

    async def recover(self) -> None:
        """Ping through a brand-new client; once one answers, it replaces the current one.

        After an outage gRPC backs off reconnecting a channel, for up to two minutes; a new
        client connects at once, so the end of an outage is seen when it happens. The old
        client may still be serving a request: it is closed only once any call on it must
        have timed out.
        """
        if self._closed:
            raise StoreUnavailable("the store is closed")
        fresh = firestore.AsyncClient(project=self.project)
        self.reads.health += 1
        try:
            await self._ping(fresh)
        except StoreUnavailable:
            await _close_async_channel(fresh)  # nothing else has seen this one
            raise
        now = time.monotonic()
        if self._db is not None:
            self._retired.append((now, self._db))
        self._db = fresh
        expired = [c for at, c in self._retired if now - at > OP_TIMEOUT_S + PING_TIMEOUT_S]
        self._retired = [(at, c) for at, c in self._retired if c not in expired]
        for client in expired:
            await _close_async_channel(client)

    async def ping(self) -> None:
        """Raise StoreUnavailable when Firestore does not answer a one-document read."""
        self.reads.health += 1
        await self._ping(self._client)

    @staticmethod
    async def _ping(client: Any) -> None:
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                await client.document(HEALTH_DOC).get(retry=None, timeout=PING_TIMEOUT_S)
        except TimeoutError as e:
            raise StoreUnavailable("firestore did not answer the health read") from e
        except gexc.GoogleAPICallError as e:
            raise StoreUnavailable(f"firestore health read failed: {type(e).__name__}") from e

    @property
    def _client(self) -> Any:
        if self._db is None or self._closed:
            raise StoreUnavailable("the store is not open")
        return self._db

    @contextlib.asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        """Bound a call in time and turn the client's errors into store errors."""
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                yield
        except TimeoutError as e:
            raise StoreUnavailable(f"firestore did not answer ({what})") from e
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"firestore unavailable ({what}): {type(e).__name__}") from e
        except gexc.GoogleAPICallError as e:
            raise StoreError(f"firestore refused {what}: {type(e).__name__}") from e

    async def _transact(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run `fn(transaction)` in a transaction; run it again when contention aborts it.

        Once it commits, the conversations it wrote are on the change feed before this
        returns, as with SQLite: a list read right after a write sees it (the listener's
        echo, ~150 ms later, is then dropped as a version already delivered). When it
        fails, the versions it marked local are forgotten: a commit that timed out here may
        still have landed, and its echo must then be published like another instance's
        change, or no dashboard would hear of it (the caller publishes only what it saved,
        and the webhook's redelivery is a duplicate).
        """
        marked: list[Conversation] = []
        token = _MARKS.set(marked)
        try:
            result = await self._transact_once(what, fn)
        except BaseException:
            self._unmark([(c.id, c.updated_at) for c in marked])
            raise
        finally:
            _MARKS.reset(token)
        # A transaction function may have run more than once: its last run committed.
        self._committed({c.id: c for c in marked}.values())
        return result

    async def _transact_once(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        async with self._guard(what):
            for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
                try:
                    result: T = await async_transactional(fn)(self._client.transaction())
                except gexc.Aborted:
                    if attempt == TRANSACTION_ATTEMPTS:
                        raise
                    await asyncio.sleep(random.uniform(0.01, 0.05) * attempt)
                    continue
                except ValueError as e:  # the client's "commit retries exhausted"
                    raise StoreUnavailable(f"firestore transaction kept aborting ({what})") from e
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _lock(self, user_id: str) -> asyncio.Lock:
        """The in-process lock serialising writes to one customer's documents."""
        return self._locks[hash(user_id) % LOCK_STRIPES]

    def _remember_path(self, conversation_id: str, path: str) -> None:
        self._paths[conversation_id] = path
        self._paths.move_to_end(conversation_id)
        while len(self._paths) > PATHS_CACHED:
            self._paths.popitem(last=False)

    async def _conversation_path(self, conversation_id: str) -> str:
        """Where a conversation lives (users/{user}/conversations/{id}); NotFound if nowhere."""
        path = self._paths.get(conversation_id)
        if path is None:
            async with self._guard("find conversation"):
                path = (await self._conversation_snap(conversation_id)).reference.path
            self._remember_path(conversation_id, path)
        return path

    # -- change feed --------------------------------------------------------------------

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        """Call `listener` on the event loop with each batch of changes the listener sees."""
        return self._subscribers.subscribe(listener)

    @property
    def listening(self) -> bool:
        """True while the listener is alive (its watch streams and its callback never failed)."""
        return bool(self._feeds) and self._feeds[-1].alive

    @property
    def needs_advance(self) -> bool:
        """True when the listener's result set has grown enough to listen from a newer mark."""
        if not self._feeds:
            return False
        feed = self._feeds[-1]
        return feed.size > RELISTEN_DOCS and now_ms() - feed.started > ADVANCE_AFTER_MS

    async def listen(self) -> None:
        """Start a new listener on recent changes (stopping any old one); wait until it streams."""
        async with self._feed_lock:
            await self._stop_feeds(self._feeds)
            if self._closed:
                return
            mark = datetime.now(UTC) - timedelta(milliseconds=MARK_MARGIN_MS)
            feed = await self._start_feed(mark)
            await self._first_snapshot(feed)

    async def advance(self) -> None:
        """Listen from a newer mark, so the listener's result set stays small.

        The new listener is started first and the old one stopped once the new one streams:
        a change in between is delivered by one of them, or by both (the second copy is
        dropped by version). StoreUnavailable when the new one does not stream (the old one
        then goes on).
        """
        async with self._feed_lock:
            old = list(self._feeds)
            if self._closed or not old:
                return
            # Every commit up to the newest listener's last read time has been delivered.
            feed = await self._start_feed(old[-1].read_time or old[-1].mark)
            try:
                await self._first_snapshot(feed)
            except StoreUnavailable:
                await self._stop_feeds([feed])
                raise
            await self._stop_feeds(old)
            log.info("firestore.advanced", generation=feed.generation, mark=feed.mark.isoformat())

    async def unlisten(self) -> None:
        """Stop the listener (during an outage its client would spin reconnecting)."""
        async with self._feed_lock:
            await self._stop_feeds(self._feeds)

    async def _start_feed(self, mark: datetime) -> _Feed:
        loop = asyncio.get_running_loop()
        self._generation += 1
        feed = _Feed(self._generation, loop, mark=mark)
        # A new sync client per listener: a fresh channel, not one in gRPC's reconnect
        # backoff from before an outage. The emulator address is in the environment.
        # Creating it may look up credentials (files, the metadata server): not on the loop.
        feed.client = await asyncio.to_thread(firestore.Client, project=self.project)
        query = feed.client.collection_group(CONVERSATIONS).where(
            filter=FieldFilter(FEED_AT, ">", feed.mark)
        )
        self._feeds.append(feed)

        def callback(docs: Any, changes: Any, read_time: Any) -> None:
            self._on_snapshot(feed, loop, docs, changes, read_time)

        # on_snapshot starts the client's threads and opens the stream: not on the loop.
        feed.watch = await asyncio.to_thread(query.on_snapshot, callback)
        log.info("firestore.listening", generation=feed.generation, mark=feed.mark.isoformat())
        return feed

    async def _first_snapshot(self, feed: _Feed) -> None:
        """Wait for a listener's first snapshot: it streams. StoreUnavailable if it does not."""
        try:
            async with asyncio.timeout(FIRST_SNAPSHOT_TIMEOUT_S):
                await asyncio.shield(feed.first)
        except TimeoutError as e:
            raise StoreUnavailable("the listener sent no first snapshot") from e

    async def _stop_feeds(self, feeds: list[_Feed]) -> None:
        for feed in list(feeds):
            self._feeds.remove(feed)
            if not feed.first.done():
                feed.first.set_exception(StoreUnavailable("the listener was stopped"))
                feed.first.exception()  # retrieved: nobody may be waiting for it
            if feed.watch is not None:
                # unsubscribe joins the client's threads, which can take a moment.
                await _blocking(feed.watch.unsubscribe, "unsubscribe")
            if feed.client is not None:
                # During an outage unsubscribing is not enough: the stream's thread goes on
                # re-opening a stream that fails at once, a whole core's worth, until it sees
                # a non-retryable error. A closed channel is one, so the thread exits.
                await _blocking(functools.partial(_close_channel, feed.client), "close channel")
            log.info("firestore.unlistened", generation=feed.generation, pushes=feed.pushes)

    def _on_snapshot(
        self, feed: _Feed, loop: asyncio.AbstractEventLoop, docs: Any, changes: Any, read_time: Any
    ) -> None:
        """The listener's callback, on the client's thread. Must never raise."""
        try:
            feed.size = len(docs)
            feed.read_time = read_time
            batch = [
                (change.type.name == "REMOVED", change.document.to_dict()) for change in changes
            ]
            loop.call_soon_threadsafe(self._deliver, feed, batch)
        except BaseException as e:  # raising here would kill the listener silently
            with contextlib.suppress(BaseException):
                loop.call_soon_threadsafe(self._feed_failed, feed, repr(e))

    def _feed_failed(self, feed: _Feed, error: str) -> None:
        if feed in self._feeds:
            feed.failed = error
            log.error("firestore.listener_failed", generation=feed.generation, error=error)

    def _deliver(self, feed: _Feed, batch: list[tuple[bool, dict[str, Any] | None]]) -> None:
        """On the loop: turn one pushed snapshot into Change records for every subscriber."""
        if feed not in self._feeds or self._closed:
            return
        feed.pushes += 1
        self.reads.listener += sum(1 for removed, _ in batch if not removed)
        changes: list[Change] = []
        for removed, doc in batch:
            change = self._change(removed, doc or {}, feed.started - MARK_MARGIN_MS)
            if change is not None:
                changes.append(change)
        if changes:
            self._subscribers.emit(changes)
        if not feed.first.done():
            feed.first.set_result(None)

    def _change(self, removed: bool, doc: dict[str, Any], since: int) -> Change | None:
        """The Change of one document; None for a malformed one or a version already seen.

        It carries the messages written since the version this process saw last (or, for a
        conversation it has not seen yet, those stamped after `since`).
        """
        try:
            conversation = rules.conversation_from_doc(doc)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("firestore.bad_document", error=repr(e))
            return None
        if removed:  # deleted (a change never leaves `feed_at > mark`)
            self._versions.pop(conversation.id, None)
            return Change(conversation, removed=True)
        seen = self._versions.get(conversation.id)
        if not self._first_delivery(conversation):
            return None  # delivered already: by this process's commit, or another listener
        key = (conversation.id, conversation.updated_at)
        local = key in self._local
        messages = _feed_messages(doc, since if seen is None else seen)
        change = Change(conversation, local=local, messages=messages)
        if local:
            del self._local[key]
            self._echoed[key] = change
            if len(self._echoed) > ECHOES_KEPT:
                self._echoed.popitem(last=False)
        return change

    def _first_delivery(self, conversation: Conversation) -> bool:
        """Record that this version reached the feed; False if it (or a newer one) had."""
        seen = self._versions.get(conversation.id)
        if seen is not None and seen >= conversation.updated_at:
            return False
        self._versions[conversation.id] = conversation.updated_at
        self._versions.move_to_end(conversation.id)
        if len(self._versions) > VERSIONS_KEPT:
            self._versions.popitem(last=False)
        return True

    def _committed(self, conversations: Iterable[Conversation]) -> None:
        """Put this process's committed writes on the feed at once (their echo comes later)."""
        changes = []
        for conversation in conversations:
            self._local.pop((conversation.id, conversation.updated_at), None)
            if self._first_delivery(conversation):  # unless its echo was quicker
                changes.append(Change(conversation, local=True))
        if changes and not self._closed:
            self._subscribers.emit(changes)

    def _unmark(self, marks: list[tuple[str, int]]) -> None:
        """A write failed here, though it may have landed: its echo is nobody's to publish.

        An echo still to come will count as another instance's change (published by the
        warmer); one that already came as local is delivered again, as not local.
        """
        again: list[Change] = []
        for key in marks:
            if key in self._local:  # its echo has not come yet
                del self._local[key]
                continue
            echoed = self._echoed.pop(key, None)
            if echoed is not None:
                again.append(dataclasses.replace(echoed, local=False))
        if again and not self._closed:
            self._subscribers.emit(again)

    def _remember_local(self, conversation: Conversation) -> None:
        """Remember a version this process writes, so its echo on the feed counts as local.

        `updated_at` grows strictly with every write of a conversation (rules.after_message,
        and each write reads the previous version in its transaction), so two instances
        never write the same (id, updated_at): the pair names this process's write exactly.
        """
        self._local[(conversation.id, conversation.updated_at)] = None
        marked = _MARKS.get()
        if marked is not None:
            marked.append(conversation)
        while len(self._local) > LOCAL_WRITES:
            self._local.popitem(last=False)

    # -- reads ------------------------------------------------------------------------

    def _filtered(self, status: str | None, assignee: str | Unset | None) -> Any:
        query = self._client.collection_group(CONVERSATIONS)
        if status is not None:
            query = query.where(filter=FieldFilter("status", "==", status))
        if not isinstance(assignee, Unset):
            # `== None` matches a null field (Firestore's IS NULL filter); unassigned
            # conversations store `"assignee": null`.
            query = query.where(filter=FieldFilter("assignee", "==", assignee))
        return query

    def _by_activity(self, status: str | None, assignee: str | Unset | None = UNSET) -> Any:
        query = self._filtered(status, assignee)
        return query.order_by("last_activity", direction=firestore.Query.DESCENDING).order_by("id")

    async def load_window(self, limit: int | None) -> list[Conversation]:
        """The newest `limit` conversations (all with None), read by keyset in chunks.

        Chunks bound each query (and the memory its response takes while being decoded). A
        conversation that moves while the chunks are read may come twice, or not at all:
        the listener, started before, delivers its change, and the snapshot keeps the
        newest version of each.
        """
        out: list[Conversation] = []
        after: tuple[int, str] | None = None
        while limit is None or len(out) < limit:
            size = LOAD_CHUNK if limit is None else min(LOAD_CHUNK, limit - len(out))
            snaps = await self._query_after(after, size, None)
            out.extend(_conversations(s.to_dict() for s in snaps))
            if len(snaps) < size:
                break
            last = snaps[-1]
            after = (last.get("last_activity"), last.get("id"))
        return out

    async def page_after(
        self,
        after: tuple[int, str] | None,
        limit: int,
        status: str | None,
        *,
        assignee: str | Unset | None = UNSET,
    ) -> list[Conversation]:
        """Conversations after a keyset, newest activity first (limit -1: no limit)."""
        if limit == 0:
            return []
        snaps = await self._query_after(after, limit, status, assignee)
        return _conversations(s.to_dict() for s in snaps)

    async def _query_after(
        self,
        after: tuple[int, str] | None,
        limit: int,
        status: str | None,
        assignee: str | Unset | None = UNSET,
    ) -> list[Any]:
        """The documents of a keyset page (limit -1: no limit)."""
        query = self._by_activity(status, assignee)
        if after is not None:
            query = query.start_after({"last_activity": after[0], "id": after[1]})
        if limit > 0:
            query = query.limit(limit)
        async with self._guard("page"):
            snaps: list[Any] = await query.get()
        self.reads.direct += max(1, len(snaps))
        return snaps

    async def count(self, status: str | None, *, assignee: str | Unset | None = UNSET) -> int:
        """How many conversations (with that status and assignee): one aggregation query."""
        query = self._filtered(status, assignee)
        async with self._guard("count"):
            result = await query.count(alias="n").get()
        n = int(result[0][0].value)
        self.reads.direct += 1 + n // 1000
        return n

    async def _conversation_snap(self, conversation_id: str, transaction: Any = None) -> Any:
        """The document of a conversation, found by its id across every user."""
        query = (
            self._client.collection_group(CONVERSATIONS)
            .where(filter=FieldFilter("id", "==", conversation_id))
            .limit(1)
        )
        snaps = await query.get(transaction=transaction)
        self.reads.direct += max(1, len(snaps))
        if not snaps:
            raise NotFound(f"no conversation {conversation_id!r}")
        self._remember_path(conversation_id, snaps[0].reference.path)
        return snaps[0]

    async def _conversation_doc(self, conversation_id: str, transaction: Any = None) -> Any:
        """A conversation's document: one read where its path is known, else a query."""
        path = self._paths.get(conversation_id)
        if path is not None:
            snap = await self._client.document(path).get(transaction=transaction)
            self.reads.direct += 1
            if snap.exists:
                return snap
        return await self._conversation_snap(conversation_id, transaction)

    async def get_conversation(self, conversation_id: str) -> Conversation:
        """One conversation summary."""
        async with self._guard("get conversation"):
            snap = await self._conversation_doc(conversation_id)
        return rules.conversation_from_doc(snap.to_dict())

    async def list_messages(
        self, conversation_id: str, limit: int, before: tuple[int, str] | None
    ) -> tuple[list[Message], bool]:
        """A page of messages older than `before`, oldest first."""
        async with self._guard("list messages"):
            snap = await self._conversation_doc(conversation_id)
            query = (
                snap.reference.collection(MESSAGES)
                .order_by("at", direction=firestore.Query.DESCENDING)
                .order_by("id", direction=firestore.Query.DESCENDING)
            )
            if before is not None:
                query = query.start_after({"at": before[0], "id": before[1]})
            docs = await query.limit(limit + 1).get()
        self.reads.direct += max(1, len(docs))
        messages = [rules.message_from_doc(d.to_dict()) for d in docs[:limit]]
        messages.reverse()
        return messages, len(docs) > limit

    # -- writes -----------------------------------------------------------------------

    def _conversation_ref(self, user_id: str, conversation_id: str) -> Any:
        return (
            self._client.collection(USERS)
            .document(user_id)
            .collection(CONVERSATIONS)
            .document(conversation_id)
        )

    async def _latest_conversation(self, user_ref: Any, user: Any, tx: Any) -> dict[str, Any]:
        """The document of the customer's most recent conversation ({} when none)."""
        if not user.exists:
            return {}  # the user document is written with a customer's first conversation
        latest_id = user.get("latest_conversation_id")
        if latest_id:
            snap = await user_ref.collection(CONVERSATIONS).document(latest_id).get(transaction=tx)
            self.reads.direct += 1
            if snap.exists:
                return snap.to_dict() or {}
        # Users written without the pointer (older data, hand edits): ask the collection.
        # (A query in a transaction is avoided otherwise: the emulator locks coarsely for
        # it, and concurrent first messages then wait on each other.)
        snaps = await (
            user_ref.collection(CONVERSATIONS)
            .order_by("created_at", direction=firestore.Query.DESCENDING)
            .order_by("id", direction=firestore.Query.DESCENDING)
            .limit(1)
            .get(transaction=tx)
        )
        self.reads.direct += max(1, len(snaps))
        return (snaps[0].to_dict() or {}) if snaps else {}

    async def save_inbound(self, inbound: InboundMessage) -> Saved | None:
        """Store a customer's message and its summary in one transaction; None when a repeat."""
        db = self._client
        message_id = message_id_for_wamid(inbound.wa_message_id)
        wamid_ref = db.collection(WAMIDS).document(message_id)
        user_ref = db.collection(USERS).document(inbound.user_id)

        async def write(tx: Any) -> Saved | None:
            self.reads.direct += 1
            user = await user_ref.get(transaction=tx)
            previous = await self._latest_conversation(user_ref, user, tx)
            latest = rules.conversation_from_doc(previous) if previous else None
            now = now_ms()
            created = rules.needs_new_conversation(latest)
            if created or latest is None:
                latest = rules.open_conversation(inbound, now)
                previous = {}
            else:
                latest = latest.with_changes(user_name=inbound.user_name, phone=inbound.phone)
            message = rules.inbound_message(inbound, latest.id)
            conversation = rules.after_message(latest, message, now)
            conversation_ref = user_ref.collection(CONVERSATIONS).document(conversation.id)
            message_ref = conversation_ref.collection(MESSAGES).document(message.id)
            self._remember_path(conversation.id, conversation_ref.path)
            profile: dict[str, Any] = {
                "name": inbound.user_name,
                "phone": inbound.phone,
                "channel": inbound.channel,
                "latest_conversation_id": conversation.id,
            }
            if not user.exists:
                profile["created_at"] = now
            self._remember_local(conversation)
            tx.set(user_ref, profile, merge=True)
            tx.set(conversation_ref, _document(conversation, previous, message, created))
            # create(): a redelivery racing this one fails the commit, never writes twice.
            tx.create(message_ref, rules.message_to_doc(message))
            tx.create(wamid_ref, {"path": message_ref.path})
            return Saved(conversation, message, new_conversation=created)

        # A redelivery is caught by this plain read, outside the transaction: reading a
        # missing document inside one locks it, and the emulator then makes concurrent
        # deliveries of different messages wait on each other until its lock timeout.
        # The create() of the same document in the transaction is the guarantee.
        async with self._guard("check redelivery"):
            seen = (await wamid_ref.get()).exists
        self.reads.direct += 1
        if seen:
            return None
        try:
            async with self._lock(inbound.user_id):
                return await self._transact("save inbound", write)
        except StoreError as e:
            if isinstance(e.__cause__, gexc.AlreadyExists):
                return None
            raise

    async def save_outbound(
        self,
        conversation_id: str,
        *,
        sender: str,
        text: str,
        agent_id: str | None = None,
        take_over: bool = False,
    ) -> Saved:
        """Store an AI or agent reply as queued, with its summary, in one transaction."""

        path = await self._conversation_path(conversation_id)

        async def write(tx: Any) -> Saved:
            snap = await self._conversation_doc(conversation_id, tx)
            previous = snap.to_dict() or {}
            conversation = rules.conversation_from_doc(previous)
            rules.check_reply(conversation, sender)
            now = rules.reply_time(conversation, now_ms())
            message = rules.outbound_message(conversation_id, sender, text, agent_id, now)
            conversation = rules.after_message(conversation, message, now)
            if take_over:
                conversation = conversation.with_changes(ai_enabled=False)
            self._remember_local(conversation)
            tx.set(snap.reference, _document(conversation, previous, message))
            tx.create(
                snap.reference.collection(MESSAGES).document(message.id),
                rules.message_to_doc(message),
            )
            return Saved(conversation, message)

        async with self._lock(_user_of(path)):
            return await self._transact("save outbound", write)

    async def _deliver_status(
        self,
        tx: Any,
        message_snap: Any,
        status: str,
        wa_message_id: str | None,
        error: MessageError | None,
    ) -> StatusChange | None:
        """Move a message's delivery status forward, and its conversation's tick with it."""
        if not message_snap.exists:
            return None
        message = rules.message_from_doc(message_snap.to_dict())
        updated = rules.with_delivery(message, status, wa_message_id, error)
        if updated is None:
            return None
        conversation_ref = message_snap.reference.parent.parent
        conversation_snap = await conversation_ref.get(transaction=tx)
        self.reads.direct += 1
        if not conversation_snap.exists:
            return None
        previous = conversation_snap.to_dict() or {}
        conversation = rules.conversation_from_doc(previous)
        after = rules.after_status(conversation, updated, now_ms())
        tx.set(message_snap.reference, rules.message_to_doc(updated))
        if updated.wa_message_id and updated.wa_message_id != message.wa_message_id:
            wamid_ref = self._client.collection(WAMIDS).document(
                message_id_for_wamid(updated.wa_message_id)
            )
            tx.set(wamid_ref, {"path": message_snap.reference.path})
        if after is not conversation:
            self._remember_local(after)
            # Its latest message changed: the document carries it, error included, so
            # other instances can show the new ticks in an open conversation too.
            tx.set(conversation_ref, _document(after, previous, updated))
        return StatusChange(after, updated)

    async def set_delivery(
        self,
        message_id: str,
        *,
        status: str,
        wa_message_id: str | None = None,
        error: MessageError | None = None,
    ) -> StatusChange | None:
        """Record the outcome of sending an outbound message (never moves it backwards)."""
        query = (
            self._client.collection_group(MESSAGES)
            .where(filter=FieldFilter("id", "==", message_id))
            .limit(1)
        )
        async with self._guard("find message"):
            found = await query.get()
        self.reads.direct += max(1, len(found))
        if not found:
            return None
        return await self._set_status(found[0].reference.path, status, wa_message_id, error)

    async def _set_status(
        self,
        message_path: str,
        status: str,
        wa_message_id: str | None,
        error: MessageError | None,
    ) -> StatusChange | None:
        message_ref = self._client.document(message_path)

        async def write(tx: Any) -> StatusChange | None:
            snap = await message_ref.get(transaction=tx)
            self.reads.direct += 1
            return await self._deliver_status(tx, snap, status, wa_message_id, error)

        async with self._lock(_user_of(message_path)):
            return await self._transact("set status", write)

    async def apply_status(
        self, wa_message_id: str, status: str, error: MessageError | None
    ) -> StatusChange | None:
        """Apply a WhatsApp status to the message it names (found through `wamids`)."""
        pointer_ref = self._client.collection(WAMIDS).document(message_id_for_wamid(wa_message_id))
        async with self._guard("find message"):
            pointer = await pointer_ref.get()
        self.reads.direct += 1
        path = pointer.get("path") if pointer.exists else None
        if not path:
            raise UnknownMessage(f"no message with WhatsApp id {wa_message_id!r}")
        return await self._set_status(path, status, None, error)

    async def update_conversation(
        self,
        conversation_id: str,
        *,
        status: str | None = None,
        ai_enabled: bool | None = None,
        assignee: str | Unset | None = UNSET,
        mark_read: bool = False,
    ) -> Conversation:
        """Change status, AI switch, assignee or unread count."""

        path = await self._conversation_path(conversation_id)

        async def write(tx: Any) -> Conversation:
            snap = await self._conversation_doc(conversation_id, tx)
            previous = snap.to_dict() or {}
            conversation = rules.conversation_from_doc(previous)
            updated = rules.updated(
                conversation,
                status=status,
                ai_enabled=ai_enabled,
                assignee=assignee,
                mark_read=mark_read,
                now=now_ms(),
            )
            self._remember_local(updated)
            # The messages carried so far stay: a mark-read right after a message must
            # not take it away from instances whose listener merges the two writes.
            tx.set(snap.reference, _document(updated, previous))
            return updated

        async with self._lock(_user_of(path)):
            return await self._transact("update conversation", write)

    async def import_conversations(
        self, conversations: Sequence[Conversation], messages: Sequence[Message]
    ) -> None:
        """Bulk-load conversations and messages in batches of 500 writes (not atomic)."""
        db = self._client
        latest: dict[str, Conversation] = {}
        for c in conversations:
            held = latest.get(c.user_id)
            if held is None or (c.created_at, c.id) > (held.created_at, held.id):
                latest[c.user_id] = c
        owner = {c.id: c.user_id for c in conversations}
        writes: list[tuple[Any, dict[str, Any], bool]] = []
        for user_id, c in latest.items():
            profile = {
                "name": c.user_name,
                "phone": c.phone,
                "channel": c.channel,
                "created_at": c.created_at,
                "latest_conversation_id": c.id,
            }
            writes.append((db.collection(USERS).document(user_id), profile, True))
        now = now_ms()
        # Written now: their version is newer than any an instance may hold from before.
        stamped = [c.with_changes(updated_at=max(c.updated_at, now)) for c in conversations]
        for c in stamped:
            self._remember_local(c)
            writes.append((self._conversation_ref(c.user_id, c.id), _document(c, {}), False))
        for m in messages:
            ref = self._conversation_ref(owner[m.conversation_id], m.conversation_id)
            message_ref = ref.collection(MESSAGES).document(m.id)
            writes.append((message_ref, rules.message_to_doc(m), False))
            if m.wa_message_id:
                pointer = db.collection(WAMIDS).document(message_id_for_wamid(m.wa_message_id))
                writes.append((pointer, {"path": message_ref.path}, False))
        gate = asyncio.Semaphore(BATCH_CONCURRENCY)

        async def commit(chunk: list[tuple[Any, dict[str, Any], bool]]) -> None:
            async with gate:
                batch = db.batch()
                for ref, doc, merge in chunk:
                    batch.set(ref, doc, merge=merge)
                async with self._guard("import"):
                    await batch.commit()

        started = time.perf_counter()
        await asyncio.gather(
            *(commit(writes[i : i + BATCH_WRITES]) for i in range(0, len(writes), BATCH_WRITES))
        )
        self._committed(stamped)
        log.info(
            "firestore.imported",
            conversations=len(conversations),
            messages=len(messages),
            writes=len(writes),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )


async def _blocking(fn: Callable[[], object], what: str) -> None:
    """Run a blocking call of the client library off the loop, waiting a bounded time.

    Stopping a listener joins the library's threads and closes its channel; seen here to
    hang now and then when the stream was mid-reconnect. A daemon thread (not the loop's
    executor, which is joined at exit) runs it, so such a hang can stall neither the
    supervisor nor the process's exit; it is logged.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            fn()
        except Exception as e:  # the stream is being discarded: its errors are moot
            log.debug("firestore.stop_error", call=what, error=repr(e))
        finally:
            with contextlib.suppress(RuntimeError):  # the loop may have closed meanwhile
                loop.call_soon_threadsafe(finished)

    threading.Thread(target=run, name=f"firestore-{what}", daemon=True).start()
    try:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await done
    except TimeoutError:
        log.warning("firestore.stop_stuck", call=what, waited_s=STOP_TIMEOUT_S)


async def _close_async_channel(client: Any) -> None:
    """Close an AsyncClient's gRPC channel (the client library offers no close of its own)."""
    with contextlib.suppress(Exception):  # a channel already broken may fail to close
        await client._firestore_api.transport.close()


def _close_channel(client: Any) -> None:
    """Close a client's gRPC channel (the client library offers no close of its own)."""
    with contextlib.suppress(Exception):  # a channel already broken may fail to close
        client._firestore_api.transport.close()


def _user_of(path: str) -> str:
    """The user id in a document path under users/{user_id}/..."""
    return path.split("/", 2)[1]


def _document(
    conversation: Conversation,
    previous: dict[str, Any],
    message: Message | None = None,
    new_conversation: bool = False,
) -> dict[str, Any]:
    """A conversation's document, carrying its latest messages whole for other instances.

    `feed_messages` keeps the last FEED_MESSAGES_KEPT messages written (or given a new
    delivery status), each with the conversation version that wrote it: a listener that
    merges several quick writes into one change still hands over every one of them.
    """
    doc = rules.conversation_to_doc(conversation)
    carried = previous.get("feed_messages")
    entries = [e for e in carried if isinstance(e, dict)] if isinstance(carried, list) else []
    if message is not None:
        entries.append(
            {
                "message": rules.message_to_doc(message),
                "new_conversation": new_conversation,
                "version": conversation.updated_at,
            }
        )
    doc["feed_messages"] = entries[-FEED_MESSAGES_KEPT:]
    doc[FEED_AT] = firestore.SERVER_TIMESTAMP
    return doc


def _feed_messages(doc: dict[str, Any], after: int) -> tuple[FeedMessage, ...]:
    """The messages a conversation's document carries from versions newer than `after`."""
    carried = doc.get("feed_messages")
    if not isinstance(carried, list):
        return ()
    out: list[FeedMessage] = []
    for entry in carried:
        try:
            if int(entry["version"]) <= after:
                continue
            message = rules.message_from_doc(entry["message"])
        except (KeyError, TypeError, ValueError):
            continue  # one malformed entry must not hide the others
        out.append(FeedMessage(message, bool(entry.get("new_conversation"))))
    return tuple(out)


def _conversations(docs: Any) -> list[Conversation]:
    """Conversation summaries from documents, skipping any that are not one of ours."""
    out: list[Conversation] = []
    for doc in docs:
        try:
            out.append(rules.conversation_from_doc(doc))
        except (KeyError, TypeError, ValueError):
            continue  # a malformed document must not take the whole list down
    return out
