"""Search: messages by what a customer wrote (Arabic and English), customers by name or
number; over real HTTP, on SQLite's full-text indexes and on the Firestore emulator."""

from __future__ import annotations

import sqlite3

import orjson
import pytest

from server import keys, search
from server.demo import build_demo
from server.store import rules
from server.store.sqlite import SCHEMA, SqliteStore
from tests.webhooks import post_webhook, text, wait_until, webhook

SEARCH = "/api/live-chat/search"
LIST = "/api/live-chat/unified-chats"


async def say(client, phone: str, body: str, name: str = "Customer") -> None:
    resp = await post_webhook(client, webhook([text(body, frm=phone)], contacts={phone: name}))
    assert resp.status == 200, await resp.text()


async def found(client, q: str, **params) -> dict:
    resp = await client.get(SEARCH, params={"q": q, **params})
    assert resp.status == 200, await resp.text()
    return await resp.json()


def shown(hit: dict) -> tuple[str, list[str]]:
    """The snippet's text, and the parts of it marked as matching."""
    runs = hit["snippet"]
    return "".join(r["text"] for r in runs), [r["text"] for r in runs if r["match"]]


# -- the folding, without a server ---------------------------------------------------------


def test_folding_meets_arabic_written_any_way_and_english_in_any_case():
    assert search.fold("الفَاتُورَةِ") == search.fold("الفاتورة") == "الفاتوره"
    assert search.fold("أحمد") == search.fold("إحمد") == search.fold("احمد")
    assert search.fold("مستشفى") == search.fold("مستشفي")
    assert search.fold("٥٥٢١") == "5521"
    assert search.fold("Café ÉCLAIR") == "cafe eclair"
    assert search.index_text("بالفاتورة") == "بالفاتوره فاتوره"


def test_a_snippet_marks_the_words_found_and_cuts_a_long_message_around_them():
    query = search.parse("invoices")
    runs = search.snippet("Where is the INVOICE for order 5521?", query)
    assert [t for t, match in runs if match] == ["INVOICE"]
    assert "".join(t for t, _ in runs) == "Where is the INVOICE for order 5521?"
    long = "x " * 200 + "the deliveries were late " + "y " * 200
    runs = search.snippet(long, search.parse("delivery"))
    text_ = "".join(t for t, _ in runs)
    assert text_.startswith("…") and text_.endswith("…") and len(text_) <= 162
    assert [t for t, match in runs if match] == ["deliveries"]
    arabic = search.snippet("أُرِيدُ الفَاتُورَةَ", search.parse("فاتورة"))
    assert [t for t, match in arabic if match] == ["الفَاتُورَةَ"]


# -- messages, on the embedded store -------------------------------------------------------


async def test_an_arabic_message_is_found_by_a_word_written_without_diacritics(client):
    await say(client, "966500000001", "أُرِيدُ الفَاتُورَةَ لِلطَّلَبِ رَقْم ٥٥٢١ مِنْ فَضْلِكَ", "نورة")
    await say(client, "966500000002", "متى يوصل طلبي؟", "خالد")
    for q in ("فاتورة", "الفاتوره", "فاتوره", "5521"):
        hits = (await found(client, q))["messages"]
        assert len(hits) >= 1, q
        first = hits[0]
        assert first["conversation"]["user_name"] == "نورة", q
        text_, marked = shown(first)
        assert text_ == "أُرِيدُ الفَاتُورَةَ لِلطَّلَبِ رَقْم ٥٥٢١ مِنْ فَضْلِكَ"
        assert marked, q
    assert (await found(client, "الفاتورة"))["messages"][0]["message"]["text"].startswith("أُرِيدُ")
    # "للطلب" (for the order) is found by the bare word, as "طلبي" (my order) by its prefix.
    hits = (await found(client, "طلب"))["messages"]
    assert [h["conversation"]["user_name"] for h in hits] == ["خالد", "نورة"]
    assert (await found(client, "مستحيل"))["messages"] == []


async def test_an_english_message_is_found_by_a_word_stem_or_prefix(client):
    await say(client, "966500000003", "Where is the invoice for order 5521? Deliveries are late.")
    await say(client, "966500000004", "Thanks, that solved it!")
    for q, word in (
        ("invoices", "invoice"),
        ("INVOICE", "invoice"),
        ("invo", "invoice"),
        ("delivery", "Deliveries"),
        ("deliver", "Deliveries"),
        ("order 5521", "order"),
    ):
        hits = (await found(client, q))["messages"]
        assert len(hits) == 1, q
        text_, marked = shown(hits[0])
        assert text_.startswith("Where is the invoice"), q
        assert word in marked, (q, marked)
    assert (await found(client, "invoice 9999"))["messages"] == []


async def test_message_search_is_newest_first_and_pages_by_cursor_once_each(client):
    for n in range(23):
        await say(client, f"96650000{n:04d}", f"refund request number {n}")
    await say(client, "966500009999", "nothing to see")
    seen: list[str] = []
    cursor = None
    while True:
        body = await found(client, "refund", limit="10", **({"cursor": cursor} if cursor else {}))
        seen += [h["message"]["text"] for h in body["messages"]]
        if not body["has_more"]:
            assert body["next_cursor"] is None
            break
        cursor = body["next_cursor"]
    assert seen == [f"refund request number {n}" for n in reversed(range(23))]


async def test_a_hit_carries_its_conversation_and_opens_at_that_message(client):
    await say(client, "966500000005", "first: the parcel code is ZX81")
    for n in range(60):
        await say(client, "966500000005", f"later message {n}")
    hit = (await found(client, "zx81"))["messages"][0]
    conversation = hit["conversation"]
    assert conversation["phone"] == "+966500000005"
    assert conversation["last_message"]["text"] == "later message 59"
    message_id = hit["message"]["id"]
    # The conversation's pages, back from the newest, reach the message that was found.
    url = f"/api/live-chat/conversations/{conversation['id']}/messages"
    cursor, pages = None, 0
    while True:
        resp = await client.get(
            url, params={"limit": "50", **({"before": cursor} if cursor else {})}
        )
        body = await resp.json()
        pages += 1
        if any(m["id"] == message_id for m in body["messages"]):
            break
        assert body["has_more"]
        cursor = body["next_cursor"]
    assert pages == 2


async def test_bad_search_requests_are_400s(client):
    for params, code in (
        ({}, "invalid_query"),
        ({"q": "  "}, "invalid_query"),
        ({"q": "x" * 101}, "invalid_query"),
        ({"q": "a", "limit": "0"}, "invalid_limit"),
        ({"q": "a", "cursor": "nope"}, "invalid_cursor"),
    ):
        resp = await client.get(SEARCH, params=params)
        assert resp.status == 400, params
        assert (await resp.json())["error"]["code"] == code
    # Punctuation alone finds nothing, and says so.
    assert (await found(client, "?!"))["messages"] == []


async def test_a_database_from_before_search_is_indexed_on_its_first_start(tmp_path):
    # The schema and rows as the previous version wrote them: no counts, no prepared
    # rows, no full-text index.
    path = str(tmp_path / "old.db")
    conversations, messages = build_demo(60)
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.executemany(
        "INSERT INTO conversations (id, user_id, status, last_activity, created_at, doc)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [
            (
                c.id,
                c.user_id,
                c.status,
                c.last_activity,
                c.created_at,
                orjson.dumps(rules.conversation_to_doc(c)).decode(),
            )
            for c in conversations
        ],
    )
    db.executemany(
        "INSERT INTO users (id, name, phone, channel, created_at) VALUES (?, ?, ?, ?, ?)",
        [(c.user_id, c.user_name, c.phone, c.channel, c.created_at) for c in conversations],
    )
    db.executemany(
        "INSERT INTO messages (id, conversation_id, at, wa_message_id, doc) VALUES (?, ?, ?, ?, ?)",
        [
            (
                m.id,
                m.conversation_id,
                m.at,
                m.wa_message_id,
                orjson.dumps(rules.message_to_doc(m)).decode(),
            )
            for m in messages
        ],
    )
    db.commit()
    db.close()
    store = SqliteStore(path)
    await store.start()
    try:
        totals = await store.totals()
        assert sum(totals.values()) == 60
        assert totals["open"] == sum(c.status == "open" for c in conversations)
        entries = await store.list_entries(None, 60, None)
        assert [e.id for e in entries] == [
            c.id for c in sorted(conversations, key=lambda c: (-c.last_activity, c.id))
        ]
        assert orjson.loads(entries[0].body)["id"] == entries[0].id
        with_text = [m for m in messages if m.text and "deliver" in m.text]
        hits = await store.search_messages(search.parse("deliver"), None, 100)
        assert {h.message.id for h in hits} == {m.id for m in with_text}
        named = conversations[7]
        customers = await store.search_customers(search.parse(named.phone[-5:]), None, 10, None)
        assert named.id in [e.id for e in customers]
    finally:
        await store.close()


# -- Firestore: customers at any depth; message text needs a search engine -----------------


@pytest.mark.firestore
@pytest.mark.parametrize("store_kind", ["firestore"], indirect=True)
async def test_firestore_finds_a_customer_past_the_window_by_name_or_number(make_client):
    client = await make_client(firestore_window=10)
    conversations, messages = build_demo(30)
    await client.app[keys.STORE].import_conversations(conversations, messages)

    async def windowed() -> bool:
        return len(client.app[keys.SNAPSHOT]) == 10

    await wait_until(windowed, within=10)
    order = sorted(conversations, key=lambda c: (-c.last_activity, c.id))
    deep = order[-1]
    assert client.app[keys.SNAPSHOT].get(deep.id) is None
    for q in (deep.phone[-4:], "0" + deep.phone[4:], search.words(deep.user_name)[-1]):
        body = await (await client.get(LIST, params={"q": q, "limit": "100"})).json()
        assert deep.id in [c["id"] for c in body["chats"]], q
        query = search.parse(q)
        want = [
            c.id
            for c in order
            if search.matches_customer(query, search.customer_key(c.user_name, c.phone))
        ]
        assert [c["id"] for c in body["chats"]] == want, q
    resp = await client.get(SEARCH, params={"q": "invoice"})
    assert resp.status == 501
    assert (await resp.json())["error"]["code"] == "message_search_unavailable"
