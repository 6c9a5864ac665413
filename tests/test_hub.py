"""The event hub on its own: ids, dedupe, replay or resync, bounded queues, shutdown."""

from __future__ import annotations

import asyncio
import json

import pytest
from structlog.testing import capture_logs

from server.hub import Event, Hub, encode_frame


class Aborts:
    """Records how often the hub asked a client's connection to be closed."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def drain(queue: asyncio.Queue[Event | None]) -> list[Event | None]:
    """Everything waiting in a client's queue, in order."""
    items: list[Event | None] = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


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


async def test_dedupe_key_publishes_once():
    hub = Hub("t1")
    client, _ = hub.connect(None, Aborts())
    first = hub.publish("new_message", {"n": 1}, dedupe_key="msg:m1")
    assert first is not None
    assert hub.seen("msg:m1")
    assert not hub.seen("msg:m2")
    assert hub.publish("new_message", {"n": 1}, dedupe_key="msg:m1") is None
    other = hub.publish("new_message", {"n": 2}, dedupe_key="msg:m2")
    assert other is not None
    # Events without a key are never deduped.
    publish_n(hub, 2)
    received = drain(client.queue)
    assert [e.id for e in received if e] == [
        first.id,
        other.id,
        *(f"t1-{other.seq + i}" for i in (1, 2)),
    ]
    assert seq_of(other.id, "t1") == seq_of(first.id, "t1") + 1  # no id burnt on a duplicate


async def test_replay_after_an_id_returns_exactly_the_missed_events():
    hub = Hub("t1", replay_buffer=16)
    events = publish_n(hub, 10)
    client, backlog = hub.connect(events[3].id, Aborts())
    assert backlog == events[4:]
    assert hub.clients == 1
    # Newer events go to the queue, after the backlog, with nothing lost or repeated.
    later = publish_n(hub, 2)
    assert drain(client.queue) == later


async def test_replay_of_the_newest_id_is_empty():
    hub = Hub("t1")
    events = publish_n(hub, 3)
    _, backlog = hub.connect(events[-1].id, Aborts())
    assert backlog == []


async def test_replay_of_the_oldest_buffered_neighbour_still_works():
    hub = Hub("t1", replay_buffer=4)
    events = publish_n(hub, 10)
    # The buffer holds events 7..10; a client that saw 6 misses nothing the buffer lacks.
    _, backlog = hub.connect(events[5].id, Aborts())
    assert backlog == events[6:]


async def test_replay_from_before_the_first_event_of_a_fresh_hub():
    hub = Hub("t1")
    start = hub.last_event_id
    events = publish_n(hub, 3)
    _, backlog = hub.connect(start, Aborts())
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
    _, backlog = hub.connect(ids.get(last_event_id, last_event_id), Aborts())
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
        _, backlog = after.connect(event.id, Aborts())
        assert backlog is None, event.id


async def test_a_full_client_queue_drops_that_client_while_others_keep_receiving():
    hub = Hub("t1", client_queue=4)
    stalled_abort, healthy_abort = Aborts(), Aborts()
    stalled, _ = hub.connect(None, stalled_abort)
    healthy, _ = hub.connect(None, healthy_abort)
    received: list[Event] = []
    with capture_logs() as logs:
        for _ in range(5):
            batch = publish_n(hub, 3)
            got = drain(healthy.queue)
            assert got == batch
            received += batch
    assert stalled_abort.calls == 1
    assert healthy_abort.calls == 0
    assert stalled.reason == "slow_client"
    assert hub.clients == 1
    assert [seq_of(e.id, "t1") for e in received] == list(
        range(received[0].seq, received[0].seq + 15)
    )
    # The stalled client got nothing past its bound.
    assert len(drain(stalled.queue)) == 4
    broadcasts = [e for e in logs if e["event"] == "sse.broadcast"]
    assert [b["clients"] for b in broadcasts[:2]] == [2, 2]
    assert broadcasts[-1]["clients"] == 1


async def test_broadcast_log_line_carries_its_fields():
    hub = Hub("t1")
    hub.connect(None, Aborts())
    with capture_logs() as logs:
        event = hub.publish(
            "new_message", {"x": 1}, dedupe_key="msg:1", conversation_id="c_1", user_id="u_1"
        )
        hub.publish("new_message", {"x": 1}, dedupe_key="msg:1")
    assert event is not None
    lines = [e for e in logs if e["event"] == "sse.broadcast"]
    assert len(lines) == 1  # a duplicate is not broadcast, so it is not logged as one
    line = lines[0]
    assert line["type"] == "new_message"
    assert line["event_id"] == event.id
    assert line["conversation_id"] == "c_1"
    assert line["user_id"] == "u_1"
    assert line["clients"] == 1
    assert line["duration_ms"] >= 0
    assert line["log_level"] == "info"


async def test_disconnect_forgets_the_client():
    hub = Hub("t1")
    client, _ = hub.connect(None, Aborts())
    hub.disconnect(client)
    hub.disconnect(client)  # twice is harmless: the handler's finally may follow a drop
    assert hub.clients == 0
    publish_n(hub, 1)
    assert client.queue.empty()


async def test_close_ends_every_client():
    hub = Hub("t1", client_queue=2)
    aborts = [Aborts() for _ in range(3)]
    clients = [hub.connect(None, a)[0] for a in aborts]
    # Two clients have one free slot, one has none: the end must reach all three.
    hub.publish("conversation_updated", {})
    clients[0].queue.get_nowait()
    clients[1].queue.get_nowait()
    hub.publish("conversation_updated", {})
    hub.close()
    assert hub.clients == 0
    assert all(c.reason == "shutdown" for c in clients)
    for client, abort in zip(clients, aborts, strict=True):
        items = drain(client.queue)
        if abort.calls:
            assert client is clients[2]  # the full queue: its connection is closed instead
        else:
            assert items[-1] is None


async def test_close_wakes_a_waiting_reader():
    hub = Hub("t1")
    client, _ = hub.connect(None, Aborts())
    waiter = asyncio.create_task(client.queue.get())
    await asyncio.sleep(0)
    hub.close()
    assert await asyncio.wait_for(waiter, 1) is None


async def test_a_client_connecting_after_close_ends_at_once():
    hub = Hub("t1")
    hub.close()
    client, _ = hub.connect(None, Aborts())
    assert await asyncio.wait_for(client.queue.get(), 1) is None
    assert client.reason == "shutdown"
    assert hub.clients == 0
