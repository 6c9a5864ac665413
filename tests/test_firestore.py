"""Firestore in production shape: realtime on both stores, two instances, pages past the
listener window, and an outage of the store the server must live through."""

from __future__ import annotations

import asyncio
import time

import pytest
from structlog.testing import capture_logs

from server import keys
from server.demo import build_demo
from server.models import now_ms
from server.store.base import InboundMessage, message_id_for_wamid
from tests.conftest import STORE_KINDS
from tests.fakes import graph_settings
from tests.firestore_emulator import Emulator, require_gcloud
from tests.webhooks import (
    SseStream,
    all_messages,
    post_webhook,
    status,
    text,
    wait_until,
    webhook,
)

LIST = "/api/live-chat/unified-chats"


def is_message(message_id: str):
    """Matches the new_message/new_conversation event of one stored message."""

    def match(event) -> bool:
        return (
            event.name in ("new_message", "new_conversation")
            and event.data["message"]["id"] == message_id
        )

    return match


async def all_pages(client, limit: int = 7, **params) -> list[dict]:
    """Every chat of the list, page after page, as the dashboard scrolls."""
    chats: list[dict] = []
    cursor = None
    while True:
        query = {"limit": str(limit), **params}
        if cursor:
            query["cursor"] = cursor
        resp = await client.get(LIST, params=query)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        chats += body["chats"]
        cursor = body["next_cursor"]
        if not body["has_more"]:
            return chats


async def listed_ids(client) -> list[str]:
    return [c["id"] for c in await all_pages(client, limit=100)]


@pytest.mark.parametrize("store_kind", STORE_KINDS, indirect=True)
async def test_a_webhook_message_is_listed_and_broadcast_once_on_either_store(client):
    stream = await SseStream.open(client)
    m = text("is my order on its way?")
    assert (await post_webhook(client, webhook([m]))).status == 200
    mid = message_id_for_wamid(m["id"])
    event, _ = await stream.until(is_message(mid), within=5)
    assert event.name == "new_conversation"
    # The feed brings the same write back (Firestore: ~150 ms later); it is not sent again.
    again = [e for e in await stream.nothing_for(1.0) if is_message(mid)(e)]
    assert again == []
    chats = await wait_until(lambda: listed_ids(client))
    assert chats == [event.data["conversation"]["id"]]
    # An agent action is broadcast once as well.
    cid = chats[0]
    assert (await client.post(f"/api/live-chat/conversations/{cid}/read")).status == 200
    updated, _ = await stream.until(lambda e: e.name == "conversation_updated")
    assert updated.data["conversation"]["unread_count"] == 0
    assert [e.name for e in await stream.nothing_for(0.5)] == []
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["status"] == "ok"
    stream.close()


@pytest.mark.firestore
@pytest.mark.parametrize("store_kind", ["firestore"], indirect=True)
async def test_a_message_whose_commit_answer_was_lost_still_reaches_the_dashboards(
    client, monkeypatch
):
    from server.store.base import StoreUnavailable
    from server.store.firestore import FirestoreStore

    committed = FirestoreStore._transact_once

    async def lost_answer(self, what, fn):
        await committed(self, what, fn)  # it lands in Firestore...
        raise StoreUnavailable(f"firestore did not answer ({what})")  # ...the answer does not

    stream = await SseStream.open(client)
    m = text("did this arrive?")
    monkeypatch.setattr(FirestoreStore, "_transact_once", lost_answer)
    assert (await post_webhook(client, webhook([m]))).status == 503  # Meta will redeliver
    monkeypatch.undo()
    mid = message_id_for_wamid(m["id"])
    event, _ = await stream.until(is_message(mid), within=5)
    assert event.data["message"]["text"] == "did this arrive?"
    # Meta's redelivery is a duplicate: stored once, announced once.
    assert (await post_webhook(client, webhook([m]))).status == 200
    assert [e for e in await stream.nothing_for(1.0) if is_message(mid)(e)] == []
    assert len(await listed_ids(client)) == 1
    stream.close()


@pytest.mark.firestore
@pytest.mark.parametrize("store_kind", ["firestore"], indirect=True)
async def test_two_instances_share_every_message_and_serve_the_same_pages(make_client, graph):
    a = await make_client(instance_id="a", **graph_settings(graph))
    b = await make_client(instance_id="b", **graph_settings(graph))
    conversations, messages = build_demo(25)
    await a.app[keys.STORE].import_conversations(conversations, messages)
    await wait_until(lambda: _holds(b, 25), within=10)
    stream_b = await SseStream.open(b)

    # Longer than the list's 140-character preview: B sends it whole, as A did.
    body = "hello from instance A's customer. " * 10
    m = text(body, frm="966509999999")
    sent = time.monotonic()
    assert (await post_webhook(a, webhook([m]))).status == 200
    mid = message_id_for_wamid(m["id"])
    event, _ = await stream_b.until(is_message(mid), within=5)
    assert time.monotonic() - sent < 1.0, "A's message took over a second to reach B"
    assert event.id.startswith("b-") and event.name == "new_conversation"
    assert event.data["conversation"]["user_id"] == "966509999999"
    assert event.data["message"]["text"] == body
    assert len(event.data["conversation"]["last_message"]["text"]) == 140
    # Exactly once on B, though B also sees later versions of the conversation on its feed.
    later = await stream_b.nothing_for(1.5)
    assert [e for e in later if is_message(mid)(e)] == []

    # An agent answers on A; B's dashboards see the reply and its ticks, sent then read.
    cid = event.data["conversation"]["id"]
    resp = await a.post(f"/api/live-chat/conversations/{cid}/messages", json={"text": "Hi!"})
    assert resp.status == 201
    reply_id = (await resp.json())["id"]
    await stream_b.until(is_message(reply_id), within=5)
    sent, _ = await stream_b.until(
        lambda e: e.name == "message_status" and e.data["message_id"] == reply_id, within=5
    )
    assert sent.data["status"] == "sent"
    [wamid] = [m["wa_message_id"] for m in await all_messages(a, cid) if m["id"] == reply_id]
    assert (await post_webhook(a, webhook(statuses=[status(wamid, "read")]))).status == 200
    read, _ = await stream_b.until(
        lambda e: e.name == "message_status" and e.data["status"] == "read", within=5
    )
    assert read.data["message_id"] == reply_id

    # A burst of one customer's messages in one delivery: A writes them back to back, B's
    # listener may merge them into one change; B's dashboards still get every one, once.
    burst = [text(f"part {i} of my question", frm="966509999999") for i in range(3)]
    assert (await post_webhook(a, webhook(burst))).status == 200
    for m in burst:
        got, _ = await stream_b.until(is_message(message_id_for_wamid(m["id"])), within=5)
        assert got.data["message"]["text"] == m["text"]["body"]
    later = await stream_b.nothing_for(1.0)
    assert not [
        e for e in later if any(is_message(message_id_for_wamid(m["id"]))(e) for m in burst)
    ]

    await wait_until(lambda: _holds(a, 26))
    pages_a = await all_pages(a)
    pages_b = await all_pages(b)
    assert pages_a == pages_b and len(pages_a) == 26
    assert len({c["id"] for c in pages_a}) == 26
    stream_b.close()


async def _holds(client, n: int) -> bool:
    return len(client.app[keys.SNAPSHOT]) == n


@pytest.mark.firestore
@pytest.mark.parametrize("store_kind", ["firestore"], indirect=True)
async def test_pages_past_the_listener_window_are_read_from_the_store_seamlessly(make_client):
    client = await make_client(firestore_window=10)
    conversations, messages = build_demo(35)
    await client.app[keys.STORE].import_conversations(conversations, messages)
    snapshot = client.app[keys.SNAPSHOT]
    await wait_until(lambda: _holds(client, 10), within=10)
    expected = [c.id for c in sorted(conversations, key=lambda c: (-c.last_activity, c.id))]
    with capture_logs() as logs:
        chats = await all_pages(client, limit=7)
    assert [c["id"] for c in chats] == expected
    sources = [e["source"] for e in logs if e["event"] == "unified_chats.served"]
    assert sources[0] == "snapshot" and "store" in sources
    assert not snapshot.complete
    # Filters cross the boundary too.
    for wanted in ("open", "resolved"):
        want = [
            c.id
            for c in sorted(conversations, key=lambda c: (-c.last_activity, c.id))
            if c.status == wanted
        ]
        got = await all_pages(client, limit=4, status=wanted)
        assert [c["id"] for c in got] == want
        assert all(c["status"] == wanted for c in got)
    # So do the Mine and Unassigned filters (an agent's id, or none), with a status or not.
    ordered = sorted(conversations, key=lambda c: (-c.last_activity, c.id))
    assignees = {c.assignee for c in conversations}
    assert None in assignees and len(assignees) > 1
    for assignee in assignees:
        for wanted in (None, "open"):
            want = [c.id for c in ordered if c.assignee == assignee and wanted in (None, c.status)]
            params = {"assignee": assignee or "none"} | ({"status": wanted} if wanted else {})
            got = await all_pages(client, limit=3, **params)
            assert [c["id"] for c in got] == want, params
    # An old conversation that gets a message moves into the window, another one leaves it.
    oldest = next(c for c in conversations if c.id == expected[-1])
    await client.app[keys.STORE].update_conversation(oldest.id, status="open")
    await client.app[keys.INBOX].receive(
        InboundMessage(
            wa_message_id="wamid.back",
            user_id=oldest.user_id,
            user_name=oldest.user_name,
            phone=oldest.phone,
            type="text",
            text="me again",
            at=now_ms(),
        )
    )
    await wait_until(lambda: _first_is(client, oldest.id))
    assert len(snapshot) == 10
    chats = await all_pages(client, limit=7)
    assert chats[0]["id"] == oldest.id
    assert sorted(c["id"] for c in chats) == sorted(expected)


@pytest.mark.firestore
async def test_the_listener_moves_to_a_newer_start_losing_and_repeating_nothing(
    firestore_emulator, firestore_project, monkeypatch
):
    from server.store import firestore as firestore_module
    from tests.firestore_emulator import open_firestore_store

    monkeypatch.setattr(firestore_module, "RELISTEN_DOCS", 3)
    monkeypatch.setattr(firestore_module, "ADVANCE_AFTER_MS", 0)
    # Another instance writes: its changes reach this one through the listener only.
    async with (
        open_firestore_store(firestore_emulator, firestore_project) as store,
        open_firestore_store(firestore_emulator, firestore_project) as other,
    ):
        seen: list[tuple[str, int]] = []
        store.subscribe(
            lambda changes: seen.extend(
                (c.conversation.id, c.conversation.updated_at) for c in changes
            )
        )
        written: list[tuple[str, int]] = []

        async def write(i: int) -> None:
            saved = await other.save_inbound(_inbound(f"wamid.handover.{i}", f"96650000{i:04d}"))
            written.append((saved.conversation.id, saved.conversation.updated_at))

        for i in range(5):
            await write(i)
        await wait_until(lambda: _async(store.needs_advance))  # 5 conversations > 3

        # Writes keep coming, one after another, while the new listener takes over.
        async def keep_writing() -> None:
            for i in range(5, 15):
                await write(i)

        writer = asyncio.create_task(keep_writing())
        with capture_logs() as logs:
            await store.advance()
        await writer
        assert [e["event"] for e in logs].count("firestore.advanced") == 1
        assert store.listening
        await wait_until(lambda: _async(set(written) <= set(seen)))
        await asyncio.sleep(0.5)  # time for a second copy to show up, if there were one
        assert sorted(seen) == sorted(written), "each change exactly once"


@pytest.mark.firestore
@pytest.mark.parametrize("store_kind", ["firestore"], indirect=True)
async def test_a_running_server_keeps_its_listener_small(make_client, monkeypatch):
    from server.store import firestore as firestore_module

    monkeypatch.setattr(firestore_module, "RELISTEN_DOCS", 2)
    monkeypatch.setattr(firestore_module, "ADVANCE_AFTER_MS", 0)
    client = await make_client()
    stream = await SseStream.open(client)
    with capture_logs() as logs:
        for i in range(4):
            m = text(f"message {i}", frm=f"96650000{i:04d}")
            assert (await post_webhook(client, webhook([m]))).status == 200
        await wait_until(
            lambda: _async(any(e["event"] == "firestore.advanced" for e in logs)), within=10
        )
    m = text("after the hand-over", frm="966500009999")
    assert (await post_webhook(client, webhook([m]))).status == 200
    await stream.until(is_message(message_id_for_wamid(m["id"])), within=5)
    chats = await wait_until(lambda: _listed(client, 5))
    assert len(set(chats)) == 5
    stream.close()


async def _listed(client, n: int) -> list[str] | None:
    ids = await listed_ids(client)
    return ids if len(ids) == n else None


async def _async(value):
    return value


def _inbound(wamid: str, user: str) -> InboundMessage:
    return InboundMessage(
        wa_message_id=wamid,
        user_id=user,
        user_name="Customer",
        phone="+" + user,
        type="text",
        text="hello",
        at=now_ms(),
    )


async def _first_is(client, conversation_id: str) -> bool:
    resp = await client.get(LIST, params={"limit": "1"})
    return (await resp.json())["chats"][0]["id"] == conversation_id


# -- an outage ---------------------------------------------------------------------------

OUTAGE_S = 10.0


@pytest.fixture
def own_emulator(tmp_path):
    """An emulator of this test's own: it is stopped and started again on the same port."""
    require_gcloud()
    emulator = Emulator(workdir=tmp_path)
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.mark.firestore
@pytest.mark.timeout(240)
async def test_the_server_lives_through_a_store_outage_and_resyncs(
    make_client, settings, own_emulator, tmp_path
):
    from dataclasses import replace

    s = replace(
        settings,
        store="firestore",
        google_cloud_project="livechat-outage",
        firestore_emulator_host=own_emulator.host,
    )
    client = await make_client(s)
    store = client.app[keys.STORE]
    snapshot = client.app[keys.SNAPSHOT]
    conversations, messages = build_demo(40)
    await store.import_conversations(conversations, messages)
    await wait_until(lambda: _holds(client, 40), within=10)
    before = await listed_ids(client)
    assert len(before) == 40

    # Firestore keeps its data through an outage; the emulator forgets it when it stops.
    # So what it holds is exported just before the outage and imported at the restart:
    # the restarted emulator holds exactly what Firestore would still hold. Nothing is
    # written during the outage (a write would fail: that is the outage).
    export = own_emulator.export("livechat-outage", tmp_path / "export")

    cpu0, wall0 = time.process_time(), time.monotonic()
    own_emulator.kill()
    # The supervisor notices within a health check or two; /readyz asks the store itself.
    degraded = await wait_until(lambda: _readyz(client, 503), within=5, interval=0.2)
    assert degraded["status"] == "degraded"
    await wait_until(lambda: _stale(client), within=5, interval=0.2)
    while time.monotonic() - wall0 < OUTAGE_S:
        resp = await client.get(LIST, params={"limit": "100"})
        assert resp.status == 200
        body = await resp.json()
        assert body["stale"] is True
        assert [c["id"] for c in body["chats"]] == before
        await asyncio.sleep(0.5)
    cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    assert cpu < 0.20, f"the server used {cpu:.0%} of a core while the store was down"

    await asyncio.to_thread(own_emulator.start, export)
    recovered = time.monotonic()
    await wait_until(lambda: _readyz(client, 200), within=10, interval=0.1)
    assert time.monotonic() - recovered < 10
    assert snapshot.fresh
    stored = [c.id for c in await store.load_window(None)]
    after = await listed_ids(client)
    assert after == stored == before
    assert len(set(after)) == 40

    # The listener works again: a new message reaches the list through the feed.
    m = text("back online", frm="966508888888")
    assert (await post_webhook(client, webhook([m]))).status == 200
    await wait_until(lambda: _count(client, 41), within=5)


async def _readyz(client, status: int):
    resp = await client.get("/readyz")
    return await resp.json() if resp.status == status else None


async def _stale(client) -> bool:
    resp = await client.get(LIST, params={"limit": "1"})
    return resp.status == 200 and (await resp.json())["stale"]


async def _count(client, n: int) -> bool:
    return len(await listed_ids(client)) == n
