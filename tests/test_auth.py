"""Who may call what, over real HTTP on loopback: routes, sessions, tokens, origins, limits."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web

from server import keys
from server.access import Access, UndeclaredRoute
from server.app import create_app
from server.demo import build_demo
from server.handlers.auth import COOKIE
from server.models import now_ms
from server.ratelimit import SignInLimiter
from tests.accounts import PASSWORD, add_agent, base_url
from tests.conftest import AUTH, STORE_KINDS, TOKEN

LIST = "/api/live-chat/unified-chats"
EVENTS = "/api/live-chat/events"
# The only API route anyone may call: signing in.
OPEN_API = {("POST", "/api/auth/login")}


async def error_of(resp) -> dict:
    body = await resp.json()
    assert set(body) == {"error"}, body
    return body["error"]


async def seed(client, count: int = 5):
    """Demo conversations whose customers wrote a moment ago (the 24-hour window is open)."""
    conversations, messages = build_demo(count)
    conversations = [replace(c, last_inbound_at=now_ms()) for c in conversations]
    await client.app[keys.STORE].import_conversations(conversations, messages)
    return conversations


def api_routes(app: web.Application):
    """(method, path with its {id} filled in, access) of every API route."""
    for route, policy in app[keys.ROUTES].items():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter", "")
        if path.startswith("/api/"):
            yield route.method, path.replace("{id}", "c_x"), policy.access


async def test_every_api_route_and_the_stream_refuse_anonymous_callers_and_agents_on_admin_routes(
    client, sign_in
):
    app = client.app
    await add_agent(app, "agent@example.com")
    await add_agent(app, "admin@example.com", role="admin")
    agent = await sign_in(client, "agent@example.com")
    admin = await sign_in(client, "admin@example.com")
    routes = list(api_routes(app))
    assert {(m, p) for m, p, a in routes if a is Access.OPEN} == OPEN_API
    assert ("GET", EVENTS, Access.AGENT) in routes
    admin_routes = [(m, p) for m, p, a in routes if a is Access.ADMIN]
    assert ("POST", "/api/agents") in admin_routes and ("PATCH", "/api/agents/c_x") in admin_routes
    async with aiohttp.ClientSession() as anonymous:
        for method, path, access in routes:
            if access is Access.OPEN:
                continue
            resp = await anonymous.request(method, base_url(client) + path, json={})
            assert resp.status == 401, (method, path)
            assert (await error_of(resp))["code"] == "unauthorized"
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            # A wrong token and the machine token sent as a cookie are no better.
            wrong = await anonymous.request(
                method, base_url(client) + path, headers={"Authorization": "Bearer nope"}
            )
            assert wrong.status == 401, (method, path)
            as_cookie = await anonymous.request(
                method, base_url(client) + path, cookies={COOKIE: TOKEN}
            )
            assert as_cookie.status == 401, (method, path)
    for method, path, access in routes:
        if access is not Access.ADMIN:
            continue
        resp = await agent.http.request(method, agent.url(path), json={})
        assert resp.status == 403, (method, path)
        assert (await error_of(resp))["code"] == "forbidden"
        # The machine token acts for integrations, never as an admin.
        machine = await client.request(method, path, json={})
        assert machine.status == 403, (method, path)
        # An admin gets past the check (to the handler's own answer).
        allowed = await admin.http.request(method, admin.url(path), json={})
        assert allowed.status not in (401, 403), (method, path)
    # Unknown API paths say nothing to strangers.
    async with aiohttp.ClientSession() as anonymous:
        resp = await anonymous.get(base_url(client) + "/api/nothing-here")
        assert resp.status == 401


async def test_an_app_with_a_route_that_declares_no_access_does_not_start(aiohttp_server, settings):
    app = create_app(settings)

    async def forgotten(request: web.Request) -> web.Response:
        return web.json_response({"secret": True})

    app.router.add_get("/api/forgotten", forgotten)
    with pytest.raises(UndeclaredRoute, match="GET /api/forgotten"):
        await aiohttp_server(app)


async def test_sign_in_sets_a_session_cookie_and_sign_out_ends_it_on_the_server(client, sign_in):
    agent = await add_agent(client.app, "Reem@Example.com", name="Reem")
    async with aiohttp.ClientSession() as plain:
        resp = await plain.post(
            base_url(client) + "/api/auth/login",
            json={"email": " reem@example.COM ", "password": PASSWORD},
        )
        assert resp.status == 200
        assert (await resp.json())["agent"] == {
            "id": agent.id,
            "email": "reem@example.com",
            "name": "Reem",
            "role": "agent",
            "disabled": False,
        }
        cookie = resp.headers["Set-Cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        for attribute in ("HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=604800"):
            assert attribute in cookie
        assert "Secure" not in cookie  # plain http on loopback; production sets it
    browser = await sign_in(client, "reem@example.com")
    old_cookie = browser.cookie
    me = await (await browser.get("/api/auth/me")).json()
    assert me == {"kind": "session", "agent": agent.to_json()}
    assert (await browser.get(LIST)).status == 200
    out = await browser.post("/api/auth/logout", json={})
    assert out.status == 200
    assert browser.cookie in (None, "")
    # The old cookie, replayed (a copy an attacker kept), no longer opens anything.
    async with aiohttp.ClientSession(cookies={COOKIE: old_cookie}) as replay:
        for path in (LIST, "/api/auth/me", EVENTS):
            resp = await replay.get(base_url(client) + path)
            assert resp.status == 401, path


async def test_wrong_passwords_are_401_and_the_11th_within_a_minute_is_429(client):
    await add_agent(client.app, "noor@example.com")
    await add_agent(client.app, "sami@example.com")
    url = base_url(client) + "/api/auth/login"
    async with aiohttp.ClientSession() as attacker:
        for attempt in range(10):
            resp = await attacker.post(
                url, json={"email": "noor@example.com", "password": f"guess {attempt}"}
            )
            assert resp.status == 401, attempt
            assert (await error_of(resp))["code"] == "invalid_credentials"
        resp = await attacker.post(url, json={"email": "noor@example.com", "password": "guess 10"})
        assert resp.status == 429
        assert (await error_of(resp))["code"] == "too_many_attempts"
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        # Locked: even the right password waits (else the lock would not slow guessing).
        right = await attacker.post(url, json={"email": "noor@example.com", "password": PASSWORD})
        assert right.status == 429
        # Another account from the same address is not locked by this one's failures.
        other = await attacker.post(url, json={"email": "sami@example.com", "password": PASSWORD})
        assert other.status == 200
        # An unknown email costs a try too, and answers exactly as a wrong password does.
        unknown = await attacker.post(url, json={"email": "nobody@example.com", "password": "x"})
        assert unknown.status == 401
        assert (await error_of(unknown))["code"] == "invalid_credentials"


async def test_too_many_failures_from_one_address_lock_the_address_with_growing_waits(client):
    # The server's limiter with a clock the test moves, and 5 tries per address instead of
    # 30 (each refused try costs a password hash: a tenth of a second).
    now = [1000.0]
    client.app[keys.ACCOUNTS].limiter = SignInLimiter(address_limit=5, clock=lambda: now[0])
    url = base_url(client) + "/api/auth/login"
    async with aiohttp.ClientSession() as sprayer:
        for i in range(5):
            resp = await sprayer.post(url, json={"email": f"u{i}@example.com", "password": "x"})
            assert resp.status == 401
        resp = await sprayer.post(url, json={"email": "u99@example.com", "password": "x"})
        assert resp.status == 429 and int(resp.headers["Retry-After"]) == 60
        now[0] += 61
        for i in range(5):
            resp = await sprayer.post(url, json={"email": f"v{i}@example.com", "password": "x"})
            assert resp.status == 401
        resp = await sprayer.post(url, json={"email": "v99@example.com", "password": "x"})
        assert resp.status == 429 and int(resp.headers["Retry-After"]) == 120  # backoff


async def test_a_cross_origin_cookie_write_is_403_and_stores_nothing(client, sign_in):
    conversations = await seed(client)
    c = conversations[0]
    await add_agent(client.app, "agent@example.com")
    browser = await sign_in(client, "agent@example.com")
    path = f"/api/live-chat/conversations/{c.id}/messages"
    before = await (await client.get(path)).json()
    cookie = {COOKIE: browser.cookie}
    async with aiohttp.ClientSession(cookies=cookie) as victim:
        url = base_url(client) + path
        attempts = [
            # The classic: a form-like text/plain POST from another site.
            {
                "data": '{"text": "pwned"}',
                "headers": {"Content-Type": "text/plain", "Origin": "https://evil.example"},
            },
            {"json": {"text": "pwned"}, "headers": {"Origin": "https://evil.example"}},
            {"json": {"text": "pwned"}, "headers": {"Origin": "null"}},
            {"json": {"text": "pwned"}, "headers": {"Sec-Fetch-Site": "cross-site"}},
            {"json": {"text": "pwned"}},  # neither Origin nor Sec-Fetch-Site
            {
                "data": '{"text": "pwned"}',
                "headers": {"Content-Type": "text/plain", "Origin": base_url(client)},
            },
        ]
        for attempt in attempts:
            resp = await victim.post(url, **attempt)
            assert resp.status == 403, attempt
            assert (await error_of(resp))["code"] == "cross_origin"
        for method, target in (
            ("PATCH", f"/api/live-chat/conversations/{c.id}"),
            ("POST", f"/api/live-chat/conversations/{c.id}/read"),
            ("POST", "/api/auth/logout"),
        ):
            resp = await victim.request(
                method,
                base_url(client) + target,
                json={"status": "resolved"},
                headers={"Origin": "https://evil.example"},
            )
            assert resp.status == 403, target
        # A file as a multipart form is taken on that route, but from this origin only.
        form = aiohttp.FormData()
        form.add_field("file", b"%PDF-1.4 forged", filename="x.pdf", content_type="application/pdf")
        resp = await victim.post(url, data=form, headers={"Origin": "https://evil.example"})
        assert resp.status == 403 and (await error_of(resp))["code"] == "cross_origin"
        form = aiohttp.FormData()
        form.add_field("file", b"%PDF-1.4 forged", filename="x.pdf", content_type="application/pdf")
        resp = await victim.patch(
            base_url(client) + f"/api/live-chat/conversations/{c.id}",
            data=form,
            headers={"Origin": base_url(client)},
        )
        assert resp.status == 403  # a form is no JSON, and this route takes no files
        # The page's own requests pass: same Origin, or Sec-Fetch-Site: same-origin.
        ok = await victim.post(
            url, json={"text": "from the page"}, headers={"Sec-Fetch-Site": "same-origin"}
        )
        assert ok.status == 201
    after = await (await client.get(path)).json()
    assert [m["text"] for m in after["messages"]] == [
        *(m["text"] for m in before["messages"]),
        "from the page",
    ]
    summary = await (await client.get(f"/api/live-chat/conversations/{c.id}")).json()
    assert summary["status"] == c.status
    # Bearer requests are exempt: another site cannot make a browser send them.
    resp = await client.post(
        path, json={"text": "script"}, headers={"Origin": "https://evil.example"}
    )
    assert resp.status == 201
    # Signing in from another site's page is refused too.
    async with aiohttp.ClientSession() as other:
        resp = await other.post(
            base_url(client) + "/api/auth/login",
            json={"email": "agent@example.com", "password": PASSWORD},
            headers={"Origin": "https://evil.example"},
        )
        assert resp.status == 403


async def test_a_reply_is_the_signed_in_agents_never_whom_the_client_names(client, sign_in):
    conversations = await seed(client)
    c = conversations[0]
    reem = await add_agent(client.app, "reem@example.com")
    browser = await sign_in(client, "reem@example.com")
    path = f"/api/live-chat/conversations/{c.id}/messages"
    forged = await browser.post(path, json={"text": "hi", "agent_id": "a_someone_else"})
    assert forged.status == 400 and (await error_of(forged))["code"] == "invalid_field"
    resp = await browser.post(path, json={"text": "Reem here"})
    assert resp.status == 201
    assert (await resp.json())["agent_id"] == reem.id
    raw, _ = await client.app[keys.ACCOUNTS].create_token(reem.id, "script")
    by_token = await client.post(
        path, json={"text": "from a script"}, headers={"Authorization": f"Bearer {raw}"}
    )
    assert (await by_token.json())["agent_id"] == reem.id
    machine = await client.post(path, json={"text": "from an integration"})
    assert (await machine.json())["agent_id"] is None
    stored = (await (await client.get(path)).json())["messages"]
    assert [(m["text"], m["agent_id"]) for m in stored if m["sender"] == "agent"][-3:] == [
        ("Reem here", reem.id),
        ("from a script", reem.id),
        ("from an integration", None),
    ]


async def test_assignee_must_be_an_existing_agent_and_the_list_filters_by_it(client, sign_in):
    conversations = await seed(client, 20)
    reem = await add_agent(client.app, "reem@example.com")
    gone = await add_agent(client.app, "gone@example.com")
    await client.app[keys.ACCOUNTS].update_agent(gone.id, disabled=True)
    browser = await sign_in(client, "reem@example.com")
    open_ = [c for c in conversations if c.status == "open"]
    target = open_[0]
    url = f"/api/live-chat/conversations/{target.id}"
    before = await (await client.get(url)).json()
    for value, code in (
        ("a_nobody", "unknown_assignee"),
        (gone.id, "unknown_assignee"),
        ("x" * 65, "invalid_assignee"),
        (5, "invalid_assignee"),
        ("", "invalid_assignee"),
    ):
        resp = await browser.patch(url, json={"assignee": value})
        assert resp.status == 400, value
        assert (await error_of(resp))["code"] == code
    assert await (await client.get(url)).json() == before
    resp = await browser.patch(url, json={"assignee": reem.id})
    assert resp.status == 200 and (await resp.json())["assignee"] == reem.id
    mine = await (await browser.get(LIST + "?assignee=me&status=open")).json()
    assert [c["id"] for c in mine["chats"]] == [target.id] and mine["total"] == 1
    unassigned = await (await browser.get(LIST + "?assignee=none&status=open&limit=100")).json()
    want = [c for c in open_ if c.id != target.id and c.assignee is None]
    assert unassigned["total"] == len(want)
    assert target.id not in {c["id"] for c in unassigned["chats"]}
    assert all(c["assignee"] is None for c in unassigned["chats"])
    # The machine token has no "me".
    resp = await client.get(LIST + "?assignee=me")
    assert resp.status == 400 and (await error_of(resp))["code"] == "invalid_assignee"
    by_id = await (await client.get(LIST + f"?assignee={reem.id}")).json()
    assert [c["id"] for c in by_id["chats"]] == [target.id]
    resp = await browser.patch(url, json={"assignee": None})
    assert (await resp.json())["assignee"] is None


async def test_personal_tokens_are_stored_hashed_and_stop_when_revoked(client):
    agent = await add_agent(client.app, "bot-owner@example.com")
    accounts = client.app[keys.ACCOUNTS]
    raw, record = await accounts.create_token(agent.id, "nightly export")
    assert raw.startswith("lcp_") and raw not in record.token_hash
    stored = await accounts.store.get_token(record.token_hash)
    assert stored is not None and stored.token_hash != raw
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {raw}"}) as script:
        me = await (await script.get(base_url(client) + "/api/auth/me")).json()
        assert me == {"kind": "token", "agent": agent.to_json()}
        await accounts.store.revoke_token(record.id)  # as `run.py agents revoke-token` does
        deadline = time.monotonic() + 2
        while (await script.get(base_url(client) + LIST)).status != 401:
            assert time.monotonic() < deadline, "the revoked token still works"
            await asyncio.sleep(0.05)
    async with aiohttp.ClientSession() as anonymous:
        me = await anonymous.get(base_url(client) + "/api/auth/me", headers=AUTH)
        assert (await me.json()) == {"kind": "machine", "agent": None}


async def read_frames(resp, until: bytes, within: float) -> bytes:
    got = b""
    async with asyncio.timeout(within):
        while until not in got:
            chunk = await resp.content.readany()
            if not chunk:
                break
            got += chunk
    return got


@pytest.mark.parametrize("store_kind", STORE_KINDS, indirect=True)
async def test_disabling_an_agent_ends_its_open_stream_within_2s_and_its_next_request_is_401(
    make_client, sign_in, store_kind
):
    client = await make_client()
    agent = await add_agent(client.app, "leaving@example.com")
    await add_agent(client.app, "boss@example.com", role="admin")
    browser = await sign_in(client, "leaving@example.com")
    admin = await sign_in(client, "boss@example.com")
    stream = await browser.get(EVENTS)
    assert stream.status == 200
    await read_frames(stream, b"retry:", 5)
    started = time.monotonic()
    resp = await admin.patch(f"/api/agents/{agent.id}", json={"disabled": True})
    assert resp.status == 200 and (await resp.json())["disabled"] is True
    async with asyncio.timeout(2):
        while await stream.content.readany():
            pass  # the stream ends: its reads run dry
    assert time.monotonic() - started < 2
    assert (await browser.get(LIST)).status == 401
    assert (await browser.get(EVENTS)).status == 401
    # Their sign-in is refused as well, with the reason.
    async with aiohttp.ClientSession() as again:
        resp = await again.post(
            base_url(client) + "/api/auth/login",
            json={"email": "leaving@example.com", "password": PASSWORD},
        )
        assert resp.status == 403 and (await error_of(resp))["code"] == "account_disabled"


@pytest.mark.firestore
@pytest.mark.parametrize("store_kind", ["firestore"], indirect=True)
async def test_access_taken_away_on_another_instance_reaches_this_one(
    make_client, settings, sign_in, store_kind
):
    # Two instances on one Firestore project, as behind a load balancer (a SQLite file has
    # one server; the command line reaches it from another process: tests/test_cli.py).
    first = await make_client()
    second = await make_client(replace(settings, instance_id="t2"))
    agent = await add_agent(first.app, "two-tabs@example.com")
    on_first = await sign_in(first, "two-tabs@example.com")
    on_second = await sign_in(second, "two-tabs@example.com")
    stream = await on_second.get(EVENTS)
    await read_frames(stream, b"retry:", 5)
    assert (await on_second.get(LIST)).status == 200
    # Signing out on the first instance ends that session there, and only that one.
    copy = on_first.cookie
    assert (await on_first.post("/api/auth/logout", json={})).status == 200
    async with aiohttp.ClientSession(cookies={COOKIE: copy}) as replay:
        deadline = time.monotonic() + 2
        while (await replay.get(base_url(second) + LIST)).status != 401:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert (await on_second.get(LIST)).status == 200
    # Disabled through the first instance: the second ends its stream within 2 s.
    started = time.monotonic()
    await first.app[keys.ACCOUNTS].update_agent(agent.id, disabled=True)
    async with asyncio.timeout(2):
        while await stream.content.readany():
            pass
    assert time.monotonic() - started < 2
    assert (await on_second.get(LIST)).status == 401


async def test_event_streams_are_capped_per_sign_in_and_in_total(make_client, sign_in):
    client = await make_client(sse_streams_per_session=2, sse_max_streams=3)
    await add_agent(client.app, "tabs@example.com")
    await add_agent(client.app, "other@example.com")
    browser = await sign_in(client, "tabs@example.com")
    other = await sign_in(client, "other@example.com")
    open_streams = []
    for _ in range(2):
        resp = await browser.get(EVENTS)
        assert resp.status == 200
        await read_frames(resp, b"retry:", 5)
        open_streams.append(resp)
    third = await browser.get(EVENTS)
    assert third.status == 429 and (await error_of(third))["code"] == "too_many_streams"
    assert third.headers["Retry-After"]
    resp = await other.get(EVENTS)
    assert resp.status == 200
    await read_frames(resp, b"retry:", 5)
    full = await client.get(EVENTS)  # the machine token: the server's total is reached
    assert full.status == 429
    open_streams[0].close()
    deadline = time.monotonic() + 2
    while client.app[keys.HUB].clients > 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    again = await browser.get(EVENTS)
    assert again.status == 200
    again.close()
    resp.close()
    for s in open_streams:
        s.close()


async def test_security_headers_on_pages_api_answers_and_errors(make_client, settings, tmp_path):
    client = await make_client()
    page = await client.get("/")
    api = await client.get(LIST)
    missing = await client.get("/api/live-chat/conversations/c_nope")
    for resp in (page, api, missing):
        headers = resp.headers
        csp = headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["Server"] == "livechat"  # no framework, no version
        assert "Strict-Transport-Security" not in headers
    assert api.headers["Cache-Control"] == "no-store"
    assert missing.headers["Cache-Control"] == "no-store"
    assert "no-store" not in page.headers.get("Cache-Control", "")
    production = replace(
        settings,
        db=str(tmp_path / "production.db"),
        env="production",
        secret_key="k" * 32,
        whatsapp_app_secret="s" * 32,
        whatsapp_verify_token="v" * 32,
        api_token="t" * 32,
    )
    prod = await make_client(production)
    resp = await prod.get("/healthz")
    assert resp.headers["Strict-Transport-Security"].startswith("max-age=")


def test_the_limits_count_failures_per_account_and_per_address_and_forget_after_a_success():
    now = [0.0]
    limiter = SignInLimiter(clock=lambda: now[0])
    for i in range(29):
        limiter.failed(f"user{i}@example.com", "198.51.100.7")
    assert limiter.retry_after(None, "198.51.100.7") is None
    limiter.failed("user29@example.com", "198.51.100.7")  # the 30th from one address
    assert limiter.retry_after("anyone@example.com", "198.51.100.7") == 60
    assert limiter.retry_after("anyone@example.com", "203.0.113.9") is None
    for _ in range(9):
        limiter.failed("reem@example.com", "203.0.113.9")
    limiter.succeeded("reem@example.com")  # a success forgets the account's failures
    limiter.failed("reem@example.com", "203.0.113.9")
    assert limiter.retry_after("reem@example.com", "203.0.113.10") is None
    now[0] += 30  # failures older than the minute no longer count
    for _ in range(9):
        limiter.failed("sami@example.com", "203.0.113.11")
    now[0] += 61
    limiter.failed("sami@example.com", "203.0.113.11")
    assert limiter.retry_after("sami@example.com", "203.0.113.12") is None
    bounded = SignInLimiter(max_keys=100)
    for i in range(1000):
        bounded.failed(f"spray{i}@example.com", f"10.0.{i // 250}.{i % 250}")
    assert len(bounded._accounts._records) <= 100 and len(bounded._addresses._records) <= 100
