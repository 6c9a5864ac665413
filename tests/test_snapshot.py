"""The in-memory snapshot and its cursors, without HTTP."""

from __future__ import annotations

import json
import random

import pytest

from server.cursor import CursorCodec, InvalidCursor
from server.models import Conversation, LastMessage
from server.snapshot import Snapshot, render_page
from server.store.base import Change


def conv(cid: str, at: int, status: str = "open", name: str = "Sara", updated: int = 0):
    return Conversation(
        id=cid,
        user_id="u" + cid,
        user_name=name,
        phone="+9665" + cid[-4:].rjust(4, "0"),
        channel="whatsapp",
        status=status,
        unread_count=0,
        ai_enabled=True,
        assignee=None,
        created_at=at,
        last_activity=at,
        last_message=LastMessage(
            id="m" + cid, type="text", text="hi", direction="in", sender="user", at=at
        ),
        updated_at=updated or at,
    )


def ids(page) -> list[str]:
    return [r.id for r in page.rows]


def walk(snapshot: Snapshot, limit: int, **filters) -> list[str]:
    seen, after = [], None
    while True:
        page = snapshot.page(limit=limit, after=after, **filters)
        seen += ids(page)
        if not page.has_more:
            return seen
        after = page.rows[-1].cursor_key


def test_rows_are_ordered_newest_first_and_equal_times_by_id():
    s = Snapshot()
    s.load([conv("c_b", 100), conv("c_a", 100), conv("c_c", 300), conv("c_d", 50)])
    assert ids(s.page(limit=10)) == ["c_c", "c_a", "c_b", "c_d"]


def test_a_change_moves_a_conversation_to_the_top():
    s = Snapshot()
    s.load([conv(f"c_{i}", 1000 + i) for i in range(5)])
    s.apply([Change(conv("c_0", 5000, updated=5000))])
    assert ids(s.page(limit=2)) == ["c_0", "c_4"]
    assert len(s) == 5


def test_an_older_version_never_replaces_a_newer_one():
    s = Snapshot()
    s.load([conv("c_1", 2000, updated=2000)])
    assert s.apply([Change(conv("c_1", 1000, updated=1000))]) == 0
    assert s.get("c_1").last_activity == 2000


def test_removed_conversations_leave_every_index():
    s = Snapshot()
    s.load([conv("c_1", 1), conv("c_2", 2, status="resolved")])
    s.apply([Change(conv("c_2", 2), removed=True)])
    assert ids(s.page(limit=10)) == ["c_1"]
    assert s.page(limit=10, status="resolved").total == 0


def test_a_bounded_snapshot_holds_the_newest_window_and_says_it_is_incomplete():
    s = Snapshot(window=3)
    s.load([conv(f"c_{i}", 1000 + i) for i in range(5)], complete=True)
    assert ids(s.page(limit=10)) == ["c_4", "c_3", "c_2"]
    assert not s.complete and s.page(limit=10).past_window


def test_a_load_in_pages_that_saw_a_conversation_twice_keeps_its_newest_version():
    s = Snapshot()
    s.load([conv("c_1", 1000, updated=1000), conv("c_2", 1500), conv("c_1", 2000, updated=2000)])
    assert ids(s.page(limit=10)) == ["c_1", "c_2"] and len(s) == 2
    assert s.get("c_1").last_activity == 2000


def test_a_conversation_moving_into_a_full_window_pushes_the_oldest_out():
    s = Snapshot(window=3)
    s.load([conv(f"c_{i}", 1000 + i) for i in range(3)], complete=True)
    assert s.complete  # the store held no more than the window
    s.apply([Change(conv("c_new", 5000))])
    assert ids(s.page(limit=10)) == ["c_new", "c_2", "c_1"]
    assert not s.complete and s.get("c_0") is None


def test_a_change_older_than_a_full_window_is_left_to_the_store():
    s = Snapshot(window=3)
    s.load([conv(f"c_{i}", 1000 + i) for i in range(3)], complete=False)
    # Resolving a conversation far down the list: its page is read from the store.
    assert s.apply([Change(conv("c_old", 10, status="resolved", updated=9000))]) == 0
    assert s.get("c_old") is None and len(s) == 3
    # A change to a row held is applied, in place.
    assert s.apply([Change(conv("c_1", 1001, status="resolved", updated=9000))]) == 1
    assert s.page(limit=10, status="resolved").total == 1


def test_status_filter_follows_status_changes():
    s = Snapshot()
    s.load([conv("c_1", 1), conv("c_2", 2)])
    s.apply([Change(conv("c_1", 1, status="resolved", updated=5))])
    assert ids(s.page(limit=10, status="open")) == ["c_2"]
    assert ids(s.page(limit=10, status="resolved")) == ["c_1"]
    assert s.page(limit=10, status="all").total == 2


def test_search_matches_name_and_phone_case_insensitively():
    s = Snapshot()
    s.load([conv("c_1111", 1, name="Layla Haddad"), conv("c_2222", 2, name="سارة العتيبي")])
    assert ids(s.page(limit=10, q="LAYLA")) == ["c_1111"]
    assert ids(s.page(limit=10, q="سارة")) == ["c_2222"]
    assert ids(s.page(limit=10, q="2222")) == ["c_2222"]
    assert s.page(limit=10, q="nobody").total == 0


@pytest.mark.parametrize("limit", [1, 7, 30, 100])
def test_walking_the_pages_returns_each_conversation_once_in_order(limit):
    rng = random.Random(limit)
    # Many equal timestamps on purpose: the id must break ties consistently.
    items = [conv(f"c_{i:05d}", rng.randrange(50)) for i in range(503)]
    s = Snapshot()
    s.load(items)
    expected = [c.id for c in sorted(items, key=lambda c: (-c.last_activity, c.id))]
    assert walk(s, limit) == expected


def test_a_move_during_the_walk_is_never_served_twice():
    s = Snapshot()
    s.load([conv(f"c_{i:03d}", 1000 - i) for i in range(100)])
    first = s.page(limit=30)
    # The 10th conversation gets a new message while the agent reads page one.
    s.apply([Change(conv("c_009", 5000, updated=5000))])
    rest = walk_from(s, first.rows[-1].cursor_key, 30)
    served = ids(first) + rest
    assert len(served) == len(set(served)) == 100


def walk_from(s, after, limit):
    out = []
    while True:
        page = s.page(limit=limit, after=after)
        out += ids(page)
        if not page.has_more:
            return out
        after = page.rows[-1].cursor_key


def test_has_more_is_false_only_on_the_last_page():
    s = Snapshot()
    s.load([conv(f"c_{i}", i) for i in range(60)])
    p1 = s.page(limit=30)
    p2 = s.page(limit=30, after=p1.rows[-1].cursor_key)
    assert p1.has_more and not p2.has_more and len(p2.rows) == 30
    assert p1.total == p2.total == 60


def test_the_rendered_page_is_valid_json_with_the_contract_fields():
    s = Snapshot()
    s.load([conv("c_1", 1, name='Quote " and \\ backslash')])
    page = s.page(limit=5)
    body = json.loads(render_page(page.rows, "abc", True, page.total, stale=False))
    assert set(body) == {"chats", "next_cursor", "has_more", "total", "stale"}
    assert body["chats"][0]["user_name"] == 'Quote " and \\ backslash'
    assert body["chats"][0]["last_activity"] == "1970-01-01T00:00:00.001Z"


def test_cursor_round_trip():
    codec = CursorCodec(b"k")
    key = (1_795_909_143_651, "c_with:colon")
    assert codec.decode("chats", codec.encode("chats", key)) == key


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c[:-2] + ("A" if c[-2] != "A" else "B") + c[-1],
        lambda c: "x" + c,
        lambda c: c.replace(".", ""),
        lambda c: "!!!." + c.split(".")[1],
        lambda c: "a" * 600,
    ],
)
def test_a_tampered_cursor_is_refused(mutate):
    codec = CursorCodec(b"k")
    cursor = codec.encode("chats", (5, "c_1"))
    with pytest.raises(InvalidCursor):
        codec.decode("chats", mutate(cursor))


def test_a_cursor_from_another_list_or_server_is_refused():
    cursor = CursorCodec(b"k").encode("messages:c_1", (5, "m_1"))
    with pytest.raises(InvalidCursor):
        CursorCodec(b"k").decode("chats", cursor)
    with pytest.raises(InvalidCursor):
        CursorCodec(b"other").decode("messages:c_1", cursor)


def test_assignee_filters_match_a_scan_through_every_change():
    rng = random.Random(11)
    agents = [None, "a_reem", "a_nouf", "a_omar"]
    held: dict[str, Conversation] = {}
    s = Snapshot()
    first = []
    for i in range(200):
        c = conv(f"c_{i:04d}", rng.randrange(1, 5000), rng.choice(("open", "resolved")))
        c = c.with_changes(assignee=rng.choice(agents))
        first.append(c)
        held[c.id] = c
    s.load(first)
    for step in range(600):
        cid = f"c_{rng.randrange(0, 220):04d}"
        old = held.get(cid)
        version = (old.updated_at if old else 0) + 1
        if old is not None and rng.random() < 0.05:
            s.apply([Change(old, removed=True)])
            del held[cid]
            continue
        c = conv(cid, rng.randrange(1, 6000), rng.choice(("open", "resolved")), updated=version)
        c = c.with_changes(assignee=rng.choice(agents), updated_at=version)
        s.apply([Change(c)])
        held[cid] = c
        if step % 60:
            continue
        order = sorted(held.values(), key=lambda c: (-c.last_activity, c.id))
        for assignee in agents:
            for status in (None, "open", "resolved"):
                want = [
                    c.id for c in order if c.assignee == assignee and status in (None, c.status)
                ]
                for limit in (1, 7, 50):
                    got = walk(s, limit, status=status, assignee=assignee)
                    assert got == want, (assignee, status, limit)
                page = s.page(limit=5, status=status, assignee=assignee)
                assert page.total == len(want)
                assert page.has_more == (len(want) > 5)
                # Every name is Sara's: a search keeps the filter's rows and order.
                assert walk(s, 9, status=status, assignee=assignee, q="SAR") == want
                assert walk(s, 9, status=status, assignee=assignee, q="nobody") == []


def test_an_agent_without_conversations_has_no_index_left_behind():
    s = Snapshot()
    s.load([conv("c_1", 100).with_changes(assignee="a_reem")])
    s.apply([Change(conv("c_1", 200, updated=300).with_changes(assignee=None))])
    assert s.page(limit=10, assignee="a_reem").rows == []
    assert ids(s.page(limit=10, assignee=None)) == ["c_1"]
    assert ("open", "a_reem") not in s._by_group
