"""Nothing acknowledged is lost when the server dies: real processes, killed with SIGKILL.

The server runs as `python run.py` on SQLite or the Firestore emulator, against a fake
Graph API and a fake chat-completions server in this process. It is killed (kill -9) at
the worst moments: right after a webhook's 200, while the AI call is in flight, while a
send's POST is in flight; and a send that was committed but never attempted is left in the
store as a crash would leave it. After a restart every customer is answered once, every
committed send goes out once, and a send cut off mid-POST is failed as interrupted, never
sent twice behind the agent's back; a retry from the API sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.config import Settings
from server.integrations.whatsapp_webhook import sign
from server.store import make_store
from server.store.base import InboundMessage, Leases
from tests.conftest import APP_SECRET, STORE_KINDS, TOKEN
from tests.media_files import png
from tests.webhooks import message, text, webhook

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Short leases so that work left by a killed instance is taken within the test (the
# embedded store takes it at once on restart; Firestore waits for the lease).
LEASE_S = 2.0

pytestmark = pytest.mark.parametrize("store_kind", STORE_KINDS, indirect=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `python run.py` process on loopback; start, kill -9, start again."""

    def __init__(self, settings: Settings, graph: Any, llm: Any, tmp_path: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "server.log"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LIVECHAT_", "WHATSAPP_", "AI_", "FIRESTORE_"))
        } | {
            "LIVECHAT_API_TOKEN": TOKEN,
            "LIVECHAT_SECRET_KEY": "crash-test-secret",
            "LIVECHAT_OUTBOX_LEASE": str(LEASE_S),
            "LIVECHAT_STORE": settings.store,
            "LIVECHAT_DB": settings.db,
            "LIVECHAT_MEDIA_DIR": str(tmp_path / "media"),
            "WHATSAPP_APP_SECRET": APP_SECRET,
            "WHATSAPP_TOKEN": "t",
            "WHATSAPP_PHONE_NUMBER_ID": "123",
            "WHATSAPP_API_BASE": graph.base,
            "AI_PROVIDER": "openai",
            "AI_BASE_URL": llm.base,
            "AI_API_KEY": "k",
            "AI_MAX_RETRIES": "0",
            "LOG_FORMAT": "json",
        }
        if settings.store == "firestore":
            self.env["GOOGLE_CLOUD_PROJECT"] = settings.google_cloud_project
            self.env["FIRESTORE_EMULATOR_HOST"] = str(settings.firestore_emulator_host)
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = aiohttp.ClientSession(headers=AUTH)

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "run.py"), "--port", str(self.port)],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        for _ in range(300):
            with contextlib.suppress(aiohttp.ClientError):
                async with self.http.get(f"{self.base}/readyz") as r:
                    if r.status == 200:
                        return
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            await asyncio.sleep(0.1)
        raise AssertionError("the server did not become ready:\n" + self.log.read_text()[-3000:])

    def kill(self) -> None:
        """SIGKILL: no shutdown, no drain, nothing flushed that was not committed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        await self.http.close()

    async def webhook(self, body: dict[str, Any]) -> int:
        import json

        raw = json.dumps(body).encode()
        headers = {"X-Hub-Signature-256": sign(APP_SECRET, raw), "Content-Type": "application/json"}
        async with self.http.post(f"{self.base}/webhooks/whatsapp", data=raw, headers=headers) as r:
            return r.status

    async def get(self, path: str) -> Any:
        async with self.http.get(f"{self.base}{path}") as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.post(f"{self.base}{path}", json=body) as r:
            return r.status, await r.json()

    async def messages(self, conversation_id: str) -> list[dict[str, Any]]:
        page = await self.get(f"/api/live-chat/conversations/{conversation_id}/messages?limit=100")
        return page["messages"]

    async def only_conversation(self) -> dict[str, Any]:
        async def one() -> dict[str, Any] | None:
            chats = (await self.get("/api/live-chat/unified-chats"))["chats"]
            return chats[0] if chats else None

        return await until(one)

    async def until_message(self, conversation_id: str, match: Any, within: float = 20.0) -> Any:
        async def found() -> Any:
            return next((m for m in await self.messages(conversation_id) if match(m)), None)

        return await until(found, within)


async def until(probe: Any, within: float = 20.0) -> Any:
    """Poll `probe` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.1)


@pytest.fixture
async def server(settings, graph, llm, tmp_path) -> AsyncIterator[Server]:
    s = Server(settings, graph, llm, tmp_path)
    try:
        yield s
    finally:
        await s.close()


def ai_replies(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["sender"] == "ai"]


def sends_of(graph: Any, body: str) -> list[Any]:
    return [r for r in graph.requests if r.json.get("text", {}).get("body") == body]


async def test_killed_right_after_the_200_the_customer_is_answered_once(server, llm, graph):
    llm.block()  # whatever the dead process managed to ask, it never got an answer
    await server.start()
    assert await server.webhook(webhook([text("is my order on its way?")])) == 200
    server.kill()
    llm.release()
    await server.start()
    conversation = await server.only_conversation()
    await server.until_message(conversation["id"], lambda m: m["sender"] == "ai")
    await asyncio.sleep(LEASE_S + 1)  # nothing else comes, not even after another lease
    messages = await server.messages(conversation["id"])
    assert len(ai_replies(messages)) == 1
    assert len(sends_of(graph, llm.reply)) == 1


async def test_killed_while_the_ai_call_is_in_flight_the_customer_is_answered_once(
    server, llm, graph
):
    llm.block()
    await server.start()
    assert await server.webhook(webhook([text("do you deliver to Jeddah?")])) == 200
    await llm.wait_for_requests(1)  # the AI call is under way
    server.kill()
    llm.release()
    await server.start()
    conversation = await server.only_conversation()
    reply = await server.until_message(conversation["id"], lambda m: m["sender"] == "ai")
    await server.until_message(conversation["id"], lambda m: m["status"] == "sent")
    await asyncio.sleep(LEASE_S + 1)
    messages = await server.messages(conversation["id"])
    assert [m["id"] for m in ai_replies(messages)] == [reply["id"]]
    assert len(sends_of(graph, llm.reply)) == 1
    assert len(llm.requests) == 2  # the call that died with the process, and the answer


async def test_killed_mid_send_the_reply_is_failed_as_interrupted_and_a_retry_sends_it(
    server, graph, settings
):
    await server.start()
    assert await server.webhook(webhook([text("hello")])) == 200
    conversation = await server.only_conversation()
    await server.until_message(conversation["id"], lambda m: m["sender"] == "ai")
    await server.until_message(conversation["id"], lambda m: m["status"] == "sent")
    graph.delay_s = 30.0  # Graph is slow: the agent's POST is under way when we die
    status, sent = await server.post(
        f"/api/live-chat/conversations/{conversation['id']}/messages", {"text": "on its way"}
    )
    assert status == 201
    await until(lambda: _async(bool(sends_of(graph, "on its way"))))
    server.kill()
    graph.delay_s = 0.0
    await server.start()
    failed = await server.until_message(
        conversation["id"], lambda m: m["id"] == sent["id"] and m["status"] == "failed"
    )
    assert failed["error"]["code"] == "interrupted"
    assert len(sends_of(graph, "on its way")) == 1  # never sent again behind the agent's back

    status, retried = await server.post(
        f"/api/live-chat/conversations/{conversation['id']}/messages/{sent['id']}/retry"
    )
    assert status == 202 and retried["status"] == "queued" and retried["attempt"] == 1
    await server.until_message(
        conversation["id"], lambda m: m["id"] == sent["id"] and m["status"] == "sent"
    )
    assert len(sends_of(graph, "on its way")) == 2
    # A reply that did not fail cannot be sent again by mistake.
    status, body = await server.post(
        f"/api/live-chat/conversations/{conversation['id']}/messages/{sent['id']}/retry"
    )
    assert status == 409 and body["error"]["code"] == "not_retryable"


async def test_a_committed_send_never_attempted_goes_out_once_after_a_restart(
    server, graph, settings
):
    # What a crash between the commit and the POST leaves: the reply and its send task,
    # leased to a process that no longer exists.
    dead = Leases(owner="dead-instance", lease_ms=int(LEASE_S * 1000))
    store = make_store(settings.with_overrides(instance_id="dead-instance", outbox_lease_s=LEASE_S))
    await store.start()
    try:
        inbound = InboundMessage(
            wa_message_id="wamid.crash-test-1",
            user_id="966501234567",
            user_name="Sara",
            phone="+966501234567",
            type="text",
            text="hi",
            at=1_760_000_000_000,
        )
        saved = await store.save_inbound(inbound)
        assert saved is not None
        reply = await store.save_outbound(
            saved.conversation.id, sender="agent", text="we open at nine", take_over=True
        )
        assert reply.task is not None and reply.task.owner == dead.owner
    finally:
        await store.close()
    await server.start()
    await server.until_message(
        saved.conversation.id, lambda m: m["id"] == reply.message.id and m["status"] == "sent"
    )
    await asyncio.sleep(LEASE_S + 1)
    assert len(sends_of(graph, "we open at nine")) == 1


async def _async(value: Any) -> Any:
    return value


async def test_killed_mid_download_the_media_still_ends_downloaded(server, graph):
    photo = png(200, 120)
    held = graph.add_media(photo, "image/png")
    media_id = graph.media_id(held)
    graph.download_delay_s = 30.0  # the download is under way when the server dies
    await server.start()
    body = webhook(
        [message("image", {"id": media_id, "mime_type": "image/png", "sha256": held.sha256})]
    )
    assert await server.webhook(body) == 200
    await until(lambda: _async(bool(graph.downloads)))
    server.kill()
    graph.download_delay_s = 0.0
    await server.start()
    conversation = await server.only_conversation()
    # The restarted server takes the task once the dead one's lease runs out (Firestore)
    # or at once (SQLite); a loaded emulator can take a while.
    stored = await server.until_message(
        conversation["id"],
        lambda m: m["type"] == "image" and m["media"]["state"] in ("ready", "failed"),
        within=60.0,
    )
    assert stored["media"]["state"] == "ready"
    assert graph.downloads == [media_id, media_id]  # the cut-off one, and the one that kept it
    async with server.http.get(f"{server.base}/api/live-chat/media/{stored['id']}") as r:
        assert r.status == 200 and await r.read() == photo
