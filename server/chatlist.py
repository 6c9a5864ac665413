"""Pages of the unified chat list (from the snapshot; past its window from the store) and
of message search results (from the store's full-text index)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

import structlog

from server import search
from server.cursor import CursorCodec
from server.models import dumps
from server.snapshot import Assignee, Listed, Snapshot, render_page, sort_key
from server.store.base import UNSET, ChatStore, ListEntry, MessageHit, Unset

log = structlog.get_logger(__name__)

CURSOR_KIND: Final = "chats"
SEARCH_CURSOR_KIND: Final = "message-search"

# Reads `limit` entries of the store after a keyset.
Fetch = Callable[[tuple[int, str] | None, int], Awaitable[list[ListEntry]]]


class NotReady(Exception):
    """The snapshot has not finished its first load: no partial list is ever served."""


@dataclass(slots=True, frozen=True)
class ServedPage:
    """A rendered page and what the log line says about it."""

    body: bytes
    chats: int
    source: str


class ChatList:
    """Serves list pages. The request path reads memory, never the store, inside the window."""

    def __init__(self, snapshot: Snapshot, store: ChatStore, cursors: CursorCodec) -> None:
        self.snapshot = snapshot
        self.store = store
        self.cursors = cursors
        # The store's counts per status, as of a snapshot version (see _total).
        self._totals: dict[str, int] | None = None
        self._totals_version = -1

    def decode_cursor(self, cursor: str | None) -> tuple[int, str] | None:
        """The keyset of a cursor (InvalidCursor when tampered with)."""
        return self.cursors.decode(CURSOR_KIND, cursor) if cursor else None

    async def page(
        self,
        *,
        limit: int,
        cursor: str | None,
        status: str | None,
        q: str | None,
        number: str | None = None,
        assignee: Assignee = UNSET,
    ) -> ServedPage:
        """One page, rendered; NotReady until the snapshot is loaded."""
        started = time.perf_counter()
        if not self.snapshot.ready:
            raise NotReady()
        after = self.decode_cursor(cursor)
        page = self.snapshot.page(
            limit=limit, after=after, status=status, q=q, number=number, assignee=assignee
        )
        rows: list[Listed] = list(page.rows)
        has_more, total, source = page.has_more, page.total, "snapshot"
        if q or number is not None or not isinstance(assignee, Unset):
            rows, has_more, total, source = await self._filtered(
                page.past_window, rows, has_more, total, after, limit, status, q, number, assignee
            )
        else:
            if page.past_window:
                rows, has_more = await self._past_window(
                    rows, after, limit, lambda key, n: self.store.list_entries(key, n, status)
                )
                source = "store"
            total = await self._total(status, total, page.past_window)
        next_cursor = (
            self.cursors.encode(CURSOR_KIND, rows[-1].cursor_key) if has_more and rows else None
        )
        body = render_page(rows, next_cursor, has_more, total, stale=not self.snapshot.fresh)
        log.info(
            "unified_chats.served",
            source=source,
            chats=len(rows),
            page="next" if cursor else "first",
            total=total,
            status=status or "all",
            assigned="any" if assignee is UNSET else ("none" if assignee is None else "agent"),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return ServedPage(body, len(rows), source)

    async def _filtered(
        self,
        past_window: bool,
        rows: list[Listed],
        has_more: bool,
        total: int,
        after: tuple[int, str] | None,
        limit: int,
        status: str | None,
        q: str | None,
        number: str | None,
        assignee: Assignee = UNSET,
    ) -> tuple[list[Listed], bool, int, str]:
        """A page searched by name or number (`q`), of one business number or of one
        assignee (Mine, Unassigned), continued past the window from the store's indexes,
        with the store's count of all matches."""
        query = search.parse(q) if q else None
        if q and not query:
            return [], False, 0, "snapshot"  # no word in it ("?!"): it matches nobody
        source = "snapshot"
        if past_window:
            if query is not None:
                rows, has_more = await self._past_window(
                    rows,
                    after,
                    limit,
                    lambda key, n: self.store.search_customers(
                        query, key, n, status, number, assignee=assignee
                    ),
                )
            else:
                rows, has_more = await self._past_window(
                    rows,
                    after,
                    limit,
                    lambda key, n: self.store.list_entries(
                        key, n, status, number, assignee=assignee
                    ),
                )
            source = "store"
        if not self.snapshot.complete:
            total = await self.store.count_entries(query, status, number, assignee=assignee)
        return rows, has_more, total, source

    async def _past_window(
        self, rows: list[Listed], after: tuple[int, str] | None, limit: int, fetch: Fetch
    ) -> tuple[list[Listed], bool]:
        """Fill a page that ran past the snapshot's window by a keyset read of the store.

        The snapshot holds every conversation up to its last row (the boundary), so the
        store is read after the last row served, or after the boundary when the page
        served none there: nothing is served twice, and nothing is skipped.
        """
        need = limit - len(rows)
        key = rows[-1].cursor_key if rows else self._after_boundary(after)
        more = await fetch(key, need + 1)
        rows += more[:need]
        return rows, len(more) > need

    def _after_boundary(self, after: tuple[int, str] | None) -> tuple[int, str] | None:
        """Where the store's part of a page starts when the snapshot served none of it."""
        held = self.snapshot.rows()
        if not held:
            return after
        boundary = held[-1].cursor_key
        if after is None or sort_key(*after) < sort_key(*boundary):
            return boundary
        return after

    async def _total(self, status: str | None, counted: int, past_window: bool) -> int:
        """How many conversations the list (with that status) holds in all.

        With the whole list in memory, what the snapshot counted. Past a window, the
        store's counts, read once per snapshot version (no store read while nothing
        changed). A store that would have to count (Firestore: reads billed per thousand
        entries) is asked only for pages past its window; inside, the window's count.
        """
        if self.snapshot.complete:
            return counted
        version = self.snapshot.version
        totals = self._totals if self._totals_version == version else None
        if totals is None:
            totals = await self.store.totals()
            if totals is None:
                return await self.store.count(status) if past_window else counted
            if version == self.snapshot.version:  # no change landed while it was read
                self._totals, self._totals_version = totals, version
        return sum(totals.values()) if status is None else totals.get(status, 0)

    async def messages(self, *, q: str, cursor: str | None, limit: int) -> bytes:
        """A page of messages whose text matches, newest first, each with its conversation
        and the part of it to show (SearchUnavailable when the store cannot search text)."""
        started = time.perf_counter()
        before = self.cursors.decode(SEARCH_CURSOR_KIND, cursor)[0] if cursor else None
        query = search.parse(q)
        hits = await self.store.search_messages(query, before, limit + 1) if query else []
        has_more = len(hits) > limit
        hits = hits[:limit]
        next_cursor = (
            self.cursors.encode(SEARCH_CURSOR_KIND, (hits[-1].position, hits[-1].message.id))
            if has_more
            else None
        )
        body = render_hits(hits, query, next_cursor, has_more)
        log.info(
            "message_search.served",
            hits=len(hits),
            page="next" if cursor else "first",
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return body


def render_hits(
    hits: Sequence[MessageHit], query: search.Query, next_cursor: str | None, has_more: bool
) -> bytes:
    """The JSON body of a page of message search results."""
    items = []
    for hit in hits:
        message = hit.message
        shown = message.text or (message.media.caption if message.media else None) or ""
        runs = [{"text": text, "match": match} for text, match in search.snippet(shown, query)]
        items.append(
            b'{"conversation":'
            + hit.conversation.body
            + b',"message":'
            + dumps(message.to_json())
            + b',"snippet":'
            + dumps(runs)
            + b"}"
        )
    return b"".join(
        (
            b'{"messages":[',
            b",".join(items),
            b'],"next_cursor":',
            dumps(next_cursor),
            b',"has_more":',
            b"true" if has_more else b"false",
            b"}",
        )
    )
