"""The ChatStore contract: every store (SQLite, Firestore) must pass the very same tests."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from server.models import Media, MessageError, now_ms
from server.store.base import (
    AiDisabled,
    Change,
    InboundMessage,
    NotFound,
    UnknownMessage,
    message_id_for_wamid,
)


def inbound(wamid: str, user: str = "966500000001", at: int | None = None, **kw) -> InboundMessage:
    fields = {
        "wa_message_id": wamid,
        "user_id": user,
        "user_name": kw.pop("name", "Sara"),
        "phone": "+" + user,
        "type": "text",
        "text": f"hello {wamid}",
        "at": at if at is not None else now_ms(),
    }
    fields.update(kw)
    return InboundMessage(**fields)


async def test_first_message_opens_a_conversation_and_later_ones_join_it(store):
    first = await store.save_inbound(inbound("wamid.A1", at=1_000_000))
    assert first is not None and first.new_conversation
    c = first.conversation
    assert (c.user_id, c.user_name, c.phone, c.status) == (
        "966500000001",
        "Sara",
        "+966500000001",
        "open",
    )
    assert c.unread_count == 1 and c.ai_enabled and c.last_activity == 1_000_000
    assert first.message.id == message_id_for_wamid("wamid.A1")
    assert first.message.direction == "in" and first.message.sender == "user"

    second = await store.save_inbound(inbound("wamid.A2", at=1_000_500, text="where is it?"))
    assert second is not None and not second.new_conversation
    assert second.conversation.id == c.id
    assert second.conversation.unread_count == 2
    assert second.conversation.last_message.text == "where is it?"
    assert second.conversation.last_activity == 1_000_500
    assert (await store.get_conversation(c.id)) == second.conversation


async def test_a_redelivered_message_is_stored_once_and_changes_nothing(store):
    seen: list[Change] = []
    store.subscribe(seen.extend)
    assert await store.save_inbound(inbound("wamid.dup")) is not None
    before = await store.get_conversation(seen[0].conversation.id)
    for _ in range(4):
        assert await store.save_inbound(inbound("wamid.dup")) is None
    assert len(seen) == 1
    assert await store.get_conversation(before.id) == before
    messages, _ = await store.list_messages(before.id, 50, None)
    assert len(messages) == 1


async def test_concurrent_deliveries_of_one_message_store_it_once(store):
    results = await asyncio.gather(*(store.save_inbound(inbound("wamid.race")) for _ in range(8)))
    saved = [r for r in results if r is not None]
    assert len(saved) == 1
    messages, _ = await store.list_messages(saved[0].conversation.id, 50, None)
    assert [m.wa_message_id for m in messages] == ["wamid.race"]


async def test_a_message_after_resolution_opens_a_new_conversation(store):
    first = await store.save_inbound(inbound("wamid.R1"))
    await store.update_conversation(first.conversation.id, status="resolved")
    again = await store.save_inbound(inbound("wamid.R2"))
    assert again.new_conversation and again.conversation.id != first.conversation.id
    assert (await store.get_conversation(first.conversation.id)).status == "resolved"
    assert await store.count("open") == 1 and await store.count("resolved") == 1
    assert await store.count(None) == 2


async def test_an_agent_reply_is_queued_reads_the_chat_and_turns_the_ai_off(store):
    s = await store.save_inbound(inbound("wamid.G1"))
    reply = await store.save_outbound(
        s.conversation.id, sender="agent", text="On its way", agent_id="reem", take_over=True
    )
    m = reply.message
    assert (m.direction, m.sender, m.status, m.agent_id, m.text) == (
        "out",
        "agent",
        "queued",
        "reem",
        "On its way",
    )
    assert reply.conversation.ai_enabled is False
    assert reply.conversation.unread_count == 0
    assert reply.conversation.last_message.id == m.id
    # The AI's answer, arriving after the agent's, is refused in the same write.
    with pytest.raises(AiDisabled):
        await store.save_outbound(s.conversation.id, sender="ai", text="Hi")
    messages, _ = await store.list_messages(s.conversation.id, 10, None)
    assert [x.sender for x in messages] == ["user", "agent"]


async def test_replying_to_an_unknown_conversation_is_not_found(store):
    with pytest.raises(NotFound):
        await store.save_outbound("c_missing", sender="agent", text="x")
    with pytest.raises(NotFound):
        await store.get_conversation("c_missing")
    with pytest.raises(NotFound):
        await store.update_conversation("c_missing", mark_read=True)
    with pytest.raises(NotFound):
        await store.list_messages("c_missing", 10, None)


async def test_delivery_statuses_only_move_forward(store):
    s = await store.save_inbound(inbound("wamid.S1"))
    out = await store.save_outbound(s.conversation.id, sender="ai", text="Hello")
    sent = await store.set_delivery(out.message.id, status="sent", wa_message_id="wamid.OUT1")
    assert sent.message.status == "sent" and sent.message.wa_message_id == "wamid.OUT1"
    assert sent.conversation.last_message.status == "sent"
    read = await store.apply_status("wamid.OUT1", "read", None)
    assert read.message.status == "read"
    # "delivered" arriving after "read" is late news: ignored.
    assert await store.apply_status("wamid.OUT1", "delivered", None) is None
    with pytest.raises(UnknownMessage):
        await store.apply_status("wamid.unknown", "read", None)
    messages, _ = await store.list_messages(s.conversation.id, 10, None)
    assert messages[-1].status == "read"


async def test_a_failed_send_keeps_its_whatsapp_error(store):
    s = await store.save_inbound(inbound("wamid.F1"))
    out = await store.save_outbound(s.conversation.id, sender="agent", text="late", take_over=True)
    error = MessageError(code=131047, title="Re-engagement message")
    failed = await store.set_delivery(out.message.id, status="failed", error=error)
    assert failed.message.status == "failed" and failed.message.error == error
    messages, _ = await store.list_messages(s.conversation.id, 10, None)
    assert messages[-1].error == error


async def test_messages_page_backwards_and_read_oldest_first(store):
    s = await store.save_inbound(inbound("wamid.P0", at=10_000))
    cid = s.conversation.id
    for i in range(1, 7):
        await store.save_inbound(inbound(f"wamid.P{i}", at=10_000 + i))
    page1, more1 = await store.list_messages(cid, 3, None)
    assert [m.wa_message_id for m in page1] == ["wamid.P4", "wamid.P5", "wamid.P6"] and more1
    page2, more2 = await store.list_messages(cid, 3, (page1[0].at, page1[0].id))
    assert [m.wa_message_id for m in page2] == ["wamid.P1", "wamid.P2", "wamid.P3"] and more2
    page3, more3 = await store.list_messages(cid, 3, (page2[0].at, page2[0].id))
    assert [m.wa_message_id for m in page3] == ["wamid.P0"] and not more3


async def test_every_message_kind_round_trips(store):
    media = Media(id="media-1", mime_type="image/jpeg", caption="the receipt", filename=None)
    at = now_ms()
    s = await store.save_inbound(inbound("wamid.M1", at=at, type="image", text=None, media=media))
    loc = await store.save_inbound(
        inbound(
            "wamid.M2",
            at=at + 1,
            type="location",
            text="Kingdom Centre",
            extra={"latitude": 24.7114, "longitude": 46.6744},
        )
    )
    messages, _ = await store.list_messages(s.conversation.id, 10, None)
    # Its bytes are downloaded in the background: a media task in the same write.
    assert messages[0].media == dataclasses.replace(media, state="pending")
    assert messages[0].type == "image"
    assert s.media_task is not None and s.media_task.kind == "media"
    assert messages[1].extra == {"latitude": 24.7114, "longitude": 46.6744}
    assert loc.conversation.last_message.type == "location"
    # An image without text shows its caption in the list.
    assert s.conversation.last_message.text == "the receipt"


async def test_the_window_and_keyset_pages_follow_list_order(store):
    for i in range(6):
        await store.save_inbound(inbound(f"wamid.W{i}", user=f"96650000010{i}", at=50_000 + i))
    # Two conversations with the same activity time: the id breaks the tie.
    await store.save_inbound(inbound("wamid.Wt", user="966500000199", at=50_005))
    window = await store.load_window(None)
    keys = [(-c.last_activity, c.id) for c in window]
    assert keys == sorted(keys) and len(window) == 7
    assert [c.id for c in await store.load_window(3)] == [c.id for c in window[:3]]
    after = (window[2].last_activity, window[2].id)
    rest = await store.page_after(after, 10, None)
    assert [c.id for c in rest] == [c.id for c in window[3:]]
    await store.update_conversation(window[4].id, status="resolved")
    resolved = await store.page_after(None, 10, "resolved")
    assert [c.id for c in resolved] == [window[4].id]


async def test_updates_change_status_ai_assignee_and_unread(store):
    s = await store.save_inbound(inbound("wamid.U1"))
    cid = s.conversation.id
    c = await store.update_conversation(cid, mark_read=True)
    assert c.unread_count == 0 and c.updated_at > s.conversation.updated_at
    c = await store.update_conversation(cid, ai_enabled=False, assignee="noura")
    assert (c.ai_enabled, c.assignee) == (False, "noura")
    c = await store.update_conversation(cid, assignee=None, status="resolved")
    assert (c.assignee, c.status, c.ai_enabled) == (None, "resolved", False)


async def test_the_change_feed_reports_each_commit_and_stops_on_unsubscribe(store):
    seen: list[Change] = []
    unsubscribe = store.subscribe(seen.extend)
    s = await store.save_inbound(inbound("wamid.C1"))
    await store.update_conversation(s.conversation.id, mark_read=True)
    assert [c.conversation.unread_count for c in seen] == [1, 0]
    assert all(c.conversation.id == s.conversation.id and not c.removed for c in seen)
    unsubscribe()
    await store.save_inbound(inbound("wamid.C2"))
    assert len(seen) == 2


async def test_bulk_import_loads_conversations_with_their_messages(store):
    from server.demo import build_demo

    conversations, messages = build_demo(40)
    await store.import_conversations(conversations, messages)
    assert await store.count(None) == 40
    window = await store.load_window(None)
    assert {c.id for c in window} == {c.id for c in conversations}
    some = conversations[7]
    stored, _ = await store.list_messages(some.id, 50, None)
    assert [m.id for m in stored] == [m.id for m in messages if m.conversation_id == some.id]


async def test_a_failing_write_among_concurrent_ones_fails_alone(store):
    results = await asyncio.gather(
        store.save_inbound(inbound("wamid.X1", user="966500000301")),
        store.save_outbound("c_missing", sender="agent", text="lost"),
        store.save_inbound(inbound("wamid.X2", user="966500000302")),
        return_exceptions=True,
    )
    assert isinstance(results[1], NotFound)
    assert results[0].conversation.id != results[2].conversation.id
    assert await store.count(None) == 2
    for saved in (results[0], results[2]):
        messages, _ = await store.list_messages(saved.conversation.id, 10, None)
        assert [m.id for m in messages] == [saved.message.id]


async def test_a_deleted_conversation_is_gone_with_its_messages_and_its_work(store):
    seen: list[Change] = []
    unsubscribe = store.subscribe(lambda changes: seen.extend(changes))
    saved = await store.save_inbound(inbound("wamid.del-1"))
    reply = await store.save_outbound(saved.conversation.id, sender="agent", text="hi")
    await store.delete_conversation(saved.conversation.id)
    with pytest.raises(NotFound):
        await store.get_conversation(saved.conversation.id)
    with pytest.raises(NotFound):
        await store.get_message(reply.message.id)
    assert await store.claim_tasks(limit=10, kind="send", steal=True) == []
    assert [c.conversation.id for c in seen if c.removed] == [saved.conversation.id]
    assert saved.conversation.id not in [c.id for c in await store.load_window(None)]
    unsubscribe()
    with pytest.raises(NotFound):
        await store.delete_conversation(saved.conversation.id)
