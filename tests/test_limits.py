"""Limits on what a client can make the server hold: body sizes, slow bodies, field lengths."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from dataclasses import replace

import pytest

from server import keys
from server.access import API_BODY, WEBHOOK_BODY
from server.demo import build_demo
from server.integrations.whatsapp_webhook import sign
from server.models import now_ms
from tests.accounts import add_agent
from tests.conftest import APP_SECRET, TOKEN
from tests.webhooks import text, webhook


async def error_of(resp) -> dict:
    body = await resp.json()
    assert set(body) == {"error"}, body
    return body["error"]


async def seed(client, count: int = 3):
    """Demo conversations whose customers wrote a moment ago (the 24-hour window is open)."""
    conversations, messages = build_demo(count)
    conversations = [replace(c, last_inbound_at=now_ms()) for c in conversations]
    await client.app[keys.STORE].import_conversations(conversations, messages)
    return conversations


async def message_count(client, conversation_id: str) -> int:
    url = f"/api/live-chat/conversations/{conversation_id}/messages?limit=200"
    return len((await (await client.get(url)).json())["messages"])


async def test_an_oversized_api_body_is_413_and_stores_nothing(client):
    [c, *_] = await seed(client)
    before = await message_count(client, c.id)
    url = f"/api/live-chat/conversations/{c.id}/messages"
    big = json.dumps({"text": "x" * API_BODY}).encode()
    resp = await client.post(url, data=big, headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await error_of(resp))["code"] == "body_too_large"

    # Without a Content-Length (chunked), cut off as soon as it passes the limit.
    async def chunks():
        yield b'{"text": "'
        for _ in range(API_BODY // 1024 + 1):
            yield b"y" * 1024
        yield b'"}'

    resp = await client.post(url, data=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert await message_count(client, c.id) == before
    # Just under the limit is read (and judged on its content: too long a reply).
    resp = await client.post(url, json={"text": "z" * 4097})
    assert resp.status == 400 and (await error_of(resp))["code"] == "invalid_text"


async def test_the_webhook_takes_4_mb_and_refuses_more(client):
    body = webhook([text("hello")])
    raw = json.dumps(body).encode()
    padded = raw[:-1] + b', "padding": "' + b"p" * (WEBHOOK_BODY - len(raw) - 100) + b'"}'
    assert API_BODY < len(padded) < WEBHOOK_BODY
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sign(APP_SECRET, padded)}
    resp = await client.post("/webhooks/whatsapp", data=io.BytesIO(padded), headers=headers)
    assert resp.status == 200, await resp.text()
    too_big = padded[:-2] + b"p" * 200 + b'"}'
    assert len(too_big) > WEBHOOK_BODY
    headers["X-Hub-Signature-256"] = sign(APP_SECRET, too_big)
    resp = await client.post("/webhooks/whatsapp", data=io.BytesIO(too_big), headers=headers)
    assert resp.status == 413
    chats = await (await client.get("/api/live-chat/unified-chats")).json()
    assert chats["total"] == 1  # the first delivery only


async def stalled_request(port: int, head: str, sent: bytes) -> tuple[bytes, float]:
    """Send a request's head and part of its body, then nothing; (what came back, seconds
    until the server closed the connection)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, head.encode() + sent)
    started = time.monotonic()
    received = b""
    try:
        async with asyncio.timeout(10):
            while chunk := await loop.sock_recv(sock, 65536):
                received += chunk
    finally:
        sock.close()
    return received, time.monotonic() - started


@pytest.mark.parametrize("target", ["webhook", "api"])
async def test_a_stalled_body_is_cut_off_with_408_and_the_connection_closed(make_client, target):
    client = await make_client(body_timeout_s=0.5)
    [c, *_] = await seed(client)
    if target == "webhook":
        path, auth = "/webhooks/whatsapp", ""
    else:
        path = f"/api/live-chat/conversations/{c.id}/messages"
        auth = f"Authorization: Bearer {TOKEN}\r\n"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{client.port}\r\n{auth}"
        "Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
    )
    received, took = await stalled_request(client.port, head, b'{"text": "hel')
    assert received.startswith(b"HTTP/1.1 408 "), received[:80]
    assert b'"code":"body_timeout"' in received.replace(b" ", b"")
    assert 0.4 < took < 3.0, took  # cut off after the timeout, and the socket closed
    if target == "api":
        assert await message_count(client, c.id) == len(
            [m for m in build_demo(3)[1] if m.conversation_id == c.id]
        )


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        (
            "/api/agents",
            {"email": "a" * 250 + "@example.com", "name": "A", "password": "p" * 12},
            "invalid_email",
        ),
        (
            "/api/agents",
            {"email": "a@example.com", "name": "N" * 101, "password": "p" * 12},
            "invalid_name",
        ),
        (
            "/api/agents",
            {"email": "a@example.com", "name": "Bad\u0000Name", "password": "p" * 12},
            "invalid_name",
        ),
        (
            "/api/agents",
            {"email": "a@example.com", "name": "A", "password": "short"},
            "weak_password",
        ),
        (
            "/api/agents",
            {"email": "a@example.com", "name": "A", "password": "p" * 257},
            "weak_password",
        ),
        (
            "/api/agents",
            {"email": "a@example.com", "name": "A", "password": "p" * 12, "role": "owner"},
            "invalid_role",
        ),
        ("/api/auth/login", {"email": "e" * 255, "password": "x"}, "invalid_email"),
        ("/api/auth/login", {"email": "a@example.com", "password": "p" * 257}, "invalid_password"),
    ],
)
async def test_free_text_fields_have_length_limits(client, sign_in, path, body, code):
    await add_agent(client.app, "root@example.com", role="admin")
    admin = await sign_in(client, "root@example.com")
    before = len(client.app[keys.ACCOUNTS].agents())
    resp = await admin.post(path, json=body)
    assert resp.status == 400
    assert (await error_of(resp))["code"] == code
    assert len(client.app[keys.ACCOUNTS].agents()) == before
