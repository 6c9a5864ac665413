"""GET /api/live-chat/events over real HTTP on loopback: the bytes a dashboard receives."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from server import keys
from server.app import create_app
from server.handlers import events as events_handler
from server.hub import Hub
from tests.conftest import AUTH, TOKEN

PATH = "/api/live-chat/events"
# Bounds for waits that only fail when something hangs; none of them measures speed.
WAIT_S = 5.0


def parse(frame: bytes) -> dict[str, list[str]]:
    """The fields of one SSE frame; a comment line is kept under the empty name."""
    assert frame.endswith(b"\n\n"), frame
    fields: dict[str, list[str]] = {}
    for line in frame[:-2].decode().split("\n"):
        name, _, value = line.partition(":")
        fields.setdefault(name, []).append(value.removeprefix(" "))
    return fields


async def read_frame(resp: aiohttp.ClientResponse) -> bytes:
    return await asyncio.wait_for(resp.content.readuntil(b"\n\n"), WAIT_S)


async def read_event(resp: aiohttp.ClientResponse) -> dict[str, list[str]]:
    """The next frame that is an event (heartbeat comments are skipped)."""
    while True:
        fields = parse(await read_frame(resp))
        if "" not in fields:
            return fields


async def connect(server: Served, last_event_id: str | None = None) -> aiohttp.ClientResponse:
    """Open a stream and read its first frame, which must be the retry interval."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    resp = await server.session.get(PATH, headers=headers)
    assert resp.status == 200
    first = await read_frame(resp)
    assert first.startswith(b"retry: 3000\n"), first
    return resp


async def until(condition, timeout: float = WAIT_S) -> None:
    """Wait for a condition the server reaches on its own (a client registered or gone)."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


class Served:
    """The app from the factory on a loopback port, served as `run.py serve` serves it."""

    def __init__(self, app: web.Application, runner: web.AppRunner, port: int) -> None:
        self.app = app
        self.runner = runner
        self.host = "127.0.0.1"
        self.port = port
        self.session = aiohttp.ClientSession(f"http://{self.host}:{port}", headers=AUTH)
        self.stopped = False

    @property
    def hub(self) -> Hub:
        return self.app[keys.HUB]

    async def stop(self) -> None:
        """The server's shutdown (on_shutdown, then cleanup), as on SIGTERM."""
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()


async def stalled_client(server: Served) -> socket.socket:
    """A client that sends its request and never reads a byte of the stream.

    Its receive buffer is small so the kernel's buffers fill after a few megabytes.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (server.host, server.port))
    request = (
        f"GET {PATH} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    return sock


@pytest.fixture
async def start(settings):
    """Start the app with five demo conversations; hub options replace its hub.

    Served by an AppRunner with run.py's options rather than aiohttp's TestServer, which
    cancels a handler when its client disconnects; production does not, so the stream
    handler must notice a departed client by itself.
    """
    started: list[Served] = []

    async def start_(*, handler_cancellation: bool = False, **hub_options) -> Served:
        s = replace(settings, demo=True, demo_conversations=5).validated()
        app = create_app(s)
        if hub_options:
            app[keys.HUB] = Hub(s.instance_id, **hub_options)
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=5.0, handler_cancellation=handler_cancellation
        )
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        served = Served(app, runner, sock.getsockname()[1])
        started.append(served)
        await web.SockSite(runner, sock).start()
        await asyncio.wait_for(app[keys.WARMER].loaded.wait(), 10)
        return served

    yield start_
    for served in started:
        await served.session.close()
        await served.stop()


async def conversation_ids(server: Served) -> list[str]:
    resp = await server.session.get("/api/live-chat/unified-chats", params={"status": "all"})
    assert resp.status == 200
    return [c["id"] for c in (await resp.json())["chats"]]


async def mark_read(server: Served, conversation_id: str) -> dict:
    resp = await server.session.post(f"/api/live-chat/conversations/{conversation_id}/read")
    assert resp.status == 200
    return await resp.json()


def seq(event_id: str) -> int:
    instance, _, n = event_id.rpartition("-")
    assert instance == "t1"
    return int(n)


async def test_headers_and_retry_first(start):
    server = await start()
    resp = await server.session.get(PATH)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers.getall("Cache-Control") == ["no-cache, no-store, must-revalidate"]
    assert resp.headers["Pragma"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in resp.headers
    # Nothing to replay: the first frame sets the retry interval and names the newest id.
    assert await read_frame(resp) == b"retry: 3000\nid: %s\n\n" % server.hub.last_event_id.encode()
    resp.close()


async def test_the_stream_needs_the_token(start):
    server = await start()
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(f"http://{server.host}:{server.port}{PATH}") as resp:
            assert resp.status == 401


async def test_an_update_arrives_as_one_event_with_its_id(start):
    server = await start()
    cid = (await conversation_ids(server))[0]
    with capture_logs() as logs:
        resp = await connect(server)
        await until(lambda: server.hub.clients == 1)
        summary = await mark_read(server, cid)
        frame = await read_frame(resp)
    fields = parse(frame)
    assert set(fields) == {"id", "event", "data"}
    assert fields["event"] == ["conversation_updated"]
    assert len(fields["id"]) == 1 and seq(fields["id"][0]) > 0
    assert fields["id"] == [server.hub.last_event_id]
    assert len(fields["data"]) == 1
    assert json.loads(fields["data"][0]) == {"conversation": summary}
    assert summary["id"] == cid and summary["unread_count"] == 0

    connected = [e for e in logs if e["event"] == "sse.connected"]
    assert len(connected) == 1
    assert connected[0]["client_id"].startswith("t1-")
    assert connected[0]["clients"] == 1
    assert connected[0]["last_event_id"] is None
    assert connected[0]["replayed"] == 0
    assert connected[0]["duration_ms"] >= 0
    broadcast = [e for e in logs if e["event"] == "sse.broadcast"]
    # Published once: the change feed that follows the write does not publish it again.
    assert len(broadcast) == 1
    assert broadcast[0]["type"] == "conversation_updated"
    assert broadcast[0]["event_id"] == fields["id"][0]
    assert broadcast[0]["conversation_id"] == cid
    assert summary["user_id"] not in str(broadcast[0])
    assert broadcast[0]["clients"] == 1
    assert broadcast[0]["duration_ms"] >= 0
    resp.close()


async def test_every_client_receives_every_event_in_order(start):
    server = await start()
    cids = await conversation_ids(server)
    streams = [await connect(server) for _ in range(3)]
    await until(lambda: server.hub.clients == 3)
    for cid in cids:
        await mark_read(server, cid)
    seen = []
    for resp in streams:
        ids = [(await read_event(resp))["id"][0] for _ in cids]
        seen.append(ids)
        resp.close()
    assert seen[0] == seen[1] == seen[2]
    assert [seq(i) for i in seen[0]] == list(range(seq(seen[0][0]), seq(seen[0][0]) + len(cids)))


async def test_a_reconnect_with_last_event_id_replays_exactly_the_missed_events(start):
    server = await start()
    cids = await conversation_ids(server)
    resp = await connect(server)
    await until(lambda: server.hub.clients == 1)
    await mark_read(server, cids[0])
    last_seen = (await read_event(resp))["id"][0]
    resp.close()  # the server notices at its next heartbeat; the browser is back sooner

    missed = [await mark_read(server, cid) for cid in cids[1:4]]
    with capture_logs() as logs:
        resp = await connect(server, last_seen)
        replayed = [await read_event(resp) for _ in missed]
    assert [json.loads(e["data"][0])["conversation"] for e in replayed] == missed
    assert [seq(e["id"][0]) for e in replayed] == [seq(last_seen) + i for i in (1, 2, 3)]

    # Then live events follow, with nothing repeated in between.
    await mark_read(server, cids[4])
    live = await read_event(resp)
    assert seq(live["id"][0]) == seq(last_seen) + 4
    assert json.loads(live["data"][0])["conversation"]["id"] == cids[4]
    resp.close()

    connected = next(e for e in logs if e["event"] == "sse.connected")
    assert connected["last_event_id"] == last_seen
    assert connected["replayed"] == 3


async def test_the_query_parameter_also_resumes(start):
    # For clients that cannot set headers on the first connection (a page reload).
    server = await start()
    cids = await conversation_ids(server)
    before = server.hub.last_event_id
    await mark_read(server, cids[0])
    resp = await server.session.get(PATH, params={"last_event_id": before})
    assert await read_frame(resp) == b"retry: 3000\n\n"  # events follow, with their ids
    event = await read_event(resp)
    assert seq(event["id"][0]) == seq(before) + 1
    resp.close()


@pytest.mark.parametrize("kind", ["pruned", "other_instance", "future", "malformed"])
async def test_an_id_that_cannot_be_replayed_gets_resync(start, kind):
    server = await start(replay_buffer=4)
    hub = server.hub
    first = hub.publish("conversation_updated", {"n": 0})
    assert first is not None
    for n in range(1, 10):
        hub.publish("conversation_updated", {"n": n})
    last_event_id = {
        "pruned": first.id,
        "other_instance": f"t2-{seq(hub.last_event_id)}",
        "future": f"t1-{seq(hub.last_event_id) + 1}",
        "malformed": "not an id",
    }[kind]
    with capture_logs() as logs:
        resp = await connect(server, last_event_id)
        resync = parse(await read_frame(resp))
    assert resync == {"id": [hub.last_event_id], "event": ["resync"], "data": ["{}"]}
    # After the resync the stream goes on from here, so the next reconnect can resume.
    await until(lambda: hub.clients == 1)
    event = hub.publish("conversation_updated", {"n": 10})
    assert event is not None
    assert parse(await read_frame(resp))["id"] == [event.id]
    resp.close()
    connected = next(e for e in logs if e["event"] == "sse.connected")
    assert connected["last_event_id"] == last_event_id
    assert connected["resync"] is True
    assert connected["replayed"] == 0


async def test_a_huge_last_event_id_gets_resync_and_a_bounded_log_line(start):
    server = await start()
    huge = "t1-" + "9" * 5000
    with capture_logs() as logs:
        resp = await connect(server, huge)
        assert parse(await read_frame(resp))["event"] == ["resync"]
    connected = next(e for e in logs if e["event"] == "sse.connected")
    assert huge.startswith(connected["last_event_id"])
    assert len(connected["last_event_id"]) < 100
    resp.close()


async def test_a_stalled_client_is_dropped_while_another_keeps_receiving(start):
    server = await start()
    hub = server.hub
    healthy = await connect(server)

    stalled = await stalled_client(server)
    await until(lambda: hub.clients == 2)

    payload = {"conversation": {"id": "c_big", "padding": "x" * 32_000}}
    received: list[str] = []
    published: list[str] = []
    with capture_logs() as logs:
        # Batches smaller than the queue, each read whole before the next: the healthy
        # client is never behind, so only the stalled one can overflow.
        for _ in range(1000):
            for _ in range(16):
                event = hub.publish("conversation_updated", payload)
                assert event is not None
                published.append(event.id)
            while len(received) < len(published):
                received.append((await read_event(healthy))["id"][0])
            if hub.clients == 1:
                break
        assert hub.clients == 1, "the stalled client was never dropped"
        # The healthy client is unaffected and keeps receiving after the drop.
        for _ in range(3):
            event = hub.publish("conversation_updated", {"n": "after"})
            assert event is not None
            published.append(event.id)
            received.append((await read_event(healthy))["id"][0])
        await until(lambda: any(e["event"] == "sse.disconnected" for e in logs))

    assert received == published
    dropped = [e for e in logs if e["event"] == "sse.disconnected"]
    assert len(dropped) == 1
    assert dropped[0]["reason"] == "slow_client"
    assert dropped[0]["clients"] == 1
    assert dropped[0]["connected_s"] >= 0
    assert dropped[0]["client_id"].startswith("t1-")

    # The stalled client's connection was closed, so its browser would reconnect.
    async def read_to_end() -> None:
        try:
            while await loop.sock_recv(stalled, 1 << 20):
                pass
        except ConnectionResetError:
            pass

    loop = asyncio.get_running_loop()
    await asyncio.wait_for(read_to_end(), WAIT_S)
    stalled.close()
    healthy.close()


async def test_heartbeats_are_sent(start, monkeypatch):
    monkeypatch.setattr(events_handler, "HEARTBEAT_S", 0.05)
    server = await start()
    resp = await connect(server)
    for _ in range(2):
        assert await read_frame(resp) == b": ping\n\n"
    resp.close()


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_a_client_that_leaves_is_removed_within_a_heartbeat(
    start, monkeypatch, handler_cancellation
):
    monkeypatch.setattr(events_handler, "HEARTBEAT_S", 0.1)
    server = await start(handler_cancellation=handler_cancellation)
    hub = server.hub
    with capture_logs() as logs:
        resp = await connect(server)
        await until(lambda: hub.clients == 1)
        resp.close()
        # No event is published: the heartbeat alone must notice the closed connection.
        await until(lambda: hub.clients == 0, timeout=1.0)
        await until(lambda: any(e["event"] == "sse.disconnected" for e in logs))
    gone = next(e for e in logs if e["event"] == "sse.disconnected")
    assert gone["reason"] == "client_gone"
    assert gone["clients"] == 0
    assert gone["connected_s"] >= 0
    assert gone["client_id"] == next(e for e in logs if e["event"] == "sse.connected")["client_id"]


async def test_shutdown_closes_every_stream_promptly(start):
    server = await start()
    hub = server.hub
    streams = [await connect(server) for _ in range(3)]
    await until(lambda: hub.clients == 3)
    with capture_logs() as logs:
        stopping = asyncio.create_task(server.stop())
        # Each client sees the end of its stream (not a hang until a shutdown timeout).
        rests = await asyncio.wait_for(
            asyncio.gather(*(resp.content.read() for resp in streams)), 1.0
        )
        # Under the runner's 5 s shutdown timeout: the stop did not wait for it to expire.
        await asyncio.wait_for(stopping, 3.0)
    assert all(b"event:" not in rest for rest in rests)
    assert all(resp.content.at_eof() for resp in streams)
    assert hub.clients == 0
    reasons = [e["reason"] for e in logs if e["event"] == "sse.disconnected"]
    assert reasons == ["shutdown"] * 3
    for resp in streams:
        resp.close()


async def test_shutdown_is_prompt_with_a_stalled_client_connected(start):
    # A generous buffer bound, so the stalled client is not dropped before shutdown.
    server = await start(client_buffer=64 * 1024 * 1024)
    hub = server.hub
    healthy = await connect(server)
    stalled = await stalled_client(server)
    await until(lambda: hub.clients == 2)
    # Enough to fill the stalled client's socket buffers (its transport then buffers, and
    # ending its stream would wait for it to read), not enough to have it dropped.
    payload = {"padding": "x" * 32_000}
    for _ in range(20):
        for _ in range(10):
            hub.publish("conversation_updated", payload)
        for _ in range(10):
            await read_event(healthy)
    assert hub.clients == 2
    with capture_logs() as logs:
        stopping = asyncio.create_task(server.stop())
        await asyncio.wait_for(healthy.content.read(), 1.0)
        # Under the runner's 5 s shutdown timeout: the stalled client did not hold the stop.
        await asyncio.wait_for(stopping, 3.0)
    reasons = [e["reason"] for e in logs if e["event"] == "sse.disconnected"]
    assert reasons == ["shutdown", "shutdown"]
    stalled.close()
    healthy.close()
