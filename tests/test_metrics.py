"""GET /metrics after known traffic: every counter an operator reads has the right value."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp

from tests.fakes import graph_settings
from tests.prometheus import scrape
from tests.test_ai_replies import llm_settings
from tests.webhooks import SseStream, post_webhook, text, webhook

LIST = "/api/live-chat/unified-chats"


async def test_metrics_count_known_traffic(make_client, llm, graph):
    client = await make_client(**llm_settings(llm), **graph_settings(graph))
    streams = [await SseStream.open(client) for _ in range(2)]

    # Webhooks: two customers write (two AI replies, sent); the same delivery again (two
    # duplicates); one with a wrong signature and one that is not a webhook body.
    first = webhook([text("Hello", frm="966500000001"), text("Hi there", frm="966500000002")])
    assert (await post_webhook(client, first)).status == 200
    await graph.wait_for_requests(2, within=10)
    assert (await post_webhook(client, first)).status == 200
    assert (await post_webhook(client, first, secret="not-the-secret")).status == 401
    assert (await post_webhook(client, b"not json")).status == 400

    # The list: three pages, one bad request; a path nothing serves.
    for _ in range(3):
        assert (await client.get(LIST, params={"limit": "10"})).status == 200
    assert (await client.get(LIST, params={"limit": "0"})).status == 400
    assert (await client.get("/nothing-here")).status == 404

    # Agents answer both customers; WhatsApp refuses the second (outside the 24 h window).
    body = await (await client.get(LIST, params={"limit": "10"})).json()
    ids = [c["id"] for c in body["chats"]]
    graph.fail(131047)
    for conversation_id in ids:
        path = f"/api/live-chat/conversations/{conversation_id}/messages"
        assert (await client.post(path, json={"text": "An agent here"})).status == 201
    await graph.wait_for_requests(4, within=10)

    # /metrics needs the token like the API.
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(client.make_url("/metrics")) as resp:
            assert resp.status == 401

    # Everything sent is stored and broadcast before the scrape.
    await wait_for_jobs(client)
    m = await scrape(client)

    requests = "livechat_http_requests_total"
    assert m(requests, method="GET", route=LIST, status="200") == 4
    assert m(requests, method="GET", route=LIST, status="400") == 1
    assert m(requests, method="GET", route="unmatched", status="404") == 1
    assert m(requests, method="POST", route="/webhooks/whatsapp", status="200") == 2
    assert m(requests, method="POST", route="/webhooks/whatsapp", status="401") == 1
    assert m(requests, method="POST", route="/webhooks/whatsapp", status="400") == 1
    reply_route = "/api/live-chat/conversations/{id}/messages"
    assert m(requests, method="POST", route=reply_route, status="201") == 2
    assert m(requests, method="GET", route="/metrics", status="401") == 1
    duration = "livechat_http_request_duration_seconds"
    assert m(f"{duration}_count", method="GET", route=LIST) == 5
    assert 0 < m(f"{duration}_sum", method="GET", route=LIST) < 5
    assert m(f"{duration}_bucket", method="GET", route=LIST, le="+Inf") == 5

    assert m("livechat_webhook_messages_total", outcome="received") == 2
    assert m("livechat_webhook_messages_total", outcome="duplicate") == 2
    assert m("livechat_webhook_refused_total", reason="bad_signature") == 1
    assert m("livechat_webhook_refused_total", reason="malformed") == 1

    assert m("livechat_ai_jobs_total", outcome="replied") == 2
    assert m("livechat_ai_job_duration_seconds_count", outcome="replied") == 2
    assert m("livechat_whatsapp_sends_total", outcome="sent") == 3
    assert m("livechat_whatsapp_sends_total", outcome="failed") == 1
    assert m("livechat_whatsapp_send_duration_seconds_count") == 4

    assert m("livechat_sse_clients") == 2
    assert m("livechat_snapshot_conversations") == 2
    assert m("livechat_snapshot_ready") == 1 and m("livechat_snapshot_fresh") == 1
    assert 0 <= m("livechat_snapshot_last_change_age_seconds") < 10
    assert m("livechat_listener_up") == 1
    assert m("livechat_listener_restarts_total") == 0
    assert m("livechat_jobs_active", lane="ai") == m("livechat_jobs_active", lane="sends") == 0

    # Events: two conversations opened, four replies (two AI, two agents), four delivery
    # outcomes; each open dashboard received exactly what the counter says.
    broadcast = {
        name: m("livechat_events_broadcast_total", type=name)
        for name in ("new_conversation", "new_message", "message_status")
    }
    assert broadcast == {"new_conversation": 2, "new_message": 4, "message_status": 4}
    for stream in streams:
        seen = Counter(e.name for e in await stream.nothing_for(0.3))
        counted = {name: m("livechat_events_broadcast_total", type=name) or 0 for name in seen}
        assert dict(seen) == counted
        stream.close()

    assert all(name.startswith("livechat_") for name in m.names())


async def wait_for_jobs(client, within: float = 10.0) -> None:
    """Until no background job runs (the AI replies and sends have stored their outcome)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        m = await scrape(client)
        busy = [
            m(name, lane=lane)
            for name in ("livechat_jobs_active", "livechat_jobs_pending")
            for lane in ("sends", "ai", "statuses")
        ]
        if busy == [0] * 6:
            return
        assert asyncio.get_running_loop().time() < deadline, "jobs still running"
        await asyncio.sleep(0.05)


async def test_metrics_on_a_port_of_their_own_leave_the_main_port(make_client):
    client = await make_client(metrics_port=0)
    assert (await client.get("/metrics")).status == 404


async def test_openmetrics_is_served_when_the_scraper_asks_for_it(client):
    resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await resp.text()).rstrip().endswith("# EOF")
