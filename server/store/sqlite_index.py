"""The embedded store's read side for a large inbox: prepared list rows, counts and
full-text search, kept by triggers in the transaction of every write.

The store's write code knows nothing of them; the schema does:

- `conversations.body`: the conversation as the list serves it (the API's JSON), so a
  page past the snapshot's window is a keyset read of prepared bytes, like a page inside.
- `conversation_counts`: conversations per status, so the list's `total` is a read of a
  few rows at any size (`count(*)` walks an index: 40 ms at a million).
- indexes in list order by status, by the business number written to and by assignee
  (the tabs, the number filter, Mine and Unassigned past the window).
- `message_search`: FTS5 over message text and media captions, folded by
  server/search.py (Arabic diacritics and letter variants, the article, case, accents),
  stemmed (porter) for English. Contentless: it holds the index, not the text again.
- `conversation_search`: FTS5 over customers' names (folded words) and numbers (every
  suffix of the digits, so a prefix query finds any part of a number).

The triggers call Python functions registered on each connection (`register`): the
folding is the one of server/search.py, the same for the index and the query. A
connection without them (the sqlite3 shell) can read the database but not write to it.

An existing database gets all of this on its first start with this code (`migrate`):
one pass over its conversations and messages, logged. Changing `fold` changes what the
indexes hold: bump SCHEMA_VERSION, and the next start rebuilds them.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any, Final

import orjson
import structlog

from server import search
from server.models import dumps
from server.search import Query
from server.store import rules
from server.store.base import UNSET, ListEntry, MessageHit, SnapshotEntry, Unset

log = structlog.get_logger(__name__)

# PRAGMA user_version of a database whose read side is current (2: the assignee's index).
SCHEMA_VERSION: Final = 2

TRIGGERS: Final = (
    "conversation_counts_insert",
    "conversation_counts_update",
    "conversation_counts_delete",
    "conversations_body_insert",
    "conversations_body_update",
    "conversation_search_insert",
    "conversation_search_update",
    "conversation_search_delete",
    "message_search_insert",
    "message_search_delete",
)

# No INSERT OR IGNORE in a trigger: the statement that fires it imposes its own conflict
# policy (an upsert's is ABORT), so the trigger checks for the row instead.
SCHEMA: Final = """
CREATE INDEX IF NOT EXISTS conversations_by_status
    ON conversations (status, last_activity DESC, id);
CREATE INDEX IF NOT EXISTS conversations_by_number
    ON conversations (json_extract(doc, '$.phone_number_id'), last_activity DESC, id);
CREATE INDEX IF NOT EXISTS conversations_by_assignee
    ON conversations (json_extract(doc, '$.assignee'), last_activity DESC, id);
CREATE TABLE IF NOT EXISTS conversation_counts (
    status TEXT PRIMARY KEY,
    n INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER conversation_counts_insert AFTER INSERT ON conversations BEGIN
    INSERT INTO conversation_counts (status, n) SELECT new.status, 0
        WHERE NOT EXISTS (SELECT 1 FROM conversation_counts WHERE status = new.status);
    UPDATE conversation_counts SET n = n + 1 WHERE status = new.status;
END;
CREATE TRIGGER conversation_counts_update AFTER UPDATE OF status ON conversations
WHEN old.status IS NOT new.status BEGIN
    UPDATE conversation_counts SET n = n - 1 WHERE status = old.status;
    INSERT INTO conversation_counts (status, n) SELECT new.status, 0
        WHERE NOT EXISTS (SELECT 1 FROM conversation_counts WHERE status = new.status);
    UPDATE conversation_counts SET n = n + 1 WHERE status = new.status;
END;
CREATE TRIGGER conversation_counts_delete AFTER DELETE ON conversations BEGIN
    UPDATE conversation_counts SET n = n - 1 WHERE status = old.status;
END;
CREATE TRIGGER conversations_body_insert AFTER INSERT ON conversations BEGIN
    UPDATE conversations SET body = list_row(new.doc) WHERE rowid = new.rowid;
END;
CREATE TRIGGER conversations_body_update AFTER UPDATE OF doc ON conversations BEGIN
    UPDATE conversations SET body = list_row(new.doc) WHERE rowid = new.rowid;
END;
CREATE VIRTUAL TABLE IF NOT EXISTS conversation_search
    USING fts5(names, digits, tokenize = 'unicode61 remove_diacritics 2');
CREATE TRIGGER conversation_search_insert AFTER INSERT ON conversations BEGIN
    INSERT INTO conversation_search (rowid, names, digits) VALUES (
        new.rowid,
        customer_names(json_extract(new.doc, '$.user_name')),
        customer_digits(json_extract(new.doc, '$.phone'))
    );
END;
CREATE TRIGGER conversation_search_update AFTER UPDATE OF doc ON conversations
WHEN json_extract(old.doc, '$.user_name') IS NOT json_extract(new.doc, '$.user_name')
    OR json_extract(old.doc, '$.phone') IS NOT json_extract(new.doc, '$.phone')
BEGIN
    UPDATE conversation_search SET
        names = customer_names(json_extract(new.doc, '$.user_name')),
        digits = customer_digits(json_extract(new.doc, '$.phone'))
    WHERE rowid = new.rowid;
END;
CREATE TRIGGER conversation_search_delete AFTER DELETE ON conversations BEGIN
    DELETE FROM conversation_search WHERE rowid = old.rowid;
END;
CREATE VIRTUAL TABLE IF NOT EXISTS message_search
    USING fts5(body, content = '', tokenize = 'porter unicode61 remove_diacritics 2');
CREATE TRIGGER message_search_insert AFTER INSERT ON messages BEGIN
    INSERT INTO message_search (rowid, body)
    SELECT new.rowid, folded FROM (
        SELECT search_text(
            json_extract(new.doc, '$.text'), json_extract(new.doc, '$.media.caption')
        ) AS folded
    ) WHERE folded IS NOT NULL;
END;
CREATE TRIGGER message_search_delete AFTER DELETE ON messages BEGIN
    INSERT INTO message_search (message_search, rowid, body)
    SELECT 'delete', old.rowid, folded FROM (
        SELECT search_text(
            json_extract(old.doc, '$.text'), json_extract(old.doc, '$.media.caption')
        ) AS folded
    ) WHERE folded IS NOT NULL;
END;
"""

# What an old database is given once: every part of the read side, from its rows.
BACKFILL: Final = (
    "DELETE FROM conversation_counts",
    "INSERT INTO conversation_counts (status, n)"
    " SELECT status, count(*) FROM conversations GROUP BY status",
    "UPDATE conversations SET body = list_row(doc)",
    "DELETE FROM conversation_search",
    "INSERT INTO conversation_search (rowid, names, digits)"
    " SELECT rowid, customer_names(json_extract(doc, '$.user_name')),"
    " customer_digits(json_extract(doc, '$.phone')) FROM conversations",
    "INSERT INTO message_search (message_search) VALUES ('delete-all')",
    "INSERT INTO message_search (rowid, body) SELECT rowid, folded FROM ("
    " SELECT rowid, search_text(json_extract(doc, '$.text'),"
    " json_extract(doc, '$.media.caption')) AS folded FROM messages"
    ") WHERE folded IS NOT NULL",
)


def _list_row(doc: str) -> bytes:
    return dumps(rules.conversation_from_doc(orjson.loads(doc)).to_json())


def _search_text(text: str | None, caption: str | None) -> str | None:
    folded = search.index_text(f"{text or ''} {caption or ''}")
    return folded or None


def _customer_names(name: str | None) -> str:
    return search.index_text(name or "")


def _customer_digits(phone: str | None) -> str:
    return search.suffixes(search.digits(phone or ""))


def register(conn: sqlite3.Connection) -> None:
    """The functions the triggers and queries call, on one connection."""
    conn.create_function("list_row", 1, _list_row, deterministic=True)
    conn.create_function("search_text", 2, _search_text, deterministic=True)
    conn.create_function("customer_names", 1, _customer_names, deterministic=True)
    conn.create_function("customer_digits", 1, _customer_digits, deterministic=True)


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the read side up to SCHEMA_VERSION (nothing to do on a current database)."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version >= SCHEMA_VERSION:
        return
    started = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(conversations)")}
        if "body" not in columns:
            conn.execute("ALTER TABLE conversations ADD COLUMN body BLOB")
        for trigger in TRIGGERS:
            conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        for statement in _statements(SCHEMA):
            conn.execute(statement)
        for statement in BACKFILL:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    (conversations,) = conn.execute("SELECT count(*) FROM conversations").fetchone()
    log.info(
        "store.migrated",
        version=SCHEMA_VERSION,
        conversations=conversations,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
    )


def _statements(script: str) -> list[str]:
    """The statements of a script (a trigger's body holds semicolons of its own)."""
    out, current = [], ""
    for line in script.strip().splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return out


# -- reads --------------------------------------------------------------------------------

# The keyset after (last_activity, id) in list order (newest activity first, then id): the
# first condition lets the index seek straight to the page.
_AFTER: Final = "c.last_activity <= ? AND (c.last_activity < ? OR c.id > ?)"
_ENTRY: Final = "c.id, c.last_activity, coalesce(c.body, list_row(c.doc))"


# The business number a conversation was written to, and the agent it is assigned to (the
# expressions of their indexes).
_NUMBER: Final = "json_extract(c.doc, '$.phone_number_id') = ?"
_ASSIGNEE: Final = "json_extract(c.doc, '$.assignee')"


def _keyset(
    after: tuple[int, str] | None,
    status: str | None,
    where: list[str],
    args: list[Any],
    number: str | None = None,
    assignee: str | Unset | None = UNSET,
) -> None:
    if after is not None:
        where.append(_AFTER)
        args += [after[0], after[0], after[1]]
    if status is not None:
        where.append("c.status = ?")
        args.append(status)
    if number is not None:
        where.append(_NUMBER)
        args.append(number)
    if isinstance(assignee, Unset):
        return
    if assignee is None:
        where.append(f"{_ASSIGNEE} IS NULL")
    else:
        where.append(f"{_ASSIGNEE} = ?")
        args.append(assignee)


def entries_after(
    conn: sqlite3.Connection,
    after: tuple[int, str] | None,
    limit: int,
    status: str | None,
    number: str | None = None,
    assignee: str | Unset | None = UNSET,
) -> list[ListEntry]:
    """A keyset page of prepared list rows (an index seek and `limit` rows)."""
    where: list[str] = []
    args: list[Any] = []
    _keyset(after, status, where, args, number, assignee)
    sql = f"SELECT {_ENTRY} FROM conversations c"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY c.last_activity DESC, c.id LIMIT ?"
    return [ListEntry(*row) for row in conn.execute(sql, [*args, limit])]


def snapshot_entries(
    conn: sqlite3.Connection, after: tuple[int, str] | None, limit: int
) -> list[SnapshotEntry]:
    """A keyset page of what the snapshot holds of each conversation: its prepared row and
    the few fields it filters on (5 µs a conversation; 35 µs from the whole document)."""
    where: list[str] = []
    args: list[Any] = []
    _keyset(after, None, where, args)
    sql = (
        "SELECT c.id, c.last_activity, c.status, c.doc ->> '$.updated_at',"
        " coalesce(c.doc ->> '$.user_name', ''), coalesce(c.doc ->> '$.phone', ''),"
        " c.doc ->> '$.phone_number_id', coalesce(c.body, list_row(c.doc)),"
        " c.doc ->> '$.assignee'"
        " FROM conversations c"
    )
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY c.last_activity DESC, c.id LIMIT ?"
    return [
        SnapshotEntry(cid, at, status, int(updated or 0), name, phone, number, body, assignee)
        for cid, at, status, updated, name, phone, number, body, assignee in conn.execute(
            sql, [*args, limit]
        )
    ]


def totals(conn: sqlite3.Connection) -> dict[str, int]:
    """Conversations per status, as the triggers keep them."""
    return {status: n for status, n in conn.execute("SELECT status, n FROM conversation_counts")}


def search_customers(
    conn: sqlite3.Connection,
    query: Query,
    after: tuple[int, str] | None,
    limit: int,
    status: str | None,
    number: str | None = None,
    assignee: str | Unset | None = UNSET,
) -> list[ListEntry]:
    """Conversations whose customer matches, in list order after the keyset.

    The index is read first (CROSS JOIN keeps it the outer loop): the matches are sorted,
    so the cost follows how many customers match, not how many conversations there are.
    """
    match = search.fts_match_customers(query)
    if match is None:
        return []
    where = ["conversation_search MATCH ?"]
    args: list[Any] = [match]
    _keyset(after, status, where, args, number, assignee)
    sql = (
        f"SELECT {_ENTRY} FROM conversation_search s"
        " CROSS JOIN conversations c ON c.rowid = s.rowid"
        f" WHERE {' AND '.join(where)}"
        " ORDER BY c.last_activity DESC, c.id LIMIT ?"
    )
    return [ListEntry(*row) for row in conn.execute(sql, [*args, limit])]


def count_entries(
    conn: sqlite3.Connection,
    query: Query | None,
    status: str | None,
    number: str | None,
    assignee: str | Unset | None = UNSET,
) -> int:
    """How many conversations `search_customers` (or `entries_after`, without a query)
    finds in all."""
    where: list[str] = []
    args: list[Any] = []
    _keyset(None, status, where, args, number, assignee)
    if query is None:
        sql = "SELECT count(*) FROM conversations c"
    else:
        match = search.fts_match_customers(query)
        if match is None:
            return 0
        if not where:
            sql = "SELECT count(*) FROM conversation_search WHERE conversation_search MATCH ?"
            (n,) = conn.execute(sql, (match,)).fetchone()
            return int(n)
        sql = (
            "SELECT count(*) FROM conversation_search s"
            " CROSS JOIN conversations c ON c.rowid = s.rowid"
        )
        where.insert(0, "conversation_search MATCH ?")
        args.insert(0, match)
    if where:
        sql += " WHERE " + " AND ".join(where)
    (n,) = conn.execute(sql, args).fetchone()
    return int(n)


def search_messages(
    conn: sqlite3.Connection, query: Query, before: int | None, limit: int
) -> list[MessageHit]:
    """Messages whose text matches, newest first (by when they were stored: the index's
    rowid is the message's), with their conversations.

    FTS5 walks the matches in descending rowid order and stops after `limit`: the cost
    follows the page, not how many messages match.
    """
    match = search.fts_match_messages(query)
    if match is None:
        return []
    sql = (
        "SELECT s.rowid, m.doc, c.id, c.last_activity, coalesce(c.body, list_row(c.doc))"
        " FROM message_search s"
        " CROSS JOIN messages m ON m.rowid = s.rowid"
        " CROSS JOIN conversations c ON c.id = m.conversation_id"
        " WHERE message_search MATCH ?"
    )
    args: list[Any] = [match]
    if before is not None:
        sql += " AND s.rowid < ?"
        args.append(before)
    sql += " ORDER BY s.rowid DESC LIMIT ?"
    args.append(limit)
    return [
        MessageHit(
            position=rowid,
            message=rules.message_from_doc(orjson.loads(doc)),
            conversation=ListEntry(conversation_id, last_activity, body),
        )
        for rowid, doc, conversation_id, last_activity, body in conn.execute(sql, args)
    ]
