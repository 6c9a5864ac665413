"""The event hub on its own: ids, dedupe, replay or resync, bounded buffers, shutdown."""

from __future__ import annotations

import asyncio
import json

import pytest
from structlog.testing import capture_logs

from server.hub import Event, Hub, encode_frame


class Sink:
    """A client's connection as the hub sees it: records writes; a stalled one never drains."""

    def __init__(self, *, stalled: bool = False) -> None:
        self.stalled = stalled
        self.written: list[bytes] = []
        self.buffered = 0
        self.aborts = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)
        if self.stalled:
            self.buffered += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborts += 1
        self.closing = True

    def take(self) -> bytes:
        """What was written since the last take, in order."""
        taken, self.written = self.written, []
        return b"".join(taken)


def received(hub: Hub, sink: Sink) -> bytes:
    """What the client has been sent once the hub flushed what it published."""
    hub.flush()
    return sink.take()


def frames(events) -> bytes:
    return b"".join(e.frame for e in events)


def live(hub: Hub, last_event_id: str | None = None, sink: Sink | None = None):
    """A client connected and past its first write, as the stream handler leaves it."""
    sink = sink or Sink()
    client, backlog = hub.connect(last_event_id, sink, chunked=False)
    hub.go_live(client)
    return client, sink, backlog


def seq_of(event_id: str, instance: str) -> int:
    prefix, _, seq = event_id.rpartition("-")
    assert prefix == instance
    return int(seq)


def publish_n(hub: Hub, n: int, name: str = "conversation_updated") -> list[Event]:
    events = []
    for i in range(n):
        event = hub.publish(name, {"i": i})
        assert event is not None
        events.append(event)
    return events


def parse_frame(frame: bytes) -> dict[str, list[str]]:
    assert frame.endswith(b"\n\n")
    fields: dict[str, list[str]] = {}
    for line in frame[:-2].decode().split("\n"):
        name, _, value = line.partition(": ")
        fields.setdefault(name, []).append(value)
    return fields


async def test_ids_are_ordered_and_name_the_instance():
    hub = Hub("web-1")
    events = publish_n(hub, 5)
    seqs = [seq_of(e.id, "web-1") for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + 5))
    assert [e.seq for e in events] == seqs
    assert hub.last_event_id == events[-1].id


async def test_frame_is_id_event_and_one_json_data_line():
    hub = Hub("t1")
    # Line breaks of every kind inside the data must not split the SSE data field.
    data = {"conversation": {"id": "c_1", "text": "a\nb\r\nc\rd\u2028e\u0085f"}}
    event = hub.publish("conversation_updated", data)
    assert event is not None
    fields = parse_frame(event.frame)
    assert fields["id"] == [event.id]
    assert fields["event"] == ["conversation_updated"]
    assert len(fields["data"]) == 1
    assert json.loads(fields["data"][0]) == data
    assert b"\r" not in event.frame
    assert event.frame == encode_frame(event.id, "conversation_updated", data)


async def test_replay_after_an_id_returns_exactly_the_missed_events():
    hub = Hub("t1", replay_buffer=16)
    events = publish_n(hub, 10)
    sink = Sink()
    client, backlog = hub.connect(events[3].id, sink, chunked=False)
    assert backlog == events[4:]
    assert hub.clients == 1
    # Events published while the backlog is being written wait, then follow it in order.
    during = publish_n(hub, 2)
    assert sink.take() == b""
    hub.go_live(client)
    later = publish_n(hub, 2)
    assert received(hub, sink) == frames(during + later)


async def test_events_published_together_go_out_in_one_write_per_client():
    hub = Hub("t1")
    sinks = [live(hub)[1] for _ in range(3)]
    events = publish_n(hub, 5)
    assert all(s.written == [] for s in sinks)  # not yet: the flush is scheduled
    await asyncio.sleep(0.05)
    for sink in sinks:
        assert sink.written == [frames(events)]


async def test_http_chunks_frame_each_event_whole():
    hub = Hub("t1")
    sink = Sink()
    client, _ = hub.connect(None, sink, chunked=True)
    hub.go_live(client)
    event = publish_n(hub, 1)[0]
    size = len(event.frame)
    assert received(hub, sink) == b"%x\r\n" % size + event.frame + b"\r\n"


async def test_replay_of_the_newest_id_is_empty():
    hub = Hub("t1")
    events = publish_n(hub, 3)
    _, backlog = hub.connect(events[-1].id, Sink(), chunked=False)
    assert backlog == []


async def test_replay_of_the_oldest_buffered_neighbour_still_works():
    hub = Hub("t1", replay_buffer=4)
    events = publish_n(hub, 10)
    # The buffer holds events 7..10; a client that saw 6 misses nothing the buffer lacks.
    _, backlog = hub.connect(events[5].id, Sink(), chunked=False)
    assert backlog == events[6:]


async def test_replay_from_before_the_first_event_of_a_fresh_hub():
    hub = Hub("t1")
    start = hub.last_event_id
    events = publish_n(hub, 3)
    _, backlog = hub.connect(start, Sink(), chunked=False)
    assert backlog == events


@pytest.mark.parametrize(
    "last_event_id",
    [
        "pruned",
        "other-instance",
        "future",
        "garbage",
        "t1-",
        "t1-abc",
        "t1--3",
        "t1-+3",
        "t1- 3",
        "t1-3.0",
        "t1-\u00b2",  # a digit to str.isdigit(), not to int()
        "t1-\u0663",  # an Arabic-Indic digit three
        "-3",
        "t1-99999999999999999999999999999999999999",
        pytest.param("t1-" + "9" * 5000, id="t1-5000-digits"),  # past int()'s digit limit
    ],
)
async def test_ids_that_cannot_be_replayed_get_resync(last_event_id):
    hub = Hub("t1", replay_buffer=4)
    events = publish_n(hub, 10)
    seq = events[-1].seq
    ids = {
        "pruned": events[2].id,  # the buffer keeps 7..10; this client needs 4 onwards
        "other-instance": f"t2-{seq - 1}",
        "future": f"t1-{seq + 1}",
    }
    _, backlog = hub.connect(ids.get(last_event_id, last_event_id), Sink(), chunked=False)
    assert backlog is None
    assert hub.clients == 1  # a resync client is still connected and gets what follows


async def test_a_restarted_instance_with_the_same_name_sends_resync():
    # An operator may pin the instance id (LIVECHAT_INSTANCE_ID): a browser that saw events
    # of the previous process must not be told it missed nothing, or only the new events.
    before = Hub("web-1")
    seen = publish_n(before, 5)
    after = Hub("web-1")
    publish_n(after, 8)
    for event in seen:
        _, backlog = after.connect(event.id, Sink(), chunked=False)
        assert backlog is None, event.id


async def test_a_stalled_client_is_dropped_while_others_keep_receiving():
    hub = Hub("t1", client_buffer=4000)
    stalled, stalled_sink, _ = live(hub, sink=Sink(stalled=True))
    healthy, healthy_sink, _ = live(hub)
    delivered: list[Event] = []
    with capture_logs() as logs:
        for _ in range(5):
            batch = [hub.publish("conversation_updated", {"pad": "x" * 500}) for _ in range(3)]
            got = received(hub, healthy_sink)
            assert got == frames(batch)
            delivered += batch
    assert stalled_sink.aborts == 1 and healthy_sink.aborts == 0
    assert stalled.reason == "slow_client" and stalled.done.is_set()
    assert not healthy.done.is_set()
    assert hub.clients == 1
    assert len(delivered) == 15
    # The stalled client got nothing once past its bound (three events a flush).
    assert 4000 < stalled_sink.buffered < 4000 + 2 * 3 * 600
    broadcasts = [e for e in logs if e["event"] == "sse.broadcast"]
    assert [b["clients"] for b in broadcasts[:2]] == [2, 2]
    assert broadcasts[-1]["clients"] == 1


async def test_a_client_whose_connection_closed_is_forgotten_on_the_next_event():
    hub = Hub("t1")
    client, sink, _ = live(hub)
    sink.closing = True
    publish_n(hub, 1)
    assert received(hub, sink) == b"" and sink.aborts == 0
    assert hub.clients == 0 and client.reason == "client_gone" and client.done.is_set()


async def test_a_client_flooded_before_its_first_write_is_dropped():
    hub = Hub("t1", pending_events=3)
    sink = Sink()
    client, _ = hub.connect(None, sink, chunked=False)
    publish_n(hub, 4)
    assert client.reason == "slow_client" and hub.clients == 0
    hub.go_live(client)
    assert received(hub, sink) == b""


async def test_broadcast_log_line_carries_its_fields():
    hub = Hub("t1")
    hub.connect(None, Sink(), chunked=False)
    with capture_logs() as logs:
        event = hub.publish("new_message", {"x": 1}, conversation_id="c_1", user_id="u_1")
    lines = [e for e in logs if e["event"] == "sse.broadcast"]
    assert len(lines) == 1
    line = lines[0]
    assert line["type"] == "new_message"
    assert line["event_id"] == event.id
    assert line["conversation_id"] == "c_1"
    # The customer's WhatsApp id (their phone number) is not logged.
    assert "user_id" not in line and "u_1" not in str(line)
    assert line["clients"] == 1
    assert line["duration_ms"] >= 0
    assert line["log_level"] == "info"


async def test_disconnect_forgets_the_client():
    hub = Hub("t1")
    client, sink, _ = live(hub)
    hub.disconnect(client)
    hub.disconnect(client)  # twice is harmless: the handler's finally may follow a drop
    assert hub.clients == 0
    publish_n(hub, 1)
    assert received(hub, sink) == b""


async def test_close_ends_every_client():
    hub = Hub("t1", client_buffer=100)
    clients = [live(hub, sink=Sink(stalled=i == 2)) for i in range(3)]
    # The first flush takes the stalled one past its bound; the next finds it there.
    hub.publish("conversation_updated", {"pad": "x" * 200})
    hub.flush()
    hub.publish("conversation_updated", {})
    hub.flush()
    assert hub.clients == 2
    hub.close()
    assert hub.clients == 0
    for client, sink, _ in clients:
        assert client.done.is_set()
        assert client.reason == ("slow_client" if sink.stalled else "shutdown")


async def test_close_wakes_a_waiting_stream():
    hub = Hub("t1")
    client, _, _ = live(hub)
    waiter = asyncio.create_task(client.done.wait())
    await asyncio.sleep(0)
    hub.close()
    await asyncio.wait_for(waiter, 1)
    assert client.reason == "shutdown"


async def test_a_client_connecting_after_close_ends_at_once():
    hub = Hub("t1")
    hub.close()
    client, _ = hub.connect(None, Sink(), chunked=False)
    await asyncio.wait_for(client.done.wait(), 1)
    assert client.reason == "shutdown"
    assert hub.clients == 0


async def test_a_client_joining_mid_batch_gets_each_event_once():
    hub = Hub("t1")
    _, early, _ = live(hub)
    first = publish_n(hub, 1)  # not flushed yet
    _, late, backlog = live(hub, last_event_id=hub.last_event_id)
    assert backlog == []  # it is current: the unflushed event is not its to receive again
    second = publish_n(hub, 1)
    hub.flush()
    assert early.take() == frames(first + second)
    assert late.take() == frames(second)
