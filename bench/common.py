"""Shared pieces of the benchmarks: servers in their own processes, percentiles, tables.

Importing this module puts the repository root on sys.path, so `python bench/<name>.py`
works from a plain checkout without installing the package.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import resource
import sys
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOKEN: Final = "bench-token"
AUTH: Final = {"Authorization": f"Bearer {TOKEN}"}
APP_SECRET: Final = "bench-app-secret"
HOST: Final = "127.0.0.1"
# Servers and clients start with `spawn`: a fresh interpreter each, no state copied from
# the parent (which may hold a large data set or a running event loop).
CTX: Final = mp.get_context("spawn")
# A server reports its port within this long, or the benchmark stops (seeding 100,000
# conversations and warming the snapshot takes well under a minute on a laptop).
START_TIMEOUT_S: Final = 300.0


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (1,000 sockets need it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far, from /proc (10 ms ticks)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    """The machine's 1-minute load average: how busy the neighbours were."""
    return f"{os.getloadavg()[0]:.2f}"


def rss_bytes(pid: int | None = None, field: str = "VmRSS") -> int:
    """Resident set size of a process (this one by default), from /proc; `field="VmHWM"`
    for its peak."""
    path = f"/proc/{pid or 'self'}/status"
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def app_settings(db: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of the server's Settings for a benchmark (picklable)."""
    values: dict[str, Any] = {
        "db": db,
        "api_token": TOKEN,
        "secret_key": "bench-secret-key",
        "whatsapp_app_secret": APP_SECRET,
        "whatsapp_verify_token": "bench-verify-token",
        "ai_provider": "off",
        "instance_id": "bench",
        "log_format": "json",
    }
    values.update(overrides)
    return values


def quiet_logs() -> None:
    """JSON log lines, as in production, written to /dev/null: their cost stays measured."""
    from server.logging import configure_logging

    sys.stdout = open(os.devnull, "w", encoding="utf-8")  # open for the process
    configure_logging("json", "info")


async def serve(
    app: web.Application,
    conn: Connection,
    ready: Awaitable[Any] | None,
    access_log_class: type[AbstractAccessLogger] | None = None,
) -> None:
    """Serve `app` on a free loopback port; send the port once ready; stop when told.

    With `access_log_class` each request writes an access line (the real app's, as in
    production); without it none (the floor).
    """
    if access_log_class is None:
        runner = web.AppRunner(app, access_log=None)
    else:
        runner = web.AppRunner(app, access_log_class=access_log_class)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, backlog=1024)
    await site.start()
    if ready is not None:
        await ready
    port = runner.addresses[0][1]
    conn.send(port)
    loop = asyncio.get_running_loop()
    # Serve until the parent says stop (or goes away).
    with contextlib.suppress(EOFError, OSError):
        await loop.run_in_executor(None, conn.recv)
    await runner.cleanup()


def app_server_main(settings_kwargs: dict[str, Any], conn: Connection) -> None:
    """Process entry: the real app from create_app, served until told to stop."""
    raise_nofile()
    quiet_logs()
    from server import keys
    from server.app import create_app
    from server.config import Settings
    from server.serve import AccessLog

    async def main() -> None:
        app = create_app(Settings(**settings_kwargs).validated())

        async def warm() -> None:
            await asyncio.wait_for(app[keys.WARMER].loaded.wait(), START_TIMEOUT_S)

        await serve(app, conn, warm(), AccessLog)

    asyncio.run(main())


class ServerProcess:
    """A server in a child process: its port, its pid, and a clean stop."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self._conn, child = CTX.Pipe()
        self.process: BaseProcess = CTX.Process(target=target, args=(*args, child), daemon=True)
        self.process.start()
        child.close()
        if not self._conn.poll(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"{target.__name__} did not start in {START_TIMEOUT_S} s")
        self.port: int = self._conn.recv()

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.process.pid is not None
        return self.process.pid

    def url(self, path: str) -> str:
        """An absolute URL on this server."""
        return f"http://{HOST}:{self.port}{path}"

    def stop(self) -> None:
        """Ask the server to stop; terminate it if it does not within 10 s."""
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self._conn.close()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile `q` (0..100) of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"
