"""The embedded store: SQLite in WAL mode, every statement on one dedicated thread.

One connection on one thread serialises writes without locks and keeps the event loop free.
After each commit the store calls its listeners on the event loop: that is the change feed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, Final, TypeVar

import orjson
import structlog

from server.models import Conversation, Media, Message, MessageError, now_ms
from server.search import Query
from server.store import rules, sqlite_index
from server.store.base import (
    UNSET,
    Change,
    ChangeFeed,
    ChangeListener,
    Draft,
    InboundMessage,
    Leases,
    ListEntry,
    MessageHit,
    NotFound,
    Saved,
    SnapshotEntry,
    StatusChange,
    StoreUnavailable,
    Task,
    TaskKind,
    UnknownMessage,
    Unset,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")
# Threads (each with its own connection) for the reads that do not need the writer's: pages
# past the window, counts, search. In WAL mode they read while a write commits, so a search
# never waits for an fsync and a write never waits for a search.
READERS: Final = 2
# A waiting write: its work, what it tells the change feed, and its caller's future.
Pending = tuple[Callable[[], Any], Callable[[Any], Sequence[Change]], "asyncio.Future[Any]"]
# A write's future, its result or error, and what it tells the change feed.
Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None, Callable[[Any], Sequence[Change]]]

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    phone TEXT NOT NULL,
    channel TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    status TEXT NOT NULL,
    last_activity INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_activity ON conversations (last_activity DESC, id);
CREATE INDEX IF NOT EXISTS conversations_by_user ON conversations (user_id, created_at DESC);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    at INTEGER NOT NULL,
    wa_message_id TEXT UNIQUE,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, at DESC, id DESC);
CREATE TABLE IF NOT EXISTS user_identities (
    identity TEXT PRIMARY KEY,
    user_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    lease_until INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_by_lease ON outbox (kind, lease_until);
"""


def _dump(doc: dict[str, Any]) -> str:
    return orjson.dumps(doc).decode()


def _no_changes(_: object) -> list[Change]:
    return []


class SqliteStore:
    """ChatStore on an embedded SQLite file (or ':memory:')."""

    name = "sqlite"
    exclusive = True

    def __init__(self, path: str, leases: Leases | None = None, *, ai_replies: bool = True) -> None:
        self.path = path
        self.leases = leases or Leases()
        # Whether customers' messages owe an AI reply (no task is recorded when the AI is off).
        self.ai_replies = ai_replies
        self._lock_file: IO[bytes] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        self._subscribers = ChangeFeed()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Writes waiting for the store's thread, and whether a batch is on its way there.
        self._pending: list[
            tuple[Callable[[], Any], Callable[[Any], Sequence[Change]], asyncio.Future[Any]]
        ] = []
        self._pending_lock = threading.Lock()
        self._batch_scheduled = False
        # A database in memory (or named by URI) has one connection: its reads take turns
        # with the writes on the store's thread.
        self._own_readers = path != ":memory:" and not path.startswith("file:")
        self._readers = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="sqlite-read")
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Lock the file for this process, open it in WAL mode and create the schema."""
        self._loop = asyncio.get_running_loop()
        await self._run(self._lock)
        await self._run(self._open)

    def _lock(self) -> None:
        """One server per database file: its leases are then all this process's, and a
        second server on the same file would send every queued reply twice. The lock is
        the kernel's (flock): it goes with the process, even on kill -9."""
        if self.path == ":memory:" or self.path.startswith("file:"):
            return
        handle = open(self.path + ".lock", "wb")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            handle.close()
            raise StoreUnavailable(f"another server is using {self.path}") from e
        self._lock_file = handle

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on the disk (fsync of the WAL) before the webhook is answered
        # 200; Meta never redelivers what was answered, so NORMAL's window (the last
        # commits lost on a power cut) would lose customers' messages. Group commit keeps
        # it one fsync per batch of writes (docs/BENCHMARKS.md has the figures).
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        # 64 MiB of page cache (SQLite's default is 2 MiB): a large inbox's indexes on
        # random keys (message ids are hashes) are written all over; with more of them in
        # memory, seeding a million demo conversations took 15% less time.
        conn.execute("PRAGMA cache_size=-65536")
        conn.executescript(SCHEMA)
        sqlite_index.register(conn)
        sqlite_index.migrate(conn)
        self._conn = conn

    async def close(self) -> None:
        """Close the connections and the store's threads."""
        self._subscribers.clear()
        await asyncio.to_thread(self._readers.shutdown, wait=True)
        for reader in self._reader_conns:
            reader.close()
        self._reader_conns.clear()
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    async def ping(self) -> None:
        """Raise StoreUnavailable when the database cannot answer."""
        try:
            await self._run(lambda: self._db.execute("SELECT 1").fetchone())
        except sqlite3.Error as e:
            raise StoreUnavailable(str(e)) from e

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable("the store is not open")
        return self._conn

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    def _reader(self) -> sqlite3.Connection:
        """This reader thread's own read-only connection."""
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            sqlite_index.register(conn)
            self._reader_local.conn = conn
            with self._pending_lock:
                self._reader_conns.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read on a reader thread (on the store's thread for a database in memory)."""
        if not self._own_readers:
            return await self._run(lambda: fn(self._db))
        if self._conn is None:
            raise StoreUnavailable("the store is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, lambda: fn(self._reader()))

    # -- change feed --------------------------------------------------------------------

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        """Call `listener` on the event loop after every commit."""
        return self._subscribers.subscribe(listener)

    # -- reads ------------------------------------------------------------------------

    async def load_window(self, limit: int | None) -> list[Conversation]:
        """The newest `limit` conversations (all when None)."""
        return await self.page_after(None, limit if limit is not None else -1, None)

    async def page_after(
        self, after: tuple[int, str] | None, limit: int, status: str | None
    ) -> list[Conversation]:
        """Conversations after a keyset, newest activity first (limit -1: no limit)."""

        def read() -> list[Conversation]:
            where, args = [], []
            if after is not None:
                where.append("(last_activity < ? OR (last_activity = ? AND id > ?))")
                args += [after[0], after[0], after[1]]
            if status is not None:
                where.append("status = ?")
                args.append(status)
            sql = "SELECT doc FROM conversations"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY last_activity DESC, id LIMIT ?"
            rows = self._db.execute(sql, [*args, limit]).fetchall()
            return [rules.conversation_from_doc(orjson.loads(r[0])) for r in rows]

        return await self._run(read)

    async def count(self, status: str | None) -> int:
        """How many conversations (with that status) there are, as the triggers count them."""
        counted = await self._read(sqlite_index.totals)
        return sum(counted.values()) if status is None else counted.get(status, 0)

    async def snapshot_entries(
        self, after: tuple[int, str] | None, limit: int
    ) -> list[SnapshotEntry]:
        """A keyset page of the window as the snapshot holds it, from prepared rows."""
        return await self._read(lambda db: sqlite_index.snapshot_entries(db, after, limit))

    async def totals(self) -> dict[str, int]:
        """Conversations per status (a read of the counts the triggers keep)."""
        return await self._read(sqlite_index.totals)

    async def list_entries(
        self,
        after: tuple[int, str] | None,
        limit: int,
        status: str | None,
        number: str | None = None,
        *,
        assignee: str | Unset | None = UNSET,
    ) -> list[ListEntry]:
        """A keyset page of the list's prepared rows, from a reader thread."""
        return await self._read(
            lambda db: sqlite_index.entries_after(db, after, limit, status, number, assignee)
        )

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
        """Conversations whose customer's name or number matches, in list order."""
        return await self._read(
            lambda db: sqlite_index.search_customers(
                db, query, after, limit, status, number, assignee
            )
        )

    async def count_entries(
        self,
        query: Query | None,
        status: str | None,
        number: str | None,
        *,
        assignee: str | Unset | None = UNSET,
    ) -> int:
        """How many conversations match a name or number, a status, a business number, an
        assignee."""
        return await self._read(
            lambda db: sqlite_index.count_entries(db, query, status, number, assignee)
        )

    async def search_messages(
        self, query: Query, before: int | None, limit: int
    ) -> list[MessageHit]:
        """Messages whose text matches, newest first (SQLite FTS5)."""
        return await self._read(lambda db: sqlite_index.search_messages(db, query, before, limit))

    def _conversation(self, conversation_id: str) -> Conversation:
        row = self._db.execute(
            "SELECT doc FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no conversation {conversation_id!r}")
        return rules.conversation_from_doc(orjson.loads(row[0]))

    async def get_conversation(self, conversation_id: str) -> Conversation:
        """One conversation summary."""
        return await self._run(lambda: self._conversation(conversation_id))

    async def list_messages(
        self, conversation_id: str, limit: int, before: tuple[int, str] | None
    ) -> tuple[list[Message], bool]:
        """A page of messages older than `before`, oldest first."""

        def read() -> tuple[list[Message], bool]:
            self._conversation(conversation_id)
            sql = "SELECT doc FROM messages WHERE conversation_id = ?"
            args: list[Any] = [conversation_id]
            if before is not None:
                sql += " AND (at < ? OR (at = ? AND id < ?))"
                args += [before[0], before[0], before[1]]
            sql += " ORDER BY at DESC, id DESC LIMIT ?"
            rows = self._db.execute(sql, [*args, limit + 1]).fetchall()
            messages = [rules.message_from_doc(orjson.loads(r[0])) for r in rows[:limit]]
            messages.reverse()
            return messages, len(rows) > limit

        return await self._run(read)

    # -- writes -----------------------------------------------------------------------

    def _put_conversation(self, c: Conversation) -> None:
        self._db.execute(
            "INSERT INTO conversations (id, user_id, status, last_activity, created_at, doc)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
            " status = excluded.status, last_activity = excluded.last_activity,"
            " doc = excluded.doc",
            (
                c.id,
                c.user_id,
                c.status,
                c.last_activity,
                c.created_at,
                _dump(rules.conversation_to_doc(c)),
            ),
        )

    def _put_message(self, m: Message, *, insert: bool) -> None:
        doc = _dump(rules.message_to_doc(m))
        if insert:
            self._db.execute(
                "INSERT INTO messages (id, conversation_id, at, wa_message_id, doc)"
                " VALUES (?, ?, ?, ?, ?)",
                (m.id, m.conversation_id, m.at, m.wa_message_id, doc),
            )
        else:
            self._db.execute(
                "UPDATE messages SET wa_message_id = ?, doc = ? WHERE id = ?",
                (m.wa_message_id, doc, m.id),
            )

    async def _write(self, fn: Callable[[], T], changes: Callable[[T], Sequence[Change]]) -> T:
        """Run `fn` in a write transaction, then tell the change feed what it committed.

        Writes that arrive together share one transaction (each in its own savepoint, so
        one that fails changes nothing and fails alone): a burst of webhooks costs one
        commit and one wake-up of the event loop instead of one each.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._pending_lock:
            self._pending.append((fn, changes, future))
            if not self._batch_scheduled:
                self._batch_scheduled = True
                self._executor.submit(self._write_batch, loop)
        result: T = await future
        return result

    def _write_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the store's thread: every waiting write in one transaction."""
        with self._pending_lock:
            batch, self._pending = self._pending, []
        outcomes: list[Outcome] = []
        try:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            for fn, changes, future in batch:
                db.execute("SAVEPOINT write")
                try:
                    result = fn()
                except Exception as e:  # the caller gets it; the other writes go on
                    db.execute("ROLLBACK TO write")
                    db.execute("RELEASE write")
                    outcomes.append((future, None, e, changes))
                else:
                    db.execute("RELEASE write")
                    outcomes.append((future, result, None, changes))
            db.execute("COMMIT")
        except (sqlite3.Error, StoreUnavailable) as e:
            if self._conn is not None and self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            failure = StoreUnavailable(f"write failed: {e}")
            outcomes = [(future, None, failure, changes) for _, changes, future in batch]
        finally:
            with self._pending_lock:
                if self._pending:
                    self._executor.submit(self._write_batch, loop)
                else:
                    self._batch_scheduled = False
        loop.call_soon_threadsafe(self._settle, outcomes)

    def _settle(self, outcomes: list[Outcome]) -> None:
        """On the event loop: tell the change feed what was committed, then each caller.

        The feed hears of a commit even when its caller has gone (cancelled on shutdown),
        so the snapshot never misses a write.
        """
        for future, result, error, changes in outcomes:
            if error is None:
                emitted = changes(result)
                if emitted:
                    self._subscribers.emit(emitted)
            if future.cancelled():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def _user_for(self, inbound: InboundMessage) -> str:
        """The customer a message is from: whoever one of its identities already names,
        else a new customer under the message's own id. Every identity it carries is
        remembered for that customer, so a later message addressing them either way (a
        number, a business-scoped user id, or both) lands in the same conversation."""
        db = self._db
        identities = inbound.identities or (f"phone:{inbound.user_id}",)
        user_id = inbound.user_id
        for identity in identities:
            row = db.execute(
                "SELECT user_id FROM user_identities WHERE identity = ?", (identity,)
            ).fetchone()
            if row is not None:
                user_id = row[0]
                break
        db.executemany(
            "INSERT OR IGNORE INTO user_identities (identity, user_id) VALUES (?, ?)",
            [(identity, user_id) for identity in identities],
        )
        return user_id

    def _put_task(self, task: Task) -> None:
        self._db.execute(
            "INSERT INTO outbox (id, kind, lease_until, created_at, doc) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET lease_until = excluded.lease_until,"
            " doc = excluded.doc",
            (
                task.id,
                task.kind,
                task.lease_until,
                task.created_at,
                _dump(rules.task_to_doc(task)),
            ),
        )

    def _task(self, task_id: str) -> Task | None:
        row = self._db.execute("SELECT doc FROM outbox WHERE id = ?", (task_id,)).fetchone()
        return rules.task_from_doc(orjson.loads(row[0])) if row else None

    def _drop_task(self, task_id: str) -> None:
        self._db.execute("DELETE FROM outbox WHERE id = ?", (task_id,))

    async def save_inbound(self, inbound: InboundMessage) -> Saved | None:
        """Store a customer's message, its summary and the AI reply it owes in one
        transaction."""

        def write() -> Saved | None:
            db = self._db
            if db.execute(
                "SELECT 1 FROM messages WHERE wa_message_id = ?", (inbound.wa_message_id,)
            ).fetchone():
                return None
            now = now_ms()
            customer = dataclasses.replace(inbound, user_id=self._user_for(inbound))
            row = db.execute(
                "SELECT doc FROM conversations WHERE user_id = ?"
                " ORDER BY created_at DESC, id DESC LIMIT 1",
                (customer.user_id,),
            ).fetchone()
            latest = rules.conversation_from_doc(orjson.loads(row[0])) if row else None
            created = rules.needs_new_conversation(latest)
            if created or latest is None:
                latest = rules.open_conversation(customer, now, latest)
            else:
                latest = rules.with_customer(customer, latest)
            db.execute(
                "INSERT INTO users (id, name, phone, channel, created_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET name = excluded.name, phone = excluded.phone",
                (customer.user_id, latest.user_name, latest.phone, customer.channel, now),
            )
            message = rules.inbound_message(customer, latest.id)
            conversation = rules.after_message(latest, message, now)
            self._put_conversation(conversation)
            self._put_message(message, insert=True)
            task = None
            if rules.wants_ai(conversation, message, self.ai_replies):
                task = rules.ai_task(conversation, message, self.leases, now)
                self._put_task(task)
            media_task = None
            if rules.wants_media(message):
                media_task = rules.media_task(message, self.leases, now)
                self._put_task(media_task)
            return Saved(
                conversation, message, new_conversation=created, task=task, media_task=media_task
            )

        return await self._write(write, rules.saved_changes)

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
        """Store a reply as queued with its send task (or a note, failed), in one write."""

        def write() -> Saved:
            conversation = self._conversation(conversation_id)
            ai_task_id = rules.ai_task_id(conversation_id)
            rules.check_reply(conversation, sender)
            rules.check_answer(self._task(ai_task_id), sender, answers)
            now = rules.reply_time(conversation, now_ms())
            message = rules.outbound_message(conversation_id, sender, text, agent_id, now, failed)
            conversation = rules.after_message(conversation, message, now)
            if take_over:
                conversation = conversation.with_changes(ai_enabled=False)
            self._put_conversation(conversation)
            self._put_message(message, insert=True)
            if answers is not None or sender == "agent":
                self._drop_task(ai_task_id)  # answered, or an agent took over
            task = None
            if failed is None:
                task = rules.send_task(message, self.leases, now)
                self._put_task(task)
            return Saved(conversation, message, task=task)

        return await self._write(write, rules.saved_changes)

    async def get_message(self, message_id: str) -> Message:
        """One message."""

        def read() -> Message:
            message = self._message("id", message_id)
            if message is None:
                raise NotFound(f"no message {message_id!r}")
            return message

        return await self._run(read)

    # -- media, rich replies ---------------------------------------------------------------

    async def find_message(self, wa_message_id: str) -> Message | None:
        """The message WhatsApp knows by this id, or None."""
        return await self._run(lambda: self._message("wa_message_id", wa_message_id))

    async def save_agent_message(
        self, conversation_id: str, draft: Draft, *, agent_id: str | None = None
    ) -> Saved:
        """Store an agent's message as queued with its send task, in one write; refused
        (WindowClosed) when only a template may reach the customer now."""

        def write() -> Saved:
            conversation = self._conversation(conversation_id)
            now = rules.reply_time(conversation, now_ms())
            rules.check_window(conversation, draft, now_ms())
            message = rules.agent_message(conversation_id, draft, agent_id, now)
            conversation = rules.after_message(conversation, message, now)
            self._put_conversation(conversation)
            self._put_message(message, insert=True)
            self._drop_task(rules.ai_task_id(conversation_id))  # an agent took over
            task = rules.send_task(message, self.leases, now)
            self._put_task(task)
            return Saved(conversation, message, task=task)

        return await self._write(write, rules.saved_changes)

    async def set_media(self, message_id: str, media: Media) -> StatusChange | None:
        """Record a message's media state, completing its download task."""

        def write() -> StatusChange | None:
            self._drop_task(rules.media_task_id(message_id))
            message = self._message("id", message_id)
            if message is None:
                return None
            updated = rules.with_media(message, media)
            self._put_message(updated, insert=False)
            return StatusChange(self._conversation(message.conversation_id), updated)

        return await self._write(write, rules.status_changes)

    async def claim_tasks(self, *, limit: int, kind: TaskKind, steal: bool = False) -> list[Task]:
        """Lease up to `limit` tasks whose lease ran out (all of them with `steal`)."""

        def write() -> list[Task]:
            now = now_ms()
            sql = "SELECT doc FROM outbox WHERE kind = ?"
            args: list[Any] = [kind]
            if not steal:
                sql += " AND lease_until <= ?"
                args.append(now)
            sql += " ORDER BY created_at, id LIMIT ?"
            rows = self._db.execute(sql, [*args, limit]).fetchall()
            claimed = []
            for (doc,) in rows:
                task = rules.task_from_doc(orjson.loads(doc))
                task = rules.leased(task, self.leases, now, attempts=task.attempts + 1)
                self._put_task(task)
                claimed.append(task)
            return claimed

        return await self._write(write, _no_changes)

    async def mark_sending(self, task: Task) -> bool:
        """Record that the POST is about to start, while this process holds the task."""

        def write() -> bool:
            now = now_ms()
            held = self._task(task.id)
            if held is None or held.state != "pending":
                return False
            if not rules.claimable(held, self.leases.owner, now, steal=False):
                return False
            self._put_task(rules.leased(held, self.leases, now, state="sending"))
            return True

        return await self._write(write, _no_changes)

    async def renew_tasks(self, task_ids: Sequence[str]) -> None:
        """Extend this process's leases on these tasks."""

        def write() -> None:
            now = now_ms()
            for task_id in task_ids:
                held = self._task(task_id)
                if held is not None and held.owner == self.leases.owner:
                    self._put_task(rules.leased(held, self.leases, now))

        await self._write(write, _no_changes)

    async def release_tasks(self, task_ids: Sequence[str]) -> None:
        """Give up this process's leases on these tasks."""

        def write() -> None:
            for task_id in task_ids:
                held = self._task(task_id)
                if held is not None and held.owner == self.leases.owner:
                    self._put_task(dataclasses.replace(held, lease_until=0))

        await self._write(write, _no_changes)

    async def finish_task(self, task: Task) -> None:
        """Drop the task if it is still the same one."""

        def write() -> None:
            held = self._task(task.id)
            if held is not None and held.message_id == task.message_id:
                self._drop_task(task.id)

        await self._write(write, _no_changes)

    async def retry_send(self, message_id: str) -> Saved:
        """Queue a failed reply again with a new send task."""

        def write() -> Saved:
            message = self._message("id", message_id)
            if message is None:
                raise NotFound(f"no message {message_id!r}")
            queued = rules.retried(message)
            self._put_message(queued, insert=False)
            conversation = self._conversation(message.conversation_id)
            after = rules.after_status(conversation, queued, now_ms())
            if after is not conversation:
                self._put_conversation(after)
            task = rules.send_task(queued, self.leases, now_ms())
            self._put_task(task)
            return Saved(after, queued, task=task)

        return await self._write(
            write, lambda s: rules.status_changes(StatusChange(s.conversation, s.message))
        )

    def _message(self, where: str, arg: str) -> Message | None:
        row = self._db.execute(f"SELECT doc FROM messages WHERE {where} = ?", (arg,)).fetchone()
        return rules.message_from_doc(orjson.loads(row[0])) if row else None

    def _deliver(
        self,
        message: Message | None,
        status: str,
        wa_message_id: str | None,
        error: MessageError | None,
    ) -> StatusChange | None:
        if message is None:
            return None
        if message.direction == "out" and status != "queued":
            self._drop_task(rules.send_task_id(message.id))  # the send's outcome is in
        updated = rules.with_delivery(message, status, wa_message_id, error)
        if updated is None:
            return None
        self._put_message(updated, insert=False)
        conversation = self._conversation(message.conversation_id)
        after = rules.after_status(conversation, updated, now_ms())
        if after is not conversation:
            self._put_conversation(after)
        return StatusChange(after, updated)

    async def set_delivery(
        self,
        message_id: str,
        *,
        status: str,
        wa_message_id: str | None = None,
        error: MessageError | None = None,
    ) -> StatusChange | None:
        """Record the outcome of sending an outbound message."""
        return await self._write(
            lambda: self._deliver(self._message("id", message_id), status, wa_message_id, error),
            rules.status_changes,
        )

    async def apply_status(
        self, wa_message_id: str, status: str, error: MessageError | None
    ) -> StatusChange | None:
        """Apply a WhatsApp status to the outbound message it names."""

        def write() -> StatusChange | None:
            message = self._message("wa_message_id", wa_message_id)
            if message is None:
                raise UnknownMessage(f"no message with WhatsApp id {wa_message_id!r}")
            return self._deliver(message, status, None, error)

        return await self._write(write, rules.status_changes)

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

        def write() -> Conversation:
            conversation = self._conversation(conversation_id)
            updated = rules.updated(
                conversation,
                status=status,
                ai_enabled=ai_enabled,
                assignee=assignee,
                mark_read=mark_read,
                now=now_ms(),
            )
            self._put_conversation(updated)
            return updated

        return await self._write(write, rules.conversation_changes)

    async def delete_conversation(self, conversation_id: str) -> Conversation:
        """Erase a conversation, its messages and their tasks in one transaction."""

        def write() -> Conversation:
            conversation = self._conversation(conversation_id)
            db = self._db
            message_ids = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM messages WHERE conversation_id = ?", (conversation_id,)
                )
            ]
            db.executemany(
                "DELETE FROM outbox WHERE id = ?",
                [(rules.send_task_id(m),) for m in message_ids]
                + [(rules.ai_task_id(conversation_id),)],
            )
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            return conversation

        return await self._write(write, lambda c: [Change(c, removed=True)])

    async def import_conversations(
        self, conversations: Sequence[Conversation], messages: Sequence[Message]
    ) -> None:
        """Bulk-load conversations and messages in one transaction, messages in time order.

        Each table gets one INSERT of all its rows (from a JSON array): the full-text
        triggers then write their index once for the statement. Row by row, FTS5 writes a
        new segment per row and merges them: 60 µs a message instead of 3.
        """

        def write() -> None:
            db = self._db
            db.executemany(
                "INSERT OR IGNORE INTO users (id, name, phone, channel, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(c.user_id, c.user_name, c.phone, c.channel, c.created_at) for c in conversations],
            )
            rows = [
                (
                    c.id,
                    c.user_id,
                    c.status,
                    c.last_activity,
                    c.created_at,
                    _dump(rules.conversation_to_doc(c)),
                )
                for c in conversations
            ]
            db.execute(
                "INSERT INTO conversations (id, user_id, status, last_activity, created_at, doc)"
                " SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4,"
                " value ->> 5 FROM json_each(?)",
                (orjson.dumps(rows),),
            )
            ordered = sorted(messages, key=lambda m: (m.at, m.id))
            db.execute(
                "INSERT INTO messages (id, conversation_id, at, wa_message_id, doc)"
                " SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4"
                " FROM json_each(?)",
                (
                    orjson.dumps(
                        [
                            (
                                m.id,
                                m.conversation_id,
                                m.at,
                                m.wa_message_id,
                                _dump(rules.message_to_doc(m)),
                            )
                            for m in ordered
                        ]
                    ),
                ),
            )

        await self._write(write, lambda _: [Change(c, announce=False) for c in conversations])
