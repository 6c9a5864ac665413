"""The live-chat HTTP API over real HTTP on loopback, against the app from the factory."""

from __future__ import annotations

import asyncio

import pytest
import structlog
from aiohttp import ClientSession

from server import keys
from server.demo import build_demo
from server.models import now_ms
from server.store.base import InboundMessage
from server.store.sqlite import SqliteStore
from tests.accounts import add_agent

LIST = "/api/live-chat/unified-chats"


async def seed(client, count: int):
    conversations, messages = build_demo(count)
    await client.app[keys.STORE].import_conversations(conversations, messages)
    return conversations


def expected_order(conversations) -> list[str]:
    return [c.id for c in sorted(conversations, key=lambda c: (-c.last_activity, c.id))]


def inbound(
    user_id: str, wamid: str, text: str = "any news?", at: int | None = None
) -> InboundMessage:
    return InboundMessage(
        wa_message_id=wamid,
        user_id=user_id,
        user_name="Walker",
        phone="+" + user_id,
        type="text",
        text=text,
        at=at or now_ms(),
    )


async def error_of(resp) -> dict:
    body = await resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]


async def test_every_api_route_needs_the_token(client):
    async with ClientSession() as anonymous:
        for path in (LIST, "/api/live-chat/conversations/c_x", "/api/live-chat/events"):
            resp = await anonymous.get(client.make_url(path))
            assert resp.status == 401, path
            assert (await error_of(resp))["code"] == "unauthorized"
        resp = await anonymous.get(client.make_url(LIST), headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401


async def test_an_empty_inbox_lists_nothing(client):
    body = await (await client.get(LIST)).json()
    assert body == {"chats": [], "next_cursor": None, "has_more": False, "total": 0, "stale": False}


async def test_the_first_page_is_the_newest_30_with_the_summary_shape(client):
    conversations = await seed(client, 75)
    resp = await client.get(LIST)
    assert resp.status == 200 and resp.content_type == "application/json"
    body = await resp.json()
    assert [c["id"] for c in body["chats"]] == expected_order(conversations)[:30]
    assert body["has_more"] is True and body["total"] == 75 and body["next_cursor"]
    chat = body["chats"][0]
    assert set(chat) >= {
        "id", "user_id", "user_name", "phone", "channel", "status", "unread_count",
        "ai_enabled", "assignee", "created_at", "last_activity", "last_message",
    }  # fmt: skip
    assert set(chat["last_message"]) >= {"id", "type", "text", "direction", "sender", "at"}
    assert chat["last_activity"].endswith("Z") and len(chat["last_activity"]) == 24


async def test_paging_50000_conversations_returns_each_once_in_order(make_client, settings):
    # Seeded before the server starts, as a real inbox is: the snapshot loads it in bulk.
    conversations, messages = build_demo(50_000)
    store = SqliteStore(settings.db)
    await store.start()
    await store.import_conversations(conversations, messages)
    await store.close()
    client = await make_client()
    order = expected_order(conversations)
    served: list[str] = []
    cursor, pages, moved = None, 0, None
    while True:
        params = {"limit": "100"} | ({"cursor": cursor} if cursor else {})
        body = await (await client.get(LIST, params=params)).json()
        served += [c["id"] for c in body["chats"]]
        pages += 1
        assert body["total"] == 50_000
        if pages == 10:
            # A customer at the bottom of the list writes in the middle of the walk.
            moved = conversations[0]
            target = next(c for c in conversations if c.id == order[-1])
            await client.app[keys.STORE].update_conversation(target.id, status="open")
            await client.app[keys.STORE].save_inbound(inbound(target.user_id, "wamid.walk"))
            moved = target.id
        if not body["has_more"]:
            assert body["next_cursor"] is None
            break
        assert body["next_cursor"] and len(body["chats"]) == 100
        cursor = body["next_cursor"]
    assert len(served) == len(set(served)), "a conversation was served twice"
    # The one that moved to the top was already passed: every other one came exactly once.
    assert set(served) == set(order) - {moved}
    assert served == [cid for cid in order if cid != moved]
    first = await (await client.get(LIST, params={"limit": "1"})).json()
    assert first["chats"][0]["id"] == moved


async def test_a_saved_message_tops_the_next_first_page_without_querying_the_store(client):
    conversations = await seed(client, 200)
    store = client.app[keys.STORE]
    assert isinstance(store, SqliteStore)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)  # every SQL statement the store runs
    try:
        bottom = next(c for c in conversations if c.id == expected_order(conversations)[-1])
        await store.update_conversation(bottom.id, status="open")
        await store.save_inbound(inbound(bottom.user_id, "wamid.top", "هل وصل الطلب؟"))
        statements.clear()
        body = await (await client.get(LIST)).json()
        assert body["chats"][0]["id"] == bottom.id
        assert body["chats"][0]["last_message"]["text"] == "هل وصل الطلب؟"
        # Every shape of list request: pages, filters, search, single conversations.
        second = await client.get(LIST, params={"cursor": body["next_cursor"], "limit": "100"})
        assert second.status == 200
        for params in ({"status": "open"}, {"status": "resolved"}, {"q": "sara"}):
            assert (await client.get(LIST, params=params)).status == 200
        assert (await client.get(f"/api/live-chat/conversations/{bottom.id}")).status == 200
        assert statements == [], f"the list path queried the store: {statements[:3]}"
    finally:
        store._db.set_trace_callback(None)


async def test_a_tampered_cursor_is_a_400(client):
    await seed(client, 40)
    body = await (await client.get(LIST)).json()
    cursor = body["next_cursor"]
    forged = cursor[:-1] + ("A" if cursor[-1] != "A" else "B")
    for bad in (forged, "garbage", "a.b", "x" * 1000):
        resp = await client.get(LIST, params={"cursor": bad})
        assert resp.status == 400
        assert (await error_of(resp))["code"] == "invalid_cursor"


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"limit": "0"}, "invalid_limit"),
        ({"limit": "101"}, "invalid_limit"),
        ({"limit": "ten"}, "invalid_limit"),
        ({"limit": "-5"}, "invalid_limit"),
        ({"limit": "\u00b2"}, "invalid_limit"),  # a digit to str.isdigit(), not to int()
        ({"status": "archived"}, "invalid_status"),
        ({"q": "x" * 101}, "invalid_query"),
    ],
)
async def test_bad_list_parameters_are_400_saying_what_is_wrong(client, params, code):
    resp = await client.get(LIST, params=params)
    assert resp.status == 400
    assert (await error_of(resp))["code"] == code


async def test_status_and_search_filters(client):
    conversations = await seed(client, 120)
    for status in ("open", "resolved"):
        body = await (await client.get(LIST, params={"status": status, "limit": "100"})).json()
        want = [c for c in conversations if c.status == status]
        assert body["total"] == len(want)
        assert all(c["status"] == status for c in body["chats"])
    name = conversations[3].user_name.split()[0]
    body = await (await client.get(LIST, params={"q": name.upper(), "limit": "100"})).json()
    want = {c.id for c in conversations if name.casefold() in c.user_name.casefold()}
    assert {c["id"] for c in body["chats"]} == want and body["total"] == len(want)


async def test_one_conversation_and_its_messages(client):
    conversations = await seed(client, 5)
    c = conversations[2]
    got = await (await client.get(f"/api/live-chat/conversations/{c.id}")).json()
    assert got["id"] == c.id and got["user_name"] == c.user_name
    missing = await client.get("/api/live-chat/conversations/c_nope")
    assert missing.status == 404 and (await error_of(missing))["code"] == "not_found"
    assert (await client.get("/api/live-chat/conversations/c_nope/messages")).status == 404

    store = client.app[keys.STORE]
    await store.update_conversation(c.id, status="open")
    start = now_ms()
    for i in range(12):
        await store.save_inbound(inbound(c.user_id, f"wamid.page{i}", f"message {i}", start + i))
    url = f"/api/live-chat/conversations/{c.id}/messages"
    page = await (await client.get(url, params={"limit": "5"})).json()
    assert [m["text"] for m in page["messages"]] == [f"message {i}" for i in range(7, 12)]
    assert page["has_more"] is True
    older = await (
        await client.get(url, params={"limit": "5", "before": page["next_cursor"]})
    ).json()
    assert [m["text"] for m in older["messages"]] == [f"message {i}" for i in range(2, 7)]
    bad = await client.get(url, params={"before": page["next_cursor"][::-1]})
    assert bad.status == 400


async def test_read_and_patch_update_the_conversation_and_the_list(client):
    conversations = await seed(client, 30)
    noura = await add_agent(client.app, "noura@example.com")
    c = next(c for c in conversations if c.status == "open")
    base = f"/api/live-chat/conversations/{c.id}"
    read = await (await client.post(f"{base}/read")).json()
    assert read["unread_count"] == 0
    patched = await client.patch(base, json={"status": "resolved", "assignee": noura.id})
    assert patched.status == 200
    body = await patched.json()
    assert (body["status"], body["assignee"]) == ("resolved", noura.id)
    listed = await (await client.get(LIST, params={"status": "resolved", "limit": "100"})).json()
    assert c.id in {x["id"] for x in listed["chats"]}
    ai = await (await client.patch(base, json={"ai_enabled": False})).json()
    assert ai["ai_enabled"] is False
    assert (await client.post("/api/live-chat/conversations/c_nope/read")).status == 404


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b"{}", "empty_patch"),
        (b'{"status": "archived"}', "invalid_status"),
        (b'{"ai_enabled": "yes"}', "invalid_ai_enabled"),
        (b'{"assignee": 7}', "invalid_assignee"),
        (b'{"colour": "red"}', "invalid_field"),
        pytest.param(b"[" * 5000 + b"]" * 5000, "invalid_json", id="nested-too-deep"),
    ],
)
async def test_a_malformed_patch_is_a_400_and_changes_nothing(client, body, code):
    conversations = await seed(client, 3)
    c = conversations[0]
    before = await (await client.get(f"/api/live-chat/conversations/{c.id}")).json()
    resp = await client.patch(
        f"/api/live-chat/conversations/{c.id}",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 400 and (await error_of(resp))["code"] == code
    after = await (await client.get(f"/api/live-chat/conversations/{c.id}")).json()
    assert after == before


async def test_a_malformed_agent_reply_is_a_400(client):
    conversations = await seed(client, 2)
    url = f"/api/live-chat/conversations/{conversations[0].id}/messages"
    for body in ({"text": ""}, {"text": "   "}, {"text": 5}, {}, {"text": "x" * 4097}):
        resp = await client.post(url, json=body)
        assert resp.status == 400, body
        assert (await error_of(resp))["code"] == "invalid_text"
    messages = await (await client.get(url)).json()
    assert all(m["sender"] != "agent" or m["agent_id"] for m in messages["messages"])


async def test_the_list_waits_for_the_first_load_and_never_serves_a_partial_list(
    aiohttp_client, settings, monkeypatch
):
    gate = asyncio.Event()

    class SlowStartStore(SqliteStore):
        async def snapshot_entries(self, after, limit):
            await gate.wait()
            return await super().snapshot_entries(after, limit)

    monkeypatch.setattr("server.app.make_store", lambda s: SlowStartStore(s.db))
    from server.app import create_app
    from tests.conftest import AUTH

    client = await aiohttp_client(create_app(settings), headers=AUTH)
    resp = await client.get(LIST)
    assert resp.status == 503 and resp.headers["Retry-After"]
    assert (await error_of(resp))["code"] == "warming_up"
    assert (await client.get("/readyz")).status == 503
    assert (await client.get("/healthz")).status == 200
    gate.set()
    await asyncio.wait_for(client.app[keys.WARMER].loaded.wait(), 5)
    assert (await client.get(LIST)).status == 200
    assert (await client.get("/readyz")).status == 200


async def test_unknown_routes_answer_json(client):
    resp = await client.get("/api/live-chat/nothing-here")
    assert resp.status == 404 and (await error_of(resp))["code"] == "not_found"


async def test_serving_logs_its_timing(client):
    await seed(client, 10)
    with structlog.testing.capture_logs() as logs:
        await client.get(LIST)
    served = [e for e in logs if e["event"] == "unified_chats.served"]
    assert len(served) == 1
    line = served[0]
    assert line["source"] == "snapshot" and line["chats"] == 10 and line["total"] == 10
    assert line["page"] == "first" and line["duration_ms"] >= 0


async def test_mine_and_unassigned_continue_past_the_window_in_list_order(make_client):
    # A window of 10 on the embedded store: later pages come from its assignee index.
    client = await make_client(sqlite_window=10)
    conversations = await seed(client, 60)
    ordered = sorted(conversations, key=lambda c: (-c.last_activity, c.id))
    assignees = {c.assignee for c in conversations}
    assert None in assignees and len(assignees) > 2
    sources = []
    for assignee in assignees:
        for status in (None, "open"):
            want = [c.id for c in ordered if c.assignee == assignee and status in (None, c.status)]
            params = {"assignee": assignee or "none", "limit": "2"}
            if status:
                params["status"] = status
            got, cursor, totals = [], None, set()
            while True:
                with structlog.testing.capture_logs() as logs:
                    page = await (
                        await client.get(
                            LIST, params=params | ({"cursor": cursor} if cursor else {})
                        )
                    ).json()
                sources += [e["source"] for e in logs if e["event"] == "unified_chats.served"]
                got += [c["id"] for c in page["chats"]]
                totals.add(page["total"])
                if not page["has_more"]:
                    break
                cursor = page["next_cursor"]
            assert got == want, params
            assert totals == {len(want)}, params
    assert {"snapshot", "store"} <= set(sources)
