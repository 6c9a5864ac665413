"""The media route against a bare aiohttp static file: a cached 1 MB image, side by side.

The app is the real one from `create_app` (bearer token, SQLite in a temporary directory,
the file media store, JSON logs to /dev/null) serving
`GET /api/live-chat/media/{message_id}` for an inbound image whose file is kept in the
media store; the floor is a bare aiohttp app in its own process serving the very same file
with `add_static`. One keep-alive session reads whole responses, sequentially; the
servers alternate in rounds, the order flipping every round. Also a range request (the
first 64 KiB, what a player asks for first) on both.

Run: `python bench/bench_media.py` (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Final

import aiohttp
from aiohttp import web
from common import (
    AUTH,
    ServerProcess,
    app_server_main,
    app_settings,
    cpu_seconds,
    load_average,
    markdown_table,
    percentile,
    serve,
    verdict,
)

from server.media import FileMediaStore
from server.models import Media, now_ms
from server.store.base import InboundMessage
from server.store.sqlite import SqliteStore

SIZE: Final = 1024 * 1024
ROUNDS: Final = 8
BATCH: Final = 250
WARMUP: Final = 200
TARGET_RATIO: Final = 1.5


def floor_main(directory: str, conn: Connection) -> None:
    """Process entry: a bare aiohttp app serving the folder as static files."""
    app = web.Application()
    app.router.add_static("/static/", directory)
    asyncio.run(serve(app, conn, None))


async def prepare(root: Path) -> tuple[str, bytes]:
    """A store with one customer's image, its 1 MB file kept; the message id and bytes."""
    data = os.urandom(SIZE)
    store = SqliteStore(str(root / "bench.db"))
    await store.start()
    try:
        saved = await store.save_inbound(
            InboundMessage(
                wa_message_id="wamid.bench-media-1",
                user_id="966500000001",
                user_name="Bench",
                phone="+966500000001",
                type="image",
                text=None,
                at=now_ms(),
                media=Media(id="1234567890", mime_type="image/jpeg", sha256="x"),
            )
        )
        assert saved is not None
        message_id = saved.message.id
        await FileMediaStore(root / "media").put(message_id, data, "image/jpeg")
        await store.set_media(
            message_id, Media(id="1234567890", mime_type="image/jpeg", state="ready", size=SIZE)
        )
    finally:
        await store.close()
    static = root / "static"
    static.mkdir()
    (static / "photo.jpg").write_bytes(data)
    return message_id, data


async def timed(
    session: aiohttp.ClientSession, url: str, n: int, expect: bytes, headers: dict[str, str]
) -> list[float]:
    """Milliseconds of `n` sequential GETs reading the whole body."""
    out = []
    for _ in range(n):
        started = time.perf_counter()
        async with session.get(url, headers=headers) as resp:
            body = await resp.read()
        out.append((time.perf_counter() - started) * 1000)
        if body != expect:
            raise AssertionError(f"{url} answered {resp.status} with {len(body)} bytes")
    return out


async def run(rounds: int, batch: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        message_id, data = await prepare(root)
        app = ServerProcess(
            app_server_main,
            app_settings(str(root / "bench.db"), media_dir=str(root / "media")),
        )
        floor = ServerProcess(floor_main, str(root / "static"))
        try:
            targets = {
                "floor": (floor, floor.url("/static/photo.jpg"), {}),
                "app": (app, app.url(f"/api/live-chat/media/{message_id}"), AUTH),
            }
            rows = []
            for label, rng in (("1 MB image, whole", None), ("first 64 KiB (Range)", 65_536)):
                times: dict[str, list[float]] = {"floor": [], "app": []}
                cpu: dict[str, float] = {"floor": 0.0, "app": 0.0}
                expect = data if rng is None else data[:rng]
                extra = {} if rng is None else {"Range": f"bytes=0-{rng - 1}"}
                async with aiohttp.ClientSession() as session:
                    for _, url, headers in targets.values():
                        await timed(session, url, WARMUP, expect, {**headers, **extra})
                    gc.disable()
                    try:
                        for r in range(rounds):
                            order = ("floor", "app") if r % 2 == 0 else ("app", "floor")
                            for name in order:
                                proc, url, headers = targets[name]
                                before = cpu_seconds(proc.pid)
                                times[name] += await timed(
                                    session, url, batch, expect, {**headers, **extra}
                                )
                                cpu[name] += cpu_seconds(proc.pid) - before
                    finally:
                        gc.enable()
                f, a = sorted(times["floor"]), sorted(times["app"])
                f50, f99 = statistics.median(f), percentile(f, 99)
                a50, a99 = statistics.median(a), percentile(a, 99)
                n = len(a)
                rows.append(
                    (
                        label,
                        n,
                        f"{f50:.3f}",
                        f"{f99:.3f}",
                        f"{a50:.3f}",
                        f"{a99:.3f}",
                        f"{a50 / f50:.2f}x",
                        f"{a99 / f99:.2f}x",
                        f"{cpu['floor'] / n * 1e6:.0f} / {cpu['app'] / n * 1e6:.0f}",
                        verdict(a50 / f50 <= TARGET_RATIO and a99 / f99 <= TARGET_RATIO),
                    )
                )
        finally:
            app.stop()
            floor.stop()
    print(
        f"\nPython {platform.python_version()}, aiohttp {aiohttp.__version__},"
        f" load average {load_average()}\n"
    )
    print(
        markdown_table(
            (
                "request",
                "requests",
                "floor p50",
                "floor p99",
                "app p50",
                "app p99",
                "p50 ratio",
                "p99 ratio",
                "server CPU µs/req (floor / app)",
                "<= 1.5x floor",
            ),
            rows,
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--batch", type=int, default=BATCH)
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
