"""Webhook to SSE: latency with 1, 100 and 1,000 dashboards, and the sustained ingest rate.

The real app from `create_app` (embedded store in a temporary directory, AI off, JSON logs
as in production, written to /dev/null) runs in its own process. SSE clients are raw
aiohttp streaming readers in one or two other processes; this process sends correctly
signed WhatsApp Cloud API webhooks (`X-Hub-Signature-256`).

- Latency: one text message every INTERVAL_S; for each (client, message) the time from
  just before the POST is sent to that client reading the `new_message` frame. The clock
  is CLOCK_MONOTONIC, one clock for every process of the machine.
- Ingest: INGEST_MESSAGES webhooks, one message each, from 16 and then 64 concurrent
  senders, with 50 SSE clients connected. Then nothing may be lost: every message is
  stored exactly once (read back through GET .../messages) and seen once by every client.

Run: `python bench/bench_realtime.py` (about three minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import platform
import re
import sqlite3
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Final

import aiohttp
from common import (
    APP_SECRET,
    AUTH,
    CTX,
    HOST,
    ServerProcess,
    app_server_main,
    app_settings,
    cpu_seconds,
    load_average,
    markdown_table,
    percentile,
    raise_nofile,
    verdict,
)

WEBHOOK_PATH: Final = "/webhooks/whatsapp"
EVENTS_PATH: Final = "/api/live-chat/events"
LIST_PATH: Final = "/api/live-chat/unified-chats"
LATENCY_CLIENTS: Final = (1, 100, 1000)
# At most this many SSE streams per client process: 1,000 clients use two processes, so
# reading the frames does not queue behind one event loop more than it must.
STREAMS_PER_PROCESS: Final = 500
LATENCY_MESSAGES: Final = 200
LATENCY_WARMUP: Final = 20
# One message every 100 ms (10 messages/s, a busy inbox): latency is measured message by
# message, not queued behind the previous one; throughput is the ingest run's job.
INTERVAL_S: Final = 0.1
# Customers writing during the latency runs (their conversations exist after the warm-up,
# so every measured frame is a `new_message`).
LATENCY_USERS: Final = 10
INGEST_CLIENTS: Final = 50
INGEST_MESSAGES: Final = 5000
# Concurrent deliveries. Meta posts a busy number's webhooks over many connections at once;
# a single-writer store overlaps its work with the event loop's only when several are in
# flight, so the rate is shown at two levels of concurrency.
INGEST_SENDERS: Final = (16, 64)
INGEST_USERS: Final = 200
# Every client must have every message within this long after the last webhook answered.
DELIVERY_TIMEOUT_S: Final = 60.0
POLL_S: Final = 0.05
# The realtime targets (a benchmark, not a test).
TARGET_P99_MS: Final = 50.0
TARGET_CLIENTS: Final = 1000
TARGET_RATE: Final = 1000.0

# The message id a benchmark webhook carries: wamid.bench-<tag>-<seq>.
MARK: Final = re.compile(rb"wamid\.bench-([a-z0-9]+-[0-9]+)")
MESSAGE_EVENTS: Final = (b"event: new_message\n", b"event: new_conversation\n")


class WebhookUnavailable(RuntimeError):
    """The server does not accept webhooks (yet)."""


# -- the SSE clients (a separate process) -----------------------------------------------


@dataclass(slots=True)
class StreamLog:
    """What one SSE stream received: first arrival time of each message key, duplicates."""

    received: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    closed: bool = False


class _SseReader(asyncio.Protocol):
    """One SSE stream read straight off its socket.

    Browsers run on other machines; here the readers share two cores with the server, so
    they must cost as little as possible or the benchmark measures its own clients. A bare
    protocol callback per chunk, with no HTTP client in between, is the cheapest reader.
    """

    def __init__(self, request: bytes, log: StreamLog, ready: asyncio.Event) -> None:
        self.request = request
        self.log = log
        self.ready = ready
        self.buffer = b""
        self.lost = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        *frames, self.buffer = (self.buffer + data).split(b"\n\n")
        log = self.log
        for frame in frames:
            if not self.ready.is_set():
                if b"retry:" in frame:
                    self.ready.set()
                elif b" 200 " not in frame[:16] and frame.startswith(b"HTTP/"):
                    self.lost.set_exception(RuntimeError(frame[:40].decode(errors="replace")))
                continue
            if b"event: new_message\n" not in frame and b"event: new_conversation\n" not in frame:
                continue
            match = MARK.search(frame)
            if match is None:
                continue
            key = match.group(1).decode()
            if key in log.received:
                log.duplicates += 1
            else:
                log.received[key] = now

    def connection_lost(self, exc: Exception | None) -> None:
        self.log.closed = True
        if not self.lost.done():
            self.lost.set_result(None)


async def _open(port: int, log: StreamLog) -> _SseReader:
    """One stream, once its first frame arrived (so it is registered with the hub)."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    headers = "".join(f"{k}: {v}\r\n" for k, v in AUTH.items())
    request = (
        f"GET {EVENTS_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{headers}"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()
    _, reader = await loop.create_connection(lambda: _SseReader(request, log, ready), HOST, port)
    waiter = asyncio.ensure_future(ready.wait())
    await asyncio.wait([waiter, reader.lost], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not ready.is_set():
        if reader.lost.done():
            reader.lost.result()  # raises what went wrong
        raise RuntimeError("the SSE stream ended before its first frame")
    return reader


async def _clients(port: int, count: int, conn: Connection) -> None:
    logs = [StreamLog() for _ in range(count)]
    # One at a time: connecting takes about a millisecond each, and nothing overflows.
    readers = [await _open(port, log) for log in logs]
    conn.send(("ready", count))
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command[0] == "collect":
            _, prefix, expected, timeout_s = command

            def got(log: StreamLog, prefix: str = prefix) -> int:
                return sum(1 for k in log.received if k.startswith(prefix))

            # Poll (the streams fill in on their own) until all have everything.
            for _ in range(int(timeout_s / POLL_S)):
                if all(log.closed or got(log) >= expected for log in logs):
                    break
                await asyncio.sleep(POLL_S)
            conn.send(
                [
                    (
                        {k: t for k, t in log.received.items() if k.startswith(prefix)},
                        log.duplicates,
                        log.closed,
                    )
                    for log in logs
                ]
            )
        else:
            break
    for reader in readers:
        if reader.transport is not None:
            reader.transport.close()


def clients_main(port: int, count: int, conn: Connection) -> None:
    """Process entry: `count` SSE streams, timing every benchmark message they receive."""
    raise_nofile()
    asyncio.run(_clients(port, count, conn))


class ClientProcesses:
    """SSE clients spread over as few processes as STREAMS_PER_PROCESS allows."""

    def __init__(self, port: int, count: int) -> None:
        self.conns: list[Connection] = []
        self.processes: list[BaseProcess] = []
        left = count
        while left > 0:
            n = min(left, STREAMS_PER_PROCESS)
            left -= n
            parent, child = CTX.Pipe()
            process = CTX.Process(target=clients_main, args=(port, n, child), daemon=True)
            process.start()
            child.close()
            self.conns.append(parent)
            self.processes.append(process)
        for conn in self.conns:
            if not conn.poll(120):
                raise RuntimeError("SSE clients did not connect within 120 s")
            conn.recv()

    def collect(self, prefix: str, expected: int) -> list[tuple[dict[str, int], int, bool]]:
        """Per stream: arrival times of the keys starting with `prefix`, duplicates, closed."""
        for conn in self.conns:
            conn.send(("collect", prefix, expected, DELIVERY_TIMEOUT_S))
        logs: list[tuple[dict[str, int], int, bool]] = []
        for conn in self.conns:
            logs += conn.recv()
        return logs

    def stop(self) -> None:
        """Close every stream and end the processes."""
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)


# -- the webhooks (this process) --------------------------------------------------------


def webhook(tag: str, seq: int, user: int) -> tuple[bytes, dict[str, str]]:
    """A signed Cloud API delivery of one text message; the body and its headers."""
    phone = f"9715{zlib.crc32(tag.encode()) % 1000:03d}{user:05d}"
    body = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "102290129340398",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550783881",
                                "phone_number_id": "106540352242922",
                            },
                            "contacts": [
                                {"profile": {"name": f"bench-{tag} {user}"}, "wa_id": phone}
                            ],
                            "messages": [
                                {
                                    "from": phone,
                                    "id": f"wamid.bench-{tag}-{seq}",
                                    "timestamp": str(int(time.time())),
                                    "type": "text",
                                    "text": {"body": f"Benchmark message {seq} of run {tag}"},
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }
    raw = json.dumps(body, separators=(",", ":")).encode()
    signature = hmac.new(APP_SECRET.encode(), raw, hashlib.sha256).hexdigest()
    return raw, {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={signature}"}


async def post(session: aiohttp.ClientSession, url: str, raw: bytes, headers: Any) -> None:
    """Deliver one webhook; anything but 200 stops the benchmark."""
    async with session.post(url, data=raw, headers=headers) as resp:
        await resp.read()
        if resp.status == 501:
            raise WebhookUnavailable("POST /webhooks/whatsapp answers 501: not implemented yet")
        if resp.status != 200:
            raise RuntimeError(f"webhook answered HTTP {resp.status}")


def tag_for(name: str) -> str:
    """A per-run tag, so a reused database never mixes runs."""
    return f"{name}{int(time.time() * 1000) % 10**8}"


# -- latency ----------------------------------------------------------------------------


@dataclass(slots=True)
class LatencyResult:
    """One latency run."""

    clients: int
    messages: int
    samples: list[float]
    lost: int
    duplicates: int
    # Server CPU time per message while measuring (parse, store, publish, fan-out).
    cpu_ms: float


async def send_paced(server: ServerProcess, tag: str, count: int, first: int) -> dict[str, int]:
    """`count` webhooks, one every INTERVAL_S; the send time of each message key."""
    url = server.url(WEBHOOK_PATH)
    bodies = [webhook(tag, seq, seq % LATENCY_USERS) for seq in range(first, first + count)]
    sent: dict[str, int] = {}
    async with aiohttp.ClientSession() as session:
        tick = time.monotonic()
        for seq, (raw, headers) in enumerate(bodies, start=first):
            sent[f"{tag}-{seq}"] = time.monotonic_ns()
            await post(session, url, raw, headers)
            tick += INTERVAL_S
            await asyncio.sleep(max(0.0, tick - time.monotonic()))
    return sent


def latency_run(server: ServerProcess, clients: int) -> LatencyResult:
    """Connect `clients` dashboards, send paced messages, time every delivery."""
    tag = tag_for(f"l{clients}x")
    group = ClientProcesses(server.port, clients)
    try:
        asyncio.run(send_paced(server, tag, LATENCY_WARMUP, 0))
        cpu = cpu_seconds(server.pid)
        sent = asyncio.run(send_paced(server, tag, LATENCY_MESSAGES, LATENCY_WARMUP))
        cpu = cpu_seconds(server.pid) - cpu
        logs = group.collect(f"{tag}-", LATENCY_WARMUP + LATENCY_MESSAGES)
    finally:
        group.stop()
    samples: list[float] = []
    lost = duplicates = 0
    for received, dupes, _closed in logs:
        duplicates += dupes
        for key, at in sent.items():
            arrived = received.get(key)
            if arrived is None:
                lost += 1
            else:
                samples.append((arrived - at) / 1e6)
    return LatencyResult(clients, len(sent), samples, lost, duplicates, cpu / len(sent) * 1e3)


# -- ingest -----------------------------------------------------------------------------


@dataclass(slots=True)
class IngestResult:
    """One ingest run and its checks."""

    senders: int
    messages: int
    accepted_s: float
    delivered_s: float
    stored_once: bool
    stored: int
    seen_by_all: bool
    lost_deliveries: int
    duplicate_deliveries: int
    cpu_ms: float


async def send_burst(server: ServerProcess, tag: str, senders: int) -> tuple[float, float]:
    """INGEST_MESSAGES webhooks from `senders` concurrent senders; (start, end)."""
    url = server.url(WEBHOOK_PATH)
    bodies = [webhook(tag, seq, seq % INGEST_USERS) for seq in range(INGEST_MESSAGES)]
    work: Iterator[tuple[bytes, dict[str, str]]] = iter(bodies)

    async def sender(session: aiohttp.ClientSession) -> None:
        for raw, headers in work:
            await post(session, url, raw, headers)

    connector = aiohttp.TCPConnector(limit=senders)
    async with aiohttp.ClientSession(connector=connector) as session:
        await post(session, url, *webhook(tag_for("probe"), 0, 0))  # fail fast if 501
        started = time.monotonic()
        await asyncio.gather(*(sender(session) for _ in range(senders)))
        return started, time.monotonic()


async def stored_keys(server: ServerProcess, tag: str) -> Counter[str]:
    """How many times each benchmark message of this run is stored, read through the API."""
    counts: Counter[str] = Counter()
    prefix = f"wamid.bench-{tag}-"
    async with aiohttp.ClientSession(headers=AUTH) as session:
        conversations: list[str] = []
        query = f"limit=100&status=all&q=bench-{tag}"
        while True:
            async with session.get(server.url(f"{LIST_PATH}?{query}")) as resp:
                resp.raise_for_status()
                page = await resp.json()
            conversations += [c["id"] for c in page["chats"]]
            if not page["has_more"]:
                break
            query = f"limit=100&status=all&q=bench-{tag}&cursor={page['next_cursor']}"
        for conversation_id in conversations:
            path = f"/api/live-chat/conversations/{conversation_id}/messages?limit=200"
            cursor = ""
            while True:
                async with session.get(server.url(path + cursor)) as resp:
                    resp.raise_for_status()
                    page = await resp.json()
                for message in page["messages"]:
                    wamid = message.get("wa_message_id") or ""
                    if wamid.startswith(prefix):
                        counts[wamid.removeprefix("wamid.bench-")] += 1
                if not page["has_more"]:
                    break
                cursor = f"&before={page['next_cursor']}"
    return counts


def ingest_run(server: ServerProcess, senders: int) -> IngestResult:
    """The burst with INGEST_CLIENTS connected, then the loss checks."""
    tag = tag_for(f"i{senders}x")
    group = ClientProcesses(server.port, INGEST_CLIENTS)
    try:
        cpu = cpu_seconds(server.pid)
        started, ended = asyncio.run(send_burst(server, tag, senders))
        logs = group.collect(f"{tag}-", INGEST_MESSAGES)
        cpu = cpu_seconds(server.pid) - cpu
    finally:
        group.stop()
    expected = {f"{tag}-{seq}" for seq in range(INGEST_MESSAGES)}
    lost = sum(len(expected - received.keys()) for received, _, _ in logs)
    duplicates = sum(d for _, d, _ in logs)
    last_arrival = max(max(r.values(), default=0) for r, _, _ in logs) / 1e9
    stored = asyncio.run(stored_keys(server, tag))
    return IngestResult(
        senders=senders,
        messages=INGEST_MESSAGES,
        accepted_s=INGEST_MESSAGES / (ended - started),
        delivered_s=INGEST_MESSAGES / (last_arrival - started) if last_arrival else 0.0,
        stored_once=set(stored) == expected and all(n == 1 for n in stored.values()),
        stored=sum(stored.values()),
        seen_by_all=lost == 0 and duplicates == 0,
        lost_deliveries=lost,
        duplicate_deliveries=duplicates,
        cpu_ms=cpu / INGEST_MESSAGES * 1e3,
    )


# -- the disk's floor ---------------------------------------------------------------------

FLOOR_COMMITS = 2_000


def fsync_floor(directory: str) -> tuple[float, float, float]:
    """Bare SQLite on the same disk: one row per transaction in WAL mode with
    synchronous=FULL, i.e. one fsync per commit, as fast as it goes. What the store could
    do if every webhook committed alone; group commit shares one fsync among a batch.
    (commits/s, p50 ms, p99 ms)."""
    path = str(Path(directory) / "floor.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, doc TEXT NOT NULL)")
    doc = "x" * 600  # about a stored message and its summary
    samples = []
    started = time.perf_counter()
    for _ in range(FLOOR_COMMITS):
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (doc) VALUES (?)", (doc,))
        conn.execute("COMMIT")
        samples.append((time.perf_counter() - t0) * 1000)
    elapsed = time.perf_counter() - started
    conn.close()
    samples.sort()
    return FLOOR_COMMITS / elapsed, percentile(samples, 50), percentile(samples, 99)


# -- the report -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the latency and ingest benchmarks and print their tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=list(LATENCY_CLIENTS))
    parser.add_argument("--no-ingest", action="store_true", help="latency runs only")
    args = parser.parse_args(argv)
    raise_nofile()
    print(
        f"python {platform.python_version()}, aiohttp {aiohttp.__version__},"
        f" {platform.machine()}, loopback {HOST}",
        flush=True,
    )
    latency: list[LatencyResult] = []
    ingest: list[IngestResult] = []
    floor: tuple[float, float, float] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-realtime-") as tmp:
        db = str(Path(tmp) / "bench.db")
        if not args.no_ingest:
            floor = fsync_floor(tmp)
        server = ServerProcess(app_server_main, app_settings(db))
        try:
            for clients in args.clients:
                print(
                    f"latency with {clients:,} SSE clients (load average {load_average()})",
                    flush=True,
                )
                latency.append(latency_run(server, clients))
            for senders in () if args.no_ingest else INGEST_SENDERS:
                print(
                    f"ingest: {INGEST_MESSAGES:,} webhooks from {senders} senders,"
                    f" {INGEST_CLIENTS} clients (load average {load_average()})",
                    flush=True,
                )
                ingest.append(ingest_run(server, senders))
        except WebhookUnavailable as e:
            print(f"cannot run: {e}", file=sys.stderr)
            return 2
        finally:
            server.stop()

    print(f"load average at the end: {load_average()}")
    print()
    print("Webhook to SSE frame (milliseconds, every client x every message)")
    print()
    rows: list[list[object]] = []
    for r in latency:
        s = sorted(r.samples)
        p99 = percentile(s, 99)
        rows.append(
            [
                f"{r.clients:,}",
                r.messages,
                f"{len(s):,}",
                f"{percentile(s, 50):.2f}",
                f"{p99:.2f}",
                f"{s[-1]:.2f}" if s else "-",
                r.lost,
                r.duplicates,
                f"{r.cpu_ms:.2f}",
                verdict(p99 <= TARGET_P99_MS) if r.clients >= TARGET_CLIENTS else "-",
            ]
        )
    print(
        markdown_table(
            [
                "SSE clients",
                "messages",
                "deliveries",
                "p50",
                "p99",
                "max",
                "lost",
                "duplicates",
                "server CPU ms/message",
                f"p99 <= {TARGET_P99_MS:g} ms at {TARGET_CLIENTS:,}",
            ],
            rows,
        )
    )
    if floor is not None:
        print()
        print("The disk's floor: bare SQLite, one fsync per commit (WAL, synchronous=FULL)")
        print()
        print(
            markdown_table(
                ["commits", "commits/s", "p50 ms", "p99 ms"],
                [[f"{FLOOR_COMMITS:,}", f"{floor[0]:,.0f}", f"{floor[1]:.2f}", f"{floor[2]:.2f}"]],
            )
        )
    if ingest:
        print()
        print("Sustained ingest (one message per webhook; the store commits with synchronous=FULL)")
        print()
        print(
            markdown_table(
                [
                    "SSE clients",
                    "concurrent senders",
                    "webhooks",
                    "accepted/s",
                    "delivered to every client/s",
                    "server CPU ms/webhook",
                    "stored exactly once",
                    "seen once by every client",
                    f">= {TARGET_RATE:,.0f}/s",
                    "vs the floor",
                ],
                [
                    [
                        INGEST_CLIENTS,
                        r.senders,
                        f"{r.messages:,}",
                        f"{r.accepted_s:,.0f}",
                        f"{r.delivered_s:,.0f}",
                        f"{r.cpu_ms:.2f}",
                        f"{'yes' if r.stored_once else 'NO'} ({r.stored:,} stored)",
                        "yes"
                        if r.seen_by_all
                        else f"NO ({r.lost_deliveries} lost, {r.duplicate_deliveries} duplicates)",
                        verdict(r.accepted_s >= TARGET_RATE and r.stored_once),
                        f"{r.accepted_s / floor[0]:.2f}x" if floor else "-",
                    ]
                    for r in ingest
                ],
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
