"""SIGTERM with dashboards connected and an AI reply on its way: a real process stops
gracefully. /readyz says 503 at once, every stream ends, running work finishes within
the bound (or is cut at it), and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from server.integrations.whatsapp_webhook import sign
from server.store.sqlite import SqliteStore
from tests.conftest import APP_SECRET, TOKEN
from tests.test_run import free_port
from tests.webhooks import text, webhook

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOUND_S = 2.0
# What stopping may take beyond the bound: closing sockets, the listener and the store.
CLOSE_S = 2.5
SSE_CLIENTS = 3


class Server:
    """run.py in a process of its own, its JSON log lines in a file."""

    def __init__(self, tmp_path: Path, llm_base: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.db = tmp_path / "live.db"
        self.log_path = tmp_path / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVECHAT_", "AI_"))}
        env |= {
            "PORT": str(self.port),
            "LIVECHAT_DB": str(self.db),
            "LIVECHAT_API_TOKEN": TOKEN,
            "LIVECHAT_SHUTDOWN_TIMEOUT": str(BOUND_S),
            "WHATSAPP_APP_SECRET": APP_SECRET,
            "AI_PROVIDER": "openai",
            "AI_BASE_URL": llm_base,
            "AI_API_KEY": "sk-test",
            "AI_MAX_RETRIES": "0",
            "LOG_FORMAT": "json",
        }
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "run.py")],
            cwd=tmp_path,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def lines(self) -> list[dict]:
        return [
            json.loads(line)
            for line in self.log_path.read_text().splitlines()
            if line.startswith("{")
        ]

    async def wait_exit(self, within: float) -> int | None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return self.process.returncode
            await asyncio.sleep(0.01)
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self._log.close()


async def wait_ready(http: aiohttp.ClientSession, base: str) -> None:
    for _ in range(300):
        try:
            async with http.get(f"{base}/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("the server did not get ready")


async def read_stream(resp: aiohttp.ClientResponse) -> float:
    """Read an SSE stream to its end; when it ended (time.monotonic)."""
    async for _ in resp.content.iter_any():
        pass
    assert resp.content.at_eof()
    return time.monotonic()


@pytest.mark.parametrize("ai", ["finishes", "is_cut", "is_cut_by_a_second_signal"])
async def test_sigterm_drains_streams_and_jobs_and_exits_0(tmp_path, llm, ai):
    server = Server(tmp_path, llm.base)
    try:
        async with aiohttp.ClientSession(headers=AUTH) as http:
            await wait_ready(http, server.base)
            streams = []
            for _ in range(SSE_CLIENTS):
                resp = await http.get(f"{server.base}/api/live-chat/events")
                assert resp.status == 200
                assert (await resp.content.readline()).startswith(b"retry:")
                streams.append(asyncio.ensure_future(read_stream(resp)))

            # A customer writes; the AI job starts and waits on the model.
            llm.block()
            raw = json.dumps(webhook([text("When do you open?", frm="966500000009")])).encode()
            headers = {"X-Hub-Signature-256": sign(APP_SECRET, raw)}
            async with http.post(
                f"{server.base}/webhooks/whatsapp", data=raw, headers=headers
            ) as r:
                assert r.status == 200
            await llm.wait_for_requests(1, within=10)

            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)

            # /readyz turns 503 at once; new work is refused; liveness still answers.
            while True:
                async with http.get(f"{server.base}/readyz") as r:
                    if r.status == 503:
                        assert (await r.json())["status"] == "stopping"
                        break
                assert time.monotonic() - signalled < 0.5, "/readyz still 200"
            async with http.get(f"{server.base}/api/live-chat/unified-chats") as r:
                assert r.status == 503
                assert (await r.json())["error"]["code"] == "shutting_down"
            async with http.get(f"{server.base}/healthz") as r:
                assert r.status == 200

            # Every open stream has ended.
            ended = await asyncio.wait_for(asyncio.gather(*streams), 2)
            assert all(t - signalled < 1.0 for t in ended)

            if ai == "finishes":
                await asyncio.sleep(0.3)
                llm.release()
            elif ai == "is_cut_by_a_second_signal":
                await asyncio.sleep(0.3)
                server.process.send_signal(signal.SIGINT)
            code = await server.wait_exit(BOUND_S + CLOSE_S)
            exited = time.monotonic() - signalled
    finally:
        server.stop()

    assert code == 0
    if ai == "is_cut":
        assert BOUND_S - 0.1 <= exited < BOUND_S + CLOSE_S
    else:  # the work was done, or a second signal cut it: no wait for the bound
        assert exited < BOUND_S

    # The AI work is saved, or was cut at the bound and left no half-written reply.
    store = SqliteStore(str(server.db))
    await store.start()
    try:
        [conversation] = await store.load_window(None)
        messages, _ = await store.list_messages(conversation.id, 50, None)
        pending = await store.claim_tasks(limit=10, kind="ai", steal=True)
        sends = await store.claim_tasks(limit=10, kind="send", steal=True)
    finally:
        await store.close()
    [customer] = [m for m in messages if m.sender == "user"]
    replies = [m for m in messages if m.sender == "ai"]
    events = [line["event"] for line in server.lines()]
    if ai == "finishes":
        # The reply is stored once; its send ran, or waits in the store for the next start.
        [reply] = replies
        assert reply.text == llm.reply
        assert "ai.replied" in events and "ai.cancelled" not in events
        assert pending == []
        if reply.status == "queued":
            assert [t.message_id for t in sends] == [reply.id]
        else:
            assert reply.status == "not_sent" and sends == []  # WhatsApp is not configured
    else:
        # Cut (at the bound, or by the second signal): no reply, and the AI task is pending
        # in the store for the next start (or another instance) to resume.
        assert replies == []
        assert "ai.cancelled" in events
        assert [(t.kind, t.message_id) for t in pending] == [("ai", customer.id)]
        if ai == "is_cut":
            [drained] = [line for line in server.lines() if line["event"] == "jobs.drained"]
            assert drained["timed_out"] is True
        else:
            assert "jobs.cut" in events and "jobs.drained" not in events
    assert events.index("server.stopping") < events.index(
        "ai.replied" if ai == "finishes" else "ai.cancelled"
    )
    assert events[-1] == "server.stopped"
