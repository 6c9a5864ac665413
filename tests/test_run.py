"""The README's first command: `python run.py --demo` serves demo data, as a new user sees it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def read_line_matching(proc: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        line = await loop.run_in_executor(None, proc.stdout.readline)
        if not line:
            break
        if m := re.search(pattern, line):
            return m
    raise AssertionError(f"no line matching {pattern!r}")


async def test_run_demo_serves_demo_data_with_a_printed_token(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVECHAT_", "WHATSAPP_"))}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "--demo", "--port", str(port)],
        cwd=tmp_path,
        env=env | {"LOG_FORMAT": "json"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        token = (await read_line_matching(proc, r"API token: (\S+)", 30)).group(1)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            for _ in range(100):
                try:
                    async with http.get(f"{base}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            async with http.get(f"{base}/api/live-chat/unified-chats") as r:
                body = await r.json()
            assert r.status == 200
            assert body["total"] == 300 and len(body["chats"]) == 30 and body["has_more"]
            names = " ".join(c["user_name"] for c in body["chats"])
            assert re.search(r"[\u0600-\u06FF]", names) and re.search(r"[A-Za-z]", names)
            senders = set()
            statuses = set()
            page = await (await http.get(f"{base}/api/live-chat/unified-chats?limit=100")).json()
            for chat in page["chats"]:
                senders.add(chat["last_message"]["sender"])
                statuses.add(chat["status"])
            assert senders == {"user", "ai", "agent"} and statuses == {"open", "resolved"}
            async with http.get(f"{base}/") as r:
                assert r.status == 200 and "text/html" in r.headers["Content-Type"]
        assert (tmp_path / "livechat-demo.db").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            proc.stdout.close()
    assert proc.returncode == 0
