"""Outbound calls (WhatsApp, the AI) read bounded answers and never follow redirects."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from server.integrations.http import MAX_RESPONSE_BYTES, ResponseTooLarge, post_json

TIMEOUT = aiohttp.ClientTimeout(total=10)


@pytest.fixture
async def upstream(aiohttp_server):
    """A loopback server answering as a misbehaving API would."""

    async def huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"padding": "')
        for _ in range(MAX_RESPONSE_BYTES // 65536 + 2):
            await resp.write(b"x" * 65536)  # no Content-Length: chunked, unbounded
        await resp.write(b'"}')
        return resp

    async def declared(request: web.Request) -> web.Response:
        return web.Response(body=b"{" * (MAX_RESPONSE_BYTES + 1), content_type="application/json")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"messages": [{"id": "wamid.1"}]})

    app = web.Application()
    app.router.add_post("/huge", huge)
    app.router.add_post("/declared", declared)
    app.router.add_post("/moved", moved)
    app.router.add_post("/ok", ok)
    return await aiohttp_server(app)


async def test_an_answer_longer_than_the_cap_is_refused(upstream):
    async with aiohttp.ClientSession() as session:
        for path in ("/huge", "/declared"):
            with pytest.raises(ResponseTooLarge):
                await post_json(session, str(upstream.make_url(path)), {}, {}, TIMEOUT)
        reply = await post_json(session, str(upstream.make_url("/ok")), {}, {}, TIMEOUT)
        assert reply.status == 200 and reply.body == {"messages": [{"id": "wamid.1"}]}


async def test_a_redirect_is_an_answer_not_followed(upstream):
    async with aiohttp.ClientSession() as session:
        reply = await post_json(session, str(upstream.make_url("/moved")), {}, {}, TIMEOUT)
    assert reply.status == 302
