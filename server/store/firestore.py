"""The production store: Cloud Firestore (or its emulator).

Data model (docs/ARCHITECTURE.md and docs/PRODUCTION.md describe how it is used):

- `users/{user_id}`: name, phone, channel, created_at, and `latest_conversation_id`, so the
  one-open-conversation rule is a read of the user document inside the save transaction.
  Reading it also serialises two concurrent first messages of one customer: both
  transactions read and write the same document, so one retries and sees the other's
  conversation instead of opening a second one.
- `users/{user_id}/conversations/{conversation_id}`: the summary, in the flat form of
  server/store/rules.py (times as integer ms), with its own id in the `id` field: a
  collection-group query finds it by id and orders ties by it like the snapshot does.
- `users/{user_id}/conversations/{conversation_id}/messages/{message_id}`.
- `identities/{identity}`: `{"user_id"}` for every way a customer was addressed
  (`phone:<digits>`, `bsuid:<business-scoped user id>`): a customer known by their
  number who later writes with a username (or the other way round) stays one customer.
  A user document lists its identities, so the usual message (a number that is a user
  id) costs no extra read.
- `outbox/{task_id}`: the work a commit owes (server/store/rules.py, "the outbox"),
  written in the same transaction; leased to one instance at a time through transactions.
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
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

import structlog
from google.api_core import exceptions as gexc
from google.cloud import firestore
from google.cloud.firestore_v1 import FieldFilter

from server import search
from server.config import Settings
from server.models import (
    CONVERSATION_STATUSES,
    Conversation,
    Media,
    Message,
    MessageError,
    now_ms,
)
from server.search import Query
from server.store import rules
from server.store.base import (
    UNSET,
    Change,
    ChangeFeed,
    ChangeListener,
    Draft,
    FeedMessage,
    InboundMessage,
    Leases,
    ListEntry,
    MessageHit,
    NotFound,
    Saved,
    SearchUnavailable,
    SnapshotEntry,
    StatusChange,
    StoreError,
    StoreUnavailable,
    Task,
    TaskKind,
    UnknownMessage,
    Unset,
    Unstorable,
    message_id_for_wamid,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

USERS: Final = "users"
# The field every conversation write sets to Firestore's commit time; the listener's.
FEED_AT: Final = "feed_at"
# Counts the message writes a conversation's document carried: an instance whose listener
# merged more of them than the document keeps sees the gap and has the open panes reload.
FEED_SEQ: Final = "feed_seq"
CONVERSATIONS: Final = "conversations"
# A conversation's customer as `array-contains` finds them: name prefixes and number runs
# (server/search.py customer_tokens). Firestore has no full-text search; this finds a
# customer by name or number at any depth with one indexed query.
SEARCH_TOKENS: Final = "search_tokens"
# A customer search reads the token's matches in batches of this many and keeps those the
# whole query matches (the token is one word of it).
SEARCH_BATCH: Final = 100
MESSAGES: Final = "messages"
WAMIDS: Final = "wamids"
IDENTITIES: Final = "identities"
OUTBOX: Final = "outbox"
# A document that never exists: reading it is the cheapest round trip (one read).
HEALTH_DOC: Final = "_livechat/health"

# Every store call gives up after this long: a webhook must answer Meta long before Meta's
# own 20 s timeout, and a page past the window must not hang while Firestore is down.
OP_TIMEOUT_S: Final = 10.0
# Each RPC of a transaction (begin, commit) is bounded on its own too, with no hidden
# retries, and a rollback (only a courtesy: Firestore drops an abandoned transaction's
# locks when it expires) gets one short try.
CALL_TIMEOUT_S: Final = 5.0
ROLLBACK_TIMEOUT_S: Final = 1.0
# A health read answers in milliseconds when Firestore is up (an unreachable one fails at
# once). The first read of a freshly started emulator takes about 2 s: allow for it.
PING_TIMEOUT_S: Final = 5.0
# A listener's first snapshot: the changes of the last MARK_MARGIN_MS, normally in well
# under a second; a freshly started emulator takes a few seconds to answer at all.
FIRST_SNAPSHOT_TIMEOUT_S: Final = 30.0
# How far before its start a listener's mark is set. `feed_at` is a server timestamp, and
# Firestore stamps it with the time it *processed the request*, not the commit time
# ("REQUEST_TIME: the time at which the server processed the request", Firestore API
# reference, Value.timestamp_value / ServerValue): a commit that is slow to land can carry
# a time before the last read time of a listener that never saw it. A new listener (first
# start, hand-over, or replacing a dead one) therefore starts this long before the
# previous one's last read time (the first one: before Firestore's own time, read from the
# server), longer than any commit can take (our commits are bounded at CALL_TIMEOUT_S; the
# longest commit deadline Firestore allows a transaction is 60 s of idle time). What it
# delivers twice is dropped by version.
MARK_MARGIN_MS: Final = 60_000
# Each instance writes a heartbeat this often into the listened collection group; a
# listener that has not delivered this instance's own beat for STALL_AFTER_S is silent
# while it says it is active (the client library can do that, googleapis/python-firestore
# #18 and #399) and is replaced: a silent stall is found within STALL_AFTER_S + a beat.
HEARTBEAT_S: Final = 10.0
STALL_AFTER_S: Final = 30.0
HEARTBEATS: Final = "heartbeats"
# Anti-entropy: the most recently committed conversations re-read and compared with
# what was delivered, in case any path missed one.
REPAIR_READS: Final = 200
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
# Characters of a message's text a document carries (WhatsApp's own limit for a text it
# sends): five of them stay far under a document's 1 MiB.
FEED_TEXT_CHARS: Final = 4096
# Versions remembered to drop a change delivered twice (by two listeners in a hand-over).
VERSIONS_KEPT: Final = 100_000
# Stopping a listener normally takes well under a second (the library waits up to 1 s for
# its thread); past this it is stuck and left behind on its daemon thread.
STOP_TIMEOUT_S: Final = 5.0
# How long a count of conversations is reused (see count()).
COUNT_TTL_S: Final = 30.0
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

# Worth another try later: the webhook answers 503 and Meta redelivers. Aborted is
# contention that outlasted the transaction's own retries.
_UNAVAILABLE: Final = (
    gexc.Aborted,
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
    exclusive = False  # several instances share it: leases decide who works

    def __init__(
        self, settings: Settings, leases: Leases | None = None, *, ai_replies: bool = True
    ) -> None:
        self.leases = leases or Leases()
        self.ai_replies = ai_replies
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
        # This instance's heartbeats: the oldest beat not yet seen (number, when), and the
        # newest its listener delivered.
        self._beat_sent: tuple[int, float] | None = None
        self._beat_seen = 0
        # Conversations whose deletion reached the feed (marked, then removed: told once).
        self._deleted: OrderedDict[str, None] = OrderedDict()
        # The last read time of a stopped listener: a new one catches up from there.
        self._resume_from: datetime | None = None
        self._beats = 0
        self._beat_at = float("-inf")
        # Conversations the anti-entropy pass delivered (something else had missed them).
        self.repairs = 0
        # The feed_seq of each conversation's document as last seen (to see gaps).
        self._seqs: OrderedDict[str, int] = OrderedDict()
        self._paths: OrderedDict[str, str] = OrderedDict()
        self._locks = [asyncio.Lock() for _ in range(LOCK_STRIPES)]
        self._closed = False
        self.reads = Reads()
        self._counts: dict[str | None, tuple[float, int]] = {}
        # Documents written by transactions, by kind (conversation, message, user, ...).
        self.writes: Counter[str] = Counter()
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
        # Creating a client may look up credentials (files, the metadata server).
        self._db = await asyncio.to_thread(firestore.AsyncClient, project=self.project)

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
        fresh = await asyncio.to_thread(firestore.AsyncClient, project=self.project)
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
        except gexc.InvalidArgument as e:  # a document over 1 MiB, a value out of range
            raise Unstorable(f"firestore refused {what}: {type(e).__name__}") from e
        except gexc.GoogleAPICallError as e:
            raise StoreError(f"firestore refused {what}: {type(e).__name__}") from e

    async def _transact(
        self,
        what: str,
        fn: Callable[[Any, _Stamps], Awaitable[T]],
        changes: Callable[[T], Sequence[Change]] = lambda _: (),
    ) -> T:
        """Run `fn(transaction, stamps)` in a transaction; again when contention aborts it.

        Once it commits, what it wrote is on the change feed before this returns, as with
        SQLite: a list read right after a write sees it, and the dashboards are told. The
        listener's echo (about 150 ms later) is then dropped as a version already
        delivered. A commit that failed here but landed after all is delivered by its echo,
        like another instance's write: one way or the other, every version once.
        """
        stamps = _Stamps()

        async def attempt(tx: Any) -> T:
            stamps.clear()  # a function run again after an abort: its last run commits
            return await fn(tx, stamps)

        result = await self._transact_once(what, attempt)
        self._emit_local(changes(result), stamps)
        return result

    async def _transact_once(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """One transaction with every RPC bounded: begin, the reads in `fn`, commit and
        rollback each get CALL_TIMEOUT_S and no hidden retries, and the whole is bounded by
        OP_TIMEOUT_S. (The client library's transaction runner takes no retry or timeout:
        its rollback retries for up to a minute, on the caller's time, even after the
        caller gave up.) Contention (Aborted) is tried again, TRANSACTION_ATTEMPTS times,
        keeping the first attempt's place in line as the library does."""
        api = self._client._firestore_api
        database = self._client._database_string
        metadata = self._client._rpc_metadata
        retry_id: bytes | None = None
        async with self._guard(what):
            for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
                tx = self._client.transaction()
                options = tx._options_protobuf(retry_id)
                begun = await api.begin_transaction(
                    request={"database": database, "options": options},
                    metadata=metadata,
                    retry=None,
                    timeout=CALL_TIMEOUT_S,
                )
                tx._id = begun.transaction
                retry_id = retry_id or tx._id
                try:
                    result = await fn(tx)
                    await api.commit(
                        request={
                            "database": database,
                            "writes": tx._write_pbs,
                            "transaction": tx._id,
                        },
                        metadata=metadata,
                        retry=None,
                        timeout=CALL_TIMEOUT_S,
                    )
                except gexc.Aborted:
                    await self._rollback(tx)
                    if attempt == TRANSACTION_ATTEMPTS:
                        raise
                    await asyncio.sleep(random.uniform(0.01, 0.05) * attempt)
                    continue
                except BaseException:
                    await asyncio.shield(self._rollback(tx))
                    raise
                self._count_writes(tx._write_pbs)
                tx._clean_up()
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _count_writes(self, write_pbs: Sequence[Any]) -> None:
        """Count committed document writes by kind, as Firestore bills them."""
        for pb in write_pbs:
            if pb.update.name:
                self.writes[_kind_of(pb.update.name)] += 1
            else:  # deletes are billed apart, at a ninth of a write
                self.writes[_kind_of(pb.delete) + " (delete)"] += 1

    async def _rollback(self, tx: Any) -> None:
        """Let Firestore release the transaction's locks at once (they expire anyway):
        one try, bounded; it must never hold up the caller."""
        try:
            await self._client._firestore_api.rollback(
                request={"database": self._client._database_string, "transaction": tx._id},
                metadata=self._client._rpc_metadata,
                retry=None,
                timeout=ROLLBACK_TIMEOUT_S,
            )
        except Exception as e:
            log.info("firestore.rollback_failed", error=type(e).__name__)
        finally:
            tx._clean_up()

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
            mark = await self._server_time() - timedelta(milliseconds=MARK_MARGIN_MS)
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
            last = (old[-1].read_time or old[-1].mark) if old else self._resume_from
            if self._closed or last is None:
                return
            # Every commit up to the newest listener's last read time has been delivered,
            # except one still landing with an earlier request time: hence the margin.
            healthy = old[-1].client if old and old[-1].alive else None
            feed = await self._start_feed(last - timedelta(milliseconds=MARK_MARGIN_MS), healthy)
            try:
                await self._first_snapshot(feed)
            except StoreUnavailable:
                await self._stop_feeds([feed])
                raise
            await self._stop_feeds(old)
            log.info("firestore.advanced", generation=feed.generation, mark=feed.mark.isoformat())

    async def catch_up(self) -> None:
        """Replace a listener that died or went silent by one that starts from its last
        read time (less the margin): nothing is reloaded and nothing is missed."""
        await self.advance()
        self._beat_sent = None  # the new listener is judged on beats from now on
        log.info("firestore.listener_replaced", generation=self._generation)

    async def _server_time(self) -> datetime:
        """Firestore's clock: the read time of a one-document read."""
        async with self._guard("read the server's time"):
            snap = await self._client.document(HEALTH_DOC).get(retry=None, timeout=PING_TIMEOUT_S)
        self.reads.health += 1
        read_time: datetime | None = snap.read_time
        return read_time if read_time is not None else datetime.now(UTC)

    @property
    def stalled(self) -> bool:
        """True when the listener has not delivered this instance's heartbeat for
        STALL_AFTER_S: it says it streams but delivers nothing."""
        sent = self._beat_sent
        return (
            sent is not None
            and self._beat_seen < sent[0]
            and time.monotonic() - sent[1] > STALL_AFTER_S
        )

    async def heartbeat(self) -> None:
        """Write this instance's heartbeat (every HEARTBEAT_S) where its own listener must
        see it."""
        if time.monotonic() - self._beat_at < HEARTBEAT_S:
            return
        self._beat_at = time.monotonic()
        self._beats += 1
        beat = self._beats
        ref = (
            self._client.collection(HEARTBEATS)
            .document(self.leases.owner)
            .collection(CONVERSATIONS)
            .document("heartbeat")
        )
        async with self._guard("heartbeat"):
            await ref.set(
                {"heartbeat": self.leases.owner, "beat": beat, FEED_AT: firestore.SERVER_TIMESTAMP},
                retry=None,
                timeout=PING_TIMEOUT_S,
            )
        if self._beat_sent is None or self._beat_seen >= self._beat_sent[0]:
            # The clock of a stall starts at the oldest beat not yet seen.
            self._beat_sent = (beat, time.monotonic())

    async def repair(self) -> int:
        """Anti-entropy: re-read the most recently committed conversations and deliver
        any version this process never delivered (a path missed it). How many."""
        query = (
            self._client.collection_group(CONVERSATIONS)
            .order_by(FEED_AT, direction=firestore.Query.DESCENDING)
            .limit(REPAIR_READS)
        )
        async with self._guard("repair"):
            docs = [d.to_dict() or {} for d in await query.get()]
        self.reads.direct += max(1, len(docs))
        repaired: list[Change] = []
        for doc in docs:
            if doc.get("heartbeat"):
                continue
            try:
                conversation = rules.conversation_from_doc(doc)
            except (KeyError, TypeError, ValueError):
                continue
            seen = self._versions.get(conversation.id)
            if seen is not None and seen >= conversation.updated_at:
                continue
            if seen is None and now_ms() - conversation.updated_at < MARK_MARGIN_MS:
                continue  # too recent to tell: the listener may still be bringing it
            if self._first_delivery(conversation):
                seq = doc.get(FEED_SEQ)
                if isinstance(seq, int):
                    self._note_seq(conversation.id, seq)
                repaired.append(Change(conversation, missed=seen is not None))
        if repaired and not self._closed:
            self.repairs += len(repaired)
            self._subscribers.emit(repaired)
        return len(repaired)

    async def unlisten(self) -> None:
        """Stop the listener (during an outage its client would spin reconnecting)."""
        async with self._feed_lock:
            await self._stop_feeds(self._feeds)

    async def _start_feed(self, mark: datetime, client: Any = None) -> _Feed:
        loop = asyncio.get_running_loop()
        self._generation += 1
        feed = _Feed(self._generation, loop, mark=mark)
        # A hand-over of a healthy listener shares its client (and channel). Otherwise a
        # new sync client: a fresh channel, not one in gRPC's reconnect backoff from before
        # a failure. The emulator address is in the environment. Creating it may look up
        # credentials (files, the metadata server): not on the loop.
        feed.client = client or await asyncio.to_thread(firestore.Client, project=self.project)
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
            # Where a later listener can pick up without a reload (catch_up).
            last = feed.read_time or feed.mark
            if self._resume_from is None or last > self._resume_from:
                self._resume_from = last
            if not feed.first.done():
                feed.first.set_exception(StoreUnavailable("the listener was stopped"))
                feed.first.exception()  # retrieved: nobody may be waiting for it
            if feed.watch is not None:
                # unsubscribe joins the client's threads, which can take a moment.
                await _blocking(feed.watch.unsubscribe, "unsubscribe")
            shared = any(other.client is feed.client for other in self._feeds)
            if feed.client is not None and not shared:
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
            if doc and doc.get("heartbeat"):
                if doc["heartbeat"] == self.leases.owner and isinstance(doc.get("beat"), int):
                    self._beat_seen = max(self._beat_seen, doc["beat"])
                continue
            change = self._change(removed, doc or {}, feed.started - MARK_MARGIN_MS)
            if change is not None:
                changes.append(change)
        if changes:
            self._subscribers.emit(changes)
        if not feed.first.done():
            feed.first.set_result(None)

    def _change(self, removed: bool, doc: dict[str, Any], since: int) -> Change | None:
        """The Change of one document; None for a malformed one or one already delivered.

        It carries the messages written after the last this process delivered (by the
        document's message count; for a conversation it has not seen yet, those stamped
        after `since`).
        """
        try:
            conversation = rules.conversation_from_doc(doc)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("firestore.bad_document", error=repr(e))
            return None
        if removed or doc.get("deleted"):
            # Marked deleted (a deletion goes through the feed first, so every instance
            # hears of it however old the conversation), or gone: once either way.
            if conversation.id in self._deleted:
                return None
            self._deleted[conversation.id] = None
            if len(self._deleted) > VERSIONS_KEPT:
                self._deleted.popitem(last=False)
            self._versions.pop(conversation.id, None)
            self._seqs.pop(conversation.id, None)
            return Change(conversation, removed=True)
        last_seq = self._seqs.get(conversation.id)
        seen = self._versions.get(conversation.id)
        missed = _missed(doc, last_seq)
        messages = _feed_messages(doc, last_seq, since if seen is None else seen)
        seq = doc.get(FEED_SEQ)
        if isinstance(seq, int):
            self._note_seq(conversation.id, seq)
        if not self._first_delivery(conversation) and not messages:
            return None  # delivered already: by this process's commit, or another listener
        return Change(conversation, messages=messages, missed=missed)

    def _note_seq(self, conversation_id: str, seq: int) -> None:
        """Remember the newest message count of a conversation this process delivered."""
        last = self._seqs.get(conversation_id)
        if last is None or seq > last:
            self._seqs[conversation_id] = seq
            self._seqs.move_to_end(conversation_id)
            if len(self._seqs) > VERSIONS_KEPT:
                self._seqs.popitem(last=False)

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

    def _emit_local(self, changes: Sequence[Change], stamps: _Stamps | None) -> None:
        """Put this process's committed writes on the feed at once (their echo comes later
        and is dropped), unless the echo was quicker.

        A write read its conversation in its transaction: when that version carried
        messages this process never delivered (another instance wrote them and the
        listener has not brought them yet), they would now never come, so open panes are
        told to reload (`missed`).
        """
        out: list[Change] = []
        for change in changes:
            conversation = change.conversation
            if change.removed:
                if conversation.id not in self._deleted:
                    self._deleted[conversation.id] = None
                    out.append(change)
                continue
            stamp = stamps.get(conversation.id) if stamps is not None else None
            missed = False
            if stamp is not None:
                read, written = stamp
                last = self._seqs.get(conversation.id)
                missed = last is not None and read > last
                self._note_seq(conversation.id, written)
            if self._first_delivery(conversation):
                out.append(dataclasses.replace(change, missed=True) if missed else change)
        if out and not self._closed:
            self._subscribers.emit(out)

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
        self, after: tuple[int, str] | None, limit: int, status: str | None
    ) -> list[Conversation]:
        """Conversations after a keyset, newest activity first (limit -1: no limit)."""
        if limit == 0:
            return []
        snaps = await self._query_after(after, limit, status)
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

    async def count(self, status: str | None) -> int:
        """How many conversations (with that status) there are: an aggregation query
        (billed one read per 1,000 entries), so its answer is kept for COUNT_TTL_S: pages
        past the window show a total a few seconds old instead of paying it every page."""
        cached = self._counts.get(status)
        if cached is not None and time.monotonic() - cached[0] < COUNT_TTL_S:
            return cached[1]
        n = await self._count(status)
        self._counts[status] = (time.monotonic(), n)
        return n

    async def _count(self, status: str | None) -> int:
        query = self._client.collection_group(CONVERSATIONS)
        if status is not None:
            query = query.where(filter=FieldFilter("status", "==", status))
        else:  # not the heartbeats that share the collection group's name
            query = query.where(filter=FieldFilter("status", "in", list(CONVERSATION_STATUSES)))
        async with self._guard("count"):
            result = await query.count(alias="n").get()
        n = int(result[0][0].value)
        self.reads.direct += 1 + n // 1000
        return n

    async def list_entries(
        self,
        after: tuple[int, str] | None,
        limit: int,
        status: str | None,
        number: str | None = None,
        *,
        assignee: str | Unset | None = UNSET,
    ) -> list[ListEntry]:
        """A keyset page past the window, as the list serves it (optionally only those
        written to one business number, or assigned to one agent: equalities on
        `phone_number_id` and `assignee` in list order)."""
        if number is None and isinstance(assignee, Unset):
            return [ListEntry.of(c) for c in await self.page_after(after, limit, status)]
        if limit == 0:
            return []
        query = self._by_activity(status, assignee)
        if number is not None:
            query = query.where(filter=FieldFilter("phone_number_id", "==", number))
        if after is not None:
            query = query.start_after({"last_activity": after[0], "id": after[1]})
        async with self._guard("page"):
            snaps = await query.limit(limit).get()
        self.reads.direct += max(1, len(snaps))
        return [ListEntry.of(c) for c in _conversations(s.to_dict() for s in snaps)]

    async def snapshot_entries(
        self, after: tuple[int, str] | None, limit: int
    ) -> list[SnapshotEntry]:
        """A keyset page of the window (one query), as the snapshot holds it."""
        return [SnapshotEntry.of(c) for c in await self.page_after(after, limit, None)]

    async def totals(self) -> None:
        """None: counting here is an aggregation billed per thousand entries, so the list
        does not ask for it on every page."""
        return None

    async def search_customers(
        self,
        query: Query,
        after: tuple[int, str] | None,
        limit: int,
        status: str | None,
        number: str | None = None,
        *,
        assignee: str | Unset | None = UNSET,
    ) -> list[ListEntry]:
        """Conversations whose customer matches: one `array-contains` query on the query's
        longest token in list order, each result checked against the whole query."""
        token = search.query_token(query)
        if token is None or limit == 0:
            return []
        found: list[ListEntry] = []
        while len(found) < limit:
            base = self._by_activity(status, assignee).where(
                filter=FieldFilter(SEARCH_TOKENS, "array_contains", token)
            )
            if after is not None:
                base = base.start_after({"last_activity": after[0], "id": after[1]})
            async with self._guard("search customers"):
                snaps = await base.limit(SEARCH_BATCH).get()
            self.reads.direct += max(1, len(snaps))
            for c in _conversations(s.to_dict() for s in snaps):
                key = search.customer_key(c.user_name, c.phone)
                wanted = number is None or c.phone_number_id == number
                if wanted and search.matches_customer(query, key) and len(found) < limit:
                    found.append(ListEntry.of(c))
            if len(snaps) < SEARCH_BATCH:
                break
            last = snaps[-1]
            after = (last.get("last_activity"), last.get("id"))
        return found

    async def count_entries(
        self,
        query: Query | None,
        status: str | None,
        number: str | None,
        *,
        assignee: str | Unset | None = UNSET,
    ) -> int:
        """How many conversations match (one aggregation): with a query, those carrying
        its token (for a query of several words, those matching its longest word)."""
        base = self._client.collection_group(CONVERSATIONS)
        if query is not None:
            token = search.query_token(query)
            if token is None:
                return 0
            base = base.where(filter=FieldFilter(SEARCH_TOKENS, "array_contains", token))
        if status is not None:
            base = base.where(filter=FieldFilter("status", "==", status))
        if number is not None:
            base = base.where(filter=FieldFilter("phone_number_id", "==", number))
        if not isinstance(assignee, Unset):
            base = base.where(filter=FieldFilter("assignee", "==", assignee))
        async with self._guard("count"):
            result = await base.count(alias="n").get()
        n = int(result[0][0].value)
        self.reads.direct += 1 + n // 1000
        return n

    async def search_messages(
        self, query: Query, before: int | None, limit: int
    ) -> list[MessageHit]:
        """Firestore has no full-text search: message text is searched by a search engine
        fed from the change feed (docs/PRODUCTION.md)."""
        raise SearchUnavailable(
            "message search needs a search engine beside Firestore (docs/PRODUCTION.md);"
            " customers are found by name or number"
        )

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

    async def _customer(self, inbound: InboundMessage, tx: Any) -> tuple[str, Any]:
        """The customer a message is from, and their user document (read in `tx`).

        A number that is a user's id finds them at once (one read, needed anyway);
        otherwise each identity the message carries is looked up; a customer found by
        none is new, under the message's own id.
        """
        db = self._client
        phone_user = next(
            (i.split(":", 1)[1] for i in inbound.identities if i.startswith("phone:")), None
        )
        if phone_user is None and not inbound.identities:
            phone_user = inbound.user_id
        first = None
        if phone_user is not None:
            first = await db.collection(USERS).document(phone_user).get(transaction=tx)
            self.reads.direct += 1
            if first.exists:
                return phone_user, first
        for identity in inbound.identities:
            found = await db.collection(IDENTITIES).document(identity).get(transaction=tx)
            self.reads.direct += 1
            user_id = found.get("user_id") if found.exists else None
            if isinstance(user_id, str) and user_id:
                user = await db.collection(USERS).document(user_id).get(transaction=tx)
                self.reads.direct += 1
                return user_id, user
        if first is not None and phone_user == inbound.user_id:
            return inbound.user_id, first  # a new customer, read above
        user = await db.collection(USERS).document(inbound.user_id).get(transaction=tx)
        self.reads.direct += 1
        return inbound.user_id, user

    def _task_ref(self, task_id: str) -> Any:
        return self._client.collection(OUTBOX).document(task_id)

    async def save_inbound(self, inbound: InboundMessage) -> Saved | None:
        """Store a customer's message, its summary and the AI reply it owes in one
        transaction; None when a repeat."""
        db = self._client
        message_id = message_id_for_wamid(inbound.wa_message_id)
        wamid_ref = db.collection(WAMIDS).document(message_id)

        async def write(tx: Any, stamps: _Stamps) -> Saved | None:
            user_id, user = await self._customer(inbound, tx)
            user_ref = db.collection(USERS).document(user_id)
            customer = dataclasses.replace(inbound, user_id=user_id)
            previous = await self._latest_conversation(user_ref, user, tx)
            latest = rules.conversation_from_doc(previous) if previous else None
            now = now_ms()
            created = rules.needs_new_conversation(latest)
            if created or latest is None:
                latest = rules.open_conversation(customer, now, latest)
                previous = {}
            else:
                latest = rules.with_customer(customer, latest)
            message = rules.inbound_message(customer, latest.id)
            conversation = rules.after_message(latest, message, now)
            conversation_ref = user_ref.collection(CONVERSATIONS).document(conversation.id)
            message_ref = conversation_ref.collection(MESSAGES).document(message.id)
            self._remember_path(conversation.id, conversation_ref.path)
            known = (user.to_dict() or {}).get("identities") if user.exists else None
            known = set(known) if isinstance(known, list) else set()
            fresh = [i for i in customer.identities if i not in known]
            profile: dict[str, Any] = {
                "name": conversation.user_name,
                "phone": conversation.phone,
                "channel": customer.channel,
                "latest_conversation_id": conversation.id,
            }
            if fresh:
                profile["identities"] = sorted(known | set(fresh))
            if not user.exists:
                profile["created_at"] = now
            held = user.to_dict() or {} if user.exists else {}
            if any(held.get(k) != v for k, v in profile.items()):
                tx.set(user_ref, profile, merge=True)  # only when it changes: a write each
            for identity in fresh:
                tx.set(db.collection(IDENTITIES).document(identity), {"user_id": user_id})
            tx.set(
                conversation_ref,
                _document(conversation, previous, stamps, message, new_conversation=created),
            )
            # create(): a redelivery racing this one fails the commit, never writes twice.
            tx.create(message_ref, rules.message_to_doc(message))
            tx.create(wamid_ref, {"path": message_ref.path})
            task = None
            if rules.wants_ai(conversation, message, self.ai_replies):
                task = rules.ai_task(conversation, message, self.leases, now)
                tx.set(self._task_ref(task.id), rules.task_to_doc(task))
            media_task = None
            if rules.wants_media(message):
                media_task = rules.media_task(message, self.leases, now)
                tx.set(self._task_ref(media_task.id), rules.task_to_doc(media_task))
            return Saved(
                conversation, message, new_conversation=created, task=task, media_task=media_task
            )

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
                return await self._transact("save inbound", write, rules.saved_changes)
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
        answers: str | None = None,
        failed: MessageError | None = None,
    ) -> Saved:
        """Store a reply as queued with its send task (or a note, failed), in one
        transaction."""

        path = await self._conversation_path(conversation_id)
        ai_task_ref = self._task_ref(rules.ai_task_id(conversation_id))

        async def write(tx: Any, stamps: _Stamps) -> Saved:
            snap = await self._conversation_doc(conversation_id, tx)
            ai_task = None
            if answers is not None:
                held = await ai_task_ref.get(transaction=tx)
                self.reads.direct += 1
                ai_task = rules.task_from_doc(held.to_dict()) if held.exists else None
            previous = snap.to_dict() or {}
            conversation = rules.conversation_from_doc(previous)
            rules.check_reply(conversation, sender)
            rules.check_answer(ai_task, sender, answers)
            now = rules.reply_time(conversation, now_ms())
            message = rules.outbound_message(conversation_id, sender, text, agent_id, now, failed)
            conversation = rules.after_message(conversation, message, now)
            if take_over:
                conversation = conversation.with_changes(ai_enabled=False)
            tx.set(snap.reference, _document(conversation, previous, stamps, message))
            tx.create(
                snap.reference.collection(MESSAGES).document(message.id),
                rules.message_to_doc(message),
            )
            if answers is not None or sender == "agent":
                tx.delete(ai_task_ref)  # answered, or an agent took over
            task = None
            if failed is None:
                task = rules.send_task(message, self.leases, now)
                tx.set(self._task_ref(task.id), rules.task_to_doc(task))
            return Saved(conversation, message, task=task)

        async with self._lock(_user_of(path)):
            return await self._transact("save outbound", write, rules.saved_changes)

    async def _message_ref(self, message_id: str) -> Any:
        """A message's document reference, found by its id; NotFound if none."""
        query = (
            self._client.collection_group(MESSAGES)
            .where(filter=FieldFilter("id", "==", message_id))
            .limit(1)
        )
        async with self._guard("find message"):
            found = await query.get()
        self.reads.direct += max(1, len(found))
        if not found:
            raise NotFound(f"no message {message_id!r}")
        return found[0].reference

    async def get_message(self, message_id: str) -> Message:
        """One message."""
        ref = await self._message_ref(message_id)
        async with self._guard("get message"):
            snap = await ref.get()
        self.reads.direct += 1
        if not snap.exists:
            raise NotFound(f"no message {message_id!r}")
        return rules.message_from_doc(snap.to_dict())

    # -- media, rich replies ---------------------------------------------------------------

    async def find_message(self, wa_message_id: str) -> Message | None:
        """The message WhatsApp knows by this id (through `wamids`), or None."""
        pointer_ref = self._client.collection(WAMIDS).document(message_id_for_wamid(wa_message_id))
        async with self._guard("find message"):
            pointer = await pointer_ref.get()
            self.reads.direct += 1
            path = pointer.get("path") if pointer.exists else None
            if not path:
                return None
            snap = await self._client.document(path).get()
            self.reads.direct += 1
        return rules.message_from_doc(snap.to_dict()) if snap.exists else None

    async def save_agent_message(
        self, conversation_id: str, draft: Draft, *, agent_id: str | None = None
    ) -> Saved:
        """Store an agent's message as queued with its send task, in one transaction;
        refused (WindowClosed) when only a template may reach the customer now."""
        path = await self._conversation_path(conversation_id)
        ai_task_ref = self._task_ref(rules.ai_task_id(conversation_id))

        async def write(tx: Any, stamps: _Stamps) -> Saved:
            snap = await self._conversation_doc(conversation_id, tx)
            previous = snap.to_dict() or {}
            conversation = rules.conversation_from_doc(previous)
            now = rules.reply_time(conversation, now_ms())
            rules.check_window(conversation, draft, now_ms())
            message = rules.agent_message(conversation_id, draft, agent_id, now)
            conversation = rules.after_message(conversation, message, now)
            tx.set(snap.reference, _document(conversation, previous, stamps, message))
            message_ref = snap.reference.collection(MESSAGES).document(message.id)
            tx.create(message_ref, rules.message_to_doc(message))
            tx.delete(ai_task_ref)  # an agent took over
            task = rules.send_task(message, self.leases, now)
            tx.set(self._task_ref(task.id), rules.task_to_doc(task))
            return Saved(conversation, message, task=task)

        async with self._lock(_user_of(path)):
            return await self._transact("save agent message", write, rules.saved_changes)

    async def set_media(self, message_id: str, media: Media) -> StatusChange | None:
        """Record a message's media state, completing its download task; the
        conversation's document carries the message so other instances' panes see it."""
        task_ref = self._task_ref(rules.media_task_id(message_id))
        try:
            message_ref = await self._message_ref(message_id)
        except NotFound:
            async with self._guard("drop media task"):
                await task_ref.delete()
            return None
        conversation_ref = message_ref.parent.parent

        async def write(tx: Any, stamps: _Stamps) -> StatusChange | None:
            snap = await message_ref.get(transaction=tx)
            conversation_snap = await conversation_ref.get(transaction=tx)
            self.reads.direct += 2
            tx.delete(task_ref)
            if not snap.exists or not conversation_snap.exists:
                return None
            updated = rules.with_media(rules.message_from_doc(snap.to_dict()), media)
            previous = conversation_snap.to_dict() or {}
            conversation = rules.conversation_from_doc(previous)
            after = conversation.with_changes(updated_at=max(now_ms(), conversation.updated_at + 1))
            tx.set(message_ref, rules.message_to_doc(updated))
            tx.set(conversation_ref, _document(after, previous, stamps, updated, new=False))
            return StatusChange(after, updated)

        async with self._lock(_user_of(message_ref.path)):
            return await self._transact("set media", write, rules.status_changes)

    async def _task_write(
        self, what: str, task_id: str, change: Callable[[Task], Task | None]
    ) -> Task | None:
        """Read a task and write what `change` makes of it, in one transaction (None:
        leave it as it is). The new task, or None."""
        ref = self._task_ref(task_id)

        async def write(tx: Any, stamps: _Stamps) -> Task | None:
            snap = await ref.get(transaction=tx)
            self.reads.direct += 1
            if not snap.exists:
                return None
            updated = change(rules.task_from_doc(snap.to_dict()))
            if updated is not None:
                tx.set(ref, rules.task_to_doc(updated))
            return updated

        return await self._transact(what, write)

    async def claim_tasks(self, *, limit: int, kind: TaskKind, steal: bool = False) -> list[Task]:
        """Lease up to `limit` tasks whose lease ran out, each in its own transaction (so
        two instances sweeping at once never take the same one)."""
        now = now_ms()
        query = self._client.collection(OUTBOX).where(filter=FieldFilter("kind", "==", kind))
        if not steal:
            query = query.where(filter=FieldFilter("lease_until", "<=", now))
        query = query.order_by("lease_until").limit(limit)
        async with self._guard("find due tasks"):
            due = await query.get()
        self.reads.direct += max(1, len(due))
        owner = self.leases.owner

        def take(task: Task) -> Task | None:
            at = now_ms()
            if not rules.claimable(task, owner, at, steal):
                return None
            return rules.leased(task, self.leases, at, attempts=task.attempts + 1)

        claimed = []
        for snap in due:
            task = await self._task_write("claim task", snap.id, take)
            if task is not None:
                claimed.append(task)
        return claimed

    async def mark_sending(self, task: Task) -> bool:
        """Record that the POST is about to start, while this process holds the task."""
        owner = self.leases.owner

        def sending(held: Task) -> Task | None:
            at = now_ms()
            if held.state != "pending" or not rules.claimable(held, owner, at, steal=False):
                return None
            return rules.leased(held, self.leases, at, state="sending")

        return await self._task_write("mark sending", task.id, sending) is not None

    async def renew_tasks(self, task_ids: Sequence[str]) -> None:
        """Extend this process's leases on these tasks."""
        owner = self.leases.owner
        for task_id in task_ids:
            await self._task_write(
                "renew task",
                task_id,
                lambda held: (
                    rules.leased(held, self.leases, now_ms()) if held.owner == owner else None
                ),
            )

    async def release_tasks(self, task_ids: Sequence[str]) -> None:
        """Give up this process's leases on these tasks."""
        owner = self.leases.owner
        for task_id in task_ids:
            await self._task_write(
                "release task",
                task_id,
                lambda held: (
                    dataclasses.replace(held, lease_until=0) if held.owner == owner else None
                ),
            )

    async def finish_task(self, task: Task) -> None:
        """Drop the task if it is still the same one."""
        ref = self._task_ref(task.id)

        async def write(tx: Any, stamps: _Stamps) -> None:
            snap = await ref.get(transaction=tx)
            self.reads.direct += 1
            if snap.exists and snap.get("message_id") == task.message_id:
                tx.delete(ref)

        await self._transact("finish task", write)

    async def retry_send(self, message_id: str) -> Saved:
        """Queue a failed reply again with a new send task."""
        message_ref = await self._message_ref(message_id)
        conversation_ref = message_ref.parent.parent

        async def write(tx: Any, stamps: _Stamps) -> Saved:
            snap = await message_ref.get(transaction=tx)
            conversation_snap = await conversation_ref.get(transaction=tx)
            self.reads.direct += 2
            if not snap.exists or not conversation_snap.exists:
                raise NotFound(f"no message {message_id!r}")
            queued = rules.retried(rules.message_from_doc(snap.to_dict()))
            previous = conversation_snap.to_dict() or {}
            conversation = rules.conversation_from_doc(previous)
            after = rules.after_status(conversation, queued, now_ms())
            tx.set(message_ref, rules.message_to_doc(queued))
            tx.set(conversation_ref, _document(after, previous, stamps, queued, new=False))
            task = rules.send_task(queued, self.leases, now_ms())
            tx.set(self._task_ref(task.id), rules.task_to_doc(task))
            return Saved(after, queued, task=task)

        async with self._lock(_user_of(message_ref.path)):
            return await self._transact(
                "retry send",
                write,
                lambda s: rules.status_changes(StatusChange(s.conversation, s.message)),
            )

    async def _deliver_status(
        self,
        tx: Any,
        stamps: _Stamps,
        message_snap: Any,
        status: str,
        wa_message_id: str | None,
        error: MessageError | None,
        finish: bool = False,
    ) -> StatusChange | None:
        """Move a message's delivery status forward, and its conversation's tick with it
        (`finish`: the send's outcome, which completes its task)."""
        if not message_snap.exists:
            return None
        message = rules.message_from_doc(message_snap.to_dict())
        task_ref = self._task_ref(rules.send_task_id(message.id))
        updated = rules.with_delivery(message, status, wa_message_id, error)
        if updated is None:
            if finish:
                tx.delete(task_ref)
            return None
        conversation_ref = message_snap.reference.parent.parent
        conversation_snap = await conversation_ref.get(transaction=tx)
        self.reads.direct += 1
        if finish:
            tx.delete(task_ref)  # after the reads: a transaction reads before it writes
        if not conversation_snap.exists:
            return None
        previous = conversation_snap.to_dict() or {}
        conversation = rules.conversation_from_doc(previous)
        now = now_ms()
        after = rules.after_status(conversation, updated, now)
        if after is conversation:
            # Not its latest message: the list row stays, but the document still carries
            # the tick (a new version), so other instances' open panes see it too.
            after = conversation.with_changes(updated_at=max(now, conversation.updated_at + 1))
        tx.set(message_snap.reference, rules.message_to_doc(updated))
        if updated.wa_message_id and updated.wa_message_id != message.wa_message_id:
            wamid_ref = self._client.collection(WAMIDS).document(
                message_id_for_wamid(updated.wa_message_id)
            )
            tx.set(wamid_ref, {"path": message_snap.reference.path})
        # The document carries the message, error included, so other instances can show
        # the new ticks in an open conversation too.
        tx.set(conversation_ref, _document(after, previous, stamps, updated, new=False))
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
        try:
            ref = await self._message_ref(message_id)
        except NotFound:
            return None
        return await self._set_status(ref.path, status, wa_message_id, error, finish=True)

    async def _set_status(
        self,
        message_path: str,
        status: str,
        wa_message_id: str | None,
        error: MessageError | None,
        finish: bool = False,
    ) -> StatusChange | None:
        message_ref = self._client.document(message_path)

        async def write(tx: Any, stamps: _Stamps) -> StatusChange | None:
            snap = await message_ref.get(transaction=tx)
            self.reads.direct += 1
            return await self._deliver_status(
                tx, stamps, snap, status, wa_message_id, error, finish
            )

        async with self._lock(_user_of(message_path)):
            return await self._transact("set status", write, rules.status_changes)

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

        async def write(tx: Any, stamps: _Stamps) -> Conversation:
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
            # The messages carried so far stay: a mark-read right after a message must
            # not take it away from instances whose listener merges the two writes.
            tx.set(snap.reference, _document(updated, previous, stamps))
            return updated

        async with self._lock(_user_of(path)):
            return await self._transact("update conversation", write, rules.conversation_changes)

    async def delete_conversation(self, conversation_id: str) -> Conversation:
        """Erase a conversation: first marked deleted through the feed (a new version, so
        every instance's listener delivers it, however old the conversation), then its
        messages, their WhatsApp-id pointers, its tasks and the document itself."""
        path = await self._conversation_path(conversation_id)
        conversation_ref = self._client.document(path)

        async def mark(tx: Any, stamps: _Stamps) -> Conversation:
            snap = await conversation_ref.get(transaction=tx)
            self.reads.direct += 1
            if not snap.exists:
                raise NotFound(f"no conversation {conversation_id!r}")
            previous = snap.to_dict() or {}
            conversation = rules.conversation_from_doc(previous)
            gone = conversation.with_changes(updated_at=max(now_ms(), conversation.updated_at + 1))
            doc = _document(gone, previous, stamps)
            doc["deleted"] = True
            tx.set(conversation_ref, doc)
            return gone

        async with self._lock(_user_of(path)):
            conversation = await self._transact(
                "delete conversation", mark, lambda c: [Change(c, removed=True)]
            )
        async with self._guard("delete messages"):
            messages = await conversation_ref.collection(MESSAGES).get()
        self.reads.direct += max(1, len(messages))
        refs = [conversation_ref.collection(MESSAGES).document(m.id) for m in messages]
        for m in messages:
            data = m.to_dict() or {}
            if data.get("wa_message_id"):
                refs.append(
                    self._client.collection(WAMIDS).document(
                        message_id_for_wamid(data["wa_message_id"])
                    )
                )
            refs.append(self._task_ref(rules.send_task_id(m.id)))
        refs += [self._task_ref(rules.ai_task_id(conversation_id)), conversation_ref]
        for start in range(0, len(refs), BATCH_WRITES):
            batch = self._client.batch()
            for ref in refs[start : start + BATCH_WRITES]:
                batch.delete(ref)
            async with self._guard("delete conversation"):
                await batch.commit()
        self._paths.pop(conversation_id, None)
        return conversation

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
            writes.append((self._conversation_ref(c.user_id, c.id), _document(c, {}, None), False))
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
        self._emit_local([Change(c, announce=False) for c in stamped], None)
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


def _kind_of(path: str) -> str:
    """The kind of document a path names: its collection, messages apart from their
    conversation."""
    parts = path.split("/documents/", 1)[-1].split("/")
    return parts[-2] if len(parts) >= 2 else "unknown"


def _user_of(path: str) -> str:
    """The user id in a document path under users/{user_id}/..."""
    return path.split("/", 2)[1]


class _Stamps(dict[str, tuple[int, int]]):
    """What one transaction did to its conversations' message counts: for each, the count
    it read and the count it wrote (`feed_seq`). Passed to the write, returned with it."""

    def wrote(self, conversation_id: str, read: int, written: int) -> None:
        """Record a conversation document written by this transaction."""
        self[conversation_id] = (read, written)


def _document(
    conversation: Conversation,
    previous: dict[str, Any],
    stamps: _Stamps | None,
    message: Message | None = None,
    *,
    new_conversation: bool = False,
    new: bool = True,
) -> dict[str, Any]:
    """A conversation's document, carrying its latest messages whole for other instances.

    `feed_messages` keeps the last FEED_MESSAGES_KEPT messages written (or given a new
    delivery status), each with the conversation version that wrote it: a listener that
    merges several quick writes into one change still hands over every one of them.
    """
    doc = rules.conversation_to_doc(conversation)
    carried = previous.get("feed_messages")
    entries = [e for e in carried if isinstance(e, dict)] if isinstance(carried, list) else []
    read = previous.get(FEED_SEQ)
    read = read if isinstance(read, int) else 0
    seq = read
    if message is not None:
        seq += 1
        carried = rules.message_to_doc(message)
        if message.text is not None and len(message.text) > FEED_TEXT_CHARS:
            # A document holds at most 1 MiB; five long texts must not reach it. Another
            # instance gets the start and has open panes read the whole message.
            carried["text"] = message.text[:FEED_TEXT_CHARS]
            carried["truncated"] = True
        entries.append(
            {
                "message": carried,
                "new": new,
                "new_conversation": new_conversation,
                "version": conversation.updated_at,
                "seq": seq,
            }
        )
    doc["feed_messages"] = entries[-FEED_MESSAGES_KEPT:]
    doc[FEED_SEQ] = seq
    doc[SEARCH_TOKENS] = search.customer_tokens(conversation.user_name, conversation.phone)
    if stamps is not None:
        stamps.wrote(conversation.id, read, seq)
    doc[FEED_AT] = firestore.SERVER_TIMESTAMP
    return doc


def _feed_messages(
    doc: dict[str, Any], after_seq: int | None, after_version: int
) -> tuple[FeedMessage, ...]:
    """The messages a conversation's document carries that were written after message
    count `after_seq` (or, where counts are unknown, after version `after_version`)."""
    carried = doc.get("feed_messages")
    if not isinstance(carried, list):
        return ()
    out: list[FeedMessage] = []
    for entry in carried:
        try:
            seq = entry.get("seq")
            if after_seq is not None and isinstance(seq, int):
                if seq <= after_seq:
                    continue
            elif int(entry["version"]) <= after_version:
                continue
            message = rules.message_from_doc(entry["message"])
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # one malformed entry must not hide the others
        new = entry.get("new")
        if not isinstance(new, bool):  # written before entries said so
            new = message.status in ("received", "queued")
        out.append(
            FeedMessage(message, new=new, new_conversation=bool(entry.get("new_conversation")))
        )
    return tuple(out)


def _missed(doc: dict[str, Any], last_seq: int | None) -> bool:
    """True when message writes happened between the last one this process saw and the
    oldest the document still carries (more were merged into one change than it keeps),
    or one it carries lost the end of a long text."""
    seq = doc.get(FEED_SEQ)
    carried = doc.get("feed_messages")
    if isinstance(carried, list) and any(
        isinstance(e, dict)
        and isinstance(e.get("message"), dict)
        and e["message"].get("truncated")
        and (last_seq is None or not isinstance(e.get("seq"), int) or e["seq"] > last_seq)
        for e in carried
    ):
        return True
    if last_seq is None or not isinstance(seq, int) or seq <= last_seq:
        return False
    kept = (
        [e.get("seq") for e in carried if isinstance(e, dict)] if isinstance(carried, list) else []
    )
    oldest = min((s for s in kept if isinstance(s, int)), default=seq + 1)
    return oldest > last_seq + 1


def _conversations(docs: Any) -> list[Conversation]:
    """Conversation summaries from documents, skipping any that are not one of ours."""
    out: list[Conversation] = []
    for doc in docs:
        try:
            out.append(rules.conversation_from_doc(doc))
        except (KeyError, TypeError, ValueError):
            continue  # a malformed document must not take the whole list down
    return out
