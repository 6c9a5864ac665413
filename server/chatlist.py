"""Pages of the unified chat list: from the snapshot, past its window from the store."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

import structlog

from server.cursor import CursorCodec
from server.snapshot import Assignee, Row, Snapshot, render_page
from server.store.base import UNSET, ChatStore

log = structlog.get_logger(__name__)

CURSOR_KIND: Final = "chats"


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
        assignee: Assignee = UNSET,
        number: str | None = None,
    ) -> ServedPage:
        """One page, rendered; NotReady until the snapshot is loaded."""
        started = time.perf_counter()
        if not self.snapshot.ready:
            raise NotReady()
        after = self.decode_cursor(cursor)
        page = self.snapshot.page(
            limit=limit, after=after, status=status, q=q, assignee=assignee, number=number
        )
        rows: list[Row] = list(page.rows)
        has_more, total, source = page.has_more, page.total, "snapshot"
        if page.past_window and not q and not number:
            rows, has_more, total = await self._from_store(rows, after, limit, status, assignee)
            source = "store"
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

    async def _from_store(
        self,
        rows: list[Row],
        after: tuple[int, str] | None,
        limit: int,
        status: str | None,
        assignee: Assignee,
    ) -> tuple[list[Row], bool, int]:
        """Fill a page that ran past the snapshot's window by a keyset read of the store."""
        need = limit - len(rows)
        key = rows[-1].cursor_key if rows else after
        if key is None and len(self.snapshot):
            key = self.snapshot.rows()[-1].cursor_key
        more = await self.store.page_after(key, need + 1, status, assignee=assignee)
        rows += [Row(c) for c in more[:need]]
        total = await self.store.count(status, assignee=assignee)
        return rows, len(more) > need, total
