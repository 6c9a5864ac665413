import assert from "node:assert/strict";
import { test } from "node:test";

import { bubbleMessages, quotedOf, reactionsByTarget } from "../../static/js/state/extras.js";
import { complete, fill, paramCount, preview } from "../../static/js/state/templates.js";
import { closingUnanswered, fileSize, formatRemaining, windowState } from "../../static/js/format.js";

const msg = (id, fields = {}) => ({ id, direction: "in", sender: "user", type: "text", text: id, wa_message_id: `wamid.${id}`, ...fields });
const reaction = (id, target, emoji, fields = {}) =>
  msg(id, { type: "reaction", text: emoji, extra: { reacted_to: `wamid.${target}`, removed: !emoji }, ...fields });

test("a reaction shows on its target, the latest of each side, and goes when removed", () => {
  const messages = [
    msg("a"),
    msg("b", { direction: "out", sender: "agent" }),
    reaction("r1", "b", "👍"),
    reaction("r2", "a", "❤️", { direction: "out", sender: "agent", status: "sent" }),
    reaction("r3", "b", "😂"),
  ];
  const map = reactionsByTarget(messages);
  assert.deepEqual(map.get("wamid.b"), { customer: "😂" });
  assert.deepEqual(map.get("wamid.a"), { business: "❤️" });
  // Reactions are drawn on their targets, not as bubbles.
  assert.deepEqual(bubbleMessages(messages).map((m) => m.id), ["a", "b"]);
  // Removed: nothing shows.
  const removed = [...messages, reaction("r4", "b", null)];
  assert.equal(reactionsByTarget(removed).has("wamid.b"), false);
  // A failed reaction never reached the customer.
  const failed = [msg("a"), reaction("r5", "a", "👍", { direction: "out", sender: "agent", status: "failed" })];
  assert.equal(reactionsByTarget(failed).size, 0);
});

test("a reaction to a message pages back stands alone", () => {
  const messages = [msg("a"), reaction("r1", "older", "👍")];
  assert.deepEqual(bubbleMessages(messages).map((m) => m.id), ["a", "r1"]);
});

test("a quoted reply shows the quoted message, or the copy kept with it", () => {
  const messages = [msg("a", { text: "Do you have it in blue?" }), msg("b", { extra: { reply_to: "wamid.a" } })];
  assert.equal(quotedOf(messages[1], messages).text, "Do you have it in blue?");
  const alone = msg("c", { extra: { reply_to: "wamid.gone", quoted: { id: "m1", sender: "agent", type: "text", text: "Yes" } } });
  assert.equal(quotedOf(alone, [alone]).text, "Yes");
  assert.equal(quotedOf(msg("d"), []), null);
});

test("templates: parameters, preview and completeness", () => {
  const t = { header: "Order {{1}}", body: "Hi {{1}}, your order {{2}} is on its way.", footer: "Thanks", parameters: 2, header_parameters: 1 };
  assert.equal(paramCount(t.body), 2);
  assert.equal(paramCount("no variables"), 0);
  assert.equal(fill(t.body, ["Sara"]), "Hi Sara, your order {{2}} is on its way.");
  assert.equal(preview(t, ["Sara", "48213"], ["48213"]), "Order 48213\n\nHi Sara, your order 48213 is on its way.\n\nThanks");
  assert.equal(complete(t, ["Sara", "48213"], ["48213"]), true);
  assert.equal(complete(t, ["Sara", ""], ["48213"]), false);
  assert.equal(complete(t, ["Sara", "two\nlines"], ["x"]), false);
});

test("the window: time left under 2 hours, closed after 24", () => {
  const now = Date.UTC(2026, 10, 29, 12, 0);
  const at = (ms) => new Date(now + ms).toISOString();
  assert.deepEqual(windowState(at(5 * 3600_000), now), { open: true, remainingMs: 5 * 3600_000, label: "" });
  assert.equal(windowState(at(72 * 60_000), now).label, "Window closes in 1h 12m");
  assert.equal(windowState(at(-1), now).open, false);
  assert.equal(windowState(null, now).open, false);
  assert.equal(formatRemaining(42 * 60_000), "42m");
  assert.equal(formatRemaining(20_000), "under a minute");
  const chat = (closesIn, direction) => ({ window_closes_at: at(closesIn), last_message: { direction } });
  assert.equal(closingUnanswered(chat(40 * 60_000, "in"), now), true);
  assert.equal(closingUnanswered(chat(40 * 60_000, "out"), now), false);
  assert.equal(closingUnanswered(chat(3 * 3600_000, "in"), now), false);
  assert.equal(fileSize(1_258_291), "1.2 MB");
  assert.equal(fileSize(2048), "2 KB");
});
