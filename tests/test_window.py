"""The embedded store's window: memory holds the newest conversations, SQLite the rest,
and the list reads as one across the boundary (over real HTTP, on a real SQLite file)."""

from __future__ import annotations

import random

import structlog

from server import keys, search
from server.demo import build_demo
from server.store.sqlite import SqliteStore
from tests.webhooks import post_webhook, text, webhook

LIST = "/api/live-chat/unified-chats"
WINDOW = 40


async def seeded(make_client, settings, count: int, **overrides):
    """A server started on a database that already holds `count` demo conversations."""
    conversations, messages = build_demo(count)
    store = SqliteStore(settings.db)
    await store.start()
    await store.import_conversations(conversations, messages)
    await store.close()
    client = await make_client(sqlite_window=WINDOW, **overrides)
    return client, conversations


def in_order(conversations) -> list[str]:
    return [c.id for c in sorted(conversations, key=lambda c: (-c.last_activity, c.id))]


async def page(client, **params) -> dict:
    resp = await client.get(LIST, params={k: str(v) for k, v in params.items()})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def walk(client, limit: int = 7, **params) -> list[str]:
    served: list[str] = []
    cursor = None
    while True:
        body = await page(client, limit=limit, **params, **({"cursor": cursor} if cursor else {}))
        served += [c["id"] for c in body["chats"]]
        if not body["has_more"]:
            assert body["next_cursor"] is None
            return served
        cursor = body["next_cursor"]


async def write_to(client, conversation) -> None:
    """The customer of a conversation writes again (a signed webhook, as Meta sends it)."""
    body = webhook(
        [text("any news?", frm=conversation.user_id)],
        contacts={conversation.user_id: conversation.user_name},
    )
    resp = await post_webhook(client, body)
    assert resp.status == 200, await resp.text()


async def test_a_restart_on_a_large_database_loads_only_the_newest_window(make_client, settings):
    client, conversations = await seeded(make_client, settings, 300)
    snapshot = client.app[keys.SNAPSHOT]
    assert len(snapshot) == WINDOW and not snapshot.complete
    assert [r.id for r in snapshot.rows()] == in_order(conversations)[:WINDOW]
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["snapshot"]["conversations"] == WINDOW
    first = await page(client, limit=30)
    assert first["total"] == 300  # the store's count, not the window's


async def test_walking_across_the_window_serves_each_conversation_once_while_messages_arrive(
    make_client, settings
):
    client, conversations = await seeded(make_client, settings, 300)
    order = in_order(conversations)
    rng = random.Random(14)
    # Customers with an open conversation write while the agent pages down: some were
    # served already, some are further down, some are past the window in the store.
    writers = [c for c in conversations if c.status == "open"]
    rng.shuffle(writers)
    served: list[str] = []
    wrote: set[str] = set()
    cursor, pages = None, 0
    with structlog.testing.capture_logs() as logs:
        while True:
            body = await page(client, limit=7, **({"cursor": cursor} if cursor else {}))
            served += [c["id"] for c in body["chats"]]
            keys_ = [(-_ms(c["last_activity"]), c["id"]) for c in body["chats"]]
            assert keys_ == sorted(keys_), "a page out of list order"
            pages += 1
            if pages % 3 == 0 and writers:
                for conversation in (writers.pop(), writers.pop()):
                    await write_to(client, conversation)
                    wrote.add(conversation.id)
            if not body["has_more"]:
                break
            cursor = body["next_cursor"]
    assert len(served) == len(set(served)), "a conversation was served twice"
    # Some writers had been served before they wrote, some had not been reached yet.
    assert wrote & set(served) and wrote - set(served)
    # Every conversation came exactly once, but those that moved to the top after the walk
    # had passed them (their SSE event shows them there).
    assert set(served) | wrote == set(order)
    assert [cid for cid in served if cid not in wrote] == [cid for cid in order if cid not in wrote]
    sources = {e["source"] for e in logs if e["event"] == "unified_chats.served"}
    assert sources == {"snapshot", "store"}
    # The window still holds the newest conversations, now those that were written to.
    snapshot = client.app[keys.SNAPSHOT]
    assert len(snapshot) == WINDOW
    top = await walk(client, limit=100)
    assert sorted(top) == sorted(order)
    assert [r.id for r in snapshot.rows()] == top[:WINDOW]


async def test_a_conversation_past_the_window_that_gets_a_message_moves_into_it(
    make_client, settings
):
    client, conversations = await seeded(make_client, settings, 200)
    order = in_order(conversations)
    snapshot = client.app[keys.SNAPSHOT]
    by_id = {c.id: c for c in conversations}
    oldest_open = next(by_id[cid] for cid in reversed(order) if by_id[cid].status == "open")
    leaving = snapshot.rows()[-1].id
    assert snapshot.get(oldest_open.id) is None
    await write_to(client, oldest_open)
    assert snapshot.get(oldest_open.id) is not None
    assert snapshot.rows()[0].id == oldest_open.id
    assert len(snapshot) == WINDOW and snapshot.get(leaving) is None
    first = await page(client, limit=5)
    assert first["chats"][0]["id"] == oldest_open.id
    assert first["chats"][0]["last_message"]["text"] == "any news?"
    # The one that left the window is served from the store, in its place.
    everything = await walk(client, limit=9)
    assert everything == [oldest_open.id] + [cid for cid in order if cid != oldest_open.id]


async def test_status_tabs_and_totals_are_exact_past_the_window(make_client, settings):
    client, conversations = await seeded(make_client, settings, 250)
    order = in_order(conversations)
    by_id = {c.id: c for c in conversations}
    for status in ("open", "resolved"):
        want = [cid for cid in order if by_id[cid].status == status]
        assert await walk(client, limit=6, status=status) == want
        assert (await page(client, status=status))["total"] == len(want)
    # Resolving a conversation far past the window moves it between the tabs' totals at once.
    old_open = next(by_id[cid] for cid in reversed(order) if by_id[cid].status == "open")
    opened = (await page(client, status="open"))["total"]
    resp = await client.patch(
        f"/api/live-chat/conversations/{old_open.id}", json={"status": "resolved"}
    )
    assert resp.status == 200
    assert (await page(client, status="open"))["total"] == opened - 1
    assert (await page(client, status="resolved"))["total"] == 250 - opened + 1
    assert (await page(client))["total"] == 250
    assert old_open.id in await walk(client, limit=50, status="resolved")
    assert old_open.id not in await walk(client, limit=50, status="open")


async def test_mine_and_unassigned_tabs_are_exact_past_the_window(make_client, settings):
    client, conversations = await seeded(make_client, settings, 250)
    order = in_order(conversations)
    by_id = {c.id: c for c in conversations}
    assignees = {c.assignee for c in conversations}
    assert None in assignees and len(assignees) > 1
    for assignee in assignees:
        for status in (None, "open", "resolved"):
            want = [
                cid
                for cid in order
                if by_id[cid].assignee == assignee and status in (None, by_id[cid].status)
            ]
            params = {"assignee": assignee or "none"} | ({"status": status} if status else {})
            assert await walk(client, limit=6, **params) == want, params
            assert (await page(client, **params))["total"] == len(want), params
    # With a search by name too, past the window.
    query = search.parse("sara")
    want = [
        cid
        for cid in order
        if by_id[cid].assignee is None
        and search.matches_customer(
            query, search.customer_key(by_id[cid].user_name, by_id[cid].phone)
        )
    ]
    assert want
    assert await walk(client, limit=3, assignee="none", q="sara") == want
    assert (await page(client, assignee="none", q="sara"))["total"] == len(want)
    # Unassigning a conversation far past the window moves it between the tabs at once.
    old = next(by_id[cid] for cid in reversed(order) if by_id[cid].assignee is not None)
    agent = old.assignee
    theirs = (await page(client, assignee=agent))["total"]
    nobodys = (await page(client, assignee="none"))["total"]
    resp = await client.patch(f"/api/live-chat/conversations/{old.id}", json={"assignee": None})
    assert resp.status == 200, await resp.text()
    assert (await page(client, assignee=agent))["total"] == theirs - 1
    assert (await page(client, assignee="none"))["total"] == nobodys + 1
    assert old.id in await walk(client, limit=50, assignee="none")
    assert old.id not in await walk(client, limit=50, assignee=agent)


async def test_searching_names_and_numbers_crosses_the_window(make_client, settings):
    client, conversations = await seeded(make_client, settings, 250)
    order = in_order(conversations)
    by_id = {c.id: c for c in conversations}
    for q in ("sara", "سارة", "al-harbi", "966 5"):
        query = search.parse(q)
        want = [
            cid
            for cid in order
            if search.matches_customer(
                query, search.customer_key(by_id[cid].user_name, by_id[cid].phone)
            )
        ]
        assert want, q
        assert await walk(client, limit=4, q=q) == want, q
        assert (await page(client, q=q))["total"] == len(want), q
    # The last digits of a number find its customer however deep they are.
    deepest = by_id[order[-1]]
    found = await page(client, q=deepest.phone[-6:])
    assert [c["id"] for c in found["chats"]] == [deepest.id]


def _ms(iso: str) -> int:
    from server.models import parse_iso

    return parse_iso(iso)


async def test_the_business_number_filter_crosses_the_window(make_client, settings):
    # Conversations written to two business numbers, seeded before the start.
    conversations, messages = build_demo(200)
    conversations = [
        c.with_changes(phone_number_id="456" if i % 3 == 0 else "123")
        for i, c in enumerate(conversations)
    ]
    store = SqliteStore(settings.db)
    await store.start()
    await store.import_conversations(conversations, messages)
    await store.close()
    client = await make_client(sqlite_window=WINDOW)
    order = in_order(conversations)
    by_id = {c.id: c for c in conversations}
    for number in ("456", "123"):
        want = [cid for cid in order if by_id[cid].phone_number_id == number]
        assert await walk(client, limit=8, number=number) == want
        assert (await page(client, number=number))["total"] == len(want)
        opened = [cid for cid in want if by_id[cid].status == "open"]
        assert await walk(client, limit=8, number=number, status="open") == opened
    # With a name too: both filters hold on either side of the boundary.
    query = search.parse("sara")
    want = [
        cid
        for cid in order
        if by_id[cid].phone_number_id == "456"
        and search.matches_customer(
            query, search.customer_key(by_id[cid].user_name, by_id[cid].phone)
        )
    ]
    assert want
    assert await walk(client, limit=3, number="456", q="sara") == want
