import assert from "node:assert/strict";
import { test } from "node:test";

import {
  applyStatus,
  emptyThread,
  mergeStatus,
  prependOlder,
  setLatestPage,
  upsertMessage,
} from "../../static/js/state/messages.js";

const T0 = Date.parse("2026-11-29T10:00:00.000Z");
const msg = (id, s, extra = {}) => ({
  id,
  conversation_id: "c1",
  direction: "in",
  sender: "user",
  type: "text",
  text: id,
  at: new Date(T0 + s * 1000).toISOString(),
  status: "received",
  error: null,
  ...extra,
});
const ids = (t) => t.messages.map((m) => m.id);

test("the latest page, then older pages above it, oldest first, no duplicates", () => {
  let t = setLatestPage(emptyThread("c1"), { messages: [msg("m3", 3), msg("m4", 4)], next_cursor: "b3", has_more: true });
  assert.equal(t.loaded, true);
  t = prependOlder(t, { messages: [msg("m1", 1), msg("m2", 2), msg("m3", 3)], next_cursor: null, has_more: false });
  assert.deepEqual(ids(t), ["m1", "m2", "m3", "m4"]);
  assert.equal(t.hasMore, false);
});

test("a new message is appended once, however often it arrives", () => {
  let t = setLatestPage(emptyThread("c1"), { messages: [msg("m1", 1)], has_more: false });
  t = upsertMessage(t, msg("m2", 2));
  t = upsertMessage(t, msg("m2", 2));
  assert.deepEqual(ids(t), ["m1", "m2"]);
  assert.equal(upsertMessage(t, { ...msg("x", 5), conversation_id: "other" }), t);
});

test("an event that arrives before the first page is kept", () => {
  let t = upsertMessage(emptyThread("c1"), msg("m9", 9));
  t = setLatestPage(t, { messages: [msg("m1", 1), msg("m2", 2)], has_more: false });
  assert.deepEqual(ids(t), ["m1", "m2", "m9"]);
});

test("statuses only move forward; a failure keeps its WhatsApp error", () => {
  let t = upsertMessage(emptyThread("c1"), msg("o1", 1, { direction: "out", sender: "agent", status: "queued" }));
  t = applyStatus(t, { conversation_id: "c1", message_id: "o1", status: "read" });
  t = applyStatus(t, { conversation_id: "c1", message_id: "o1", status: "delivered" });
  assert.equal(t.messages[0].status, "read");
  const error = { code: 131047, title: "Re-engagement message" };
  t = applyStatus(t, { conversation_id: "c1", message_id: "o1", status: "failed", error });
  assert.equal(t.messages[0].status, "failed");
  assert.deepEqual(t.messages[0].error, error);
});

test("the reply's own answer (queued) does not undo a status the stream already gave", () => {
  let t = upsertMessage(emptyThread("c1"), msg("o1", 1, { direction: "out", sender: "agent", status: "not_sent", error: { code: "not_configured", title: "x" } }));
  t = upsertMessage(t, msg("o1", 1, { direction: "out", sender: "agent", status: "queued" }));
  assert.equal(t.messages[0].status, "not_sent");
  assert.equal(t.messages[0].error.code, "not_configured");
});

test("a retry starts the statuses over; the old attempt's late statuses are ignored", () => {
  const error = { code: "interrupted", title: "x" };
  let t = upsertMessage(emptyThread("c1"), msg("o1", 1, { direction: "out", sender: "agent", status: "failed", error }));
  t = upsertMessage(t, msg("o1", 1, { direction: "out", sender: "agent", status: "queued", attempt: 1 }));
  assert.equal(t.messages[0].status, "queued");
  assert.equal(t.messages[0].error, null);
  t = applyStatus(t, { conversation_id: "c1", message_id: "o1", status: "failed", error, attempt: 0 });
  assert.equal(t.messages[0].status, "queued");
  t = applyStatus(t, { conversation_id: "c1", message_id: "o1", status: "sent", attempt: 1 });
  assert.equal(t.messages[0].status, "sent");
  t = upsertMessage(emptyThread("c1"), msg("o2", 1, { direction: "out", sender: "agent", status: "failed", error }));
  t = applyStatus(t, { conversation_id: "c1", message_id: "o2", status: "queued", attempt: 1, error: null });
  assert.equal(t.messages[0].status, "queued");
});

test("mergeStatus ranks like the server", () => {
  assert.equal(mergeStatus("sent", "delivered"), "delivered");
  assert.equal(mergeStatus("read", "sent"), "read");
  assert.equal(mergeStatus("queued", "not_sent"), "not_sent");
  assert.equal(mergeStatus("delivered", "failed"), "failed");
  assert.equal(mergeStatus(undefined, "sent"), "sent");
});
