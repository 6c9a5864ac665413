"""The Cloud Storage media store against a fake of the JSON API (google-cloud-storage's own
requests): files uploaded to the bucket, read back into each instance's cache, and served
by the media route."""

from __future__ import annotations

from dataclasses import replace

from server.media import GcsMediaStore, make_media_store
from tests.fakes import FakeGcs, graph_settings
from tests.media_files import pdf, png
from tests.webhooks import all_messages, chats, message, post_webhook, wait_until, webhook


async def test_files_go_to_the_bucket_and_come_back_through_the_cache(
    aiohttp_server, settings, tmp_path
):
    gcs = await FakeGcs.serve(aiohttp_server)
    store = make_media_store(
        replace(
            settings,
            media_store="gcs",
            media_bucket="livechat-media",
            gcs_endpoint=gcs.endpoint,
            media_dir=str(tmp_path / "cache-a"),
        )
    )
    assert isinstance(store, GcsMediaStore)
    photo = png()
    await store.put("wa_0123abcd", photo, "image/png")
    assert gcs.objects[("livechat-media", "wa_0123abcd")] == (photo, "image/png")

    # Another instance (another cache) reads it from the bucket once, then from its disk.
    other = make_media_store(
        replace(
            settings,
            media_store="gcs",
            media_bucket="livechat-media",
            gcs_endpoint=gcs.endpoint,
            media_dir=str(tmp_path / "cache-b"),
        )
    )
    path = await other.local_path("wa_0123abcd")
    assert path is not None and path.read_bytes() == photo
    downloads = [r for r in gcs.requests if r.path.startswith("/download/")]
    assert len(downloads) == 1
    assert await other.local_path("wa_0123abcd") == path
    assert len([r for r in gcs.requests if r.path.startswith("/download/")]) == 1
    assert await other.local_path("wa_missing") is None


async def test_the_cache_keeps_within_its_budget(aiohttp_server, settings, tmp_path):
    gcs = await FakeGcs.serve(aiohttp_server)
    store = make_media_store(
        replace(
            settings,
            media_store="gcs",
            media_bucket="b",
            gcs_endpoint=gcs.endpoint,
            media_dir=str(tmp_path / "cache"),
            media_cache_mb=1,
        )
    )
    big = b"\x00" * (600 * 1024)
    await store.put("m_one", big, "application/pdf")
    await store.put("m_two", big, "application/pdf")  # past 1 MiB: the older file leaves
    assert not (tmp_path / "cache" / "ne" / "m_one").exists()
    path = await store.local_path("m_one")  # fetched again from the bucket
    assert path is not None and path.read_bytes() == big


async def test_a_customers_document_is_kept_in_the_bucket_and_served(
    make_client, graph, aiohttp_server
):
    gcs = await FakeGcs.serve(aiohttp_server)
    client = await make_client(
        **graph_settings(graph),
        media_store="gcs",
        media_bucket="livechat-media",
        gcs_endpoint=gcs.endpoint,
    )
    document = pdf()
    held = graph.add_media(document, "application/pdf")
    m = message(
        "document",
        {
            "id": graph.media_id(held),
            "mime_type": "application/pdf",
            "sha256": held.sha256,
            "filename": "invoice.pdf",
        },
    )
    assert (await post_webhook(client, webhook([m]))).status == 200
    [convo] = await chats(client)

    async def ready():
        [stored] = await all_messages(client, convo["id"])
        return stored if stored["media"]["state"] == "ready" else None

    stored = await wait_until(ready, within=10)
    assert gcs.objects[("livechat-media", stored["id"])][0] == document
    resp = await client.get(f"/api/live-chat/media/{stored['id']}")
    assert resp.status == 200 and await resp.read() == document
