"""Lanes: an agent's reply never waits behind AI work stuck on a slow provider."""

from __future__ import annotations

import asyncio
import time

from server import keys
from tests.fakes import graph_settings
from tests.test_ai_replies import llm_settings
from tests.webhooks import post_webhook, text, webhook

STUCK_AI_CALLS = 200


async def test_with_200_ai_calls_stuck_an_agent_reply_reaches_whatsapp_within_a_second(
    make_client, llm, graph
):
    client = await make_client(
        **llm_settings(llm, ai_timeout_s=60, ai_max_retries=0), **graph_settings(graph)
    )
    llm.hang(times=STUCK_AI_CALLS)
    # 200 customers write at once: each gets an AI job, and every one of them hangs.
    senders = [f"9665{n:08d}" for n in range(STUCK_AI_CALLS)]
    for start in range(0, STUCK_AI_CALLS, 50):
        batch = webhook([text(f"hello {n}", frm=n) for n in senders[start : start + 50]])
        assert (await post_webhook(client, batch)).status == 200
    await llm.wait_for_requests(STUCK_AI_CALLS, within=30)
    assert client.app[keys.OUTBOX].lanes.ai.active_count == STUCK_AI_CALLS

    chats = (await (await client.get("/api/live-chat/unified-chats?limit=1")).json())["chats"]
    started = time.monotonic()
    resp = await client.post(
        f"/api/live-chat/conversations/{chats[0]['id']}/messages", json={"text": "an agent here"}
    )
    assert resp.status == 201
    while not any(r.json.get("text", {}).get("body") == "an agent here" for r in graph.requests):
        assert time.monotonic() - started < 1.0, "the agent's reply waited behind the AI"
        await asyncio.sleep(0.01)
