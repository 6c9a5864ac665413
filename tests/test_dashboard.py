"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright.

Each test serves the real app from its factory on a loopback port, posts signed WhatsApp
webhooks to it as Meta would, and watches what an agent would see and what the page asks
the server for.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, async_playwright, expect

from server import keys
from server.app import create_app
from server.models import now_ms
from server.store import make_store
from server.store.agents import AgentExists
from server.store.base import InboundMessage
from tests.accounts import PASSWORD
from tests.conftest import APP_SECRET, AUTH
from tests.fakes import FakeGraph

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 360, "height": 740}
# The reconciling refresh of the list runs at most this often (static/js/app.js).
RECONCILE_S = 3.0

expect.set_options(timeout=5000)
_wamids = itertools.count(1)


# ---------- the app on a real port ----------


@dataclass
class Served:
    """A running app: its URL and its application object."""

    server: Any
    app: web.Application

    @property
    def url(self) -> str:
        return str(self.server.make_url("/"))


# The agent each tab signs in as, unless a test signs in as someone else.
AGENT_EMAIL = "reem@example.com"


@pytest.fixture
def serve(aiohttp_server, settings):
    """Start the app from the factory on loopback (settings may be overridden); wait until
    warm. open_tab signs in as Reem (the demo's, with demo data)."""

    async def start(port: int | None = None, **overrides: Any) -> Served:
        if overrides.get("demo"):
            # The demo team (Reem among them) signs in with the test password.
            overrides.setdefault("demo_password", PASSWORD)
        app = create_app(replace(settings, **overrides).validated())
        server = await aiohttp_server(app, host="127.0.0.1", port=port)
        await asyncio.wait_for(app[keys.WARMER].loaded.wait(), 10)
        return Served(server, app)

    return start


async def add_agent(served: Served, email: str, name: str, role: str = "agent"):
    return await served.app[keys.ACCOUNTS].add_agent(email, name, role, PASSWORD)


async def session_cookie(served: Served, email: str) -> str:
    """Sign in over HTTP as the page would (Reem is added first when the team lacks her:
    the demo has its own Reem); the session cookie's value."""
    if email == AGENT_EMAIL:
        try:
            await add_agent(served, AGENT_EMAIL, "Reem")
        except AgentExists:
            pass  # the demo's Reem, or a restart on the same store
    async with aiohttp.ClientSession() as http:
        async with http.post(
            served.url + "api/auth/login", json={"email": email, "password": PASSWORD}
        ) as resp:
            assert resp.status == 200, await resp.text()
            return resp.cookies["livechat_session"].value


@pytest.fixture
async def http():
    """An HTTP client for the test's own calls (the API with the token, webhooks)."""
    async with aiohttp.ClientSession() as session:
        yield session


async def api_get(http, served: Served, path: str) -> Any:
    async with http.get(served.url.rstrip("/") + path, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def inbound(phone: str, text: str, name: str = "Customer") -> dict[str, Any]:
    """A WhatsApp Cloud API webhook body with one text message (../shared/WHATSAPP.md)."""
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "102290129340398",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550783881",
                                "phone_number_id": "106540352242922",
                            },
                            "contacts": [{"profile": {"name": name}, "wa_id": phone}],
                            "messages": [
                                {
                                    "from": phone,
                                    "id": f"wamid.HBgLdashboard{next(_wamids):06d}",
                                    "timestamp": str(int(time.time())),
                                    "type": "text",
                                    "text": {"body": text},
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }


async def post_webhook(http, served: Served, body: dict[str, Any]) -> None:
    """POST a webhook signed as Meta signs it: HMAC-SHA256 of the raw body."""
    raw = json.dumps(body, ensure_ascii=False).encode()
    signature = hmac.new(APP_SECRET.encode(), raw, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={signature}"}
    async with http.post(served.url + "webhooks/whatsapp", data=raw, headers=headers) as resp:
        assert resp.status == 200, await resp.text()


# ---------- the browser ----------


@pytest.fixture
async def browser():
    async with async_playwright() as p:
        chromium = await p.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@dataclass
class Tab:
    """A page with what it asked the server for and what it logged."""

    page: Page
    requests: list[tuple[float, str, str]] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def list_requests(self, since: float = 0.0) -> list[float]:
        """When the page asked for the unified chat list (monotonic seconds)."""
        return [t for t, _, url in self.requests if "/unified-chats" in url and t >= since]

    def api_requests(self, since: float) -> list[str]:
        return [f"{m} {url}" for t, m, url in self.requests if "/api/" in url and t >= since]

    def assert_no_console_errors(self, allow: tuple[str, ...] = ()) -> None:
        unexpected = [e for e in self.console_errors if not any(a in e for a in allow)]
        assert unexpected == [], unexpected


async def open_tab(
    browser: Browser,
    served: Served,
    viewport=DESKTOP,
    signed_in: bool = True,
    email: str = AGENT_EMAIL,
) -> Tab:
    """A fresh browser context on the dashboard, signed in (as Reem unless `email` says)
    with the session cookie a sign-in sets."""
    context = await browser.new_context(
        viewport=viewport, locale="en-GB", timezone_id="Asia/Riyadh"
    )
    if signed_in:
        value = await session_cookie(served, email)
        await context.add_cookies(
            [{"name": "livechat_session", "value": value, "url": served.url, "httpOnly": True}]
        )
    page = await context.new_page()
    tab = Tab(page)
    page.on("request", lambda r: tab.requests.append((time.monotonic(), r.method, r.url)))
    page.on("console", lambda m: tab.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: tab.console_errors.append(f"pageerror: {e}"))
    await page.goto(served.url)
    if signed_in:
        await expect(page.locator("#chat-list li").first).to_be_visible()
        await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    return tab


async def chat_ids(page: Page) -> list[str]:
    return await page.locator("#chat-list li").evaluate_all("els => els.map(e => e.dataset.id)")


async def open_chat(page: Page, conversation_id: str) -> None:
    await page.locator(f'#chat-list li[data-id="{conversation_id}"] button').click()
    await expect(page.locator("#message-list .msg").first).to_be_visible()
    await expect(page.locator("#older-status")).not_to_have_text("Loading messages…")


async def wait_until(predicate, within: float, interval: float = 0.01) -> float:
    """Poll until predicate() is true; the seconds it took."""
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


# ---------- the tests ----------


async def test_first_page_load_more_and_keyboard(browser, serve, http):
    served = await serve(demo=True, demo_conversations=100)
    first = await api_get(http, served, "/api/live-chat/unified-chats?limit=30&status=open")
    second = await api_get(
        http,
        served,
        f"/api/live-chat/unified-chats?limit=30&status=open&cursor={first['next_cursor']}",
    )
    tab = await open_tab(browser, served)
    page = tab.page

    await expect(page.locator("#chat-list li")).to_have_count(30)
    assert await chat_ids(page) == [c["id"] for c in first["chats"]]
    await expect(page.locator("#total")).to_have_text(f"{first['total']} open conversations")
    top = first["chats"][0]
    row = page.locator("#chat-list li").first
    await expect(row.locator(".chat-name")).to_have_text(top["user_name"])
    await expect(row.locator(".who")).to_have_text(
        {"user": "Customer", "ai": "AI", "agent": "Agent"}[top["last_message"]["sender"]]
    )
    assert await row.locator(".chat-preview").get_attribute("dir") == "auto"

    # Load More, pressed where it is (scrolling to it would start the scroll loader too).
    since = time.monotonic()
    await page.locator("#load-more").evaluate("button => button.click()")
    expected = [c["id"] for c in first["chats"] + second["chats"]]
    await expect(page.locator("#chat-list li")).to_have_count(len(expected))
    ids = await chat_ids(page)
    assert ids == expected
    assert len(set(ids)) == len(ids)
    assert len(tab.list_requests(since)) == 1

    # Scrolling to the end of the list loads the rest, still without duplicates.
    await page.locator("#chat-list li").last.scroll_into_view_if_needed()
    await expect(page.locator("#chat-list li")).to_have_count(first["total"])
    ids = await chat_ids(page)
    assert len(set(ids)) == len(ids) == first["total"]
    await expect(page.locator("#load-more")).to_be_hidden()

    # Keyboard: from the search box, Tab reaches the tabs, then the first chat; Enter opens it.
    await page.locator("#search").focus()
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.dataset.tab") == "open"
    await page.keyboard.press("Tab")
    await page.keyboard.press("ArrowDown")
    focused = page.locator("#chat-list li:nth-child(2) button")
    await expect(focused).to_be_focused()
    outline = await focused.evaluate("el => getComputedStyle(el).outlineStyle")
    assert outline != "none", "focus is visible"
    await page.keyboard.press("Enter")
    await expect(page.locator("#convo-name")).to_have_text(first["chats"][1]["user_name"])
    await expect(page.locator("#message-list .msg").first).to_be_visible()

    # Tabs and search ask the API and show what it answers.
    await page.locator("#tabs [data-tab=resolved]").click()
    await expect(page.locator("#chat-list li").first).to_have_attribute("data-status", "resolved")
    await page.locator("#tabs [data-tab=all]").click()
    await expect(page.locator("#total")).to_have_text("100 conversations")
    name = first["chats"][3]["user_name"]
    await page.locator("#search").fill(name)
    await expect(page.locator("#chat-list li .chat-name").first).to_have_text(name)
    assert any("/unified-chats" in url and "q=" in url for _, _, url in tab.requests)
    tab.assert_no_console_errors()


async def test_agents_sign_in_and_out_with_their_own_accounts(browser, serve, http):
    served = await serve(demo=True, demo_conversations=5)
    tab = await open_tab(browser, served, signed_in=False)
    page = tab.page
    await expect(page.locator("#signin")).to_be_visible()
    await expect(page.locator("#email")).to_be_focused()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / "signin.png"))

    await page.locator("#email").fill(AGENT_EMAIL)
    await page.locator("#password").fill("not her password")
    await page.locator("#password").press("Enter")
    await expect(page.locator("#signin-error")).to_have_text("The email or password is wrong.")
    await page.locator("#password").fill(PASSWORD)
    await page.locator("#signin-form button[type=submit]").click()
    await expect(page.locator("#chat-list li").first).to_be_visible()
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    await expect(page.locator("#me")).to_have_text("Reem")
    [cookie] = [c for c in await page.context.cookies() if c["name"] == "livechat_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    # The page's script cannot read the session (HttpOnly).
    assert "livechat_session" not in await page.evaluate("document.cookie")
    # A reload keeps the sign-in.
    await page.reload()
    await expect(page.locator("#me")).to_have_text("Reem")

    await page.locator("#signout").click()
    await expect(page.locator("#signin")).to_be_visible()
    await expect(page.locator("#app")).to_be_hidden()
    await expect(page.locator("#signin-error")).to_have_text("You are signed out.")
    # Signed out on the server: the cookie the browser held no longer opens anything.
    async with http.get(
        served.url + "api/auth/me", headers={"Cookie": f"livechat_session={cookie['value']}"}
    ) as resp:
        assert resp.status == 401

    # Another agent signs in on the same page and is named as themself.
    await page.locator("#email").fill("admin@example.com")
    await page.locator("#password").fill(PASSWORD)
    await page.locator("#password").press("Enter")
    await expect(page.locator("#me")).to_have_text("Demo Admin")
    await expect(page.locator("#chat-list li").first).to_be_visible()
    # The only console errors: the browser reporting the 401s of the signed-out page.
    tab.assert_no_console_errors(allow=("status of 401",))


async def test_agents_see_who_replied_assign_and_filter_mine_and_unassigned(browser, serve, http):
    served = await serve(demo=True, demo_conversations=40)
    first = await api_get(http, served, "/api/live-chat/unified-chats?limit=30&status=open")
    chat = next(c for c in first["chats"] if c["assignee"] is None)
    # The customer writes now: the 24-hour window is open for free text.
    await post_webhook(http, served, inbound(chat["user_id"], "Anyone there?", chat["user_name"]))
    reem = await open_tab(browser, served)
    nouf = await open_tab(browser, served, email="nouf@example.com")
    await expect(reem.page.locator("#me")).to_have_text("Reem")
    await expect(nouf.page.locator("#me")).to_have_text("Nouf")

    # Nouf watches the unassigned conversations: this one is among them.
    await nouf.page.locator("#tabs [data-tab=unassigned]").click()
    nouf_row = nouf.page.locator(f'#chat-list li[data-id="{chat["id"]}"]')
    await expect(nouf_row).to_have_count(1)
    unassigned = await api_get(
        http, served, "/api/live-chat/unified-chats?limit=1&status=open&assignee=none"
    )
    await expect(nouf.page.locator("#total")).to_have_text(
        f"{unassigned['total']} open unassigned conversations"
    )

    # Reem takes it.
    page = reem.page
    await open_chat(page, chat["id"])
    await expect(page.locator("#assignee")).to_have_value("")
    await page.locator("#take").click()
    await expect(page.locator("#assignee")).to_have_value("a_demo_reem")
    await expect(page.locator("#take")).to_be_hidden()
    row = page.locator(f'#chat-list li[data-id="{chat["id"]}"]')
    await expect(row.locator(".assignee-chip")).to_have_text("Reem")
    # ...and it leaves Nouf's Unassigned list at once, from the event.
    await expect(nouf_row).to_have_count(0)

    # Her Mine tab has it, served by the API's assignee filter; Unassigned does not.
    since = time.monotonic()
    await page.locator("#tabs [data-tab=mine]").click()
    mine = await api_get(
        http, served, "/api/live-chat/unified-chats?limit=1&status=open&assignee=a_demo_reem"
    )
    await expect(page.locator("#total")).to_have_text(
        f"{mine['total']} open conversations assigned to you"
    )
    await expect(row).to_have_count(1)
    assert any("assignee=me" in r for r in reem.api_requests(since))
    ids = await chat_ids(page)
    assert len(ids) == min(30, mine["total"])
    await page.locator("#tabs [data-tab=unassigned]").click()
    await expect(page.locator("#total")).to_contain_text("unassigned")
    await expect(row).to_have_count(0)
    await page.locator("#tabs [data-tab=mine]").click()
    await expect(row).to_have_count(1)

    # Reem replies: both agents see that it was Reem who answered.
    await page.locator("#composer-text").fill("Reem here: I will sort this out today.")
    await page.locator("#composer-text").press("Enter")
    mine_bubble = page.locator("#message-list .msg-agent", has_text="I will sort this out")
    await expect(mine_bubble.locator(".author")).to_have_text("Agent · Reem")
    await nouf.page.locator("#tabs [data-tab=all]").click()
    await open_chat(nouf.page, chat["id"])
    theirs = nouf.page.locator("#message-list .msg-agent", has_text="I will sort this out")
    await expect(theirs.locator(".author")).to_have_text("Agent · Reem")
    await expect(nouf.page.locator("#assignee")).to_have_value("a_demo_reem")

    # Reem hands it to Nouf: it leaves Reem's Mine list and enters Nouf's.
    await page.locator("#assignee").select_option("a_demo_nouf")
    await expect(row).to_have_count(0)
    await expect(nouf.page.locator("#assignee")).to_have_value("a_demo_nouf")
    await nouf.page.locator("#tabs [data-tab=mine]").click()
    await expect(nouf.page.locator(f'#chat-list li[data-id="{chat["id"]}"]')).to_have_count(1)
    summary = await api_get(http, served, f"/api/live-chat/conversations/{chat['id']}")
    assert summary["assignee"] == "a_demo_nouf"
    messages = await api_get(http, served, f"/api/live-chat/conversations/{chat['id']}/messages")
    [reply] = [m for m in messages["messages"] if "sort this out" in (m["text"] or "")]
    assert reply["agent_id"] == "a_demo_reem"
    reem.assert_no_console_errors()
    nouf.assert_no_console_errors()


async def test_webhook_appears_at_once_with_no_list_request(browser, serve, http):
    served = await serve(demo=True, demo_conversations=40)
    tab = await open_tab(browser, served)
    page = tab.page
    first = await api_get(http, served, "/api/live-chat/unified-chats?limit=30&status=open")
    chat = first["chats"][5]
    await open_chat(page, chat["id"])
    await asyncio.sleep(0.3)  # let opening settle (mark read)

    text = "مرحبا، هل طلبي في الطريق؟ order 48213"
    since = time.monotonic()
    await post_webhook(http, served, inbound(chat["user_id"], text, chat["user_name"]))
    bubble = page.locator("#message-list .msg-customer", has_text="order 48213")

    async def shown() -> bool:
        return await bubble.count() == 1 and (await chat_ids(page))[0] == chat["id"]

    took = await wait_until(shown, within=1.0)
    assert took < 1.0
    # Shown from the event alone: no list request, no messages request.
    assert tab.list_requests(since) == []
    assert [r for r in tab.api_requests(since) if "/messages" in r] == []
    # Arabic reads right to left.
    text_el = bubble.locator(".text")
    assert await text_el.get_attribute("dir") == "auto"
    assert await text_el.evaluate("el => getComputedStyle(el).direction") == "rtl"
    row = page.locator("#chat-list li").first
    await expect(row.locator(".chat-preview")).to_have_text(text)
    await expect(row.locator(".who")).to_have_text("Customer")
    # The open conversation is being read: no unread badge for it.
    await expect(row.locator(".badge")).to_have_count(0)
    await asyncio.sleep(1.0)
    assert tab.list_requests(since) == [], "the refresh waits for its 3 s window"
    tab.assert_no_console_errors()


async def test_a_burst_of_webhooks_costs_at_most_one_list_request_per_3s(browser, serve, http):
    served = await serve(demo=True, demo_conversations=40)
    tab = await open_tab(browser, served)
    page = tab.page
    first = await api_get(http, served, "/api/live-chat/unified-chats?limit=30&status=open")
    customers = first["chats"][:20]
    assert len(customers) == 20

    since = time.monotonic()
    for i, chat in enumerate(reversed(customers)):
        await post_webhook(http, served, inbound(chat["user_id"], f"burst {i}", chat["user_name"]))
    posted = time.monotonic() - since
    assert posted < 1.0, f"20 webhooks took {posted:.2f} s"

    # Every message moved its chat to the top, locally, in the server's order (WhatsApp
    # timestamps are whole seconds, so ties are ordered by id, as the API orders them).
    after = await api_get(http, served, "/api/live-chat/unified-chats?limit=30&status=open")
    expected_top = [c["id"] for c in after["chats"][:20]]
    assert set(expected_top) == {c["id"] for c in customers}

    async def reordered() -> bool:
        return (await chat_ids(page))[:20] == expected_top

    await wait_until(reordered, within=1.0)
    previews = await page.locator("#chat-list li .chat-preview").all_text_contents()
    assert sorted(previews[:20]) == sorted(f"burst {i}" for i in range(20))
    await asyncio.sleep(RECONCILE_S + 1.5)
    times = tab.list_requests(since)
    assert len(times) <= 2
    assert all(b - a >= RECONCILE_S - 0.1 for a, b in itertools.pairwise(times)), times
    assert len(times) == 1, f"one reconciling refresh, got {len(times)}"
    assert times[0] - since >= RECONCILE_S - 0.1, (
        "the refresh waited, it did not follow the first event"
    )
    # The refresh merged: the list is still whole and in order.
    assert (await chat_ids(page))[:20] == expected_top
    tab.assert_no_console_errors()


async def test_a_new_customer_appears_on_top_with_no_list_request(browser, serve, http):
    served = await serve(demo=True, demo_conversations=40)
    tab = await open_tab(browser, served)
    page = tab.page
    total_before = (
        await api_get(http, served, "/api/live-chat/unified-chats?limit=1&status=open")
    )["total"]
    await expect(page.locator("#total")).to_have_text(f"{total_before} open conversations")

    since = time.monotonic()
    await post_webhook(
        http, served, inbound("966500000123", "Hello, is anyone there?", "Noor Test")
    )
    row = page.locator("#chat-list li").first
    await expect(row.locator(".chat-name")).to_have_text("Noor Test", timeout=1000)
    await expect(row.locator(".chat-preview")).to_have_text("Hello, is anyone there?")
    await expect(row.locator(".badge")).to_have_text("1")
    await expect(page.locator("#total")).to_have_text(f"{total_before + 1} open conversations")
    await asyncio.sleep(1.0)
    assert tab.list_requests(since) == []
    tab.assert_no_console_errors()


async def test_agent_reply_shows_and_reaches_the_graph_api(browser, serve, http, aiohttp_server):
    graph = await FakeGraph.serve(aiohttp_server)
    served = await serve(
        demo=True,
        demo_conversations=20,
        whatsapp_token=graph.token,
        whatsapp_phone_number_id="106540352242922",
        whatsapp_api_base=graph.base,
    )
    tab = await open_tab(browser, served)
    page = tab.page
    first = await api_get(http, served, "/api/live-chat/unified-chats?limit=30&status=open")
    chat = next(c for c in first["chats"] if c["ai_enabled"])
    await open_chat(page, chat["id"])
    await expect(page.locator("#ai-switch")).to_have_attribute("aria-checked", "true")
    # A fresh customer message keeps the 24-hour window open for free text.
    await post_webhook(
        http, served, inbound(chat["user_id"], "Can someone help me?", chat["user_name"])
    )
    await expect(
        page.locator("#message-list .msg-customer", has_text="Can someone help me?")
    ).to_be_visible()

    composer = page.locator("#composer-text")
    await composer.fill("First line")
    await composer.press("Shift+Enter")
    await composer.type("second line")
    assert await composer.input_value() == "First line\nsecond line"
    await composer.press("Enter")

    bubble = page.locator("#message-list .msg-agent", has_text="second line")
    await expect(bubble).to_be_visible()
    await expect(composer).to_have_value("")
    await expect(bubble).to_have_attribute("data-status", "sent")
    await expect(bubble.locator(".tick")).to_have_text("✓")
    sent = next(r for r in graph.sends() if r.json["text"]["body"] == "First line\nsecond line")
    assert sent.path == "/v21.0/106540352242922/messages"
    assert sent.headers["Authorization"] == f"Bearer {graph.token}"
    assert sent.json["to"] == chat["user_id"]
    # An agent's reply takes over from the AI.
    await expect(page.locator("#ai-switch")).to_have_attribute("aria-checked", "false")
    row = page.locator("#chat-list li").first
    await expect(row).to_have_attribute("data-id", chat["id"])
    await expect(row.locator(".who")).to_have_text("Agent")

    # WhatsApp refuses a reply outside the 24-hour window: the agent reads why.
    graph.fail(131047)
    await composer.fill("Are you still there?")
    await page.locator("#send").click()
    failed = page.locator("#message-list .msg-agent", has_text="Are you still there?")
    await expect(failed).to_have_attribute("data-status", "failed")
    await expect(failed.locator(".msg-error")).to_contain_text("24-hour")
    # The agent decides to send it again: Retry, and its ticks start over.
    await failed.locator("button.retry").click()
    await expect(failed).to_have_attribute("data-status", "sent")
    await expect(failed.locator(".msg-error")).to_have_count(0)
    bodies = [r.json["text"]["body"] for r in graph.sends()]
    assert bodies.count("Are you still there?") == 2

    # The AI switch and resolve act on the conversation.
    await page.locator("#ai-switch").click()
    await expect(page.locator("#ai-switch")).to_have_attribute("aria-checked", "true")
    await page.locator("#resolve").click()
    await expect(page.locator("#resolve")).to_have_text("Reopen")
    await expect(page.locator(f'#chat-list li[data-id="{chat["id"]}"]')).to_have_count(0)
    summary = await api_get(http, served, f"/api/live-chat/conversations/{chat['id']}")
    assert summary["status"] == "resolved" and summary["ai_enabled"] is True
    tab.assert_no_console_errors()


@pytest.mark.parametrize("saw_events", [True, False], ids=["after-events", "idle-page"])
async def test_restart_reconnects_and_resyncs_what_was_missed(
    browser, serve, http, settings, saw_events
):
    served = await serve(demo=True, demo_conversations=20)
    port = served.server.port
    tab = await open_tab(browser, served)
    page = tab.page
    first = await api_get(http, served, "/api/live-chat/unified-chats?limit=30&status=open")
    chat = first["chats"][4]
    await open_chat(page, chat["id"])
    if saw_events:
        # The page holds an event id: on reconnect the new server says `resync`.
        await page.locator("#ai-switch").click()
        await expect(page.locator("#ai-switch")).to_have_attribute(
            "aria-checked", "false" if chat["ai_enabled"] else "true"
        )
        await asyncio.sleep(0.2)
    # Otherwise the page has no id to resume from, and reloads by itself on reconnect.

    await served.server.close()
    await expect(page.locator("#conn")).to_have_attribute(
        "data-state", "reconnecting", timeout=5000
    )
    await expect(page.locator("#conn")).to_have_text("Reconnecting…")

    # While the server is down a message is stored: no live event will ever carry it.
    store = make_store(settings)
    await store.start()
    try:
        await store.save_inbound(
            InboundMessage(
                wa_message_id="wamid.while-you-were-away",
                user_id=chat["user_id"],
                user_name=chat["user_name"],
                phone=chat["phone"],
                type="text",
                text="Sent while the server was down",
                at=now_ms(),
            )
        )
    finally:
        await store.close()

    # The same port and SQLite file; a restarted server is a new instance and cannot replay.
    await serve(port=port, instance_id="t2")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=10_000)
    await expect(
        page.locator("#message-list .msg-customer", has_text="Sent while the server was down")
    ).to_be_visible()
    await expect(page.locator("#chat-list li").first).to_have_attribute("data-id", chat["id"])
    await expect(page.locator("#chat-list li").first.locator(".chat-preview")).to_have_text(
        "Sent while the server was down"
    )
    # Only the browser's reports of the refused reconnects while the server was down.
    tab.assert_no_console_errors(
        allow=("ERR_CONNECTION_REFUSED", "ERR_EMPTY_RESPONSE", "ERR_INCOMPLETE_CHUNKED_ENCODING")
    )


async def test_older_messages_load_on_scrolling_up_and_keep_the_place(browser, serve, settings):
    store = make_store(settings)
    await store.start()
    try:
        start = now_ms() - 3_600_000
        for i in range(120):
            await store.save_inbound(
                InboundMessage(
                    wa_message_id=f"wamid.history{i:03d}",
                    user_id="966511112222",
                    user_name="Hala Saleh",
                    phone="+966511112222",
                    type="text",
                    text=f"message number {i}",
                    at=start + i * 20_000,
                )
            )
    finally:
        await store.close()
    served = await serve()
    tab = await open_tab(browser, served)
    page = tab.page
    await page.locator("#chat-list li button").first.click()
    bubbles = page.locator("#message-list .msg")
    await expect(bubbles).to_have_count(50)
    await expect(bubbles.last).to_contain_text("message number 119")
    box = page.locator("#messages")
    assert await box.evaluate("el => el.scrollHeight - el.scrollTop - el.clientHeight") < 2

    async def top_of(text: str) -> float:
        bubble = page.locator("#message-list .msg", has_text=text)
        return await bubble.evaluate("el => el.getBoundingClientRect().top")

    # Scroll to the top and note where the oldest loaded message is, in one go (the older
    # page may arrive right after).
    before = await box.evaluate(
        """el => {
            el.scrollTop = 0;
            const first = [...el.querySelectorAll(".msg")].find(
                (m) => m.textContent.includes("message number 70"));
            return first.getBoundingClientRect().top;
        }"""
    )
    await expect(bubbles).to_have_count(100)
    await expect(bubbles.first).to_contain_text("message number 20")
    # The message the agent was looking at stays where it was.
    assert abs(await top_of("message number 70") - before) < 40
    await box.evaluate("el => { el.scrollTop = 0; }")
    await expect(bubbles).to_have_count(120)
    await expect(page.locator("#older-status")).to_have_text("Start of the conversation")
    tab.assert_no_console_errors()


ARABIC = re.compile("[\u0600-\u06ff]")


def _showcase_score(messages: list[dict[str, Any]]) -> int:
    """How well a conversation shows the inbox off: every kind of sender, some Arabic."""
    senders = {m["sender"] for m in messages}
    if not {"user", "ai", "agent"} <= senders or len(messages) < 5:
        return 0
    arabic = any(ARABIC.search(m["text"] or "") for m in messages)
    english = any(m["text"] and not ARABIC.search(m["text"]) for m in messages)
    return 1 + 2 * arabic + english


async def test_screenshots_of_the_inbox_on_desktop_and_phone(browser, serve, http):
    served = await serve(demo=True, demo_conversations=300)
    first = await api_get(http, served, "/api/live-chat/unified-chats?limit=30&status=open")
    scores = {}
    for chat in first["chats"][1:16]:
        page_ = await api_get(http, served, f"/api/live-chat/conversations/{chat['id']}/messages")
        scores[chat["id"]] = _showcase_score(page_["messages"])
    showcase_id = max(scores, key=lambda k: scores[k])
    showcase = next(c for c in first["chats"] if c["id"] == showcase_id)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    desktop = await open_tab(browser, served, viewport=DESKTOP)
    await open_chat(desktop.page, showcase["id"])
    await desktop.page.mouse.move(0, 0)
    await desktop.page.screenshot(path=str(SCREENSHOTS / "inbox-desktop.png"))
    desktop.assert_no_console_errors()

    phone = await open_tab(browser, served, viewport=PHONE)
    page = phone.page
    await expect(page.locator(".convo-pane")).to_be_hidden()
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    await page.screenshot(path=str(SCREENSHOTS / "inbox-phone.png"))
    # One pane at a time: the conversation, then back to the list.
    await open_chat(page, showcase["id"])
    await expect(page.locator(".list-pane")).to_be_hidden()
    await expect(page.locator("#back")).to_be_visible()
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    await page.locator("#back").click()
    await expect(page.locator(".list-pane")).to_be_visible()
    await expect(page.locator(f'#chat-list li[data-id="{showcase["id"]}"] button')).to_be_focused()
    phone.assert_no_console_errors()
    for name in ("inbox-desktop.png", "inbox-phone.png"):
        assert (SCREENSHOTS / name).read_bytes().startswith(b"\x89PNG")


async def test_search_shows_message_matches_and_opens_the_conversation_at_the_match(
    browser, serve, http
):
    served = await serve()
    noura, omar = "966555123456", "966555999888"
    await post_webhook(
        http, served, inbound(noura, "أُرِيدُ الفَاتُورَةَ لِلطَّلَبِ ٥٥٢١ مِنْ فَضْلِكُمْ", "نورة القحطاني")
    )
    # Many later messages: the match is no longer among the latest page of the conversation.
    for n in range(60):
        await post_webhook(http, served, inbound(noura, f"رسالة رقم {n}", "نورة القحطاني"))
    await post_webhook(
        http,
        served,
        inbound(omar, "Where is the invoice for order 5521? Deliveries are late.", "Omar Haddad"),
    )
    tab = await open_tab(browser, served)
    page = tab.page
    results = page.locator("#results")
    await expect(results).to_be_hidden()

    # Arabic, typed without diacritics or the article: the message as the customer wrote it.
    await page.locator("#search").fill("فاتورة")
    await expect(results).to_be_visible()
    hits = page.locator("#hits li")
    await expect(hits).to_have_count(1)
    hit = hits.first
    await expect(hit.locator(".chat-name")).to_have_text("نورة القحطاني")
    await expect(hit.locator(".hit-text")).to_contain_text("أُرِيدُ الفَاتُورَةَ لِلطَّلَبِ")
    await expect(hit.locator("mark")).to_have_text(["الفَاتُورَةَ"])

    # A click opens the conversation at that message, scrolled to and marked.
    await hit.locator("button").click()
    await expect(page.locator("#convo-name")).to_have_text("نورة القحطاني")
    found = page.locator("#message-list .msg-found")
    await expect(found).to_have_count(1)
    await expect(found.locator(".text")).to_have_text("أُرِيدُ الفَاتُورَةَ لِلطَّلَبِ ٥٥٢١ مِنْ فَضْلِكُمْ")
    await expect(found).to_be_in_viewport()
    assert await page.locator("#message-list .msg").count() == 61
    await page.screenshot(path=str(SCREENSHOTS / "search-desktop.png"))

    # English, by another form of the word: both words of the query are marked.
    await page.locator("#search").fill("invoices 5521")
    await expect(hits).to_have_count(1)
    await expect(hits.first.locator(".chat-name")).to_have_text("Omar Haddad")
    await expect(hits.first.locator("mark")).to_have_text(["invoice", "5521"])
    await page.locator("#search").fill("delivery")
    await expect(hits.first.locator("mark")).to_have_text(["Deliveries"])

    # The last digits of a number: the customer is listed; no message says them.
    await page.locator("#search").fill("3456")
    await expect(page.locator("#chat-list li .chat-name")).to_have_text(["نورة القحطاني"])
    await expect(page.locator("#results-note")).to_have_text("No messages match “3456”.")
    await expect(hits).to_have_count(0)

    # Clearing the search hides the results and lists everyone again.
    await page.locator("#search").fill("")
    await expect(results).to_be_hidden()
    await expect(page.locator("#chat-list li")).to_have_count(2)
    tab.assert_no_console_errors()
