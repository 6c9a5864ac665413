"""`run.py simulate` against a real server on loopback: signed, parsed, stored."""

from __future__ import annotations

import asyncio

from run import simulate as main
from server.integrations.whatsapp_webhook import parse_payload
from server.simulate import Traffic
from tests.conftest import APP_SECRET
from tests.webhooks import all_messages, chats, wait_until


async def test_simulated_traffic_is_accepted_and_stored(client, capsys):
    url = str(client.make_url("/")).rstrip("/")
    argv = ["--url", url, "--secret", APP_SECRET, "--rate", "200", "--count", "40", "--seed", "3"]
    code = await asyncio.to_thread(main, argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "answers: 200: 40" in out

    rows = await wait_until(lambda: chats(client))
    assert 1 < len(rows) <= 6
    names = {r["user_name"] for r in rows}
    assert any(any("\u0600" <= ch <= "\u06ff" for ch in n) for n in names)  # Arabic names
    assert any(n.isascii() for n in names)  # and English ones
    types = set()
    for row in rows:
        types |= {m["type"] for m in await all_messages(client, row["id"])}
    assert {"text", "image"} <= types and len(types) >= 4


async def test_a_wrong_secret_is_reported_as_failure(client, capsys):
    url = str(client.make_url("/")).rstrip("/")
    code = await asyncio.to_thread(
        main, ["--url", url, "--secret", "nope", "--count", "2", "--rate", "50"]
    )
    assert code == 1
    assert "401" in capsys.readouterr().err
    assert await chats(client) == []


def test_it_refuses_a_remote_url(capsys):
    assert main(["--url", "http://203.0.113.7:8080", "--count", "1"]) == 2
    assert "not a loopback address" in capsys.readouterr().err


def test_a_duration_run_stops_by_itself():
    # Nothing listens on this port: every request fails fast, and the run still ends on time.
    code = main(["--url", "http://127.0.0.1:9", "--duration", "0.3", "--rate", "20"])
    assert code == 1


def test_every_generated_body_is_a_valid_webhook():
    traffic = Traffic(seed=1, customers=8)
    kinds = set()
    for _ in range(300):
        body, messages, statuses = traffic.body(3)
        parsed = parse_payload(body)
        assert len(parsed.messages) == messages and len(parsed.statuses) == statuses
        kinds |= {m.type for m in parsed.messages}
    assert kinds == {
        "text",
        "image",
        "audio",
        "document",
        "location",
        "interactive",
        "reaction",
        "unsupported",
    }


async def test_it_never_follows_a_redirect(aiohttp_server, capsys):
    from aiohttp import web

    followed: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        followed.append(request.path)
        return web.json_response({"ok": True})

    target = web.Application()
    target.router.add_post("/webhooks/whatsapp", elsewhere)
    target_server = await aiohttp_server(target)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(str(target_server.make_url("/webhooks/whatsapp")))

    redirector = web.Application()
    redirector.router.add_post("/webhooks/whatsapp", redirect)
    server = await aiohttp_server(redirector)
    url = str(server.make_url("/")).rstrip("/")
    code = await asyncio.to_thread(main, ["--url", url, "--count", "3", "--rate", "50"])
    assert code == 1  # a redirect is not an acceptance
    assert "307: 3" in capsys.readouterr().out
    assert followed == []
