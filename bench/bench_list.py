"""The unified chat list and message search at scale, over HTTP on loopback, against floors.

For each size (10,000 and 100,000 by default; `--sizes 1000000` for the million) this

1. seeds the demo into a fresh SQLite file (`seed_demo`: streamed in batches) and times it;
2. restarts the real server (`python run.py`, JSON logs to /dev/null) on that database
   RESTARTS times and times each start to the first `200` from `/readyz`;
3. walks the whole list through `next_cursor` (checking that every conversation comes once
   and that their number is `total`), keeping DEEP_PAGES cursors spread over it, past the
   window included; for each status tab and for Mine (`status=open&assignee=me`) and
   Unassigned (`status=open&assignee=none`), the first page and DEEP_PAGES cursors spread
   over the tab (signed as the server signs them, from keys read in the database); a
   search by name and one by the last digits of a number. Every request carries a demo
   agent's personal API token (Mine is hers);
4. times every page kind against the floor: a bare aiohttp app in its own process that
   answers each request with the very bytes the app answered, prepared in advance; the
   two alternate batch by batch, each page kind ROUNDS x BATCH times;
5. times message search (`GET /api/live-chat/search`) the same way, and against a bare
   FTS5 query of the same MATCH on the same file (`ORDER BY rowid DESC LIMIT 21`, in this
   process, no HTTP);
6. reads both servers' RSS (now and peak);
7. in a fresh interpreter: bytes per row held by the snapshot's window, and how long a
   full collection of the cyclic garbage collector takes with the window held, with it
   frozen (what the server does after loading), and with 200,000 rows held (what a
   snapshot holding every conversation holds at 200,000).

Run: `python bench/bench_list.py` (about 4 minutes), `--sizes 1000000` (about 10).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import orjson
from common import (
    CTX,
    HOST,
    ROOT,
    TOKEN,
    ServerProcess,
    cpu_seconds,
    load_average,
    markdown_table,
    percentile,
    rss_bytes,
    serve,
    verdict,
)

from server import search
from server.accounts import new_token
from server.cursor import CursorCodec
from server.demo import NO_PASSWORD, seed_demo
from server.models import now_ms
from server.snapshot import Row, Snapshot
from server.store.agents import Agent
from server.store.agents_sqlite import SqliteAgents
from server.store.sqlite import SqliteStore

LIST_PATH: Final = "/api/live-chat/unified-chats"
SEARCH_PATH: Final = "/api/live-chat/search"
SECRET_KEY: Final = "bench-secret-key"
PAGE_LIMIT: Final = 30
SEARCH_LIMIT: Final = 20
SIZES: Final = (10_000, 100_000)
WINDOW: Final = 20_000  # the server's default (LIVECHAT_SQLITE_WINDOW)
RESTARTS: Final = 3
# Deeper pages measured per page kind: this many cursors spread evenly over the list.
DEEP_PAGES: Final = 200
# Each (server, page kind) gets ROUNDS x BATCH timed requests; the servers alternate
# every batch so a noisy neighbour on this shared 2-core machine hits both alike.
ROUNDS: Final = 8
BATCH: Final = 400
SEARCH_BATCH: Final = 60
WARMUP: Final = 200
# Rows an unbounded snapshot would hold, for the collector's pause beside the window's.
GC_ROWS: Final = 200_000
# Targets at a million conversations (a benchmark, not a test).
TARGET_SIZE: Final = 1_000_000
TARGET_RSS: Final = 400 * 2**20
TARGET_READY_S: Final = 3.0
TARGET_RATIO: Final = 1.5
TARGET_SEARCH_P99_MS: Final = 50.0
START_TIMEOUT_S: Final = 120.0
# The demo agent the requests come from (`assignee=me`): the demo assigns her about a
# third of the conversations.
AGENT_ID: Final = "a_demo_reem"


@dataclass(slots=True)
class Latencies:
    """Milliseconds of every timed request of one server and page kind, and the server's
    CPU time spent on them (robust to a busy neighbour, unlike wall-clock percentiles)."""

    values: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    # The path of each timed request (message search cycles over several queries).
    paths: list[str] = field(default_factory=list)

    @property
    def cpu_us(self) -> float:
        """Server CPU microseconds per request."""
        return self.cpu_s / max(1, len(self.values)) * 1e6

    def p(self, q: float) -> float:
        return percentile(sorted(self.values), q)


@dataclass(slots=True)
class Kind:
    """A kind of request: its label and the paths (with queries) it cycles over."""

    label: str
    paths: list[str]
    batch: int = BATCH


# -- servers ----------------------------------------------------------------------------


def floor_server_main(bodies: dict[str, bytes], conn: Connection) -> None:
    """Process entry: a bare aiohttp app answering each request with bytes prepared before."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=bodies[request.path_qs], content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_get(LIST_PATH, handler)
        app.router.add_get(SEARCH_PATH, handler)
        await serve(app, conn, None)

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class RunPy:
    """`python run.py` on a database, as an operator starts it; timed to its first ready."""

    def __init__(self, db: str) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "LIVECHAT_API_TOKEN": TOKEN,
            "LIVECHAT_SECRET_KEY": SECRET_KEY,
            "AI_PROVIDER": "off",
            "LOG_FORMAT": "json",
            "LIVECHAT_INSTANCE_ID": "bench",
        }
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "run.py", "--db", db, "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.ready_s = asyncio.run(self._ready())

    async def _ready(self) -> float:
        async with aiohttp.ClientSession() as session:
            while time.perf_counter() - self.started < START_TIMEOUT_S:
                if self.process.poll() is not None:
                    raise RuntimeError(f"run.py exited with {self.process.returncode}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.url("/readyz")) as resp:
                        if resp.status == 200:
                            return time.perf_counter() - self.started
                await asyncio.sleep(0.01)
        raise RuntimeError(f"run.py was not ready in {START_TIMEOUT_S} s")

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- seeding and choosing what to request --------------------------------------------------


async def seed(db: str, count: int) -> dict[str, str]:
    """Fill a fresh store with `count` demo conversations, as `run.py --demo` does, and add
    the agent the requests come from; the headers with her personal API token."""
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
    return {"Authorization": f"Bearer {token}"}


def list_path(**params: str) -> str:
    query = "&".join(f"{k}={quote(v)}" for k, v in params.items())
    return f"{LIST_PATH}?{query}"


async def walk(session: aiohttp.ClientSession, server: RunPy) -> tuple[list[str], int]:
    """Every page's path, by following next_cursor to the end (checked); and the count."""
    paths = [list_path(limit=str(PAGE_LIMIT))]
    seen: set[str] = set()
    while True:
        async with session.get(server.url(paths[-1])) as resp:
            resp.raise_for_status()
            page = await resp.json()
        for chat in page["chats"]:
            if chat["id"] in seen:
                raise AssertionError(f"{chat['id']} served twice while paging")
            seen.add(chat["id"])
        if not page["has_more"]:
            break
        paths.append(list_path(limit=str(PAGE_LIMIT), cursor=page["next_cursor"]))
    if len(seen) != page["total"]:
        raise AssertionError(f"paging returned {len(seen)} of {page['total']} conversations")
    return paths, len(seen)


def spread(items: list[Any], n: int) -> list[Any]:
    """n items spread evenly over a list, its last included."""
    if len(items) <= n:
        return list(items)
    step = (len(items) - 1) / (n - 1)
    return [items[round(i * step)] for i in range(n)]


def tab_paths(db: str, status: str, assignee: str | None = None) -> tuple[list[str], list[str]]:
    """The first page of a tab (a status; Mine with `assignee="me"`, Unassigned with
    "none"), and DEEP_PAGES pages spread over it (cursors signed as the server signs them,
    after keys read from the database)."""
    codec = CursorCodec(SECRET_KEY.encode())
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    where, args = "status = ?", [status]
    if assignee == "me":
        where += " AND json_extract(doc, '$.assignee') = ?"
        args.append(AGENT_ID)
    elif assignee == "none":
        where += " AND json_extract(doc, '$.assignee') IS NULL"
    keys = conn.execute(
        f"SELECT last_activity, id FROM conversations WHERE {where}"
        " ORDER BY last_activity DESC, id",
        args,
    ).fetchall()
    conn.close()
    params = {"limit": str(PAGE_LIMIT), "status": status}
    if assignee is not None:
        params["assignee"] = assignee
    first = [list_path(**params)]
    deep = [
        list_path(**params, cursor=codec.encode("chats", tuple(k)))
        for k in spread(keys[: -PAGE_LIMIT or None], DEEP_PAGES)
    ]
    return first, deep


def search_queries(db: str) -> list[str]:
    """What agents search for: common words in Arabic and English, a word by its stem, a
    word written with diacritics in the messages, an order number deep in the history
    (with and without a word), and a word nobody wrote."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    (top,) = conn.execute("SELECT max(rowid) FROM message_search").fetchone()
    numbers = []
    for below in (top // 20, top // 2):
        row = conn.execute(
            "SELECT m.doc ->> 'text' FROM message_search s JOIN messages m ON m.rowid = s.rowid"
            " WHERE message_search MATCH 'invoic*' AND s.rowid < ? ORDER BY s.rowid DESC LIMIT 1",
            (below,),
        ).fetchone()
        if row:
            numbers += [w for w in search.words(row[0]) if w.isdigit()]
    conn.close()
    queries = ["invoice", "deliveries", "فاتورة", "شكرا جزيلا", "refund", "zqxw"]
    if numbers:
        queries += [f"invoice {numbers[0]}", numbers[-1]]
    return queries


def search_path(q: str) -> str:
    return f"{SEARCH_PATH}?q={quote(q)}&limit={SEARCH_LIMIT}"


async def prepare(
    server: RunPy, db: str, auth: dict[str, str]
) -> tuple[list[Kind], dict[str, bytes], int]:
    """The page kinds to time, and the app's bytes for each path (the floor serves them)."""
    async with aiohttp.ClientSession(headers=auth) as session:
        started = time.perf_counter()
        paths, total = await walk(session, server)
        print(
            f"  walked {len(paths):,} pages ({total:,} conversations, each once) in"
            f" {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        kinds = [
            Kind("first page", paths[:1]),
            Kind(f"{min(DEEP_PAGES, len(paths) - 1)} deep pages", spread(paths[1:], DEEP_PAGES)),
        ]
        for tab, status, assignee in (
            ("open", "open", None),
            ("resolved", "resolved", None),
            ("mine", "open", "me"),
            ("unassigned", "open", "none"),
        ):
            first, deep = tab_paths(db, status, assignee)
            kinds += [Kind(f"{tab}: first page", first), Kind(f"{tab}: deep pages", deep)]
        async with session.get(server.url(paths[-1])) as resp:
            deepest = (await resp.json())["chats"][-1]
        kinds += [
            Kind("name search", [list_path(limit=str(PAGE_LIMIT), q="sara")]),
            Kind("number search", [list_path(limit=str(PAGE_LIMIT), q=deepest["phone"][-6:])]),
            Kind(
                "message search",
                [search_path(q) for q in search_queries(db)],
                batch=SEARCH_BATCH,
            ),
        ]
        bodies: dict[str, bytes] = {}
        for kind in kinds:
            for path in kind.paths:
                async with session.get(server.url(path)) as resp:
                    resp.raise_for_status()
                    bodies[path] = await resp.read()
    return kinds, bodies, total


# -- timing -------------------------------------------------------------------------------


async def timed(
    session: aiohttp.ClientSession,
    url: Any,
    paths: list[str],
    count: int,
    into: Latencies | None,
    expect: dict[str, bytes],
) -> None:
    """`count` sequential requests cycling over `paths`; milliseconds appended to `into`
    (during the warm-up, `into` is None and each body is checked against the app's)."""
    clock = time.perf_counter_ns
    for i in range(count):
        path = paths[i % len(paths)]
        started = clock()
        async with session.get(url(path)) as resp:
            body = await resp.read()
        elapsed = clock() - started
        if resp.status != 200:
            raise AssertionError(f"{path}: HTTP {resp.status}")
        if into is not None:
            into.values.append(elapsed / 1e6)
            into.paths.append(path)
        elif body != expect[path]:
            raise AssertionError(f"{path}: the response changed during the run")


async def compare(
    app: RunPy,
    floor: ServerProcess,
    kinds: list[Kind],
    bodies: dict[str, bytes],
    auth: dict[str, str],
) -> dict[tuple[str, str], Latencies]:
    """Interleaved timed runs of both servers for every page kind."""
    results = {(who, k.label): Latencies() for who in ("floor", "app") for k in kinds}
    servers = {"app": (app.url, app.pid), "floor": (floor.url, floor.pid)}
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(headers=auth, connector=connector) as session:
        for url, _ in servers.values():  # warm up both (and check the bytes are identical)
            for kind in kinds:
                await timed(session, url, kind.paths, min(WARMUP, kind.batch), None, bodies)
        gc.collect()
        gc.disable()  # the load generator's own collector would add noise to both
        try:
            for r in range(ROUNDS):
                order = ["app", "floor"] if r % 2 == 0 else ["floor", "app"]
                for who in order:
                    url, pid = servers[who]
                    for kind in kinds:
                        result = results[(who, kind.label)]
                        cpu = cpu_seconds(pid)
                        await timed(session, url, kind.paths, kind.batch, result, bodies)
                        result.cpu_s += cpu_seconds(pid) - cpu
        finally:
            gc.enable()
    return results


def bare_fts(db: str, queries: list[str], rounds: int) -> dict[str, Latencies]:
    """The floor of message search: the same MATCH straight on SQLite, in this process."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    out: dict[str, Latencies] = {}
    sql = (
        "SELECT rowid FROM message_search WHERE message_search MATCH ?"
        f" ORDER BY rowid DESC LIMIT {SEARCH_LIMIT + 1}"
    )
    for q in queries:
        match = search.fts_match_messages(search.parse(q))
        lat = out.setdefault(q, Latencies())
        for i in range(rounds + 3):
            started = time.perf_counter_ns()
            conn.execute(sql, (match,)).fetchall()
            if i >= 3:  # the first reads warm the page cache, as the app's warm-up did
                lat.values.append((time.perf_counter_ns() - started) / 1e6)
    conn.close()
    return out


# -- memory and the collector ------------------------------------------------------------


def memory_main(db: str, window: int, conn: Connection) -> None:
    """Process entry: the snapshot's bytes per row, and full-collection pauses."""
    import server.app  # noqa: F401  (the server's modules are loaded, as in the server)

    async def load(limit: int) -> list[Row]:
        store = SqliteStore(db)
        await store.start()
        rows: list[Row] = []
        after = None
        try:
            while len(rows) < limit:
                chunk = await store.snapshot_entries(after, min(5_000, limit - len(rows)))
                rows += [Row.from_entry(e) for e in chunk]
                if not chunk:
                    break
                after = (chunk[-1].last_activity, chunk[-1].id)
        finally:
            await store.close()
        return rows

    def pause_ms() -> float:
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            gc.collect()
            best = min(best, (time.perf_counter() - started) * 1000)
        return best

    gc.collect()
    tracemalloc.start()
    snapshot = Snapshot(window=window)
    snapshot.load_rows(asyncio.run(load(window)))
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    n = len(snapshot)
    windowed = pause_ms()
    gc.freeze()
    frozen = pause_ms()
    gc.unfreeze()
    big = Snapshot()
    big.load_rows(asyncio.run(load(GC_ROWS)))
    unbounded = pause_ms()
    conn.send((held, n, windowed, frozen, len(big), unbounded, len(gc.get_objects())))


def measure_memory(db: str) -> tuple[Any, ...]:
    parent, child = CTX.Pipe()
    process = CTX.Process(target=memory_main, args=(db, WINDOW, child))
    process.start()
    result = parent.recv()
    process.join()
    return tuple(result)


# -- one size -----------------------------------------------------------------------------


def ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def run_size(count: int, workdir: Path) -> dict[str, Any]:
    """Seed, restart, serve, measure one size; the rows of every table."""
    db = str(workdir / f"bench-{count}.db")
    load_before = load_average()
    started = time.perf_counter()
    auth = asyncio.run(seed(db, count))
    seed_s = time.perf_counter() - started
    size_mb = sum(os.path.getsize(db + s) for s in ("", "-wal") if os.path.exists(db + s)) / 1e6
    print(f"  seeded {count:,} conversations in {seed_s:.1f} s ({size_mb:,.0f} MB)", flush=True)

    ready: list[float] = []
    for _ in range(RESTARTS - 1):
        server = RunPy(db)
        ready.append(server.ready_s)
        server.stop()
    app = RunPy(db)
    ready.append(app.ready_s)
    print("  ready after " + ", ".join(f"{s:.2f} s" for s in ready), flush=True)
    try:
        kinds, bodies, total = asyncio.run(prepare(app, db, auth))
        floor = ServerProcess(floor_server_main, bodies)
        try:
            load_start = load_average()
            results = asyncio.run(compare(app, floor, kinds, bodies, auth))
            load_end = load_average()
            rss = (rss_bytes(app.pid), rss_bytes(app.pid, "VmHWM"))
            floor_rss = rss_bytes(floor.pid)
        finally:
            floor.stop()
    finally:
        app.stop()
    search_kind = kinds[-1]
    queries = [p.split("q=")[1].split("&")[0] for p in search_kind.paths]
    from urllib.parse import unquote

    queries = [unquote(q) for q in queries]
    fts = bare_fts(db, queries, ROUNDS * SEARCH_BATCH // len(queries))
    hits = {
        q: len(orjson.loads(bodies[path])["messages"])
        for q, path in zip(queries, search_kind.paths, strict=True)
    }
    memory = measure_memory(db)
    return {
        "count": count,
        "total": total,
        "seed_s": seed_s,
        "size_mb": size_mb,
        "ready": ready,
        "kinds": kinds,
        "results": results,
        "rss": rss,
        "floor_rss": floor_rss,
        "fts": fts,
        "queries": queries,
        "hits": hits,
        "memory": memory,
        "load": (load_before, load_start, load_end, load_average()),
    }


def tables(runs: list[dict[str, Any]]) -> str:
    """Every table of the run, in markdown."""
    out: list[str] = []
    rows: list[list[object]] = []
    for run in runs:
        count = run["count"]
        rss, peak = run["rss"]
        ready = run["ready"]
        rows.append(
            [
                f"{count:,}",
                f"{run['seed_s']:.0f} s ({run['size_mb']:,.0f} MB)",
                " / ".join(f"{s:.2f}" for s in ready) + " s",
                f"{rss / 2**20:,.0f} MiB (peak {peak / 2**20:,.0f})",
                f"{run['floor_rss'] / 2**20:,.0f} MiB",
                " → ".join(run["load"]),
                verdict(peak <= TARGET_RSS) if count >= TARGET_SIZE else "-",
                verdict(max(ready) <= TARGET_READY_S) if count >= TARGET_SIZE else "-",
            ]
        )
    out.append("Start-up and memory (`python run.py` on the seeded database)\n")
    out.append(
        markdown_table(
            [
                "conversations",
                "seeding (database size)",
                f"start to /readyz, {RESTARTS} restarts",
                "app RSS after the run",
                "floor RSS",
                "load average (seed → timed start → end → after)",
                "RSS <= 400 MiB",
                "ready <= 3 s",
            ],
            rows,
        )
    )
    rows = []
    for run in runs:
        results = run["results"]
        for kind in run["kinds"]:
            f, a = results[("floor", kind.label)], results[("app", kind.label)]
            f50, f99, a50, a99 = f.p(50), f.p(99), a.p(50), a.p(99)
            rows.append(
                [
                    f"{run['count']:,}",
                    kind.label,
                    len(a.values),
                    ms(f50),
                    ms(f99),
                    ms(a50),
                    ms(a99),
                    f"{a50 / f50:.2f}x",
                    f"{a99 / f99:.2f}x",
                    f"{a.p(99.9):.1f} / {max(a.values):.1f}",
                    f"{f.cpu_us:.0f} / {a.cpu_us:.0f}",
                    verdict(a99 <= TARGET_RATIO * f99)
                    if kind.label != "message search"
                    else verdict(a99 <= TARGET_SEARCH_P99_MS),
                ]
            )
    out.append("\nGET requests, one keep-alive connection, milliseconds\n")
    out.append(
        markdown_table(
            [
                "conversations",
                "request",
                "requests",
                "floor p50",
                "floor p99",
                "app p50",
                "app p99",
                "p50 ratio",
                "p99 ratio",
                "app p99.9 / max",
                "server CPU µs/req (floor / app)",
                f"p99 <= {TARGET_RATIO:g}x floor (search: <= {TARGET_SEARCH_P99_MS:g} ms)",
            ],
            rows,
        )
    )
    rows = []
    for run in runs:
        app = run["results"][("app", "message search")]
        fts_all = Latencies([v for lat in run["fts"].values() for v in lat.values])
        rows.append(
            [
                f"{run['count']:,}",
                "all queries",
                ms(fts_all.p(50)),
                ms(fts_all.p(99)),
                ms(app.p(50)),
                ms(app.p(99)),
                f"{app.p(99) / fts_all.p(99):.2f}x",
            ]
        )
        per_path: dict[str, list[float]] = {}
        for path, value in zip(app.paths, app.values, strict=True):
            per_path.setdefault(path, []).append(value)
        for q, path in zip(run["queries"], run["kinds"][-1].paths, strict=True):
            mine = Latencies(per_path.get(path, []))
            bare = run["fts"][q]
            rows.append(
                [
                    "",
                    f"`{q}` ({run['hits'][q]} hits)",
                    ms(bare.p(50)),
                    ms(bare.p(99)),
                    ms(mine.p(50)),
                    ms(mine.p(99)),
                    f"{mine.p(99) / bare.p(99):.2f}x",
                ]
            )
    out.append("\nMessage search: the app over HTTP against the bare FTS5 query, milliseconds\n")
    out.append(
        markdown_table(
            [
                "conversations",
                "query",
                "bare FTS5 p50",
                "bare FTS5 p99",
                "app p50",
                "app p99",
                "p99 ratio",
            ],
            rows,
        )
    )
    rows = []
    for run in runs:
        held, n, windowed, frozen, big_n, unbounded, _ = run["memory"]
        rows.append(
            [
                f"{run['count']:,}",
                f"{n:,}",
                f"{held / max(1, n):,.0f}",
                f"{windowed:.1f}",
                f"{frozen:.1f}",
                f"{big_n:,}",
                f"{unbounded:.1f}",
            ]
        )
    out.append("\nThe snapshot's window and the cyclic garbage collector\n")
    out.append(
        markdown_table(
            [
                "conversations",
                "rows held (window)",
                "bytes/row (tracemalloc)",
                "full collection, window held (ms)",
                "same, frozen after the load (ms)",
                "rows held, unbounded",
                "full collection, unbounded (ms)",
            ],
            rows,
        )
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run every size and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = parser.parse_args(argv)
    print(
        f"python {platform.python_version()}, aiohttp {aiohttp.__version__},"
        f" SQLite {sqlite3.sqlite_version}, {platform.machine()}, {os.cpu_count()} CPUs,"
        f" loopback {HOST}",
        flush=True,
    )
    runs = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-list-") as tmp:
        for count in args.sizes:
            print(f"{count:,} conversations (load average {load_average()})", flush=True)
            runs.append(run_size(count, Path(tmp)))
    print(f"done in {time.perf_counter() - started:.0f} s; load average {load_average()}\n")
    print(tables(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
