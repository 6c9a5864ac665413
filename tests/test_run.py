"""The README's first command: `python run.py --demo` serves demo data, as a new user sees it."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp

from server.integrations.whatsapp_webhook import sign
from server.simulate import DEMO_APP_SECRET

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVECHAT_", "WHATSAPP_"))}
    env.pop("FIRESTORE_EMULATOR_HOST", None)
    return env


class Output:
    """Everything a process writes to a file descriptor, collected by a thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # the terminal's other end closed
                return
            if not chunk:
                return
            with self._lock:
                self.text += chunk.decode(errors="replace")

    async def wait_for(self, pattern: str, timeout: float = 30) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = re.search(pattern, self.text)
            if found:
                return found
            await asyncio.sleep(0.05)
        raise AssertionError(f"no output matching {pattern!r} in:\n{self.text[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


async def wait_ready(http: aiohttp.ClientSession, base: str) -> None:
    for _ in range(200):
        try:
            async with http.get(f"{base}/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("the server did not become ready")


async def test_run_demo_serves_demo_data_and_prints_its_sign_in_on_a_terminal(tmp_path):
    port = free_port()
    # A terminal, as a person running the README's command has: the only place the
    # generated demo password is printed.
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "--demo", "--port", str(port)],
        cwd=tmp_path,
        env=clean_env() | {"LOG_FORMAT": "json"},
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    output = Output(leader)
    try:
        email = (await output.wait_for(r"sign in as (\S+@\S+)")).group(1)
        password = (await output.wait_for(r"password: (\S+)")).group(1)
        assert email == "admin@example.com"
        base = f"http://127.0.0.1:{port}"
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            await wait_ready(http, base)
            async with http.get(f"{base}/api/live-chat/unified-chats") as r:
                assert r.status == 401
            async with http.post(
                f"{base}/api/auth/login", json={"email": email, "password": password}
            ) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["agent"]["role"] == "admin"
            async with http.get(f"{base}/api/live-chat/unified-chats") as r:
                body = await r.json()
            assert r.status == 200
            assert body["total"] == 300 and len(body["chats"]) == 30 and body["has_more"]
            names = " ".join(c["user_name"] for c in body["chats"])
            assert re.search(r"[\u0600-\u06FF]", names) and re.search(r"[A-Za-z]", names)
            page = await (await http.get(f"{base}/api/live-chat/unified-chats?limit=100")).json()
            senders = {chat["last_message"]["sender"] for chat in page["chats"]}
            statuses = {chat["status"] for chat in page["chats"]}
            assert senders == {"user", "ai", "agent"} and statuses == {"open", "resolved"}
            team = await (await http.get(f"{base}/api/agents")).json()
            assert {a["email"] for a in team["agents"]} >= {email, "reem@example.com"}
            mine = await (
                await http.get(f"{base}/api/live-chat/unified-chats?assignee=none")
            ).json()
            assert 0 < mine["total"] < 300
            async with http.get(f"{base}/") as r:
                assert r.status == 200 and "text/html" in r.headers["Content-Type"]

            # A customer writes: their phone number never appears in the logs.
            phone = "966512340987"
            raw = json.dumps(webhook_body(phone)).encode()
            headers = {
                "Content-Type": "application/json",
                "X-Hub-Signature-256": sign(DEMO_APP_SECRET, raw),
            }
            async with http.post(f"{base}/webhooks/whatsapp", data=raw, headers=headers) as r:
                assert r.status == 200
            await output.wait_for(r'"event":\s*"webhook.received"')
            await output.wait_for(r'"event":\s*"sse.broadcast"')
            await asyncio.sleep(0.5)  # the AI job's lines too

        # A request too broken to route: aiohttp's own error comes out as a JSON line too.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n")
        await writer.drain()
        assert b" 400 " in (await reader.read(100)).split(b"\r\n")[0]
        writer.close()
        line = await output.wait_for(r'\{[^\n]*"logger":\s*"aiohttp\.server"[^\n]*\}')
        record = json.loads(line.group(0))
        assert record["level"] == "error" and "Error handling request" in record["event"]
        assert (tmp_path / "livechat-demo.db").exists()
    finally:
        stop(proc)
    assert proc.returncode == 0
    logged = output.text
    assert '"event": "ai.replied"' in logged or '"event":"ai.replied"' in logged
    assert phone not in logged
    assert password not in logged.replace(f"password: {password}", "")


def webhook_body(phone: str) -> dict:
    return {
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
                            "contacts": [{"profile": {"name": "Hana"}, "wa_id": phone}],
                            "messages": [
                                {
                                    "from": phone,
                                    "id": "wamid.HBgMOTY2NTEyMzQwOTg3FQIAEhgUM0E",
                                    "timestamp": str(int(time.time())),
                                    "type": "text",
                                    "text": {"body": "What are your opening hours?"},
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }


async def test_a_generated_password_is_not_printed_where_it_is_not_a_terminal(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "--demo", "--port", str(port),
         "--demo-conversations", "5"],
        cwd=tmp_path,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    output = Output(proc.stdout.fileno())
    try:
        await output.wait_for(r"sign in as admin@example.com")
        await output.wait_for(r"shown only on a terminal; set one with `python run.py agents")
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, f"http://127.0.0.1:{port}")
    finally:
        stop(proc)
        proc.stdout.close()
    assert "password:" not in output.text


def test_production_refuses_a_weak_setting_at_start_up_naming_it(tmp_path):
    env = clean_env() | {
        "LIVECHAT_ENV": "production",
        "LIVECHAT_SECRET_KEY": "too-short",
        "WHATSAPP_APP_SECRET": "s" * 40,
        "WHATSAPP_VERIFY_TOKEN": "v" * 40,
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "run.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "LIVECHAT_SECRET_KEY must be at least 32 characters in production" in done.stderr
