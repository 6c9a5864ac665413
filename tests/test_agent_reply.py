"""Agent replies over real HTTP: saved, broadcast, sent to the (fake) Graph API, AI off."""

from __future__ import annotations

import time

import aiohttp
import pytest

from server.config import Settings
from server.integrations.whatsapp import WhatsAppClient
from tests.fakes import FakeGraph, graph_settings
from tests.webhooks import (
    SseStream,
    all_messages,
    chats,
    message_event,
    post_webhook,
    status,
    text,
    wait_until,
    webhook,
)


async def customer_writes(client, body: str = "hello", frm: str = "966501234567") -> dict:
    assert (await post_webhook(client, webhook([text(body, frm=frm)]))).status == 200
    [conversation] = [c for c in await chats(client) if c["user_id"] == frm]
    return conversation


async def reply(client, conversation_id: str, body: str = "Hi, how can I help?") -> dict:
    resp = await client.post(
        f"/api/live-chat/conversations/{conversation_id}/messages", json={"text": body}
    )
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def stored(client, conversation_id: str, message_id: str, statuses: set[str]) -> dict:
    """Wait until a message has one of `statuses`; the message."""

    async def check():
        for m in await all_messages(client, conversation_id):
            if m["id"] == message_id and m["status"] in statuses:
                return m
        return None

    return await wait_until(check)


async def test_an_agent_reply_reaches_whatsapp_and_turns_the_ai_off(make_client, graph):
    client = await make_client(**graph_settings(graph))
    conversation = await customer_writes(client)
    assert conversation["ai_enabled"] is True
    stream = await SseStream.open(client)

    sent = await reply(client, conversation["id"], "مرحبًا! كيف أقدر أساعدك؟")
    assert sent["sender"] == "agent" and sent["direction"] == "out"
    assert sent["status"] == "queued"

    [request] = await graph.wait_for_requests(1)
    assert request.path == "/v21.0/123/messages"
    assert request.headers["Authorization"] == "Bearer t"
    assert request.json == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "966501234567",
        "type": "text",
        "text": {"preview_url": False, "body": "مرحبًا! كيف أقدر أساعدك؟"},
    }
    message = await stored(client, conversation["id"], sent["id"], {"sent"})
    assert message["wa_message_id"] == "wamid.FAKE0001"
    assert message["error"] is None

    event, _ = await stream.until(message_event(sender="agent"))
    assert event.data["conversation"]["ai_enabled"] is False
    status_event, _ = await stream.until(lambda e: e.name == "message_status")
    assert status_event.data == {
        "conversation_id": conversation["id"],
        "message_id": sent["id"],
        "status": "sent",
        "error": None,
        "attempt": 0,
        "wa_message_id": "wamid.FAKE0001",
    }
    resp = await client.get(f"/api/live-chat/conversations/{conversation['id']}")
    after = await resp.json()
    assert after["ai_enabled"] is False and after["unread_count"] == 0
    stream.close()


async def test_after_an_agent_reply_the_ai_stays_quiet_until_switched_back_on(
    make_client, graph, llm
):
    client = await make_client(
        ai_provider="openai", ai_base_url=llm.base, ai_api_key="k", **graph_settings(graph)
    )
    conversation = await customer_writes(client, "first")
    await llm.wait_for_requests(1)
    await wait_until(
        lambda: _has(client, conversation["id"], lambda m: m["sender"] == "ai"),
    )
    await reply(client, conversation["id"], "An agent here")
    await customer_writes(client, "second")
    # The AI was switched off by the agent's reply: no request for the second message.
    await stored_count(client, conversation["id"], 4)
    assert len(llm.requests) == 1

    resp = await client.patch(
        f"/api/live-chat/conversations/{conversation['id']}", json={"ai_enabled": True}
    )
    assert resp.status == 200 and (await resp.json())["ai_enabled"] is True
    await customer_writes(client, "third")
    await llm.wait_for_requests(2)
    ai_replies = await wait_until(
        lambda: _count(client, conversation["id"], lambda m: m["sender"] == "ai", 2)
    )
    assert ai_replies


async def _has(client, conversation_id, pred):
    return any(pred(m) for m in await all_messages(client, conversation_id))


async def _count(client, conversation_id, pred, n):
    return sum(1 for m in await all_messages(client, conversation_id) if pred(m)) >= n


async def stored_count(client, conversation_id, n):
    async def check():
        return len(await all_messages(client, conversation_id)) >= n

    await wait_until(check)


async def test_without_credentials_a_reply_is_stored_as_not_sent(client):
    conversation = await customer_writes(client)
    stream = await SseStream.open(client)
    sent = await reply(client, conversation["id"])
    message = await stored(client, conversation["id"], sent["id"], {"not_sent"})
    assert message["error"]["code"] == "not_configured"
    assert "not delivered" in message["error"]["title"]
    assert message["wa_message_id"] is None
    event, _ = await stream.until(lambda e: e.name == "message_status")
    assert event.data["status"] == "not_sent"
    assert event.data["error"]["code"] == "not_configured"
    stream.close()


async def test_outside_the_24_hour_window_the_error_is_stored_and_broadcast(make_client, graph):
    client = await make_client(**graph_settings(graph))
    conversation = await customer_writes(client)
    stream = await SseStream.open(client)
    graph.fail(131047)
    sent = await reply(client, conversation["id"])
    message = await stored(client, conversation["id"], sent["id"], {"failed"})
    assert message["error"]["code"] == 131047
    assert "24-hour" in message["error"]["title"]
    event, _ = await stream.until(lambda e: e.name == "message_status")
    assert event.data["message_id"] == sent["id"]
    assert event.data["status"] == "failed"
    assert event.data["error"]["code"] == 131047
    # Retrying cannot open the window: one request only.
    assert len(graph.requests) == 1
    stream.close()


async def test_a_failed_status_webhook_with_131047_is_stored_and_broadcast(make_client, graph):
    client = await make_client(**graph_settings(graph))
    conversation = await customer_writes(client)
    sent = await reply(client, conversation["id"])
    message = await stored(client, conversation["id"], sent["id"], {"sent"})
    stream = await SseStream.open(client)
    errors = [
        {
            "code": 131047,
            "title": "Re-engagement message",
            "message": "Re-engagement message",
            "error_data": {"details": "Message failed to send because more than 24 hours"},
        }
    ]
    body = webhook(statuses=[status(message["wa_message_id"], "failed", errors=errors)])
    assert (await post_webhook(client, body)).status == 200
    # (The send's own "sent" may still be on its way to this new stream: wait past it.)
    event, _ = await stream.until(
        lambda e: e.name == "message_status" and e.data["status"] != "sent"
    )
    assert event.data["status"] == "failed"
    assert event.data["error"]["code"] == 131047
    assert "24-hour" in event.data["error"]["title"]
    failed = await stored(client, conversation["id"], sent["id"], {"failed"})
    assert failed["error"]["code"] == 131047
    stream.close()


@pytest.mark.parametrize("code", [131048, 131026, 190])
async def test_permanent_errors_are_not_retried(make_client, graph, code):
    client = await make_client(**graph_settings(graph))
    conversation = await customer_writes(client)
    graph.fail(code)
    sent = await reply(client, conversation["id"])
    message = await stored(client, conversation["id"], sent["id"], {"failed"})
    assert message["error"]["code"] == code
    assert len(graph.requests) == 1


async def test_a_wrong_token_is_stored_as_error_190(make_client, graph):
    client = await make_client(**{**graph_settings(graph), "whatsapp_token": "expired"})
    conversation = await customer_writes(client)
    sent = await reply(client, conversation["id"])
    message = await stored(client, conversation["id"], sent["id"], {"failed"})
    assert message["error"]["code"] == 190
    assert "token" in message["error"]["title"]


def _client_settings(graph: FakeGraph) -> Settings:
    return Settings(**graph_settings(graph)).validated()


async def test_transient_errors_are_retried_with_backoff_then_succeed(graph):
    graph.fail(131000)
    graph.fail(130429)
    graph.fail_raw(502)
    async with aiohttp.ClientSession() as session:
        sender = WhatsAppClient(_client_settings(graph), session, backoff_base_s=0.01)
        result = await sender.send_text("+966 50 123 4567", "hello")
    assert result.status == "sent" and result.wa_message_id == "wamid.FAKE0001"
    assert len(graph.requests) == 4
    assert graph.requests[-1].json["to"] == "966501234567"


async def test_retries_are_bounded_and_the_last_error_is_kept(graph):
    graph.fail(131016, times=10)
    async with aiohttp.ClientSession() as session:
        sender = WhatsAppClient(
            _client_settings(graph), session, max_retries=2, backoff_base_s=0.01
        )
        result = await sender.send_text("966501234567", "hello")
    assert result.status == "failed"
    assert result.error is not None and result.error.code == 131016
    assert len(graph.requests) == 3


async def test_the_pair_rate_limit_backs_off_longer(graph):
    graph.fail(131056)
    async with aiohttp.ClientSession() as session:
        sender = WhatsAppClient(
            _client_settings(graph), session, backoff_base_s=0.01, pair_backoff_s=(0.3, 0.6)
        )
        started = time.monotonic()
        result = await sender.send_text("966501234567", "hello")
    assert result.status == "sent"
    assert graph.requests[1].at - graph.requests[0].at >= 0.29
    assert time.monotonic() - started < 5


async def test_an_unreachable_api_is_a_failure_not_a_crash(unused_tcp_port):
    settings = Settings(
        whatsapp_token="t",
        whatsapp_phone_number_id="123",
        whatsapp_api_base=f"http://127.0.0.1:{unused_tcp_port}/v21.0",
    ).validated()
    async with aiohttp.ClientSession() as session:
        sender = WhatsAppClient(settings, session, max_retries=1, backoff_base_s=0.01)
        result = await sender.send_text("966501234567", "hello")
    assert result.status == "failed"
    assert result.error is not None and result.error.code == "network"
