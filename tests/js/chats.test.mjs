import assert from "node:assert/strict";
import { test } from "node:test";

import {
  appendPage,
  applyMessageStatus,
  applyNewMessage,
  compareChats,
  emptyList,
  firstPage,
  matchesFilter,
  patchChat,
  reconcileFirstPage,
  TABS,
  tabOf,
  upsertChat,
} from "../../static/js/state/chats.js";

const T0 = Date.parse("2026-11-29T10:00:00.000Z");
const at = (minutes) => new Date(T0 + minutes * 60_000).toISOString();

function chat(id, minutes, extra = {}) {
  return {
    id,
    user_name: `Customer ${id}`,
    phone: `+9665${id.replace(/\D/g, "").padStart(8, "0")}`,
    status: "open",
    unread_count: 0,
    ai_enabled: true,
    last_activity: at(minutes),
    last_message: { id: `m_${id}_${minutes}`, type: "text", text: "hi", direction: "in", sender: "user", at: at(minutes), status: "received" },
    ...extra,
  };
}

// 100 chats, c0 newest; pages of 30 as the API serves them.
const ALL = Array.from({ length: 100 }, (_, i) => chat(`c${String(i).padStart(3, "0")}`, -i));
const page = (from, n = 30, rows = ALL) => ({
  chats: rows.slice(from, from + n),
  next_cursor: from + n < rows.length ? `cur${from + n}` : null,
  has_more: from + n < rows.length,
  total: rows.length,
});
const ids = (s) => s.chats.map((c) => c.id);
const OPEN = { status: "open", q: "" };

test("the first page lists 30 chats in API order", () => {
  const s = firstPage(OPEN, page(0));
  assert.equal(s.chats.length, 30);
  assert.deepEqual(ids(s), ALL.slice(0, 30).map((c) => c.id));
  assert.equal(s.total, 100);
  assert.equal(s.hasMore, true);
  assert.equal(s.nextCursor, "cur30");
});

test("Load More appends the next page; a chat served twice shows once", () => {
  let s = firstPage(OPEN, page(0));
  // c005 got new activity meanwhile and the server put it on page two as well (it cannot
  // with keyset paging, but a merge must not trust that).
  const p2 = page(30);
  p2.chats = [...p2.chats, { ...ALL[5] }];
  s = appendPage(s, p2);
  assert.equal(s.chats.length, 60);
  assert.equal(new Set(ids(s)).size, 60);
  assert.deepEqual(ids(s), ALL.slice(0, 60).map((c) => c.id));
  assert.equal(s.nextCursor, "cur60");
  assert.equal(s.pages, 2);
});

test("a new message moves its chat to the top with the event's summary", () => {
  let s = firstPage(OPEN, page(0));
  const summary = chat("c020", 5, { unread_count: 3, last_message: { id: "m_new", type: "text", text: "where is my order?", direction: "in", sender: "user", at: at(5), status: "received" } });
  s = applyNewMessage(s, { conversation: summary, message: {} });
  assert.equal(s.chats[0].id, "c020");
  assert.equal(s.chats[0].unread_count, 3);
  assert.equal(s.chats[0].last_message.text, "where is my order?");
  assert.equal(s.chats.length, 30);
  assert.equal(new Set(ids(s)).size, 30);
  assert.equal(s.total, 100);
});

test("a new message for a chat not loaded yet puts it on top without changing the total", () => {
  let s = firstPage(OPEN, page(0));
  s = applyNewMessage(s, { conversation: chat("c090", 1) });
  assert.equal(s.chats[0].id, "c090");
  assert.equal(s.chats.length, 31);
  assert.equal(s.total, 100);
});

test("a new conversation is inserted at the top and counted", () => {
  let s = firstPage(OPEN, page(0));
  s = applyNewMessage(s, { conversation: chat("c_new", 2) }, { isNew: true });
  assert.equal(s.chats[0].id, "c_new");
  assert.equal(s.total, 101);
});

test("a new conversation that the filter excludes stays out", () => {
  let s = firstPage({ status: "resolved", q: "" }, page(0, 30, ALL.map((c) => ({ ...c, status: "resolved" }))));
  s = applyNewMessage(s, { conversation: chat("c_new", 2) }, { isNew: true });
  assert.equal(s.chats.some((c) => c.id === "c_new"), false);
  assert.equal(s.total, 100);
});

test("an older event never undoes a fresher local state", () => {
  let s = firstPage(OPEN, page(0));
  s = applyNewMessage(s, { conversation: chat("c010", 5, { unread_count: 2 }) });
  s = upsertChat(s, chat("c010", -10, { unread_count: 0 }));
  assert.equal(s.chats[0].id, "c010");
  assert.equal(s.chats[0].unread_count, 2);
});

test("resolving a chat in the Open tab removes it and lowers the total", () => {
  let s = firstPage(OPEN, page(0));
  s = upsertChat(s, { ...ALL[3], status: "resolved" });
  assert.equal(s.chats.some((c) => c.id === ALL[3].id), false);
  assert.equal(s.total, 99);
});

test("reopening a chat within the loaded range adds it to the Open tab", () => {
  const rows = ALL.slice(0, 40);
  let s = firstPage(OPEN, page(0, 30, rows.filter((c) => c.id !== "c007")));
  assert.equal(s.total, 39);
  s = upsertChat(s, { ...ALL[7] }, { kind: "update" });
  assert.equal(s.chats[7].id, "c007");
  assert.equal(s.total, 40);
});

test("an update to a chat past the loaded pages is left for Load More", () => {
  const s = firstPage(OPEN, page(0));
  assert.equal(upsertChat(s, { ...ALL[80], unread_count: 0 }, { kind: "update" }), s);
});

test("the reconciling refresh merges the first page and keeps the pages loaded after it", () => {
  let s = appendPage(firstPage(OPEN, page(0)), page(30));
  // Since then: c050 got a message (event applied) and c002 was resolved elsewhere.
  s = applyNewMessage(s, { conversation: chat("c050", 3) });
  const fresh = [chat("c050", 3), ...ALL.slice(0, 30).filter((c) => c.id !== "c002")].slice(0, 30);
  s = reconcileFirstPage(s, { chats: fresh, next_cursor: "x", has_more: true, total: 99 });
  assert.equal(s.chats[0].id, "c050");
  assert.equal(s.chats.some((c) => c.id === "c002"), false);
  assert.equal(new Set(ids(s)).size, s.chats.length);
  assert.equal(s.chats.length, 59);
  assert.ok(s.chats.some((c) => c.id === "c059"), "page two is still there");
  assert.equal(s.nextCursor, "cur60", "the cursor of the loaded pages is kept");
  assert.equal(s.total, 99);
});

test("the reconciling refresh of a single page takes the new cursor", () => {
  let s = firstPage(OPEN, page(0));
  s = reconcileFirstPage(s, page(0));
  assert.equal(s.nextCursor, "cur30");
  assert.deepEqual(ids(s), ALL.slice(0, 30).map((c) => c.id));
});

test("a delivery status updates the ticks of the chat's last message only, never backwards", () => {
  const out = chat("c001", 0, { last_message: { id: "m_out", type: "text", text: "ok", direction: "out", sender: "agent", at: at(0), status: "sent" } });
  let s = firstPage(OPEN, { chats: [out], next_cursor: null, has_more: false, total: 1 });
  s = applyMessageStatus(s, { conversation_id: "c001", message_id: "m_out", status: "read" });
  assert.equal(s.chats[0].last_message.status, "read");
  const same = applyMessageStatus(s, { conversation_id: "c001", message_id: "m_out", status: "delivered" });
  assert.equal(same, s);
  assert.equal(applyMessageStatus(s, { conversation_id: "c001", message_id: "other", status: "failed" }), s);
});

test("matchesFilter follows the server: status, then name or phone containing q", () => {
  const c = chat("c123", 0, { user_name: "سارة Haddad", phone: "+966512345678" });
  assert.ok(matchesFilter(c, { status: "open", q: "" }));
  assert.ok(!matchesFilter(c, { status: "resolved", q: "" }));
  assert.ok(matchesFilter(c, { status: "all", q: "hadd" }));
  assert.ok(matchesFilter(c, { status: "all", q: "سارة" }));
  assert.ok(matchesFilter(c, { status: "all", q: "12345" }));
  assert.ok(!matchesFilter(c, { status: "all", q: "omar" }));
});

test("order: newest activity first, then id", () => {
  const a = chat("a", 0);
  const b = chat("b", 0);
  const c = chat("c", 1);
  assert.deepEqual([a, b, c].sort(compareChats).map((x) => x.id), ["c", "a", "b"]);
});

test("patchChat changes one chat in place; the state is never mutated", () => {
  const s = firstPage(OPEN, page(0));
  const before = JSON.stringify(s);
  const t = patchChat(s, "c004", { unread_count: 0 });
  assert.equal(JSON.stringify(s), before);
  assert.equal(t.chats[4].id, "c004");
  assert.equal(patchChat(s, "nope", {}), s);
  assert.deepEqual(emptyList().filter, { status: "open", assignee: null, me: null, q: "", number: null });
});

test("Mine and Unassigned: the filter follows the server's assignee rule", () => {
  const mine = { ...TABS.mine, me: "a_reem", q: "" };
  const unassigned = { ...TABS.unassigned, me: "a_reem", q: "" };
  const ours = chat("c1", 0, { assignee: "a_reem" });
  const theirs = chat("c2", 0, { assignee: "a_nouf" });
  const nobodys = chat("c3", 0, { assignee: null });
  assert.deepEqual([ours, theirs, nobodys].map((c) => matchesFilter(c, mine)), [true, false, false]);
  assert.deepEqual([ours, theirs, nobodys].map((c) => matchesFilter(c, unassigned)), [false, false, true]);
  // Mine lists open conversations only; without a signed-in agent it lists nothing.
  assert.ok(!matchesFilter({ ...ours, status: "resolved" }, mine));
  assert.ok(!matchesFilter(ours, { ...mine, me: null }));
  assert.equal(tabOf(mine), "mine");
  assert.equal(tabOf({ status: "all", assignee: null }), "all");
  assert.equal(tabOf({ status: "resolved", assignee: "me" }), null);
});

test("assigning a chat away moves it out of Mine, and one assigned to me moves in", () => {
  const filter = { ...TABS.mine, me: "a_reem", q: "" };
  const s = firstPage(filter, {
    chats: [chat("c1", 5, { assignee: "a_reem" }), chat("c2", 3, { assignee: "a_reem" })],
    has_more: false,
    total: 2,
  });
  const away = upsertChat(s, chat("c1", 5, { assignee: "a_nouf" }), { kind: "update" });
  assert.deepEqual(away.chats.map((c) => c.id), ["c2"]);
  assert.equal(away.total, 1);
  const back = upsertChat(away, chat("c9", 4, { assignee: "a_reem" }), { kind: "update" });
  assert.deepEqual(back.chats.map((c) => c.id), ["c9", "c2"]);
  assert.equal(back.total, 2);
  const unassigned = upsertChat(back, chat("c9", 4, { assignee: null }), { kind: "update" });
  assert.deepEqual(unassigned.chats.map((c) => c.id), ["c2"]);
});

test("a deleted conversation leaves the list and the total", async () => {
  const { removeChat, firstPage } = await import("../../static/js/state/chats.js");
  const page = {
    chats: [
      { id: "a", status: "open", last_activity: "2026-01-02T00:00:00.000Z" },
      { id: "b", status: "open", last_activity: "2026-01-01T00:00:00.000Z" },
    ],
    total: 2,
    has_more: false,
    next_cursor: null,
  };
  let list = firstPage({ status: "open", q: "" }, page);
  list = removeChat(list, "a");
  assert.deepEqual(list.chats.map((c) => c.id), ["b"]);
  assert.equal(list.total, 1);
  assert.equal(removeChat(list, "zzz"), list);
});
