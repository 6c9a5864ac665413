"""The embedded store: SQLite in WAL mode, every statement on one dedicated thread.

One connection on one thread serialises writes without locks and keeps the event loop free.
After each commit the store calls its listeners on the event loop: that is the change feed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson
import structlog

from server.models import Conversation, Message, MessageError, now_ms
from server.store import rules
from server.store.base import (
    UNSET,
    Change,
    ChangeFeed,
    ChangeListener,
    InboundMessage,
    NotFound,
    Saved,
    StatusChange,
    StoreUnavailable,
    UnknownMessage,
    Unset,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")
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
"""


def _dump(doc: dict[str, Any]) -> str:
    return orjson.dumps(doc).decode()


def _where_assignee(where: list[str], args: list[Any], assignee: str | Unset | None) -> None:
    """Filter by assignee. The snapshot holds every conversation of this store, so this is
    read only by the store's own callers, never for the list: no index is needed."""
    if isinstance(assignee, Unset):
        return
    if assignee is None:
        where.append("json_extract(doc, '$.assignee') IS NULL")
    else:
        where.append("json_extract(doc, '$.assignee') = ?")
        args.append(assignee)


class SqliteStore:
    """ChatStore on an embedded SQLite file (or ':memory:')."""

    name = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
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

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, set WAL mode and create the schema."""
        self._loop = asyncio.get_running_loop()
        await self._run(self._open)

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across application crashes in WAL mode; only a power cut can
        # lose the last transactions, and Meta redelivers any webhook we did not answer.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        self._conn = conn

    async def close(self) -> None:
        """Close the connection and the store's thread."""
        self._subscribers.clear()
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        await asyncio.to_thread(self._executor.shutdown, wait=True)

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

    # -- change feed --------------------------------------------------------------------

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        """Call `listener` on the event loop after every commit."""
        return self._subscribers.subscribe(listener)

    # -- reads ------------------------------------------------------------------------

    async def load_window(self, limit: int | None) -> list[Conversation]:
        """The newest `limit` conversations (all when None)."""
        return await self.page_after(None, limit if limit is not None else -1, None)

    async def page_after(
        self,
        after: tuple[int, str] | None,
        limit: int,
        status: str | None,
        *,
        assignee: str | Unset | None = UNSET,
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
            _where_assignee(where, args, assignee)
            sql = "SELECT doc FROM conversations"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY last_activity DESC, id LIMIT ?"
            rows = self._db.execute(sql, [*args, limit]).fetchall()
            return [rules.conversation_from_doc(orjson.loads(r[0])) for r in rows]

        return await self._run(read)

    async def count(self, status: str | None, *, assignee: str | Unset | None = UNSET) -> int:
        """How many conversations (with that status and assignee) there are."""

        def read() -> int:
            where: list[str] = []
            args: list[Any] = []
            if status is not None:
                where.append("status = ?")
                args.append(status)
            _where_assignee(where, args, assignee)
            sql = "SELECT count(*) FROM conversations"
            if where:
                sql += " WHERE " + " AND ".join(where)
            row = self._db.execute(sql, args).fetchone()
            return int(row[0])

        return await self._run(read)

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

    async def save_inbound(self, inbound: InboundMessage) -> Saved | None:
        """Store a customer's message and its summary in one transaction."""

        def write() -> Saved | None:
            db = self._db
            if db.execute(
                "SELECT 1 FROM messages WHERE wa_message_id = ?", (inbound.wa_message_id,)
            ).fetchone():
                return None
            now = now_ms()
            db.execute(
                "INSERT INTO users (id, name, phone, channel, created_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET name = excluded.name, phone = excluded.phone",
                (inbound.user_id, inbound.user_name, inbound.phone, inbound.channel, now),
            )
            row = db.execute(
                "SELECT doc FROM conversations WHERE user_id = ?"
                " ORDER BY created_at DESC, id DESC LIMIT 1",
                (inbound.user_id,),
            ).fetchone()
            latest = rules.conversation_from_doc(orjson.loads(row[0])) if row else None
            created = rules.needs_new_conversation(latest)
            if created or latest is None:
                latest = rules.open_conversation(inbound, now)
            else:
                latest = latest.with_changes(user_name=inbound.user_name, phone=inbound.phone)
            message = rules.inbound_message(inbound, latest.id)
            conversation = rules.after_message(latest, message, now)
            self._put_conversation(conversation)
            self._put_message(message, insert=True)
            return Saved(conversation, message, new_conversation=created)

        return await self._write(write, lambda s: [Change(s.conversation, local=True)] if s else [])

    async def save_outbound(
        self,
        conversation_id: str,
        *,
        sender: str,
        text: str,
        agent_id: str | None = None,
        take_over: bool = False,
    ) -> Saved:
        """Store an AI or agent reply as queued."""

        def write() -> Saved:
            conversation = self._conversation(conversation_id)
            rules.check_reply(conversation, sender)
            now = rules.reply_time(conversation, now_ms())
            message = rules.outbound_message(conversation_id, sender, text, agent_id, now)
            conversation = rules.after_message(conversation, message, now)
            if take_over:
                conversation = conversation.with_changes(ai_enabled=False)
            self._put_conversation(conversation)
            self._put_message(message, insert=True)
            return Saved(conversation, message)

        return await self._write(write, lambda s: [Change(s.conversation, local=True)])

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
        updated = rules.with_delivery(message, status, wa_message_id, error)
        if updated is None:
            return None
        self._put_message(updated, insert=False)
        conversation = self._conversation(message.conversation_id)
        after = rules.after_status(conversation, updated, now_ms())
        if after is not conversation:
            self._put_conversation(after)
        return StatusChange(after, updated)

    @staticmethod
    def _status_changes(result: StatusChange | None) -> list[Change]:
        if result is None:
            return []
        last = result.conversation.last_message
        # Only the list's tick changed when this was the last message; otherwise nothing.
        return (
            [Change(result.conversation, local=True)]
            if last and last.id == result.message.id
            else []
        )

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
            self._status_changes,
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

        return await self._write(write, self._status_changes)

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

        return await self._write(write, lambda c: [Change(c, local=True)])

    async def import_conversations(
        self, conversations: Sequence[Conversation], messages: Sequence[Message]
    ) -> None:
        """Bulk-load conversations and messages in one transaction."""

        def write() -> None:
            db = self._db
            db.executemany(
                "INSERT OR IGNORE INTO users (id, name, phone, channel, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(c.user_id, c.user_name, c.phone, c.channel, c.created_at) for c in conversations],
            )
            db.executemany(
                "INSERT INTO conversations (id, user_id, status, last_activity, created_at, doc)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        c.id,
                        c.user_id,
                        c.status,
                        c.last_activity,
                        c.created_at,
                        _dump(rules.conversation_to_doc(c)),
                    )
                    for c in conversations
                ],
            )
            db.executemany(
                "INSERT INTO messages (id, conversation_id, at, wa_message_id, doc)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    (m.id, m.conversation_id, m.at, m.wa_message_id, _dump(rules.message_to_doc(m)))
                    for m in messages
                ],
            )

        await self._write(write, lambda _: [Change(c, local=True) for c in conversations])
