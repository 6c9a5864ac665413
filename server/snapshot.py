"""The unified chat list in memory: conversation summaries kept in list order.

Order is `(last_activity desc, id asc)`. Each row holds its summary already encoded as
JSON, so serving a page is a bisect, a slice and a join of bytes: no per-request encoding.
Rows use slots and keep only what ordering, filtering and serving need (the memory budget
is 1 KiB a conversation, measured in bench/).

With a window (the default on both stores) it holds only the newest conversations: memory
and start-up time stay the same at any size, and older pages come from the store.
"""

from __future__ import annotations

import heapq
import sys
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from server import search
from server.models import CONVERSATION_STATUSES, Conversation, dumps
from server.store.base import UNSET, Change, SnapshotEntry, Unset

ALL: Final = "all"
# An assignee filter: an agent's id, None for unassigned, UNSET for no filter.
Assignee = str | None | Unset
Group = tuple[str, str | None]


def _interned(value: str | None) -> str | None:
    return sys.intern(value) if value is not None else None


def sort_key(last_activity: int, conversation_id: str) -> tuple[int, str]:
    """The ascending sort key of the list order (newest activity first, then id)."""
    return (-last_activity, conversation_id)


class Row:
    """One conversation in the snapshot."""

    __slots__ = ("assignee", "body", "id", "key", "number", "search", "status", "updated_at")

    def __init__(self, conversation: Conversation) -> None:
        self.id = conversation.id
        self.key = sort_key(conversation.last_activity, conversation.id)
        self.status = sys.intern(conversation.status)
        self.updated_at = conversation.updated_at
        # Agents search by customer name or phone number; fold once, here.
        self.search = search.customer_key(conversation.user_name, conversation.phone)
        # The business number the customer wrote to (the list's number filter), and the
        # agent it is assigned to (the Mine and Unassigned tabs): interned, one copy each.
        self.number = _interned(conversation.phone_number_id)
        self.assignee = _interned(conversation.assignee)
        self.body = dumps(conversation.to_json())

    @classmethod
    def from_entry(cls, entry: SnapshotEntry) -> Row:
        """The row of a conversation as a store keeps it prepared."""
        row = cls.__new__(cls)
        row.id = entry.id
        row.key = sort_key(entry.last_activity, entry.id)
        row.status = sys.intern(entry.status)
        row.updated_at = entry.updated_at
        row.search = search.customer_key(entry.user_name, entry.phone)
        row.number = _interned(entry.phone_number_id)
        row.assignee = _interned(entry.assignee)
        row.body = entry.body
        return row

    def __lt__(self, other: Row) -> bool:
        return self.key < other.key

    @property
    def last_activity(self) -> int:
        """Milliseconds of the conversation's latest activity."""
        return -self.key[0]

    @property
    def cursor_key(self) -> tuple[int, str]:
        """The `(last_activity, id)` a cursor after this row encodes."""
        return (-self.key[0], self.key[1])


class Listed(Protocol):
    """What a page is made of: a snapshot row, or a store's entry past the window."""

    @property
    def body(self) -> bytes:
        """The conversation's JSON."""

    @property
    def cursor_key(self) -> tuple[int, str]:
        """The `(last_activity, id)` a cursor after it encodes."""


@dataclass(slots=True, frozen=True)
class Page:
    """One page of the list and where it stands in it."""

    rows: Sequence[Row]
    has_more: bool
    total: int
    # True when the page ran past the rows held in memory of a snapshot that holds only
    # the newest conversations (a bounded window): the rest comes from the store.
    past_window: bool = False


class _Index:
    """Rows sorted by key: a bisect finds a row, a memmove inserts or removes it."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, row: Row) -> None:
        insort(self.rows, row)

    def remove(self, row: Row) -> None:
        i = bisect_left(self.rows, row)
        if i < len(self.rows) and self.rows[i] is row:
            del self.rows[i]
            return
        # Not where its key says: only possible after a bug; fall back to a scan.
        self.rows.remove(row)  # pragma: no cover

    def start_after(self, key: tuple[int, str] | None) -> int:
        if key is None:
            return 0
        return bisect_right(self.rows, key, key=lambda r: r.key)


class Snapshot:
    """The in-memory read model of the unified chat list.

    With a `window` it holds at most the newest `window` conversations: a conversation that
    moves into the window (a new message) pushes the oldest one out, and a change to one
    older than every row held is left to the store, which serves the pages past the window.
    """

    def __init__(self, *, complete: bool = True, window: int | None = None) -> None:
        self.window = window
        self._by_id: dict[str, Row] = {}
        self._all = _Index()
        self._by_status = {status: _Index() for status in CONVERSATION_STATUSES}
        # Rows by (status, assignee): the Mine and Unassigned tabs are a bisect and a slice
        # like the status tabs. An agent with no conversations has no index.
        self._by_group: dict[Group, _Index] = {}
        self.ready = False
        # False while the store is unreachable: pages are served, marked stale.
        self.fresh = True
        # False when the snapshot holds only a window of the newest conversations.
        self.complete = complete
        # Counts every applied batch of changes: what is cached from the store beside the
        # snapshot (its totals) is current while this has not moved.
        self.version = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, conversation_id: str) -> Row | None:
        """The row of one conversation, if the snapshot holds it."""
        return self._by_id.get(conversation_id)

    def rows(self) -> Sequence[Row]:
        """Every row in list order (read only)."""
        return self._all.rows

    def load(self, conversations: Iterable[Conversation], *, complete: bool = True) -> None:
        """Replace the whole content (the first load, or a resync) and mark it ready.

        A conversation read twice (a load in pages while it moved) keeps its newest version.
        """
        self.load_rows((Row(c) for c in conversations), complete=complete)

    def load_rows(self, loaded: Iterable[Row], *, complete: bool = True) -> None:
        """Replace the whole content with rows built as they were read (chunk by chunk, so
        no other copy of the window exists at once) and mark it ready. A conversation read
        twice keeps its newest version."""
        newest: dict[str, Row] = {}
        for row in loaded:
            held = newest.get(row.id)
            if held is None or row.updated_at >= held.updated_at:
                newest[row.id] = row
        rows = sorted(newest.values())
        if self.window is not None and len(rows) > self.window:
            del rows[self.window :]
            complete = False
        self._by_id = {r.id: r for r in rows}
        self._all.rows = rows
        for status, index in self._by_status.items():
            index.rows = [r for r in rows if r.status == status]
        self._by_group = {}
        for r in rows:
            self._by_group.setdefault((r.status, r.assignee), _Index()).rows.append(r)
        self.complete = complete
        self.ready = True
        self.fresh = True
        self.version += 1

    def apply(self, changes: Sequence[Change]) -> int:
        """Apply committed changes in order; returns how many changed the snapshot."""
        self.version += 1
        applied = 0
        for change in changes:
            if change.removed:
                applied += self._remove(change.conversation.id)
            else:
                applied += self._upsert(change.conversation)
        return applied

    def _index(self, status: str) -> _Index | None:
        return self._by_status.get(status)

    def _remove(self, conversation_id: str) -> int:
        row = self._by_id.pop(conversation_id, None)
        if row is None:
            return 0
        self._all.remove(row)
        index = self._index(row.status)
        if index is not None:
            index.remove(row)
        group = (row.status, row.assignee)
        grouped = self._by_group.get(group)
        if grouped is not None:
            grouped.remove(row)
            if not grouped.rows:
                del self._by_group[group]
        return 1

    def _upsert(self, conversation: Conversation) -> int:
        old = self._by_id.get(conversation.id)
        if old is not None and conversation.updated_at < old.updated_at:
            return 0  # an older version than what we hold: changes can cross on the wire
        key = sort_key(conversation.last_activity, conversation.id)
        rows = self._all.rows
        if old is None and not self.complete and (not rows or key > rows[-1].key):
            return 0  # older than the whole window: its page is read from the store
        if old is not None:
            self._remove(old.id)
        row = Row(conversation)
        self._by_id[row.id] = row
        self._all.add(row)
        index = self._index(row.status)
        if index is not None:
            index.add(row)
        self._by_group.setdefault((row.status, row.assignee), _Index()).add(row)
        if self.window is not None and len(self._by_id) > self.window:
            self._remove(rows[-1].id)  # pushed out of the window by a newer one
            self.complete = False
        return 1

    def page(
        self,
        *,
        limit: int,
        after: tuple[int, str] | None = None,
        status: str | None = None,
        q: str | None = None,
        number: str | None = None,
        assignee: Assignee = UNSET,
    ) -> Page:
        """Up to `limit` rows after the cursor key `(last_activity, id)`, in list order.

        `assignee` filters by agent id (None: unassigned), with or without a status.
        """
        if status == ALL:
            status = None
        key = sort_key(after[0], after[1]) if after is not None else None
        if isinstance(assignee, Unset):
            index = self._all if status is None else self._by_status[status]
            return self._page(index.rows, key, limit, q, number)
        statuses = CONVERSATION_STATUSES if status is None else (status,)
        groups = [self._by_group.get((s, assignee)) for s in statuses]
        lists = [g.rows for g in groups if g is not None]
        if len(lists) <= 1:
            return self._page(lists[0] if lists else [], key, limit, q, number)
        return self._merged_page(lists, key, limit, q, number)

    def _page(
        self,
        rows: list[Row],
        key: tuple[int, str] | None,
        limit: int,
        q: str | None,
        number: str | None,
    ) -> Page:
        if q or number:
            rows = _filtered(rows, q, number)
        start = 0 if key is None else bisect_right(rows, key, key=lambda r: r.key)
        chosen = rows[start : start + limit]
        has_more = start + limit < len(rows)
        # The page reached the end of the rows held in memory: when they are only the newest
        # window, the rest (or whether there is any) is in the store.
        past_window = not self.complete and not has_more
        return Page(rows=chosen, has_more=has_more, total=len(rows), past_window=past_window)

    def _merged_page(
        self,
        lists: list[list[Row]],
        key: tuple[int, str] | None,
        limit: int,
        q: str | None,
        number: str | None,
    ) -> Page:
        """A page over several sorted lists (an assignee across statuses): bisect each, then
        merge only the `limit` rows the page needs."""
        if q or number:
            lists = [_filtered(rows, q, number) for rows in lists]
        starts = [
            0 if key is None else bisect_right(rows, key, key=lambda r: r.key) for rows in lists
        ]
        heads = [rows[start : start + limit] for rows, start in zip(lists, starts, strict=True)]
        chosen = list(heapq.merge(*heads))[:limit]
        remaining = sum(len(rows) - start for rows, start in zip(lists, starts, strict=True))
        has_more = remaining > limit
        past_window = not self.complete and not has_more
        total = sum(len(rows) for rows in lists)
        return Page(rows=chosen, has_more=has_more, total=total, past_window=past_window)


def _filtered(rows: list[Row], q: str | None, number: str | None) -> list[Row]:
    """The rows written to `number` whose name or number matches `q`."""
    if number is not None:
        rows = [r for r in rows if r.number == number]
    if q:
        # Substring tests of each row's prepared key, one needle at a time over what the
        # last one kept: about 60 ns a row. A query of no word ("?!") finds nobody.
        needles = search.customer_needles(search.parse(q))
        rows = rows if needles else []
        for needle in needles:
            rows = [r for r in rows if needle in r.search]
    return rows


def render_page(
    rows: Sequence[Listed], next_cursor: str | None, has_more: bool, total: int, stale: bool
) -> bytes:
    """The JSON body of a list page, joined from the rows' prepared bytes."""
    cursor = b"null" if next_cursor is None else b'"' + next_cursor.encode() + b'"'
    return b"".join(
        (
            b'{"chats":[',
            b",".join(r.body for r in rows),
            b'],"next_cursor":',
            cursor,
            b',"has_more":',
            b"true" if has_more else b"false",
            b',"total":',
            str(total).encode(),
            b',"stale":',
            b"true" if stale else b"false",
            b"}",
        )
    )
