"""Start-up: the single executable against `python run.py`, from exec to the first 200 of
/readyz, and the executable's size.

Each start is a fresh process in a fresh temporary folder (`--demo`: seeds 300 demo
conversations into a new SQLite file, then loads the snapshot), stopped with SIGTERM once
ready; the two commands alternate. The executable is dist/livechat (build it first:
`pyinstaller livechat.spec --noconfirm`).

Run: `python bench/bench_startup.py` (about a minute; `--starts 5` for a quick look).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Final

from common import ROOT, load_average, markdown_table, percentile

BINARY: Final = ROOT / "dist" / "livechat"
STARTS: Final = 15
READY_TIMEOUT_S: Final = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def time_to_ready(command: list[str], env: dict[str, str]) -> float:
    """Seconds from starting `command` to its first 200 from /readyz; then it is stopped."""
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        process = subprocess.Popen(
            [*command, "--demo", "--port", str(port)],
            cwd=folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while time.perf_counter() - started < READY_TIMEOUT_S:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                        if r.status == 200:
                            return time.perf_counter() - started
                except (urllib.error.URLError, ConnectionError):
                    pass
                time.sleep(0.005)
            raise RuntimeError(f"{command} was not ready in {READY_TIMEOUT_S} s")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=STARTS)
    args = parser.parse_args()
    if not BINARY.exists():
        sys.exit(f"{BINARY} is missing: pyinstaller livechat.spec --noconfirm")
    env = {"LIVECHAT_API_TOKEN": "bench-token", "LOG_FORMAT": "json"}
    python_env = {**env, "PATH": os.environ.get("PATH", "")}
    commands = {
        "dist/livechat": ([str(BINARY)], env),
        "python run.py": ([sys.executable, str(ROOT / "run.py")], python_env),
    }
    print(f"load average {load_average()}; {args.starts} starts each")
    times: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(args.starts):
        order = list(commands) if i % 2 == 0 else list(reversed(commands))
        for name in order:
            command, command_env = commands[name]
            times[name].append(time_to_ready(command, command_env) * 1000)
    rows = []
    for name, values in times.items():
        values.sort()
        rows.append(
            (
                name,
                len(values),
                f"{percentile(values, 50):.0f}",
                f"{percentile(values, 90):.0f}",
                f"{max(values):.0f}",
                f"{statistics.mean(values):.0f}",
            )
        )
    print(f"load average at the end {load_average()}")
    print()
    size = BINARY.stat().st_size
    print(f"dist/livechat: {size:,} bytes ({size / 2**20:.1f} MiB)")
    print()
    print("Start to the first 200 from /readyz with --demo (milliseconds)")
    print()
    print(markdown_table(("command", "starts", "p50", "p90", "max", "mean"), rows))


if __name__ == "__main__":
    main()
