"""Firestore in production shape: realtime on both stores, two instances, pages past the
listener window, and an outage of the store the server must live through."""

from __future__ import annotations

import asyncio
import contextlib
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
from tests.prometheus import scrape
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
    m = await scrape(client)
    assert m("livechat_listener_up") == 1 and m("livechat_snapshot_fresh") == 1
    assert m("livechat_listener_outages_total") == 0
    # A listener replaced for going silent on a busy machine also counts as a restart.
    restarts_before = m("livechat_listener_restarts_total")

    # Firestore keeps its data through an outage; the emulator forgets it when it stops.
    # So what it holds is exported just before the outage and imported at the restart:
    # the restarted emulator holds exactly what Firestore would still hold. Nothing is
    # written during the outage (a write would fail: that is the outage).
    export = own_emulator.export("livechat-outage", tmp_path / "export")

    cpu0, wall0 = time.process_time(), time.monotonic()
    own_emulator.kill()
    # The supervisor notices within a few health checks. /readyz stays 200 (the snapshot
    # is warm: the load balancer keeps the instance) and says degraded.
    # Three failed checks in a row (a blip is not an outage): seconds, more on a busy machine.
    await wait_until(lambda: _stale(client), within=30, interval=0.2)
    degraded = await _readyz(client, 200)
    assert degraded is not None and degraded["status"] == "degraded"
    m = await scrape(client)
    assert m("livechat_listener_up") == 0 and m("livechat_snapshot_fresh") == 0
    assert m("livechat_listener_outages_total") == 1
    assert m("livechat_snapshot_conversations") == 40
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
    await wait_until(lambda: _ready_ok(client), within=10, interval=0.1)
    assert time.monotonic() - recovered < 10
    assert snapshot.fresh
    stored = [c.id for c in await store.load_window(None)]
    after = await listed_ids(client)
    assert after == stored == before
    assert len(set(after)) == 40
    m = await scrape(client)
    assert m("livechat_listener_up") == 1 and m("livechat_snapshot_fresh") == 1
    assert m("livechat_listener_outages_total") == 1
    assert m("livechat_listener_restarts_total") >= restarts_before + 1

    # The listener works again: a new message reaches the list through the feed.
    m = text("back online", frm="966508888888")
    assert (await post_webhook(client, webhook([m]))).status == 200
    await wait_until(lambda: _count(client, 41), within=5)


async def _readyz(client, status: int):
    resp = await client.get("/readyz")
    return await resp.json() if resp.status == status else None


async def _ready_ok(client) -> bool:
    body = await _readyz(client, 200)
    return body is not None and body["status"] == "ok"


async def _stale(client) -> bool:
    resp = await client.get(LIST, params={"limit": "1"})
    return resp.status == 200 and (await resp.json())["stale"]


async def _count(client, n: int) -> bool:
    return len(await listed_ids(client)) == n


@pytest.mark.firestore
@pytest.mark.parametrize("store_kind", ["firestore"], indirect=True)
async def test_a_tick_on_an_older_reply_reaches_the_other_instance(make_client, graph):
    a = await make_client(instance_id="a", **graph_settings(graph))
    b = await make_client(instance_id="b", **graph_settings(graph))
    assert (await post_webhook(a, webhook([text("hi", frm="966508887777")]))).status == 200
    [conversation] = await wait_until(lambda: _chats_of(a))
    cid = conversation["id"]
    replies = []
    for body in ("first reply", "second reply"):
        resp = await a.post(f"/api/live-chat/conversations/{cid}/messages", json={"text": body})
        replies.append((await resp.json())["id"])

    async def both_sent():
        stored = {m["id"]: m for m in await all_messages(a, cid)}
        return all(stored[r]["status"] == "sent" for r in replies) and stored

    stored = await wait_until(both_sent)
    stream_b = await SseStream.open(b)
    older = stored[replies[0]]["wa_message_id"]
    assert (await post_webhook(a, webhook(statuses=[status(older, "read")]))).status == 200
    event, _ = await stream_b.until(
        lambda e: e.name == "message_status" and e.data["message_id"] == replies[0], within=5
    )
    assert event.data["status"] == "read"
    stream_b.close()


async def _chats_of(client):
    return (await (await client.get(LIST)).json())["chats"]


def test_a_burst_merged_past_what_the_document_carries_asks_open_panes_to_reload():
    from server.store.firestore import FEED_MESSAGES_KEPT, FirestoreStore
    from tests.firestore_emulator import firestore_settings

    store = FirestoreStore(
        firestore_settings(Emulator(port=1), "livechat-unit"), None, ai_replies=False
    )

    def doc(version: int, seqs: range) -> dict:
        base = {
            "id": "c1",
            "user_id": "u1",
            "user_name": "Sara",
            "phone": "+966500000000",
            "status": "open",
            "unread_count": 0,
            "ai_enabled": True,
            "created_at": 1,
            "last_activity": version,
            "updated_at": version,
            "feed_seq": seqs[-1],
        }
        base["feed_messages"] = [
            {
                "message": {
                    "id": f"m{n}",
                    "conversation_id": "c1",
                    "direction": "in",
                    "sender": "user",
                    "type": "text",
                    "text": f"part {n}",
                    "at": 100 + n,
                    "status": "received",
                },
                "new_conversation": n == 1,
                "version": 100 + n,
                "seq": n,
            }
            for n in seqs
        ]
        return base

    first = store._change(False, doc(101, range(1, 2)), 0)
    assert first is not None and not first.missed
    # The listener merged eight writes; the document carries the last five.
    merged = store._change(False, doc(109, range(9 - FEED_MESSAGES_KEPT + 1, 10)), 0)
    assert merged is not None and merged.missed
    assert len(merged.messages) == FEED_MESSAGES_KEPT
    # Next time nothing is missing.
    following = store._change(False, doc(110, range(6, 11)), 0)
    assert following is not None and not following.missed


@pytest.mark.firestore
@pytest.mark.timeout(120)
async def test_under_an_outage_every_store_call_returns_within_its_bound(own_emulator):
    from server.store.base import StoreError
    from server.store.firestore import OP_TIMEOUT_S
    from tests.firestore_emulator import open_firestore_store

    async with open_firestore_store(own_emulator, "livechat-bounds") as store:
        saved = await store.save_inbound(_inbound("wamid.bound-1", "966500000001"))
        assert saved is not None
        cid = saved.conversation.id
        reply = await store.save_outbound(cid, sender="agent", text="hi", take_over=True)
        assert reply.task is not None
        await store.set_delivery(reply.message.id, status="failed")
        calls = {
            "ping": store.ping(),
            "load_window": store.load_window(10),
            "page_after": store.page_after((saved.conversation.last_activity, cid), 10, None),
            "count": store.count("open"),
            "get_conversation": store.get_conversation(cid),
            "list_messages": store.list_messages(cid, 10, None),
            "get_message": store.get_message(reply.message.id),
            "save_inbound": store.save_inbound(_inbound("wamid.bound-2", "966500000002")),
            "save_outbound": store.save_outbound(cid, sender="agent", text="again"),
            "set_delivery": store.set_delivery(reply.message.id, status="sent"),
            "apply_status": store.apply_status("wamid.unknown", "read", None),
            "update_conversation": store.update_conversation(cid, mark_read=True),
            "retry_send": store.retry_send(reply.message.id),
            "claim_tasks": store.claim_tasks(limit=5, kind="send"),
            "mark_sending": store.mark_sending(reply.task),
            "renew_tasks": store.renew_tasks([reply.task.id]),
            "finish_task": store.finish_task(reply.task),
        }

        async def timed(call):
            started = time.monotonic()
            try:
                await call
                outcome = "answered"
            except StoreError as e:
                outcome = type(e).__name__
            return outcome, time.monotonic() - started

        own_emulator.freeze()
        try:
            results = dict(
                zip(calls, await asyncio.gather(*(timed(c) for c in calls.values())), strict=True)
            )
        finally:
            own_emulator.thaw()
        slow = {name: r for name, r in results.items() if r[1] > OP_TIMEOUT_S + 1}
        assert not slow, slow
        failed = {name for name, (outcome, _) in results.items() if outcome != "answered"}
        assert failed >= {"ping", "save_inbound", "set_delivery", "update_conversation"}


# -- the feed in production shape: hand-over, blips, deletes ------------------------------


def _raw_conversation_doc(user_id: str, conversation_id: str, when_ms: int) -> dict:
    """A conversation document as the store writes it (feed_at set by the caller)."""
    from server.models import Conversation
    from server.store.firestore import _document

    conversation = Conversation(
        id=conversation_id,
        user_id=user_id,
        user_name="Late Commit",
        phone="+966500000099",
        channel="whatsapp",
        status="open",
        unread_count=1,
        ai_enabled=True,
        assignee=None,
        created_at=when_ms,
        last_activity=when_ms,
        last_message=None,
        updated_at=when_ms,
    )
    return _document(conversation, {}, None)


@pytest.mark.firestore
@pytest.mark.parametrize("store_kind", ["firestore"], indirect=True)
async def test_a_commit_stamped_before_the_hand_over_mark_is_delivered_once(make_client):
    from datetime import timedelta

    a = await make_client(instance_id="a")
    store = a.app[keys.STORE]
    stream = await SseStream.open(a)
    # The listener stops (a hand-over, or it died); a commit whose request time is before
    # the last read time it had lands only now, so it never saw it.
    await store.unlisten()
    resume = store._resume_from
    assert resume is not None
    doc = _raw_conversation_doc("966500000099", "c_late_commit", now_ms())
    doc["feed_at"] = resume - timedelta(seconds=5)
    await store._client.document("users/966500000099/conversations/c_late_commit").set(doc)
    await store.catch_up()
    _event, _ = await stream.until(
        lambda e: (
            e.name == "conversation_updated" and e.data["conversation"]["id"] == "c_late_commit"
        ),
        within=10,
    )
    assert a.app[keys.SNAPSHOT].get("c_late_commit") is not None
    again = await stream.nothing_for(1.5)
    assert not [e for e in again if "c_late_commit" in json_of(e)]
    stream.close()


def json_of(event) -> str:
    import json

    return json.dumps(event.data)


@pytest.mark.firestore
@pytest.mark.parametrize("store_kind", ["firestore"], indirect=True)
@pytest.mark.timeout(120)
async def test_a_listener_killed_ten_times_costs_no_reload_no_resync_and_no_change(
    make_client, graph
):
    a = await make_client(instance_id="a", **graph_settings(graph))
    b = await make_client(instance_id="b", **graph_settings(graph))
    store = a.app[keys.STORE]
    stream = await SseStream.open(a)
    sent: list[str] = []
    with capture_logs() as logs:
        for i in range(10):
            feed = store._feeds[-1]
            store._feed_failed(feed, "killed by the test")  # what a failing callback does
            m = text(f"message {i} while A's listener was killed", frm=f"9665000001{i:02d}")
            assert (await post_webhook(b, webhook([m]))).status == 200
            sent.append(message_id_for_wamid(m["id"]))
            await wait_until(lambda f=feed: _replaced(store, f), within=30, interval=0.1)

        async def replaced_ten_times() -> bool:
            # The new listener streams a moment before catch_up logs the replacement.
            return len([e for e in logs if e["event"] == "firestore.listener_replaced"]) >= 10

        await wait_until(replaced_ten_times, within=10, interval=0.05)
    for mid in sent:
        if not any(is_message(mid)(e) for e in stream.events):
            await stream.until(is_message(mid), within=20)
    later = await stream.nothing_for(2.0)
    everything = stream.events
    assert not [e for e in everything if e.name == "resync"]
    for mid in sent:
        assert len([e for e in everything if is_message(mid)(e)]) == 1
    assert not [e for e in later if any(is_message(mid)(e) for mid in sent)]
    assert not [e for e in logs if e["event"] in ("snapshot.loaded", "firestore.outage")]
    assert len([e for e in logs if e["event"] == "firestore.listener_replaced"]) >= 10
    stream.close()


async def _replaced(store, feed) -> bool:
    return bool(store._feeds) and store._feeds[-1] is not feed and store.listening


@pytest.mark.firestore
@pytest.mark.parametrize("store_kind", ["firestore"], indirect=True)
@pytest.mark.timeout(120)
async def test_a_silent_listener_is_found_by_its_heartbeat_and_replaced(
    make_client, graph, monkeypatch
):
    import server.store.firestore as fs

    # Seconds instead of the production 10 s beat and 30 s stall (found within a minute).
    monkeypatch.setattr(fs, "HEARTBEAT_S", 0.5)
    monkeypatch.setattr(fs, "STALL_AFTER_S", 3.0)
    a = await make_client(instance_id="a", **graph_settings(graph))
    b = await make_client(instance_id="b", **graph_settings(graph))
    store = a.app[keys.STORE]
    stream = await SseStream.open(a)
    silent = store._feeds[-1]
    deliver = store._deliver

    def muted(feed, batch):  # the watch says it is active but delivers nothing
        if feed is not silent:
            deliver(feed, batch)

    monkeypatch.setattr(store, "_deliver", muted)
    m = text("sent while A's listener is silent", frm="966500000200")
    assert (await post_webhook(b, webhook([m]))).status == 200
    started = time.monotonic()
    _event, _ = await stream.until(is_message(message_id_for_wamid(m["id"])), within=60)
    assert time.monotonic() - started < 60
    assert store._feeds[-1] is not silent
    assert not [e for e in stream.events if e.name == "resync"]
    stream.close()


@pytest.mark.firestore
@pytest.mark.parametrize("store_kind", ["firestore"], indirect=True)
async def test_deleting_an_old_conversation_removes_it_from_every_instance(make_client, graph):
    from datetime import UTC, datetime

    a = await make_client(instance_id="a", **graph_settings(graph))
    # A conversation last committed long before any listener started.
    doc = _raw_conversation_doc("966500000300", "c_old_one", now_ms() - 86_400_000)
    doc["feed_at"] = datetime(2024, 1, 1, tzinfo=UTC)
    await a.app[keys.STORE]._client.document("users/966500000300/conversations/c_old_one").set(doc)
    b = await make_client(instance_id="b", **graph_settings(graph))
    assert b.app[keys.SNAPSHOT].get("c_old_one") is not None
    stream_b = await SseStream.open(b)
    # Erasing a conversation is an admin's: through an admin's personal token.
    admin = await a.app[keys.ACCOUNTS].add_agent("admin@example.com", "Admin", "admin", "x" * 12)
    token, _ = await a.app[keys.ACCOUNTS].create_token(admin.id, "erasure")
    assert (await a.delete("/api/live-chat/conversations/c_old_one")).status == 403
    resp = await a.delete(
        "/api/live-chat/conversations/c_old_one", headers={"Authorization": f"Bearer {token}"}
    )
    assert resp.status == 200
    deleted = time.monotonic()
    await stream_b.until(
        lambda e: e.name == "conversation_deleted" and e.data["conversation_id"] == "c_old_one",
        within=2,
    )
    assert time.monotonic() - deleted < 2
    assert b.app[keys.SNAPSHOT].get("c_old_one") is None
    assert "c_old_one" not in await listed_ids(b)
    assert (await a.get("/api/live-chat/conversations/c_old_one")).status == 404
    again = await stream_b.nothing_for(1.0)
    assert not [e for e in again if e.name == "conversation_deleted"]
    stream_b.close()


@pytest.mark.firestore
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("store_kind", ["firestore"], indirect=True)
async def test_three_instances_a_minute_of_mixed_traffic_agree_and_tell_everything_once(
    make_client, graph, llm
):
    import random

    from tests.test_ai_replies import llm_settings

    rng = random.Random(7)
    settings = {**graph_settings(graph), **llm_settings(llm)}
    apps = [await make_client(instance_id=name, **settings) for name in ("a", "b", "c")]
    streams = [await SseStream.open(app) for app in apps for _ in range(2)]

    async def drain(stream):
        with contextlib.suppress(EOFError, asyncio.CancelledError):
            while True:
                with contextlib.suppress(TimeoutError):
                    await stream.next(1.0)

    readers = [asyncio.create_task(drain(s)) for s in streams]
    customers = [f"9665000004{n:02d}" for n in range(12)]
    deadline = time.monotonic() + 60
    sent_webhooks = replies = statuses = 0
    while time.monotonic() < deadline:
        app = rng.choice(apps)
        roll = rng.random()
        if roll < 0.5:
            m = text(f"question {sent_webhooks}", frm=rng.choice(customers))
            assert (await post_webhook(app, webhook([m]))).status in (200, 503)
            sent_webhooks += 1
        elif roll < 0.75:
            chats = (await (await app.get(LIST, params={"status": "all"})).json())["chats"]
            if chats:
                cid = rng.choice(chats)["id"]
                body = {"text": f"agent answer {replies}"}
                resp = await app.post(f"/api/live-chat/conversations/{cid}/messages", json=body)
                assert resp.status in (201, 503)
                replies += 1
        else:
            if graph.requests:
                # WhatsApp's statuses for a reply it took: delivered, then read.
                index = rng.randrange(len(graph.requests))
                wamid = f"wamid.FAKE{index + 1:04d}"
                value = rng.choice(["delivered", "read"])
                body = webhook(statuses=[status(wamid, value)])
                assert (await post_webhook(app, body)).status in (200, 503)
                statuses += 1
        await asyncio.sleep(rng.uniform(0.05, 0.3))

    store = apps[0].app[keys.STORE]

    async def settled():
        stored = {c.id: c.updated_at for c in await store.load_window(None)}
        held = [{r.id: r.updated_at for r in app.app[keys.SNAPSHOT].rows()} for app in apps]
        return stored if all(h == stored for h in held) else None

    stored = await wait_until(settled, within=30, interval=0.5)
    await asyncio.sleep(2)
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)

    messages: dict[str, dict] = {}
    for cid in stored:
        for m in await all_messages(apps[0], cid):
            messages[m["id"]] = m
    assert sent_webhooks > 50 and replies > 20 and statuses > 20
    for stream in streams:
        news = [e.data["message"]["id"] for e in stream.events if is_message_event(e)]
        assert len(news) == len(set(news)), "a message told twice"
        # A message is told as new_message, or (another instance's burst that this one's
        # listener merged past what a document carries) its open panes are told to reload.
        reloaded = {
            e.data["conversation_id"] for e in stream.events if e.name == "conversation_resync"
        }
        untold = {mid for mid in messages if mid not in set(news)}
        assert {messages[mid]["conversation_id"] for mid in untold} <= reloaded, untold
        ticks = [
            (e.data["message_id"], e.data["attempt"], e.data["status"])
            for e in stream.events
            if e.name == "message_status"
        ]
        assert len(ticks) == len(set(ticks)), "a status told twice"
        final = {}
        for e in stream.events:
            if is_message_event(e):
                final[e.data["message"]["id"]] = e.data["message"]["status"]
            elif e.name == "message_status":
                final[e.data["message_id"]] = e.data["status"]
        for mid, m in messages.items():
            if m["conversation_id"] not in reloaded:
                assert final[mid] == m["status"], (mid, final.get(mid), m["status"])
        assert not [e for e in stream.events if e.name == "resync"]
        stream.close()


def is_message_event(event) -> bool:
    return event.name in ("new_message", "new_conversation")
