"""The dashboard's media, replies, reactions, templates and window in headless Chromium,
against the real app and the fake Graph API; also the README's screenshots of them."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from playwright.async_api import async_playwright, expect

from server import keys
from server.app import create_app
from server.integrations.whatsapp_webhook import sign
from tests.conftest import APP_SECRET, AUTH
from tests.fakes import FakeGraph
from tests.media_files import pdf, png, wav
from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS, Served, open_chat, open_tab
from tests.webhooks import message, text, webhook

pytestmark = pytest.mark.browser

CUSTOMER = "966501112233"
NAME = "Lina Haddad"
ORDER_UPDATE = {
    "name": "order_update",
    "status": "APPROVED",
    "language": "en_US",
    "category": "UTILITY",
    "components": [{"type": "BODY", "text": "Hi {{1}}, your order {{2}} is on its way."}],
    "id": "1234567890",
}


@pytest.fixture
async def browser():
    """Chromium that may play audio without a click (the test starts the player itself)."""
    async with async_playwright() as p:
        chromium = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=[*CHROMIUM_ARGS, "--autoplay-policy=no-user-gesture-required"],
            headless=True,
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
def serve(aiohttp_server, settings):
    """Start the app from the factory on loopback; wait until it is warm."""

    async def start(**overrides: Any) -> Served:
        app = create_app(replace(settings, **overrides).validated())
        server = await aiohttp_server(app, host="127.0.0.1")
        await asyncio.wait_for(app[keys.WARMER].loaded.wait(), 10)
        return Served(server, app)

    return start


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def graph(aiohttp_server) -> FakeGraph:
    fake = await FakeGraph.serve(aiohttp_server)
    fake.templates = [ORDER_UPDATE]
    return fake


async def start(serve, graph: FakeGraph) -> Served:
    return await serve(
        whatsapp_token=graph.token,
        whatsapp_phone_number_id="123",
        whatsapp_api_base=graph.base,
        whatsapp_business_account_id="102290129340398",
    )


async def deliver(
    http,
    served: Served,
    messages: list[dict[str, Any]],
    phone: str = CUSTOMER,
    name: str = NAME,
) -> None:
    for m in messages:
        m["from"] = phone
    raw = json.dumps(webhook(messages, contacts={phone: name}), ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sign(APP_SECRET, raw)}
    async with http.post(served.url + "webhooks/whatsapp", data=raw, headers=headers) as resp:
        assert resp.status == 200, await resp.text()


async def api(http, served: Served, path: str) -> Any:
    async with http.get(served.url.rstrip("/") + path, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def conversation_id(http, served: Served, phone: str = CUSTOMER) -> str:
    chats = (await api(http, served, "/api/live-chat/unified-chats?limit=100"))["chats"]
    return next(c["id"] for c in chats if c["user_id"] == phone)


async def until_ready(http, served: Served, cid: str, count: int) -> list[dict[str, Any]]:
    for _ in range(200):
        messages = (await api(http, served, f"/api/live-chat/conversations/{cid}/messages"))[
            "messages"
        ]
        done = [m for m in messages if m["media"] and m["media"]["state"] in ("ready", "failed")]
        if len(done) >= count:
            return messages
        await asyncio.sleep(0.05)
    raise AssertionError("media not downloaded in time")


async def sends_of(graph: FakeGraph, kind: str) -> list[Any]:
    """The sends of one type the fake Graph API received (waiting a moment for the first)."""
    for _ in range(100):
        found = [r for r in graph.sends() if r.json.get("type") == kind]
        if found:
            return found
        await asyncio.sleep(0.05)
    return []


def held(graph: FakeGraph, kind: str, data: bytes, mime: str, **fields: Any) -> dict[str, Any]:
    media = graph.add_media(data, mime)
    return message(
        kind, {"id": graph.media_id(media), "mime_type": mime, "sha256": media.sha256, **fields}
    )


async def test_photos_voice_notes_documents_quotes_reactions_in_the_thread(
    browser, serve, http, graph
):
    served = await start(serve, graph)
    photo = png(480, 320, (14, 116, 144))
    question = text("Hello! My order arrived damaged, photos below.")
    await deliver(http, served, [question])
    await deliver(
        http,
        served,
        [
            held(graph, "image", photo, "image/png", caption="The box, as it arrived"),
            held(graph, "audio", wav(2.0), "audio/wav", voice=True),
            held(
                graph,
                "document",
                pdf("Invoice 48213"),
                "application/pdf",
                filename="invoice-48213.pdf",
            ),
            message("video", {"id": "404404404", "mime_type": "video/mp4", "sha256": "x"}),
        ],
    )
    cid = await conversation_id(http, served)
    stored = await until_ready(http, served, cid, 4)
    tab = await open_tab(browser, served)
    page = tab.page
    await open_chat(page, cid)

    # The photo, inline; a click opens it larger.
    img = page.locator("#message-list .media-image img")
    await expect(img).to_be_visible()
    await page.wait_for_function(
        """() => {
            const i = document.querySelector('#message-list .media-image img');
            return i && i.complete && i.naturalWidth === 480;
        }"""
    )
    await expect(
        page.locator("#message-list .msg", has_text="The box, as it arrived")
    ).to_be_visible()
    await page.locator("#message-list .media-image").click()
    await expect(page.locator("#lightbox")).to_be_visible()
    await expect(page.locator("#lightbox figcaption")).to_have_text("The box, as it arrived")
    await page.locator("#lightbox [data-close]").click()
    await expect(page.locator("#lightbox")).to_be_hidden()

    # The voice note plays.
    audio = page.locator("#message-list .media-audio audio")
    await expect(page.locator("#message-list .media-audio")).to_contain_text("Voice message")
    await audio.evaluate("a => a.play()")
    await page.wait_for_function(
        "() => document.querySelector('#message-list .media-audio audio').currentTime > 0.2"
    )

    # The PDF downloads, with its name and size shown.
    link = page.locator("#message-list .media-document")
    await expect(link.locator(".media-name")).to_have_text("invoice-48213.pdf")
    await expect(link.locator(".media-size")).to_have_text(
        f"{len(pdf('Invoice 48213'))} B · application/pdf"
    )
    async with page.expect_download() as info:
        await link.click()
    download = await info.value
    assert download.suggested_filename == "invoice-48213.pdf"
    assert (await download.path()).read_bytes() == pdf("Invoice 48213")

    # A file WhatsApp no longer has: unavailable, with why.
    unavailable = page.locator("#message-list .media-unavailable")
    await expect(unavailable).to_contain_text("Media unavailable")
    await expect(unavailable.locator(".media-reason")).to_contain_text("does not exist")

    # The agent answers the question, quoting it (Reply), and reacts to the photo.
    first = page.locator("#message-list .msg", has_text="photos below")
    await first.hover()
    await first.locator("[data-reply]").click()
    await expect(page.locator("#reply-bar")).to_be_visible()
    await expect(page.locator("#reply-text")).to_contain_text("photos below")
    await page.locator("#composer-text").fill("So sorry! A replacement is on its way.")
    await page.locator("#composer-text").press("Enter")
    answer = page.locator("#message-list .msg-agent", has_text="replacement is on its way")
    await expect(answer.locator(".quote")).to_contain_text("photos below")
    await expect(answer).to_have_attribute("data-status", "sent")
    [send] = await sends_of(graph, "text")
    assert send.json["context"] == {"message_id": question["id"]}

    photo_msg = page.locator("#message-list .msg", has=page.locator(".media-image"))
    await photo_msg.hover()
    await photo_msg.locator("[data-react]").click()
    await page.locator("#react-menu button", has_text="🙏").click()
    await expect(photo_msg.locator(".reaction-business")).to_have_text("🙏")
    await expect(photo_msg.locator(".reaction-business")).to_be_visible()
    reactions = await sends_of(graph, "reaction")
    [reaction] = reactions
    image_wamid = next(m for m in stored if m["type"] == "image")["wa_message_id"]
    assert reaction.json["reaction"] == {"message_id": image_wamid, "emoji": "🙏"}

    # The customer quotes the agent's answer and reacts to it; then takes the reaction back.
    answered = next(
        m
        for m in (await api(http, served, f"/api/live-chat/conversations/{cid}/messages"))[
            "messages"
        ]
        if m["sender"] == "agent" and m["type"] == "text"
    )
    await deliver(
        http,
        served,
        [
            text(
                "Thank you, that was quick!",
                context={"from": "15550783881", "id": answered["wa_message_id"]},
            ),
            message("reaction", {"message_id": answered["wa_message_id"], "emoji": "❤️"}),
        ],
    )
    thanks = page.locator("#message-list .msg-customer", has_text="that was quick")
    await expect(thanks.locator(".quote")).to_contain_text("replacement is on its way")
    await expect(answer.locator(".reaction-customer")).to_have_text("❤️")
    # Shown on its target, never as a bubble of its own.
    await expect(page.locator("#message-list .media-reaction")).to_have_count(0)

    # The README's screenshot: the photo at the top, the rest of the exchange below it.
    await page.set_viewport_size({"width": 1280, "height": 1100})
    await page.evaluate("document.activeElement && document.activeElement.blur()")
    await page.mouse.move(0, 0)
    await page.locator("#messages").evaluate(
        "el => { el.scrollTop = el.querySelector('.media-image').closest('.msg').offsetTop - 12; }"
    )
    await page.screenshot(path=str(SCREENSHOTS / "conversation-media.png"))

    await deliver(http, served, [message("reaction", {"message_id": answered["wa_message_id"]})])
    await expect(answer.locator(".reaction-customer")).to_have_count(0)
    tab.assert_no_console_errors()


async def test_an_agent_sends_a_photo_by_drag_and_drop(browser, serve, http, graph):
    served = await start(serve, graph)
    await deliver(http, served, [text("Could you show me the red one?")])
    cid = await conversation_id(http, served)
    tab = await open_tab(browser, served)
    page = tab.page
    await open_chat(page, cid)
    photo = png(200, 140, (190, 40, 40))
    encoded = base64.b64encode(photo).decode()
    await page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const file = new File([bytes], "red.png", { type: "image/png" });
            const data = new DataTransfer();
            data.items.add(file);
            const target = document.querySelector("#messages");
            for (const type of ["dragenter", "dragover", "drop"]) {
                const init = { bubbles: true, cancelable: true, dataTransfer: data };
                target.dispatchEvent(new DragEvent(type, init));
            }
        }""",
        encoded,
    )
    await expect(page.locator("#attachment")).to_be_visible()
    await expect(page.locator("#attachment-name")).to_contain_text("red.png")
    await page.locator("#composer-text").fill("Here it is in red")
    await page.locator("#send").click()
    bubble = page.locator("#message-list .msg-agent", has=page.locator(".media-image"))
    await expect(bubble).to_have_attribute("data-status", "sent")
    await expect(bubble).to_contain_text("Here it is in red")
    await expect(page.locator("#attachment")).to_be_hidden()
    [upload] = graph.uploads
    assert upload["data"] == photo and upload["type"] == "image/png"
    [send] = await sends_of(graph, "image")
    assert send.json["image"]["caption"] == "Here it is in red"
    await page.wait_for_function(
        """() => [...document.querySelectorAll('#message-list .msg-agent .media-image img')]
            .some((i) => i.naturalWidth === 200)"""
    )
    tab.assert_no_console_errors()


async def test_a_closed_window_offers_the_template_picker_and_an_open_one_counts_down(
    browser, serve, http, graph
):
    served = await start(serve, graph)
    now = int(time.time())
    await deliver(http, served, [text("Is my order shipped?", timestamp=str(now - 25 * 3600))])
    closing = "966507778899"
    await deliver(
        http,
        served,
        [text("Are you open tomorrow?", timestamp=str(now - 23 * 3600 - 1200))],
        phone=closing,
        name="Omar Farouk",
    )
    closed_id = await conversation_id(http, served)
    closing_id = await conversation_id(http, served, closing)
    tab = await open_tab(browser, served)
    page = tab.page

    # The list flags the conversation whose window closes within the hour, unanswered.
    row = page.locator(f'#chat-list li[data-id="{closing_id}"]')
    await expect(row.locator(".closing")).to_have_text("39m")
    await expect(page.locator(f'#chat-list li[data-id="{closed_id}"] .closing')).to_have_count(0)

    # Under 2 hours: the composer shows the time left.
    await open_chat(page, closing_id)
    await expect(page.locator("#window-countdown")).to_have_text("Window closes in 39m")
    await expect(page.locator("#composer-text")).to_be_enabled()

    # Closed: free text is disabled and the template picker is offered.
    await open_chat(page, closed_id)
    await expect(page.locator("#window-notice")).to_be_visible()
    await expect(page.locator("#composer-text")).to_be_disabled()
    await expect(page.locator("#send")).to_be_disabled()
    await expect(page.locator("#window-countdown")).to_be_hidden()
    await page.locator("#window-template").click()
    picker = page.locator("#template-picker")
    await expect(picker).to_be_visible()
    await picker.locator(".tpl-item", has_text="order_update").click()
    await expect(picker.locator("#template-send")).to_be_disabled()
    inputs = picker.locator("#template-fields input")
    await expect(inputs).to_have_count(2)
    await inputs.nth(0).fill("Sara")
    await inputs.nth(1).fill("48213")
    await expect(picker.locator("#template-preview")).to_have_text(
        "Hi Sara, your order 48213 is on its way."
    )
    await page.screenshot(path=str(SCREENSHOTS / "template-picker.png"))
    await picker.locator("#template-send").click()
    await expect(picker).to_be_hidden()
    bubble = page.locator("#message-list .msg-agent", has_text="your order 48213 is on its way")
    await expect(bubble).to_have_attribute("data-status", "sent")
    [send] = await sends_of(graph, "template")
    assert send.json["template"]["name"] == "order_update"
    assert [p["text"] for p in send.json["template"]["components"][0]["parameters"]] == [
        "Sara",
        "48213",
    ]
    assert not [r for r in graph.sends() if r.json.get("type") == "text"]
    tab.assert_no_console_errors()
