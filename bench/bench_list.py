"""The unified chat list over HTTP on loopback, against the floor, and its memory per row.

For 10,000 and 100,000 demo conversations in the embedded store this prints:

- p50/p99 of `GET /api/live-chat/unified-chats?limit=30` for each tab of the dashboard
  (All, Open, Mine: `status=open&assignee=me`, Unassigned: `status=open&assignee=none`),
  the first page and deeper pages (cursors collected by walking each whole list through
  `next_cursor`), served by the real app from `create_app` (an agent's personal API token,
  SQLite in a temporary directory, JSON logs as in production, written to /dev/null);
- the same for the floor: a bare aiohttp app whose handler returns the very same response
  bytes, prepared in advance; both servers run in their own processes, the load generator
  in a third, with one keep-alive session, and their runs interleave;
- bytes held per conversation by the snapshot: tracemalloc around `Snapshot.load` of the
  conversations as the store returns them, and the RSS growth of the same load.

Run: `python bench/bench_list.py` (about ten minutes; `--sizes 1000` for a quick look,
`--tabs all mine` for some tabs only).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import aiohttp
from common import (
    CTX,
    HOST,
    ServerProcess,
    app_server_main,
    app_settings,
    cpu_seconds,
    load_average,
    markdown_table,
    percentile,
    rss_bytes,
    serve,
    verdict,
)

from server.accounts import new_token
from server.demo import NO_PASSWORD, seed_demo
from server.models import now_ms
from server.snapshot import Snapshot
from server.store.agents import Agent
from server.store.agents_sqlite import SqliteAgents
from server.store.sqlite import SqliteStore

LIST_PATH: Final = "/api/live-chat/unified-chats"
PAGE_LIMIT: Final = 30
# The dashboard's tabs, as the query each one sends. Mine is the agent's own (the demo data
# assigns about a fifth of the conversations to each of its agents).
TABS: Final = {
    "all": "",
    "open": "&status=open",
    "mine": "&status=open&assignee=me",
    "unassigned": "&status=open&assignee=none",
}
# The demo agent the requests come from (`assignee=me`).
AGENT_ID: Final = "a_demo_reem"
SIZES: Final = (10_000, 100_000)
# Deeper pages measured: this many cursors spread evenly over the whole list.
DEEP_PAGES: Final = 200
# Each (server, page kind) gets ROUNDS x BATCH timed requests; the servers alternate
# every batch so a noisy neighbour on this shared 2-core machine hits both alike.
ROUNDS: Final = 8
BATCH: Final = 625
WARMUP: Final = 500
# The list's targets (a benchmark, not a test).
TARGET_P99_MS: Final = 2.0  # at TARGET_SIZE conversations
TARGET_SIZE: Final = 100_000
TARGET_RATIO: Final = 1.5
TARGET_BYTES: Final = 1024


@dataclass(slots=True)
class Latencies:
    """Milliseconds of every timed request of one server and page kind, and the server's
    CPU time spent on them (robust to a busy neighbour, unlike wall-clock percentiles)."""

    values: list[float]
    cpu_s: float = 0.0

    @property
    def cpu_us(self) -> float:
        """Server CPU microseconds per request."""
        return self.cpu_s / len(self.values) * 1e6

    def p(self, q: float) -> float:
        return percentile(sorted(self.values), q)


def floor_server_main(bodies: dict[str, bytes], conn: Connection) -> None:
    """Process entry: a bare aiohttp app answering each query with bytes prepared before."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=bodies[request.query_string], content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_get(LIST_PATH, handler)
        await serve(app, conn, None)

    asyncio.run(main())


async def seed(db: str, count: int) -> str:
    """Fill a fresh store with `count` demo conversations (build_demo + import), add the
    agent the requests come from; returns that agent's personal API token."""
    store = SqliteStore(db)
    await store.start()
    try:
        await seed_demo(store, count)
    finally:
        await store.close()
    agents = SqliteAgents(db)
    await agents.start()
    try:
        agent = Agent(AGENT_ID, "reem@example.com", "Reem", "agent", NO_PASSWORD, False, now_ms())
        await agents.add_agent(agent)
        token, record = new_token(agent, "bench")
        await agents.add_token(record)
    finally:
        await agents.close()
    return token


def memory_main(db: str, trace: bool, conn: Connection) -> None:
    """Process entry: bytes that Snapshot.load of the whole store keeps (traced, or RSS)."""

    async def conversations() -> list[Any]:
        store = SqliteStore(db)
        await store.start()
        try:
            return await store.load_window(None)
        finally:
            await store.close()

    snapshot = Snapshot()
    gc.collect()
    if trace:
        # Traced from before the conversations exist: the rows keep some of their strings
        # (the id), so tracing only the load itself would miss them.
        tracemalloc.start()
        rows = asyncio.run(conversations())
        snapshot.load(rows)
        del rows
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    else:
        before = rss_bytes()
        rows = asyncio.run(conversations())
        snapshot.load(rows)
        del rows
        gc.collect()
        # Growth from reading the store to a loaded snapshot: an upper bound of what the
        # rows cost, since it includes SQLite's page cache and freed memory the allocator
        # keeps rather than giving it back.
        held = rss_bytes() - before
    conn.send((held, len(snapshot)))


def measure_memory(db: str, trace: bool) -> tuple[int, int]:
    """Run memory_main in a fresh interpreter; (bytes held, conversations)."""
    parent, child = CTX.Pipe()
    process = CTX.Process(target=memory_main, args=(db, trace, child))
    process.start()
    held, count = parent.recv()
    process.join()
    return held, count


async def walk(session: aiohttp.ClientSession, server: ServerProcess, tab: str) -> list[str]:
    """Every page's query string of one tab, by following next_cursor to the end (checked)."""
    queries = [f"limit={PAGE_LIMIT}{TABS[tab]}"]
    seen: set[str] = set()
    total = None
    while True:
        async with session.get(server.url(f"{LIST_PATH}?{queries[-1]}")) as resp:
            resp.raise_for_status()
            page = await resp.json()
        total = page["total"]
        for chat in page["chats"]:
            if chat["id"] in seen:
                raise AssertionError(f"{chat['id']} served twice while paging")
            seen.add(chat["id"])
        if not page["has_more"]:
            break
        queries.append(f"limit={PAGE_LIMIT}{TABS[tab]}&cursor={page['next_cursor']}")
    if len(seen) != total:
        raise AssertionError(f"paging returned {len(seen)} of {total} conversations")
    return queries


async def fetch_bodies(
    session: aiohttp.ClientSession, server: ServerProcess, queries: list[str]
) -> dict[str, bytes]:
    """The app's exact response bytes for each query (the floor serves these)."""
    bodies = {}
    for query in queries:
        async with session.get(server.url(f"{LIST_PATH}?{query}")) as resp:
            resp.raise_for_status()
            bodies[query] = await resp.read()
    return bodies


async def timed(
    session: aiohttp.ClientSession,
    server: ServerProcess,
    queries: list[str],
    count: int,
    into: list[float] | None,
    expect: dict[str, bytes],
) -> None:
    """`count` sequential requests cycling over `queries`; milliseconds appended to `into`."""
    urls = [(server.url(f"{LIST_PATH}?{q}"), q) for q in queries]
    clock = time.perf_counter_ns
    for i in range(count):
        url, query = urls[i % len(urls)]
        started = clock()
        async with session.get(url) as resp:
            body = await resp.read()
        elapsed = clock() - started
        if resp.status != 200:
            raise AssertionError(f"{url}: HTTP {resp.status}")
        if into is not None:
            into.append(elapsed / 1e6)
        elif body != expect[query]:
            raise AssertionError(f"{url}: the response changed during the run")


Pages = dict[tuple[str, str], list[str]]  # (tab, "first" or "deep") -> query strings


async def compare(
    app: ServerProcess, floor: ServerProcess, pages: Pages, bodies: Any, auth: dict[str, str]
) -> dict[tuple[str, str, str], Latencies]:
    """Interleaved timed runs of both servers for every tab and page kind."""
    results = {(who, *page): Latencies([]) for who in ("floor", "app") for page in pages}
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(headers=auth, connector=connector) as session:
        for server in (app, floor):  # warm up both (and check the bytes are identical)
            for queries in pages.values():
                await timed(session, server, queries, WARMUP, None, bodies)
        gc.collect()
        gc.disable()  # the load generator's own collector would add noise to both
        try:
            for r in range(ROUNDS):
                order = [("app", app), ("floor", floor)]
                if r % 2:
                    order.reverse()
                for who, server in order:
                    for page, queries in pages.items():
                        result = results[(who, *page)]
                        cpu = cpu_seconds(server.pid)
                        await timed(session, server, queries, BATCH, result.values, bodies)
                        result.cpu_s += cpu_seconds(server.pid) - cpu
        finally:
            gc.enable()
    return results


async def prepare(
    app: ServerProcess, tabs: list[str], auth: dict[str, str]
) -> tuple[Pages, dict[str, bytes]]:
    """Walk each tab's list once; choose its deep pages; fetch the bytes the floor serves."""
    pages: Pages = {}
    bodies: dict[str, bytes] = {}
    async with aiohttp.ClientSession(headers=auth) as session:
        for tab in tabs:
            queries = await walk(session, app, tab)
            step = max(1, len(queries) // DEEP_PAGES)
            pages[(tab, "first")] = queries[:1]
            pages[(tab, "deep")] = queries[1::step][:DEEP_PAGES] or queries[:1]
            bodies |= await fetch_bodies(session, app, pages[(tab, "first")] + pages[(tab, "deep")])
    return pages, bodies


def ms(value: float) -> str:
    return f"{value:.3f}"


def run_size(count: int, workdir: Path, tabs: list[str]) -> tuple[list[list[object]], list[object]]:
    """Seed, serve, measure one size; rows of the latency and memory tables."""
    db = str(workdir / f"bench-{count}.db")
    started = time.perf_counter()
    token = asyncio.run(seed(db, count))
    auth = {"Authorization": f"Bearer {token}"}
    print(f"  seeded {count:,} conversations in {time.perf_counter() - started:.1f} s", flush=True)

    app = ServerProcess(app_server_main, app_settings(db))
    try:
        pages, bodies = asyncio.run(prepare(app, tabs, auth))
        print(f"  walked the lists: {len(bodies)} pages prepared for the floor", flush=True)
        floor = ServerProcess(floor_server_main, bodies)
        try:
            results = asyncio.run(compare(app, floor, pages, bodies, auth))
            app_rss = rss_bytes(app.pid)
            floor_rss = rss_bytes(floor.pid)
        finally:
            floor.stop()
    finally:
        app.stop()

    latency_rows: list[list[object]] = []
    for tab, kind in pages:
        label = "first page" if kind == "first" else f"{len(pages[(tab, kind)])} deeper pages"
        f, a = results[("floor", tab, kind)], results[("app", tab, kind)]
        f50, f99, a50, a99 = f.p(50), f.p(99), a.p(50), a.p(99)
        latency_rows.append(
            [
                f"{count:,}",
                tab,
                label,
                len(a.values),
                ms(f50),
                ms(f99),
                ms(a50),
                ms(a99),
                f"{a50 / f50:.2f}x",
                f"{a99 / f99:.2f}x",
                f"{f.cpu_us:.0f} / {a.cpu_us:.0f}",
                verdict(a99 <= TARGET_P99_MS) if count >= TARGET_SIZE else "-",
                verdict(a99 <= TARGET_RATIO * f99),
            ]
        )
        for who, lat in (("floor", f), ("app", a)):
            print(
                f"  {tab}, {label}, {who}: mean {statistics.fmean(lat.values):.3f}"
                f" p90 {lat.p(90):.3f} p99 {lat.p(99):.3f} p99.9 {lat.p(99.9):.3f}"
                f" max {max(lat.values):.3f} ms",
                flush=True,
            )

    traced, n = measure_memory(db, trace=True)
    rss, _ = measure_memory(db, trace=False)
    memory_row: list[object] = [
        f"{n:,}",
        f"{traced / n:,.0f}",
        f"{rss / n:,.0f}",
        f"{app_rss / 2**20:,.0f} MiB",
        f"{floor_rss / 2**20:,.0f} MiB",
        verdict(traced / n <= TARGET_BYTES),
    ]
    return latency_rows, memory_row


def main(argv: list[str] | None = None) -> int:
    """Run every size and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--tabs", nargs="+", choices=list(TABS), default=list(TABS))
    args = parser.parse_args(argv)
    print(
        f"python {platform.python_version()}, aiohttp {aiohttp.__version__},"
        f" {platform.machine()}, loopback {HOST}",
        flush=True,
    )
    latency_rows: list[list[object]] = []
    memory_rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-list-") as tmp:
        for count in args.sizes:
            print(f"{count:,} conversations (load average {load_average()})", flush=True)
            rows, memory = run_size(count, Path(tmp), args.tabs)
            latency_rows += rows
            memory_rows.append(memory)
    print(f"load average at the end: {load_average()}")
    print()
    print(f"GET {LIST_PATH}?limit={PAGE_LIMIT} (milliseconds, one keep-alive connection)")
    print()
    print(
        markdown_table(
            [
                "conversations",
                "tab",
                "page",
                "requests",
                "floor p50",
                "floor p99",
                "app p50",
                "app p99",
                "p50 ratio",
                "p99 ratio",
                "server CPU µs/req (floor / app)",
                f"p99 <= {TARGET_P99_MS:g} ms at {TARGET_SIZE:,}",
                f"p99 <= {TARGET_RATIO:g}x floor",
            ],
            latency_rows,
        )
    )
    print()
    print("Bytes held by the snapshot")
    print()
    print(
        markdown_table(
            [
                "conversations",
                "bytes/conversation (tracemalloc)",
                "bytes/conversation (RSS growth)",
                "app server RSS",
                "floor server RSS",
                f"<= {TARGET_BYTES} B",
            ],
            memory_rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
