"""Templates and the 24-hour window, quoted replies, reactions, read receipts and typing,
and several business numbers, over real HTTP against the fake Graph API. On both stores."""

from __future__ import annotations

import time

from tests.fakes import graph_settings
from tests.webhooks import (
    all_messages,
    chats,
    message,
    post_webhook,
    text,
    wait_until,
    webhook,
)

CUSTOMER = "966501234567"
ORDER_UPDATE = {
    "name": "order_update",
    "status": "APPROVED",
    "language": "en_US",
    "category": "UTILITY",
    "components": [
        {"type": "HEADER", "format": "TEXT", "text": "Your order"},
        {"type": "BODY", "text": "Hi {{1}}, your order {{2}} is on its way."},
        {"type": "FOOTER", "text": "Reply STOP to opt out"},
    ],
    "id": "1234567890",
}
PENDING = {**ORDER_UPDATE, "name": "summer_sale", "status": "PENDING", "id": "55"}


async def conversation(client, user_id: str = CUSTOMER) -> dict:
    [row] = [c for c in await chats(client) if c["user_id"] == user_id]
    return row


async def post(client, conversation_id: str, body: dict):
    return await client.post(f"/api/live-chat/conversations/{conversation_id}/messages", json=body)


async def sent(graph, n: int) -> list:
    await wait_until(lambda: _async(len(graph.sends()) >= n))
    return graph.sends()


async def test_outside_the_window_free_text_is_422_without_whatsapp_and_a_template_is_sent(
    make_client, graph
):
    graph.templates = [ORDER_UPDATE, PENDING]
    client = await make_client(
        **graph_settings(graph), whatsapp_business_account_id="102290129340398"
    )
    # The customer last wrote 25 hours ago.
    old = text("where is my order?", timestamp=str(int(time.time()) - 25 * 3600))
    assert (await post_webhook(client, webhook([old]))).status == 200
    convo = await conversation(client)
    assert convo["window_closes_at"] is not None

    resp = await post(client, convo["id"], {"text": "Sorry for the wait!"})
    assert resp.status == 422
    assert (await resp.json())["error"]["code"] == "window_closed"
    assert graph.sends() == []

    # The approved templates, with how many parameters each takes.
    resp = await client.get("/api/live-chat/templates")
    assert resp.status == 200
    listing = (await resp.json())["templates"]
    assert [t["name"] for t in listing] == ["order_update"]  # not the pending one
    [template] = listing
    assert template["parameters"] == 2 and template["language"] == "en_US"
    assert template["body"] == "Hi {{1}}, your order {{2}} is on its way."
    [lookup] = [r for r in graph.requests if r.path.endswith("/message_templates")]
    assert lookup.path == "/v21.0/102290129340398/message_templates"

    resp = await post(
        client,
        convo["id"],
        {
            "template": {
                "name": "order_update",
                "language": "en_US",
                "parameters": ["Sara", "48213"],
            }
        },
    )
    assert resp.status == 201, await resp.text()
    reply = await resp.json()
    assert reply["type"] == "template"
    assert reply["text"] == (
        "Your order\n\nHi Sara, your order 48213 is on its way.\n\nReply STOP to opt out"
    )
    [send] = await sent(graph, 1)
    assert send.json["type"] == "template"
    assert send.json["template"] == {
        "name": "order_update",
        "language": {"code": "en_US"},
        "components": [
            {
                "type": "body",
                "parameters": [{"type": "text", "text": "Sara"}, {"type": "text", "text": "48213"}],
            }
        ],
    }
    # Wrong parameters and templates that cannot be sent are refused before WhatsApp.
    resp = await post(
        client,
        convo["id"],
        {"template": {"name": "order_update", "language": "en_US", "parameters": ["Sara"]}},
    )
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_template"
    resp = await post(
        client, convo["id"], {"template": {"name": "summer_sale", "language": "en_US"}}
    )
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "template_not_approved"
    assert len(graph.sends()) == 1

    # A new message from the customer opens the window again: free text goes out.
    assert (await post_webhook(client, webhook([text("thanks! and the invoice?")]))).status == 200
    resp = await post(client, convo["id"], {"text": "Attached below."})
    assert resp.status == 201
    await sent(graph, 2)


async def test_a_template_status_webhook_refreshes_the_templates(make_client, graph):
    graph.templates = [PENDING]
    client = await make_client(
        **graph_settings(graph), whatsapp_business_account_id="102290129340398"
    )
    assert (await (await client.get("/api/live-chat/templates")).json())["templates"] == []
    graph.templates = [{**PENDING, "status": "APPROVED"}]
    update = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "102290129340398",
                "time": int(time.time()),
                "changes": [
                    {
                        "field": "message_template_status_update",
                        "value": {
                            "event": "APPROVED",
                            "message_template_id": 55,
                            "message_template_name": "summer_sale",
                            "message_template_language": "en_US",
                            "reason": "NONE",
                        },
                    }
                ],
            }
        ],
    }
    assert (await post_webhook(client, update)).status == 200

    async def approved():
        listing = (await (await client.get("/api/live-chat/templates")).json())["templates"]
        return [t["name"] for t in listing] == ["summer_sale"]

    await wait_until(approved)


async def test_quoted_replies_reactions_and_agent_replies_and_reactions(make_client, graph):
    client = await make_client(**graph_settings(graph))
    first = text("Do you have it in blue?")
    assert (await post_webhook(client, webhook([first]))).status == 200
    convo = await conversation(client)
    [question] = await all_messages(client, convo["id"])

    # The agent answers that message, quoting it.
    resp = await post(
        client, convo["id"], {"text": "Yes, in navy blue.", "reply_to": question["id"]}
    )
    assert resp.status == 201
    answer = await resp.json()
    assert answer["extra"]["quoted"]["text"] == "Do you have it in blue?"
    [send] = await sent(graph, 1)
    assert send.json["context"] == {"message_id": first["id"]}
    assert send.json["text"]["body"] == "Yes, in navy blue."

    async def stored_answer():
        return next(
            (
                m
                for m in await all_messages(client, convo["id"])
                if m["id"] == answer["id"] and m["wa_message_id"]
            ),
            None,
        )

    answer = await wait_until(stored_answer)

    # The customer quotes the agent's answer and reacts to it, then takes the reaction back.
    quote = text(
        "Great, I'll take two", context={"from": "15550783881", "id": answer["wa_message_id"]}
    )
    like = message("reaction", {"message_id": answer["wa_message_id"], "emoji": "👍"})
    assert (await post_webhook(client, webhook([quote, like]))).status == 200
    unlike = message("reaction", {"message_id": answer["wa_message_id"]})
    assert (await post_webhook(client, webhook([unlike]))).status == 200
    messages = {m["wa_message_id"]: m for m in await all_messages(client, convo["id"])}
    assert messages[quote["id"]]["extra"]["quoted"] == {
        "id": answer["id"],
        "sender": "agent",
        "type": "text",
        "text": "Yes, in navy blue.",
    }
    assert messages[like["id"]]["extra"]["reacted_to"] == answer["wa_message_id"]
    assert (
        messages[like["id"]]["text"] == "👍" and messages[like["id"]]["extra"]["removed"] is False
    )
    assert messages[unlike["id"]]["extra"]["removed"] is True

    # The agent reacts to the customer's message, then removes the reaction.
    resp = await post(
        client, convo["id"], {"reaction": {"message_id": messages[quote["id"]]["id"], "emoji": "❤️"}}
    )
    assert resp.status == 201
    resp = await post(
        client, convo["id"], {"reaction": {"message_id": messages[quote["id"]]["id"], "emoji": ""}}
    )
    assert resp.status == 201
    sends = await sent(graph, 3)
    assert sends[1].json["type"] == "reaction"
    assert sends[1].json["reaction"] == {"message_id": quote["id"], "emoji": "❤️"}
    assert sends[2].json["reaction"] == {"message_id": quote["id"], "emoji": ""}
    # A message of another conversation cannot be answered or reacted to from this one.
    resp = await post(client, convo["id"], {"text": "hm", "reply_to": "m_nothere"})
    assert resp.status == 404


async def test_opening_a_conversation_marks_it_read_on_whatsapp_once(make_client, graph):
    client = await make_client(**graph_settings(graph))
    one, two = text("hello?"), text("anyone there?")
    assert (await post_webhook(client, webhook([one, two]))).status == 200
    convo = await conversation(client)
    assert convo["unread_count"] == 2

    resp = await client.post(f"/api/live-chat/conversations/{convo['id']}/read")
    assert resp.status == 200 and (await resp.json())["unread_count"] == 0
    await wait_until(lambda: _async(len(graph.receipts()) == 1))
    [receipt] = graph.receipts()
    # The newest message: WhatsApp marks the earlier ones read with it.
    assert receipt.json == {
        "messaging_product": "whatsapp",
        "status": "read",
        "message_id": two["id"],
    }
    assert receipt.path == "/v21.0/123/messages"
    # Opened again (another agent, a reload): no second receipt.
    resp = await client.post(f"/api/live-chat/conversations/{convo['id']}/read")
    assert resp.status == 200
    later = text("one more thing")
    assert (await post_webhook(client, webhook([later]))).status == 200
    await client.post(f"/api/live-chat/conversations/{convo['id']}/read")
    await wait_until(lambda: _async(len(graph.receipts()) == 2))
    assert graph.receipts()[1].json["message_id"] == later["id"]


async def test_read_receipts_can_be_turned_off(make_client, graph):
    client = await make_client(**graph_settings(graph), read_receipts=False)
    assert (await post_webhook(client, webhook([text("hello?")]))).status == 200
    convo = await conversation(client)
    resp = await client.post(f"/api/live-chat/conversations/{convo['id']}/read")
    assert resp.status == 200
    assert graph.receipts() == []


async def test_the_customer_sees_typing_while_the_ai_prepares_its_reply(make_client, graph, llm):
    client = await make_client(
        **graph_settings(graph), ai_provider="openai", ai_base_url=llm.base, ai_api_key="k"
    )
    question = text("what are your opening hours?")
    assert (await post_webhook(client, webhook([question]))).status == 200
    [reply] = await sent(graph, 1)
    [typing] = graph.receipts()
    assert typing.json == {
        "messaging_product": "whatsapp",
        "status": "read",
        "message_id": question["id"],
        "typing_indicator": {"type": "text"},
    }
    assert typing.at <= llm.requests[0].at  # shown before the AI is asked
    assert reply.json["text"]["body"] == llm.reply


async def test_a_webhook_to_a_second_number_replies_from_that_number(make_client, graph):
    graph.tokens = {"456": "second-token"}
    client = await make_client(
        **graph_settings(graph), whatsapp_numbers=(_number("456", "second-token"),)
    )
    body = webhook([text("hola, second line here", frm="966509999999")])
    body["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = "456"
    assert (await post_webhook(client, body)).status == 200
    assert (await post_webhook(client, webhook([text("first line")]))).status == 200
    second = await conversation(client, "966509999999")
    first = await conversation(client)
    assert second["phone_number_id"] == "456" and first["phone_number_id"] == "123"

    resp = await post(client, second["id"], {"text": "Hello from the second line"})
    assert resp.status == 201
    resp = await post(client, first["id"], {"text": "Hello from the first line"})
    assert resp.status == 201
    sends = await sent(graph, 2)
    by_body = {r.json["text"]["body"]: r for r in sends}
    second_send = by_body["Hello from the second line"]
    assert second_send.path == "/v21.0/456/messages"
    assert second_send.headers["Authorization"] == "Bearer second-token"
    assert by_body["Hello from the first line"].path == "/v21.0/123/messages"

    # The list, filtered by number; and the numbers there are.
    resp = await client.get("/api/live-chat/unified-chats?number=456")
    assert [c["id"] for c in (await resp.json())["chats"]] == [second["id"]]
    resp = await client.get("/api/live-chat/numbers")
    assert (await resp.json())["numbers"] == [{"id": "123"}, {"id": "456"}]


def _number(id_: str, token: str):
    from server.config import WhatsAppNumber

    return WhatsAppNumber(id_, token)


async def _async(value):
    return value


def test_the_parser_keeps_the_business_number_and_the_media_hash():
    from server.integrations.whatsapp_webhook import parse_payload

    body = webhook(
        [
            message("image", {"id": "1", "mime_type": "image/jpeg", "sha256": "abc="}),
            message("image", {"mime_type": "image/jpeg"}),  # no media id: kept as unsupported
        ]
    )
    body["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = "106540352242922"
    parsed = parse_payload(body)
    good, bad = parsed.messages
    assert good.phone_number_id == bad.phone_number_id == "106540352242922"
    assert good.media is not None and good.media.sha256 == "abc="
    assert bad.type == "unsupported" and "image.id" in bad.extra["reason"]
    body["entry"][0]["changes"][0]["value"]["metadata"] = "garbage"
    assert parse_payload(body).messages[0].phone_number_id is None
