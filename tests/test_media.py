"""Media over real HTTP: customers' photos, voice notes and documents downloaded once from
the (fake) Graph API, checked, kept and served; agents' photos uploaded and sent. On both
stores."""

from __future__ import annotations

import io

import aiohttp

from tests.fakes import graph_settings
from tests.media_files import pdf, png, wav
from tests.webhooks import all_messages, chats, message, post_webhook, status, wait_until, webhook

CUSTOMER = "966501234567"


async def conversation(client) -> dict:
    [row] = [c for c in await chats(client) if c["user_id"] == CUSTOMER]
    return row


async def media_state(client, conversation_id: str, wamid: str, states: set[str]) -> dict:
    """Wait until the message's media is in one of `states`; the message."""

    async def check():
        for m in await all_messages(client, conversation_id):
            if m["wa_message_id"] == wamid and (m["media"] or {}).get("state") in states:
                return m
        return None

    return await wait_until(check, within=10)


def media_message(graph, kind: str, data: bytes, mime: str, **fields) -> dict:
    """A customer's media message as WhatsApp delivers it, its file held by the fake."""
    held = graph.add_media(data, mime)
    content = {"id": graph.media_id(held), "mime_type": mime, "sha256": held.sha256, **fields}
    return message(kind, content)


async def test_a_photo_a_voice_note_and_a_pdf_are_downloaded_once_checked_kept_and_served(
    make_client, graph
):
    client = await make_client(**graph_settings(graph))
    photo, voice, document = png(), wav(), pdf()
    messages = [
        media_message(graph, "image", photo, "image/png", caption="the damaged box"),
        media_message(graph, "audio", voice, "audio/ogg; codecs=opus", voice=True),
        media_message(graph, "document", document, "application/pdf", filename="invoice.pdf"),
    ]
    assert (await post_webhook(client, webhook(messages))).status == 200
    convo = await conversation(client)
    stored = [
        await media_state(client, convo["id"], m["id"], {"ready", "failed"}) for m in messages
    ]
    assert [m["media"]["state"] for m in stored] == ["ready", "ready", "ready"]
    assert [m["media"]["size"] for m in stored] == [len(photo), len(voice), len(document)]
    # Each file was looked up and downloaded once, with the token.
    assert sorted(graph.lookups) == sorted(graph.downloads) == sorted(graph.media)
    assert all(
        r.headers["Authorization"] == "Bearer t" for r in graph.requests if "/lookaside/" in r.path
    )

    for m, data, mime in zip(
        stored,
        (photo, voice, document),
        ("image/png", "audio/ogg; codecs=opus", "application/pdf"),
        strict=True,
    ):
        resp = await client.get(f"/api/live-chat/media/{m['id']}")
        assert resp.status == 200
        assert await resp.read() == data
        assert resp.headers["Content-Type"] == mime
        assert resp.headers["Content-Length"] == str(len(data))
        assert (
            "max-age" in resp.headers["Cache-Control"]
            and "private" in resp.headers["Cache-Control"]
        )
        assert resp.headers["Accept-Ranges"] == "bytes"
    pdf_resp = await client.get(f"/api/live-chat/media/{stored[2]['id']}")
    assert pdf_resp.headers["Content-Disposition"] == 'attachment; filename="invoice.pdf"'

    # A range (audio and video seek): 206 with just those bytes.
    resp = await client.get(
        f"/api/live-chat/media/{stored[1]['id']}", headers={"Range": "bytes=100-199"}
    )
    assert resp.status == 206
    assert await resp.read() == voice[100:200]
    assert resp.headers["Content-Range"] == f"bytes 100-199/{len(voice)}"
    # Conditional: the browser's cached copy is still good.
    etag = pdf_resp.headers["ETag"]
    resp = await client.get(
        f"/api/live-chat/media/{stored[2]['id']}", headers={"If-None-Match": etag}
    )
    assert resp.status == 304
    # Agents only.
    async with aiohttp.ClientSession() as anonymous:
        url = client.make_url(f"/api/live-chat/media/{stored[0]['id']}")
        async with anonymous.get(url) as resp:
            assert resp.status == 401
    # A webhook redelivered: nothing is downloaded again.
    assert (await post_webhook(client, webhook(messages))).status == 200
    assert len(graph.downloads) == 3


async def test_an_expired_media_url_is_asked_for_again(make_client, graph):
    client = await make_client(**graph_settings(graph))
    graph.expire_urls = 1  # the first URL has expired by the time it is fetched
    photo = png()
    m = media_message(graph, "image", photo, "image/png")
    assert (await post_webhook(client, webhook([m]))).status == 200
    convo = await conversation(client)
    stored = await media_state(client, convo["id"], m["id"], {"ready", "failed"})
    assert stored["media"]["state"] == "ready"
    media_id = m["image"]["id"]
    assert graph.lookups == [media_id, media_id]
    assert graph.downloads == [media_id]
    resp = await client.get(f"/api/live-chat/media/{stored['id']}")
    assert await resp.read() == photo


async def test_a_failed_download_shows_as_unavailable_with_its_reason(make_client, graph):
    client = await make_client(**graph_settings(graph))
    # A media id WhatsApp no longer has (they expire after 7 days).
    gone = message("image", {"id": "1037543291543636", "mime_type": "image/jpeg", "sha256": "x"})
    # Bytes that do not match the checksum the webhook gave: tried again, then failed.
    held = graph.add_media(png(), "image/png")
    garbled = message(
        "image", {"id": graph.media_id(held), "mime_type": "image/png", "sha256": "bm90IGl0"}
    )
    assert (await post_webhook(client, webhook([gone, garbled]))).status == 200
    convo = await conversation(client)
    failed = await media_state(client, convo["id"], gone["id"], {"ready", "failed"})
    assert failed["media"]["state"] == "failed"
    assert "does not exist" in failed["media"]["error"]
    resp = await client.get(f"/api/live-chat/media/{failed['id']}")
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["code"] == "media_unavailable" and "does not exist" in error["message"]

    bad = await media_state(client, convo["id"], garbled["id"], {"ready", "failed"})
    assert bad["media"]["state"] == "failed"
    assert "checksum" in bad["media"]["error"]
    assert len(graph.downloads) == 3  # tried three times, never kept


async def test_an_agents_photo_with_a_caption_is_uploaded_sent_and_shows_its_ticks(
    make_client, graph
):
    client = await make_client(**graph_settings(graph))
    text_message = message("text", {"body": "can you send me a photo of it?"})
    assert (await post_webhook(client, webhook([text_message]))).status == 200
    convo = await conversation(client)
    photo = png(120, 80, (180, 60, 40))
    data = aiohttp.FormData()
    data.add_field("caption", "Here it is, in red")
    data.add_field("file", photo, filename="red.png", content_type="image/png")
    resp = await client.post(f"/api/live-chat/conversations/{convo['id']}/messages", data=data)
    assert resp.status == 201, await resp.text()
    sent = await resp.json()
    assert sent["type"] == "image" and sent["status"] == "queued"
    assert sent["media"]["caption"] == "Here it is, in red" and sent["media"]["state"] == "ready"

    await wait_until(lambda: _async(len(graph.sends()) == 1))
    [upload] = graph.uploads
    assert upload["messaging_product"] == "whatsapp" and upload["type"] == "image/png"
    assert upload["data"] == photo and upload["authorization"] == "Bearer t"
    [send] = graph.sends()
    assert send.path == "/v21.0/123/messages"
    assert send.json["type"] == "image"
    assert send.json["image"] == {"id": "media-1", "caption": "Here it is, in red"}
    assert send.json["to"] == CUSTOMER

    async def status_of(wanted: str) -> dict | None:
        for m in await all_messages(client, convo["id"]):
            if m["id"] == sent["id"] and m["status"] == wanted:
                return m
        return None

    stored = await wait_until(lambda: status_of("sent"))
    assert (
        await post_webhook(client, webhook(statuses=[status(stored["wa_message_id"], "delivered")]))
    ).status == 200
    await wait_until(lambda: status_of("delivered"))
    # Agents see it like any reply: served from the media store.
    resp = await client.get(f"/api/live-chat/media/{sent['id']}")
    assert resp.status == 200 and await resp.read() == photo


async def test_files_past_whatsapps_limits_or_empty_are_refused(make_client, graph):
    client = await make_client(**graph_settings(graph))
    assert (await post_webhook(client, webhook([message("text", {"body": "hi"})]))).status == 200
    convo = await conversation(client)
    data = aiohttp.FormData()
    data.add_field(
        "file",
        io.BytesIO(b"\xff" * (5 * 1024 * 1024 + 1)),
        filename="big.jpg",
        content_type="image/jpeg",
    )
    resp = await client.post(f"/api/live-chat/conversations/{convo['id']}/messages", data=data)
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "file_too_large"
    data = aiohttp.FormData(default_to_multipart=True)
    data.add_field("caption", "nothing attached")
    resp = await client.post(f"/api/live-chat/conversations/{convo['id']}/messages", data=data)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_file"
    assert graph.requests == [] or all("/media" not in r.path for r in graph.requests)
    assert len(await all_messages(client, convo["id"])) == 1


async def _async(value):
    return value
