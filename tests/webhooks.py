"""Helpers for tests of the WhatsApp flow: Cloud API bodies, signed posts, an SSE reader."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from server.integrations.whatsapp_webhook import sign
from tests.conftest import APP_SECRET

_ids = itertools.count(1)


def wamid() -> str:
    """A fresh WhatsApp-style message id (some contain '/', which ids must survive)."""
    return f"wamid.HBgLMTY1NTU1MTIzNBUCABIYFjNFQjBD/{next(_ids):06d}"


def now_s() -> str:
    return str(int(time.time()))


def message(
    kind: str,
    content: dict[str, Any] | None,
    *,
    frm: str = "966501234567",
    id: str | None = None,
    **more: Any,
) -> dict[str, Any]:
    """One `messages[]` element."""
    m: dict[str, Any] = {"from": frm, "id": id or wamid(), "timestamp": now_s(), "type": kind}
    if content is not None:
        m[kind] = content
    m.update(more)
    return m


def text(body: str, **kw: Any) -> dict[str, Any]:
    return message("text", {"body": body}, **kw)


def status(
    wa_message_id: str, value: str, *, errors: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    s: dict[str, Any] = {
        "id": wa_message_id,
        "status": value,
        "timestamp": now_s(),
        "recipient_id": "966501234567",
    }
    if errors is not None:
        s["errors"] = errors
    return s


def webhook(
    messages: list[dict[str, Any]] = (),  # type: ignore[assignment]
    statuses: list[dict[str, Any]] = (),  # type: ignore[assignment]
    contacts: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Cloud API webhook body with one entry and one `messages` change."""
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": "123"},
    }
    if messages:
        names = contacts or {
            m["from"]: f"Customer {m['from'][-4:]}" for m in messages if "from" in m
        }
        value["contacts"] = [{"profile": {"name": n}, "wa_id": w} for w, n in names.items()]
        value["messages"] = list(messages)
    if statuses:
        value["statuses"] = list(statuses)
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": value}]}],
    }


async def post_webhook(
    client,
    body: dict[str, Any] | bytes,
    *,
    secret: str | None = APP_SECRET,
    signature: str | None = None,
):
    """POST a body to the webhook, signed with `secret` unless a signature is given."""
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    elif secret is not None:
        headers["X-Hub-Signature-256"] = sign(secret, raw)
    return await client.post("/webhooks/whatsapp", data=raw, headers=headers)


async def all_messages(client, conversation_id: str) -> list[dict[str, Any]]:
    resp = await client.get(f"/api/live-chat/conversations/{conversation_id}/messages?limit=200")
    assert resp.status == 200, await resp.text()
    return (await resp.json())["messages"]


async def chats(client) -> list[dict[str, Any]]:
    resp = await client.get("/api/live-chat/unified-chats?limit=100")
    assert resp.status == 200, await resp.text()
    return (await resp.json())["chats"]


async def wait_until(
    check: Callable[[], Awaitable[Any]], within: float = 5.0, interval: float = 0.02
) -> Any:
    """Poll `check` until it returns something truthy; its value."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


@dataclass
class SseEvent:
    id: str | None
    name: str
    data: Any


class SseStream:
    """Reads the raw bytes of GET /api/live-chat/events and splits them into events."""

    def __init__(self, resp) -> None:
        self.resp = resp
        # Every event read so far, in order.
        self.events: list[SseEvent] = []

    @classmethod
    async def open(cls, client) -> SseStream:
        resp = await client.get("/api/live-chat/events")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return cls(resp)

    async def next(self, within: float = 5.0) -> SseEvent:
        event = await asyncio.wait_for(self._read(), within)
        self.events.append(event)
        return event

    async def _read(self) -> SseEvent:
        fields: dict[str, str] = {}
        while True:
            raw = await self.resp.content.readline()
            if not raw:
                raise EOFError("the stream ended")
            line = raw.decode().rstrip("\n")
            if line == "":
                if "event" in fields or "data" in fields:
                    data = json.loads(fields["data"]) if "data" in fields else None
                    return SseEvent(fields.get("id"), fields.get("event", "message"), data)
                fields = {}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value

    async def until(
        self, match: Callable[[SseEvent], bool], within: float = 5.0
    ) -> tuple[SseEvent, list[SseEvent]]:
        """Read until an event matches; it and every event read before it."""
        seen: list[SseEvent] = []
        deadline = time.monotonic() + within
        while True:
            event = await self.next(max(0.01, deadline - time.monotonic()))
            if match(event):
                return event, seen
            seen.append(event)

    async def nothing_for(self, seconds: float) -> list[SseEvent]:
        """Events that arrive within `seconds` (the test expects none of a kind)."""
        events: list[SseEvent] = []
        deadline = time.monotonic() + seconds
        try:
            while True:
                events.append(await self.next(max(0.001, deadline - time.monotonic())))
        except TimeoutError:
            return events

    def close(self) -> None:
        self.resp.close()


def message_event(
    wamid_: str | None = None, *, sender: str | None = None
) -> Callable[[SseEvent], bool]:
    """Matches new_message/new_conversation events for a wamid, or from a sender."""

    def match(event: SseEvent) -> bool:
        if event.name not in ("new_message", "new_conversation"):
            return False
        m = event.data["message"]
        if wamid_ is not None and m["wa_message_id"] != wamid_:
            return False
        return sender is None or m["sender"] == sender

    return match
