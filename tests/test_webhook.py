"""The WhatsApp webhook over real HTTP: handshake, signatures, batches, types, statuses."""

from __future__ import annotations

import json

import pytest
from structlog.testing import capture_logs

from server import keys
from server.integrations.whatsapp_webhook import parse_payload
from tests.conftest import APP_SECRET
from tests.fakes import graph_settings
from tests.webhooks import (
    SseStream,
    all_messages,
    chats,
    message,
    message_event,
    post_webhook,
    status,
    text,
    wait_until,
    wamid,
    webhook,
)


async def conversation_of(client, user_id: str = "966501234567") -> dict:
    rows = [c for c in await chats(client) if c["user_id"] == user_id]
    assert len(rows) == 1, rows
    return rows[0]


# -- the handshake ---------------------------------------------------------------------


async def test_verify_echoes_the_challenge_for_the_right_token(client):
    resp = await client.get(
        "/webhooks/whatsapp",
        params={
            "hub.mode": "subscribe",
            "hub.verify_token": "test-verify-token",
            "hub.challenge": "1158201444",
        },
    )
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    assert await resp.text() == "1158201444"


@pytest.mark.parametrize(
    "params",
    [
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
        {"hub.mode": "unsubscribe", "hub.verify_token": "test-verify-token", "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.challenge": "1"},
        {},
    ],
)
async def test_verify_refuses_anything_else(client, params):
    resp = await client.get("/webhooks/whatsapp", params=params)
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "forbidden"


async def test_verify_refuses_when_no_token_is_configured(make_client):
    client = await make_client(whatsapp_verify_token=None)
    resp = await client.get(
        "/webhooks/whatsapp",
        params={"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "1"},
    )
    assert resp.status == 403


# -- signatures -------------------------------------------------------------------------


async def test_a_correctly_signed_message_is_stored_with_its_customer(client):
    body = webhook([text("Does it come in another color?", frm="16505551234")])
    body["entry"][0]["changes"][0]["value"]["contacts"] = [
        {"profile": {"name": "Sheena Nelson"}, "wa_id": "16505551234"}
    ]
    resp = await post_webhook(client, body)
    assert resp.status == 200
    conversation = await conversation_of(client, "16505551234")
    assert conversation["user_name"] == "Sheena Nelson"
    assert conversation["phone"] == "+16505551234"
    assert conversation["unread_count"] == 1
    [stored] = await all_messages(client, conversation["id"])
    assert stored["text"] == "Does it come in another color?"
    assert stored["direction"] == "in" and stored["sender"] == "user"
    assert stored["status"] == "received"


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "sha256=" + "0" * 64,
        "sha1=abc",
        "not-a-signature",
    ],
)
async def test_a_missing_or_wrong_signature_is_401_and_stores_nothing(client, signature):
    body = webhook([text("hello")])
    if signature is None:
        resp = await post_webhook(client, body, secret=None)
    else:
        resp = await post_webhook(client, body, signature=signature)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "invalid_signature"
    assert await chats(client) == []


async def test_a_body_signed_with_another_secret_is_401(client):
    resp = await post_webhook(client, webhook([text("hello")]), secret="someone-elses-secret")
    assert resp.status == 401
    assert await chats(client) == []


async def test_the_signature_covers_the_raw_bytes_not_the_parsed_json(client):
    raw = json.dumps(webhook([text("hello")])).encode()
    from server.integrations.whatsapp_webhook import sign

    signature = sign(APP_SECRET, raw)
    # The same JSON with other spacing is another body: its signature does not match.
    respaced = json.dumps(json.loads(raw), indent=2).encode()
    resp = await post_webhook(client, respaced, signature=signature)
    assert resp.status == 401
    resp = await post_webhook(client, raw, signature=signature)
    assert resp.status == 200


async def test_without_an_app_secret_every_delivery_is_refused(make_client):
    client = await make_client(whatsapp_app_secret=None)
    resp = await post_webhook(client, webhook([text("hello")]), secret=APP_SECRET)
    assert resp.status == 401
    assert await chats(client) == []


# -- idempotence and batches -------------------------------------------------------------


async def test_the_same_webhook_five_times_stores_one_message_and_broadcasts_once(client):
    stream = await SseStream.open(client)
    first = text("are you open today?")
    body = webhook([first])
    for _ in range(5):
        resp = await post_webhook(client, body)
        assert resp.status == 200
    marker = text("second message")
    assert (await post_webhook(client, webhook([marker]))).status == 200

    _, before = await stream.until(message_event(marker["id"]))
    about_first = [
        e
        for e in before
        if e.name in ("new_message", "new_conversation")
        and e.data["message"]["wa_message_id"] == first["id"]
    ]
    assert len(about_first) == 1
    assert about_first[0].name == "new_conversation"
    conversation = await conversation_of(client)
    assert [m["wa_message_id"] for m in await all_messages(client, conversation["id"])] == [
        first["id"],
        marker["id"],
    ]
    assert conversation["unread_count"] == 2
    stream.close()


async def test_duplicates_are_counted_in_the_log_line(client):
    body = webhook([text("hi")])
    await post_webhook(client, body)
    with capture_logs() as logs:
        assert (await post_webhook(client, body)).status == 200
    [line] = [entry for entry in logs if entry["event"] == "webhook.received"]
    assert line["messages"] == 1 and line["duplicates"] == 1 and line["statuses"] == 0
    assert line["duration_ms"] >= 0
    # The customer's words stay out of the log.
    assert "hi" not in {str(v) for entry in logs for v in entry.values()}


async def test_a_batch_of_three_messages_and_two_statuses_is_handled_whole(make_client, graph):
    client = await make_client(**graph_settings(graph))
    # Two outbound messages for the statuses to update: agent replies sent through Graph.
    await post_webhook(client, webhook([text("hello", frm="966500000001")]))
    conversation = await conversation_of(client, "966500000001")
    for reply in ("first answer", "second answer"):
        resp = await client.post(
            f"/api/live-chat/conversations/{conversation['id']}/messages", json={"text": reply}
        )
        assert resp.status == 201

    async def sent():
        out = [m for m in await all_messages(client, conversation["id"]) if m["direction"] == "out"]
        return out if all(m["status"] == "sent" for m in out) and len(out) == 2 else None

    out = await wait_until(sent)

    stream = await SseStream.open(client)
    batch = webhook(
        [
            text("one", frm="966500000001"),
            text("two", frm="447700900123"),
            message("image", {"id": "1234", "mime_type": "image/jpeg"}, frm="447700900123"),
        ],
        [status(out[0]["wa_message_id"], "delivered"), status(out[1]["wa_message_id"], "read")],
        contacts={"966500000001": "سارة", "447700900123": "Emily Clarke"},
    )
    with capture_logs() as logs:
        resp = await post_webhook(client, batch)
    assert resp.status == 200
    [line] = [entry for entry in logs if entry["event"] == "webhook.received"]
    assert (line["messages"], line["statuses"], line["duplicates"]) == (3, 2, 0)

    sara = await conversation_of(client, "966500000001")
    emily = await conversation_of(client, "447700900123")
    assert emily["user_name"] == "Emily Clarke"
    assert len(await all_messages(client, emily["id"])) == 2
    by_id = {m["id"]: m for m in await all_messages(client, sara["id"])}
    assert by_id[out[0]["id"]]["status"] == "delivered"
    assert by_id[out[1]["id"]]["status"] == "read"

    names = []
    while len(names) < 5:
        event = await stream.next()
        # The image's download (WhatsApp has no such media id here) announces its outcome.
        if event.name != "message_updated":
            names.append(event.name)
    assert sorted(names) == sorted(
        ["new_message", "new_conversation", "new_message", "message_status", "message_status"]
    )
    stream.close()


async def test_a_status_never_moves_a_message_backwards(make_client, graph):
    client = await make_client(**graph_settings(graph))
    await post_webhook(client, webhook([text("hello")]))
    conversation = await conversation_of(client)
    resp = await client.post(
        f"/api/live-chat/conversations/{conversation['id']}/messages", json={"text": "hi there"}
    )
    message_id = (await resp.json())["id"]

    async def sent():
        for m in await all_messages(client, conversation["id"]):
            if m["id"] == message_id and m["status"] == "sent":
                return m
        return None

    wa_id = (await wait_until(sent))["wa_message_id"]
    for value in ("read", "delivered", "sent"):
        assert (await post_webhook(client, webhook(statuses=[status(wa_id, value)]))).status == 200
    [stored] = [m for m in await all_messages(client, conversation["id"]) if m["id"] == message_id]
    assert stored["status"] == "read"


async def test_a_status_that_overtakes_its_send_is_applied_once_the_send_is_stored(client):
    await post_webhook(client, webhook([text("hello")]))
    conversation = await conversation_of(client)
    store = client.app[keys.STORE]
    # A reply is being sent (here: by another instance); WhatsApp's "delivered" arrives
    # before the send's answer has stored the message's WhatsApp id.
    out = await store.save_outbound(conversation["id"], sender="agent", text="on its way")
    stream = await SseStream.open(client)
    body = webhook(statuses=[status("wamid.OVERTAKEN", "delivered")])
    assert (await post_webhook(client, body)).status == 200
    await store.set_delivery(out.message.id, status="sent", wa_message_id="wamid.OVERTAKEN")
    event, _ = await stream.until(
        lambda e: e.name == "message_status" and e.data["status"] == "delivered", within=5
    )
    assert event.data["message_id"] == out.message.id
    messages = await all_messages(client, conversation["id"])
    assert [m["status"] for m in messages if m["id"] == out.message.id] == ["delivered"]
    stream.close()


async def test_statuses_for_unknown_messages_and_unknown_values_are_ignored(client):
    body = webhook(statuses=[status("wamid.nobody", "delivered"), status("wamid.x", "deleted")])
    assert (await post_webhook(client, body)).status == 200
    assert await chats(client) == []


async def test_other_webhook_fields_are_acknowledged_and_ignored(client):
    body = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "1",
                "changes": [
                    {"field": "account_update", "value": {"event": "VERIFIED_ACCOUNT"}},
                    {
                        "field": "messages",
                        "value": webhook([text("hi")])["entry"][0]["changes"][0]["value"],
                    },
                ],
            }
        ],
    }
    assert (await post_webhook(client, body)).status == 200
    assert len(await chats(client)) == 1


# -- every message type ------------------------------------------------------------------


async def test_every_message_type_round_trips_to_the_api(client):
    frm = "966501234567"
    sent = {
        "text": text("مرحبا، هل عندكم توصيل؟", frm=frm),
        "image": message(
            "image",
            {"caption": "this one", "mime_type": "image/jpeg", "sha256": "abc", "id": "111"},
            frm=frm,
        ),
        "audio": message(
            "audio", {"mime_type": "audio/ogg; codecs=opus", "id": "222", "voice": True}, frm=frm
        ),
        "video": message(
            "video", {"caption": "unboxing", "mime_type": "video/mp4", "id": "333"}, frm=frm
        ),
        "document": message(
            "document",
            {
                "caption": "Invoice",
                "filename": "invoice.pdf",
                "mime_type": "application/pdf",
                "id": "444",
            },
            frm=frm,
        ),
        "sticker": message(
            "sticker", {"mime_type": "image/webp", "id": "555", "animated": True}, frm=frm
        ),
        "location": message(
            "location",
            {
                "latitude": 24.7136,
                "longitude": 46.6753,
                "name": "Kingdom Centre",
                "address": "Riyadh",
            },
            frm=frm,
        ),
        "button_reply": message(
            "interactive",
            {"type": "button_reply", "button_reply": {"id": "yes_1", "title": "Yes"}},
            frm=frm,
            context={"from": "15550783881", "id": "wamid.asked"},
        ),
        "list_reply": message(
            "interactive",
            {
                "type": "list_reply",
                "list_reply": {"id": "size_m", "title": "Medium", "description": "Chest 96-101 cm"},
            },
            frm=frm,
        ),
        "button": message("button", {"payload": "STOP_PROMOS", "text": "Stop promotions"}, frm=frm),
        "reaction": message("reaction", {"message_id": "wamid.target", "emoji": "❤️"}, frm=frm),
        "unreaction": message("reaction", {"message_id": "wamid.target"}, frm=frm),
        "unsupported": message(
            "unsupported",
            None,
            frm=frm,
            errors=[{"code": 131051, "title": "Message type unknown", "message": "..."}],
        ),
        "contacts": message("contacts", [{"name": {"formatted_name": "Ali"}}], frm=frm),
    }
    resp = await post_webhook(client, webhook(list(sent.values())))
    assert resp.status == 200, await resp.text()
    conversation = await conversation_of(client, frm)
    got = {m["wa_message_id"]: m for m in await all_messages(client, conversation["id"])}
    assert len(got) == len(sent)

    def stored(name: str) -> dict:
        return got[sent[name]["id"]]

    assert stored("text")["type"] == "text"
    assert stored("text")["text"] == "مرحبا، هل عندكم توصيل؟"
    image = stored("image")
    assert image["type"] == "image" and image["media"]["id"] == "111"
    assert image["media"]["caption"] == "this one" and image["media"]["mime_type"] == "image/jpeg"
    audio = stored("audio")
    assert audio["type"] == "audio" and audio["extra"] == {"voice": True}
    assert stored("video")["media"]["caption"] == "unboxing"
    document = stored("document")
    assert document["type"] == "document" and document["media"]["filename"] == "invoice.pdf"
    sticker = stored("sticker")
    assert sticker["type"] == "image" and sticker["extra"] == {"sticker": True, "animated": True}
    location = stored("location")
    assert location["type"] == "location"
    assert location["text"] == "Kingdom Centre, Riyadh"
    assert location["extra"]["latitude"] == 24.7136 and location["extra"]["longitude"] == 46.6753
    button = stored("button_reply")
    assert button["type"] == "interactive" and button["text"] == "Yes"
    assert button["extra"] == {
        "interactive_type": "button_reply",
        "reply_id": "yes_1",
        "reply_to": "wamid.asked",
    }
    listed = stored("list_reply")
    assert listed["text"] == "Medium" and listed["extra"]["reply_id"] == "size_m"
    assert listed["extra"]["description"] == "Chest 96-101 cm"
    quick = stored("button")
    assert quick["type"] == "interactive" and quick["text"] == "Stop promotions"
    assert quick["extra"]["payload"] == "STOP_PROMOS"
    reaction = stored("reaction")
    assert reaction["type"] == "reaction" and reaction["text"] == "❤️"
    assert reaction["extra"] == {"reacted_to": "wamid.target", "removed": False}
    assert stored("unreaction")["extra"]["removed"] is True
    unsupported = stored("unsupported")
    assert unsupported["type"] == "unsupported"
    assert unsupported["extra"]["errors"] == [
        {"code": 131051, "title": "Message type unknown", "message": "..."}
    ]
    contacts = stored("contacts")
    assert contacts["type"] == "unsupported" and contacts["extra"]["original_type"] == "contacts"


async def test_timestamps_become_milliseconds_and_wamids_with_slashes_work(client):
    m = text("hello", id="wamid.with/slash==")
    m["timestamp"] = "1749416383"
    assert (await post_webhook(client, webhook([m]))).status == 200
    conversation = await conversation_of(client)
    [stored] = await all_messages(client, conversation["id"])
    assert stored["at"] == "2025-06-08T20:59:43.000Z"
    assert stored["wa_message_id"] == "wamid.with/slash=="


# -- malformed bodies ---------------------------------------------------------------------


def _bad_in_the_middle() -> dict:
    good, bad, good2 = text("one"), text("two"), text("three")
    del bad["id"]
    return webhook([good, bad, good2])


def _bad_type_content() -> dict:
    m = text("x")
    m["text"] = {"body": 5}
    return webhook([text("first"), m])


def _bad_timestamp() -> dict:
    m = text("x")
    m["timestamp"] = "yesterday"
    return webhook([m])


def _far_future_timestamp() -> dict:
    m = text("x")
    m["timestamp"] = "31690708000000"  # a year SQLite cannot hold, and no list should show
    return webhook([text("first"), m])


def _nested_too_deep() -> bytes:
    return b'{"object": "whatsapp_business_account", "entry": ' + b"[" * 5000 + b"]" * 5000 + b"}"


def _bad_location() -> dict:
    return webhook([message("location", {"latitude": "north", "longitude": 1})])


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        b"\xff\xfe",
        b"[]",
        b'"just a string"',
        b"{}",
        json.dumps({"object": "whatsapp_business_account", "entry": {}}).encode(),
        json.dumps({"entry": [{"changes": [{"field": "messages", "value": []}]}]}).encode(),
        json.dumps(
            {"entry": [{"changes": [{"field": "messages", "value": {"messages": {}}}]}]}
        ).encode(),
        _nested_too_deep(),
    ],
    ids=[
        "not-json",
        "not-utf8",
        "a-list",
        "a-string",
        "no-entry",
        "entry-not-a-list",
        "value-not-an-object",
        "messages-not-a-list",
        "nested-too-deep",
    ],
)
async def test_a_broken_envelope_is_400_and_stores_nothing(client, body):
    with capture_logs() as logs:
        resp = await post_webhook(client, body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "invalid_webhook"
    assert error["message"]
    assert await chats(client) == []
    [line] = [entry for entry in logs if entry["event"] == "webhook.malformed"]
    assert len(line["reason"]) <= 300


@pytest.mark.parametrize(
    "make, reason",
    [
        (_bad_type_content, "text.body must be a string"),
        (_bad_timestamp, "timestamp must be Unix seconds"),
        (_far_future_timestamp, "timestamp is not a plausible time"),
        (_bad_location, "latitude must be a number"),
    ],
    ids=["bad-text-body", "bad-timestamp", "far-future-timestamp", "bad-latitude"],
)
async def test_a_bad_message_is_kept_as_unsupported_and_its_batch_stands(client, make, reason):
    body = make()
    good = text("the good one")
    body["entry"][0]["changes"][0]["value"]["messages"].append(good)
    for _ in range(2):  # a redelivery changes nothing
        assert (await post_webhook(client, body)).status == 200
    conversation = await conversation_of(client)
    stored = await all_messages(client, conversation["id"])
    kept = [m for m in stored if m["type"] == "unsupported"]
    assert len(kept) == 1 and reason in kept[0]["extra"]["reason"]
    assert [m["text"] for m in stored if m["type"] == "text"].count("the good one") == 1


async def test_messages_and_statuses_without_an_id_are_refused_alone(client):
    nameless = text("no id")
    del nameless["id"]
    senderless = text("no sender")
    del senderless["from"]
    # Two contacts: which one sent it cannot be told.
    contacts = {"966501234567": "Sara", "201001234567": "Omar"}
    body = webhook([text("first"), nameless, text("last")], [{"status": "read"}], contacts)
    body["entry"][0]["changes"][0]["value"]["messages"].insert(2, senderless)
    with capture_logs() as logs:
        assert (await post_webhook(client, body)).status == 200
    conversation = await conversation_of(client)
    stored = await all_messages(client, conversation["id"])
    assert [m["text"] for m in stored] == ["first", "last"]
    refused = [entry for entry in logs if entry["event"] == "webhook.refused"]
    assert len(refused) == 3


async def test_a_parse_error_names_the_place_that_is_wrong():
    parsed = parse_payload(_bad_in_the_middle())
    assert [m.text for m in parsed.messages] == ["one", "three"]
    [reason] = parsed.refused
    assert reason.startswith("entry[0].changes[0].value.messages[1].id")


async def test_a_message_from_a_number_without_a_contact_uses_the_number(client):
    body = webhook([text("hi", frm="201001234567")], contacts={"999": "Someone", "998": "Else"})
    assert (await post_webhook(client, body)).status == 200
    conversation = await conversation_of(client, "201001234567")
    assert conversation["user_name"] == "+201001234567"


async def test_a_new_message_reaches_an_open_dashboard(client):
    stream = await SseStream.open(client)
    m = text("hello")
    await post_webhook(client, webhook([m]))
    event, _ = await stream.until(message_event(m["id"]))
    assert event.name == "new_conversation"
    assert event.data["conversation"]["user_id"] == "966501234567"
    assert event.data["message"]["text"] == "hello"
    stream.close()


@pytest.mark.parametrize("n", [wamid()])
async def test_redelivery_after_a_resolved_conversation_does_not_reopen_it(client, n):
    m = text("hello", id=n)
    await post_webhook(client, webhook([m]))
    conversation = await conversation_of(client)
    await client.patch(
        f"/api/live-chat/conversations/{conversation['id']}", json={"status": "resolved"}
    )
    assert (await post_webhook(client, webhook([m]))).status == 200
    rows = await chats(client)
    assert len(rows) == 1 and rows[0]["status"] == "resolved"


def test_whole_second_times_are_refined_by_the_arrival_time_in_body_order():
    first, second = text("one"), text("two")
    first["timestamp"] = second["timestamp"] = "1749416383"
    body = webhook([first, second])
    arrived = 1749416383_000 + 400
    parsed = parse_payload(body, received_ms=arrived)
    assert [m.at for m in parsed.messages] == [arrived, arrived + 1]
    # Arriving in the second's last millisecond: still one after the other.
    edge = parse_payload(body, received_ms=1749416383_999)
    assert [m.at for m in edge.messages] == [1749416383_999, 1749416384_000]
    # Redelivered a day later: WhatsApp's own time stands, the body's order too.
    late = parse_payload(body, received_ms=arrived + 86_400_000)
    assert [m.at for m in late.messages] == [1749416383_000, 1749416383_001]


async def test_a_batch_from_one_customer_keeps_its_order(client):
    sent = [text(f"part {i}") for i in range(6)]
    assert (await post_webhook(client, webhook(sent))).status == 200
    conversation = await conversation_of(client)
    stored = await all_messages(client, conversation["id"])
    assert [m["text"] for m in stored] == [f"part {i}" for i in range(6)]


# -- customers known by a username (business-scoped user id) -----------------------------

BSUID = "SA.1502576394655843"


def _bsuid_body(m: dict, contact: dict | None) -> dict:
    body = webhook([m])
    value = body["entry"][0]["changes"][0]["value"]
    if contact is None:
        value.pop("contacts", None)
    else:
        value["contacts"] = [contact]
    return body


async def test_a_customer_known_by_number_then_by_username_stays_one_conversation(
    make_client, graph
):
    client = await make_client(**graph_settings(graph))
    first = text("my order?", frm="966501112222")
    assert (
        await post_webhook(client, webhook([first], contacts={"966501112222": "Sara"}))
    ).status == 200
    # WhatsApp starts sending the business-scoped user id beside the number...
    both = text("it is late", frm="966501112222", from_user_id=BSUID)
    contact = {"profile": {"name": "Sara"}, "wa_id": "966501112222", "user_id": BSUID}
    assert (await post_webhook(client, _bsuid_body(both, contact))).status == 200
    # ...then the customer adopts a username: no number at all.
    only = text("hello?", frm="x", from_user_id=BSUID)
    del only["from"]
    contact = {"profile": {"name": "Sara", "username": "@sara.k"}, "user_id": BSUID}
    assert (await post_webhook(client, _bsuid_body(only, contact))).status == 200
    rows = await chats(client)
    assert len(rows) == 1
    [conversation] = rows
    assert conversation["user_name"] == "Sara" and conversation["phone"] == "+966501112222"
    stored = await all_messages(client, conversation["id"])
    assert [m["text"] for m in stored] == ["my order?", "it is late", "hello?"]
    assert stored[-1]["extra"]["username"] == "@sara.k"


async def test_a_customer_known_only_by_username_is_answered_by_their_user_id(make_client, graph):
    client = await make_client(**graph_settings(graph))
    m = text("hi", frm="x", from_user_id=BSUID)
    del m["from"]
    contact = {"profile": {"name": "Omar", "username": "@omar"}, "user_id": BSUID}
    assert (await post_webhook(client, _bsuid_body(m, contact))).status == 200
    [conversation] = await chats(client)
    assert conversation["user_id"] == BSUID and conversation["phone"] == ""
    assert conversation["user_name"] == "Omar"
    resp = await client.post(
        f"/api/live-chat/conversations/{conversation['id']}/messages", json={"text": "hello Omar"}
    )
    assert resp.status == 201
    [sent] = await graph.wait_for_requests(1)
    assert sent.json["recipient"] == BSUID and "to" not in sent.json
    # Later the number shows up too: still the same customer.
    both = text("thanks", frm="966507778888", from_user_id=BSUID)
    contact = {"profile": {"name": "Omar"}, "wa_id": "966507778888", "user_id": BSUID}
    assert (await post_webhook(client, _bsuid_body(both, contact))).status == 200
    [conversation] = await chats(client)
    assert conversation["phone"] == "+966507778888"


async def test_a_system_message_without_contacts_keeps_the_known_name(client):
    await post_webhook(client, webhook([text("hi")], contacts={"966501234567": "Sara Ahmed"}))
    notice = message(
        "system",
        {
            "body": "User Sara Ahmed changed from 966501234567 to 966509999999",
            "wa_id": "966509999999",
            "type": "user_changed_number",
        },
    )
    assert (await post_webhook(client, _bsuid_body(notice, None))).status == 200
    conversation = await conversation_of(client)
    assert conversation["user_name"] == "Sara Ahmed"
    stored = await all_messages(client, conversation["id"])
    assert stored[-1]["type"] == "system"
    assert stored[-1]["extra"]["system_type"] == "user_changed_number"


async def test_hostile_strings_and_numbers_are_kept_safely_and_the_batch_stands(client):
    evil_name = "\u202eevil\u202c\x00 Name"
    surrogate = text("lone \ud800 surrogate")
    bad_code = message("unsupported", None, errors=[{"code": 2**80, "title": "huge"}])
    fine = text("fine")
    body = webhook([surrogate, bad_code, fine], contacts={"966501234567": evil_name})
    raw = json.dumps(body).encode()  # \ud800 travels escaped, as JSON allows
    for _ in range(3):
        assert (await post_webhook(client, raw)).status == 200
    conversation = await conversation_of(client)
    assert conversation["user_name"] == "evil Name"
    stored = await all_messages(client, conversation["id"])
    assert [m["text"] for m in stored] == ["lone \ufffd surrogate", None, "fine"]
    assert stored[1]["extra"]["errors"][0]["code"] == str(2**80)


async def test_an_interactive_message_without_its_object_is_kept_with_its_errors(client):
    m = message(
        "interactive",
        None,
        errors=[
            {
                "code": 131000,
                "title": "Something went wrong",
                "message": "unsupported webhook payload",
            }
        ],
    )
    assert (await post_webhook(client, webhook([m]))).status == 200
    conversation = await conversation_of(client)
    [stored] = await all_messages(client, conversation["id"])
    assert stored["type"] == "unsupported"
    assert stored["extra"]["original_type"] == "interactive"
    assert stored["extra"]["errors"][0]["code"] == 131000


async def test_good_poisoned_good_three_times_stores_each_once(client):
    good, poisoned, good2 = text("good one"), text("x"), text("good two")
    poisoned["text"] = {"body": {"\ud800": [2**70, float("nan")]}}
    body = json.dumps(webhook([good, poisoned, good2])).encode()
    for _ in range(3):
        resp = await post_webhook(client, body)
        assert resp.status == 200, await resp.text()
    conversation = await conversation_of(client)
    stored = await all_messages(client, conversation["id"])
    assert [(m["type"], m["text"]) for m in stored] == [
        ("text", "good one"),
        ("unsupported", None),
        ("text", "good two"),
    ]
    assert stored[1]["wa_message_id"] == poisoned["id"]


async def test_an_unexpected_failure_is_a_json_500_with_the_request_id(client, monkeypatch):
    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(client.app[keys.STORE], "save_inbound", broken)
    with capture_logs() as logs:
        resp = await post_webhook(client, webhook([text("hello")]))
    assert resp.status == 500
    error = (await resp.json())["error"]
    assert error["code"] == "internal_error"
    [failed] = [e for e in logs if e["event"] == "request.failed"]
    assert failed["path"] == "/webhooks/whatsapp"
    assert failed["request_id"] in error["message"]
