"""The SSE event hub: one entry point for publishing, ids, replay, bounded client buffers.

Every event gets an id `<instance>-<seq>`, ordered within this instance. A reconnecting
client names the last id it saw; the hub replays what followed from a bounded ring buffer,
or tells it to `resync` when it cannot. Loss is never silent.

Fan-out is the hot path (every message, times every open dashboard), so an event is
encoded once and written straight to each client's transport: no task switch and no
per-client copy. The socket write per client is what costs (a system call that wakes the
reader), so events published close together go out in one write per client: the first
event of a quiet moment is flushed at once, later ones at most every FLUSH_INTERVAL_S.
Each client's backlog is its transport's write buffer, bounded; a client whose buffer
outgrows the bound is stalled and is disconnected, so it never slows anyone else (it
reconnects with Last-Event-ID and resumes).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog

from server.models import dumps

log = structlog.get_logger(__name__)

# Events kept for replay. At a busy 100 messages/s this covers the 20 s a browser needs
# to notice a dropped connection and come back (retry: 3000 ms plus a slow network).
REPLAY_BUFFER: Final = 2048
# Bytes a client may have waiting, beyond what the kernel's socket buffer holds. A
# dashboard reads far faster than any inbox grows: about 500 events of a typical 1 KB; a
# client this far behind is stalled, and holding more would only grow memory.
CLIENT_BUFFER: Final = 512 * 1024
# Events held for a client between registering and its first write (the replay), while
# the stream's headers go out; the first write takes milliseconds.
PENDING_EVENTS: Final = 512
RETRY_MS: Final = 3000
# Writes to one client at most this often under load (a burst of webhooks): at 1,000
# messages a second and 50 dashboards that is 10,000 socket writes a second instead of
# 50,000. Invisible to a person; the first event after a quiet moment does not wait.
FLUSH_INTERVAL_S: Final = 0.005
# A Last-Event-ID sequence longer than this is not one of ours (ours have 16 digits until
# the year 2286), and parsing an arbitrarily long one would cost time or raise.
SEQ_DIGITS: Final = 20


@dataclass(slots=True, frozen=True)
class Event:
    """One published event, encoded once as its SSE frame (and as an HTTP/1.1 chunk)."""

    seq: int
    id: str
    name: str
    frame: bytes

    @property
    def chunk(self) -> bytes:
        """The frame as one chunk of a chunked HTTP/1.1 body."""
        return b"%x\r\n%s\r\n" % (len(self.frame), self.frame)


class Sink(Protocol):
    """Where a client's bytes go: the stream's asyncio transport."""

    def write(self, data: bytes) -> None:
        """Send (or buffer) bytes."""

    def is_closing(self) -> bool:
        """True once the connection is closing or closed."""

    def get_write_buffer_size(self) -> int:
        """Bytes written but not yet handed to the kernel."""

    def abort(self) -> None:
        """Close the connection now, dropping what is buffered."""


class Client:
    """One connected SSE stream."""

    __slots__ = (
        "chunked",
        "connected_at",
        "done",
        "id",
        "limit",
        "pending",
        "reason",
        "sent_upto",
        "sink",
    )

    def __init__(self, client_id: str, sink: Sink, *, chunked: bool, limit: int) -> None:
        self.id = client_id
        self.sink = sink
        # HTTP/1.1 streams are chunked: each write must be one whole chunk.
        self.chunked = chunked
        self.limit = limit
        # Events published before the stream's first write; None once it is live.
        self.pending: list[Event] | None = []
        # The newest event this client has been given (its backlog, then what follows).
        self.sent_upto = 0
        # Set when the stream must end (shutdown, stalled, gone); the handler waits on it.
        self.done = asyncio.Event()
        self.connected_at = time.monotonic()
        self.reason = "closed"

    def send(self, data: bytes) -> str | None:
        """Write now; the reason to drop the client when it cannot take it."""
        sink = self.sink
        if sink.is_closing():
            return "client_gone"
        if sink.get_write_buffer_size() > self.limit:
            return "slow_client"
        sink.write(data)
        return None

    def encode(self, events: list[Event]) -> bytes:
        """Events as this stream carries them: whole HTTP/1.1 chunks, or bare frames."""
        if self.chunked:
            return b"".join(e.chunk for e in events)
        return b"".join(e.frame for e in events)


def encode_frame(event_id: str, name: str, data: dict[str, Any]) -> bytes:
    """An SSE frame; compact JSON has no raw newlines, so one data line always suffices."""
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (event_id.encode(), name.encode(), dumps(data))


class Hub:
    """Fans events out to every connected client of this instance."""

    def __init__(
        self,
        instance_id: str,
        *,
        replay_buffer: int = REPLAY_BUFFER,
        client_buffer: int = CLIENT_BUFFER,
        pending_events: int = PENDING_EVENTS,
    ) -> None:
        self.instance_id = instance_id
        # Ids count on from the start time in microseconds, not from 0: an instance id can be
        # pinned (LIVECHAT_INSTANCE_ID), and a browser holding an id from before a restart
        # must get resync (its id is older than anything buffered here), never a replay of
        # the new process's events as if they followed what it saw.
        self._seq = time.time_ns() // 1000
        self._buffer: deque[Event] = deque(maxlen=replay_buffer)
        self._clients: dict[str, Client] = {}
        self._client_buffer = client_buffer
        self._pending_events = pending_events
        self._client_ids = itertools.count(1)
        # Published, not yet written to the live clients; the flush that writes them.
        self._batch: list[Event] = []
        self._flush_handle: asyncio.Handle | None = None
        self._last_flush = 0.0
        self.closed = False
        # Events published, by name (read by /metrics).
        self.broadcasts: Counter[str] = Counter()

    @property
    def clients(self) -> int:
        """How many clients are connected."""
        return len(self._clients)

    @property
    def last_event_id(self) -> str:
        """The id of the newest event (what a client that saw everything would send)."""
        return f"{self.instance_id}-{self._seq}"

    def publish(
        self,
        name: str,
        data: dict[str, Any],
        *,
        conversation_id: str | None = None,
        user_id: str | None = None,
    ) -> Event:
        """Publish one event to every client (server/broadcaster.py decides which).

        `user_id` (the customer's WhatsApp id, a phone number) is not logged: the
        conversation id says which conversation it was without naming the customer.
        """
        started = time.perf_counter()
        self._seq += 1
        event_id = f"{self.instance_id}-{self._seq}"
        event = Event(self._seq, event_id, name, encode_frame(event_id, name, data))
        self._buffer.append(event)
        self.broadcasts[name] += 1
        if self._clients:
            stalled: list[Client] = []
            for client in self._clients.values():
                pending = client.pending
                if pending is None:
                    continue  # live: the flush writes it
                if len(pending) >= self._pending_events:
                    stalled.append(client)
                else:
                    pending.append(event)
            for client in stalled:
                self.drop(client, "slow_client")
            self._batch.append(event)
            if self._flush_handle is None:
                loop = asyncio.get_running_loop()
                wait = self._last_flush + FLUSH_INTERVAL_S - time.monotonic()
                self._flush_handle = (
                    loop.call_later(wait, self.flush) if wait > 0 else loop.call_soon(self.flush)
                )
        log.info(
            "sse.broadcast",
            type=name,
            event_id=event_id,
            conversation_id=conversation_id,
            clients=len(self._clients),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return event

    def connect(
        self, last_event_id: str | None, sink: Sink, *, chunked: bool = True
    ) -> tuple[Client, list[Event] | None]:
        """Register a client; returns it and the events it missed (None: it must resync).

        The client holds later events until `go_live` (after the caller wrote the backlog),
        so nothing published in between is lost or written ahead of the backlog.
        """
        client_id = f"{self.instance_id}-c{next(self._client_ids)}"
        client = Client(client_id, sink, chunked=chunked, limit=self._client_buffer)
        backlog = self._replay(last_event_id) if last_event_id else []
        # Its backlog (or resync) covers everything up to now, flushed or not.
        client.sent_upto = self._seq
        if self.closed:
            # A request that slipped in during shutdown: end it now rather than leave a
            # stream that nothing will ever close.
            client.reason = "shutdown"
            client.done.set()
            return client, backlog
        self._clients[client.id] = client
        return client, backlog

    def go_live(self, client: Client) -> None:
        """Write what the client got while it was starting, then write events as they come."""
        pending, client.pending = client.pending, None
        if client.id not in self._clients or not pending:
            return
        reason = client.send(client.encode(pending))
        if reason is not None:
            self.drop(client, reason)
            return
        client.sent_upto = pending[-1].seq

    def flush(self) -> None:
        """Write the events published since the last flush to every live client at once."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._last_flush = time.monotonic()
        batch, self._batch = self._batch, []
        if not batch:
            return
        first, last = batch[0].seq, batch[-1].seq
        chunked = raw = b""
        stalled: list[tuple[Client, str]] = []
        for client in self._clients.values():
            if client.pending is not None or client.sent_upto >= last:
                continue
            if client.sent_upto >= first:
                # It joined during this batch and has its start already.
                data = client.encode([e for e in batch if e.seq > client.sent_upto])
            elif client.chunked:
                chunked = chunked or b"".join(e.chunk for e in batch)
                data = chunked
            else:
                raw = raw or b"".join(e.frame for e in batch)
                data = raw
            # Client.send, inlined: this loop runs once per client per flush.
            sink = client.sink
            if sink.is_closing():
                stalled.append((client, "client_gone"))
            elif sink.get_write_buffer_size() > client.limit:
                stalled.append((client, "slow_client"))
            else:
                sink.write(data)
                client.sent_upto = last
        for client, reason in stalled:
            self.drop(client, reason)

    def _replay(self, last_event_id: str) -> list[Event] | None:
        instance, dash, seq_text = last_event_id.rpartition("-")
        if not dash or instance != self.instance_id:
            return None  # another instance, or a server that restarted: cannot replay
        # The header is the client's to choose: isdigit() alone also accepts digits int()
        # refuses ('²'), and int() refuses more than 4,300 digits. Our ids have about 16.
        if not (seq_text.isascii() and seq_text.isdigit() and len(seq_text) <= SEQ_DIGITS):
            return None
        seq = int(seq_text)
        if seq > self._seq:
            return None
        if seq == self._seq:
            return []
        oldest = self._buffer[0].seq if self._buffer else self._seq + 1
        if seq + 1 < oldest:
            return None  # pruned from the ring buffer
        return [e for e in self._buffer if e.seq > seq]

    def disconnect(self, client: Client) -> None:
        """Forget a client whose stream ended."""
        self._clients.pop(client.id, None)
        client.done.set()

    def drop(self, client: Client, reason: str) -> None:
        """Disconnect a client now (it reconnects with its last id and resumes)."""
        if self._clients.pop(client.id, None) is None:
            return
        client.reason = reason
        client.done.set()
        if reason == "slow_client":
            # Its buffer will not drain: close the socket rather than wait on it.
            client.sink.abort()

    def close(self) -> None:
        """Shutdown: end every stream promptly; no event is published after this."""
        self.flush()
        self.closed = True
        for client in list(self._clients.values()):
            client.reason = "shutdown"
            self._clients.pop(client.id, None)
            client.done.set()
            if client.sink.get_write_buffer_size() > client.limit:
                client.sink.abort()
