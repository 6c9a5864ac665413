"""Logs a pipeline takes as they are: under LOG_FORMAT=json every line on stdout is one JSON
object with timestamp, level and event (request_id within a request), aiohttp's and
asyncio's records included, exceptions as fields, and no secret or message text."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import structlog

from server.integrations.whatsapp_webhook import sign
from server.logging import REDACTED, configure_logging
from tests.test_run import free_port
from tests.webhooks import text, webhook

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "logs-test-api-token"
APP_SECRET = "logs-test-app-secret"
VERIFY_TOKEN = "logs-test-verify-token"
PRIVATE_TEXT = "my card number is 4111 1111 1111 1111"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


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


def raw_request(port: int, data: bytes) -> bytes:
    """Send bytes as they are (aiohttp's client would refuse to send a malformed request)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_a_demo_with_traffic_logs_one_json_object_per_line(tmp_path):
    port, metrics_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVECHAT_", "WHATSAPP_"))}
    env |= {
        "LOG_FORMAT": "json",
        "LIVECHAT_API_TOKEN": TOKEN,
        "WHATSAPP_APP_SECRET": APP_SECRET,
        "WHATSAPP_VERIFY_TOKEN": VERIFY_TOKEN,
        "AI_PROVIDER": "builtin",
    }
    stdout_path = tmp_path / "stdout.log"
    with stdout_path.open("wb") as stdout:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "run.py"),
                "--demo",
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
            ],
            cwd=tmp_path,
            env=env,
            stdout=stdout,
            stderr=subprocess.PIPE,
        )
        try:
            async with aiohttp.ClientSession() as http:
                await traffic(http, base, port, metrics_port)
                # A dashboard still connected when the server stops: its stream ends.
                auth = {"Authorization": f"Bearer {TOKEN}"}
                async with http.get(f"{base}/api/live-chat/events", headers=auth) as r:
                    assert r.status == 200
                    await r.content.readline()
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(r.read(), 5)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            stderr = proc.stderr.read().decode()
            proc.stderr.close()
    assert code == 0, stderr
    output = stdout_path.read_text(encoding="utf-8")

    lines = [json.loads(line) for line in output.splitlines()]  # every line, or it raises
    assert len(lines) > 20
    for line in lines:
        assert isinstance(line, dict)
        assert ISO_UTC.match(line["timestamp"]), line
        assert line["level"] in ("debug", "info", "warning", "error", "critical"), line
        assert isinstance(line["event"], str) and line["event"], line

    # The access log: one line per request, in the same format.
    access = [line for line in lines if line["event"] == "http.request"]
    for line in access:
        assert {"request_id", "method", "path", "status", "duration_ms"} <= set(line), line
        assert line["request_id"]
    routes = {(line["method"], line["route"], line["status"]) for line in access}
    assert ("GET", "/api/live-chat/unified-chats", 200) in routes
    assert ("GET", "/api/live-chat/unified-chats", 400) in routes
    assert ("POST", "/webhooks/whatsapp", 200) in routes
    assert ("POST", "/webhooks/whatsapp", 401) in routes
    assert ("POST", "/webhooks/whatsapp", 413) in routes
    assert ("GET", "unmatched", 404) in routes
    assert ("GET", "/api/live-chat/events", 200) in routes
    assert ("UNKNOWN", None, 400) in routes  # refused by aiohttp's parser, never routed

    # A line logged while a request was handled carries that request's id.
    [received] = [line for line in lines if line["event"] == "webhook.received"]
    webhook_ids = {
        line["request_id"]
        for line in access
        if line["route"] == "/webhooks/whatsapp" and line["status"] == 200
    }
    assert received["request_id"] in webhook_ids

    # aiohttp's own error record, through the same renderer: the exception as fields.
    [refused] = [line for line in lines if line.get("logger") == "aiohttp.server"]
    assert refused["level"] == "error"
    [exc] = refused["exception"]
    assert exc["exc_type"] == "BadHttpMessage"
    assert exc["frames"] and all("locals" not in frame for frame in exc["frames"])
    assert REDACTED in exc["exc_value"]  # the token in the malformed header

    # No secret, token or message text on any line.
    for secret in (TOKEN, APP_SECRET, VERIFY_TOKEN, PRIVATE_TEXT, "4111"):
        assert secret not in output, secret

    events = {line["event"] for line in lines}
    assert {"server.listening", "sse.connected", "sse.disconnected", "server.stopped"} <= events


async def traffic(http: aiohttp.ClientSession, base: str, port: int, metrics_port: int) -> None:
    """Requests of every kind: served, refused, failing inside aiohttp, streamed."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    await wait_ready(http, base)
    async with http.get(f"{base}/") as r:
        assert r.status == 200
    async with http.get(f"{base}/api/live-chat/unified-chats", headers=auth) as r:
        assert r.status == 200
    async with http.get(
        f"{base}/api/live-chat/unified-chats", params={"cursor": "x"}, headers=auth
    ) as r:
        assert r.status == 400
    async with http.get(f"{base}/no/such/page") as r:
        assert r.status == 404
    params = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "7"}
    async with http.get(f"{base}/webhooks/whatsapp", params=params) as r:
        assert r.status == 200

    # Server-Sent Events: a dashboard connects and leaves.
    async with http.get(f"{base}/api/live-chat/events", headers=auth) as r:
        assert r.status == 200
        await r.content.readline()

    raw = json.dumps(webhook([text(PRIVATE_TEXT, frm="966500000077")])).encode()
    signed = {"X-Hub-Signature-256": sign(APP_SECRET, raw)}
    async with http.post(f"{base}/webhooks/whatsapp", data=raw, headers=signed) as r:
        assert r.status == 200
    unsigned = {"X-Hub-Signature-256": "sha256=00"}
    async with http.post(f"{base}/webhooks/whatsapp", data=raw, headers=unsigned) as r:
        assert r.status == 401
    # Larger than aiohttp lets a request body be: refused while aiohttp reads it.
    huge = io.BytesIO(b"x" * (5 * 1024 * 1024))
    async with http.post(f"{base}/webhooks/whatsapp", data=huge, headers=signed) as r:
        assert r.status == 413

    # The metrics port needs no token.
    async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
        assert r.status == 200
        assert "livechat_http_requests_total" in await r.text()

    # A request aiohttp's parser refuses, with the token in the broken header line.
    answer = await asyncio.to_thread(
        raw_request,
        port,
        b"GET /api/live-chat/unified-chats HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization Bearer {TOKEN}\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400")
    # Let the AI's reply to the webhook finish before the stop.
    await asyncio.sleep(0.3)


def test_stdlib_records_are_rendered_like_our_own(capsys, logging_restored):
    """asyncio's and aiohttp's loggers, and a secret inside an exception, as JSON fields."""
    configure_logging("json", "info", secret_values=[TOKEN])
    try:
        raise ValueError(f"bad header Bearer {TOKEN}")
    except ValueError:
        logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=True)
    logging.getLogger("aiohttp.server").warning("something %s", "odd")
    logging.getLogger("aiohttp.access").info("an access record aiohttp would write")
    structlog.get_logger("t").info("ours", request_id="r-9")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["event"] for line in lines] == [
        "Task exception was never retrieved",
        "something odd",
        "ours",
    ]
    failed = lines[0]
    assert failed["logger"] == "asyncio" and failed["level"] == "error"
    [exc] = failed["exception"]
    assert exc["exc_type"] == "ValueError"
    assert exc["exc_value"] == f"bad header Bearer {REDACTED}"
    assert all("locals" not in frame for frame in exc["frames"])
    assert all(ISO_UTC.match(line["timestamp"]) for line in lines)
    assert lines[2]["request_id"] == "r-9"
