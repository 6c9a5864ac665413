import assert from "node:assert/strict";
import { test } from "node:test";

import {
  authorLabel,
  countLabel,
  errorText,
  initials,
  textDirection,
  mediaLabel,
  previewText,
  relativeTime,
  speakerLabel,
  tick,
  windowOpen,
} from "../../static/js/format.js";

const NOW = new Date(2026, 10, 29, 15, 0, 0).getTime(); // local time, Sunday 29 Nov 2026

test("relative times for the list", () => {
  const ago = (ms) => new Date(NOW - ms).toISOString();
  assert.equal(relativeTime(ago(20_000), NOW), "now");
  assert.equal(relativeTime(ago(5 * 60_000), NOW), "5m");
  assert.equal(relativeTime(ago(3 * 3600_000), NOW), "3h");
  assert.equal(relativeTime(new Date(2026, 10, 28, 23, 0).toISOString(), NOW), "Yesterday");
  assert.equal(relativeTime(new Date(2026, 10, 25, 9, 0).toISOString(), NOW), "Wed");
  assert.equal(relativeTime(new Date(2026, 9, 2, 9, 0).toISOString(), NOW), "2 Oct");
  assert.equal(relativeTime(new Date(2025, 9, 2, 9, 0).toISOString(), NOW), "2 Oct 2025");
});

test("who spoke last", () => {
  assert.equal(speakerLabel("user"), "Customer");
  assert.equal(speakerLabel("ai"), "AI");
  assert.equal(speakerLabel("agent"), "Agent");
  const names = new Map([["a_reem", "Reem"]]);
  assert.equal(authorLabel({ sender: "agent", agent_id: "a_reem" }, "Sara", names), "Agent · Reem");
  // An id the page cannot name is never shown raw.
  assert.equal(authorLabel({ sender: "agent", agent_id: "a_gone" }, "Sara", names), "Agent");
  assert.equal(authorLabel({ sender: "agent", agent_id: null }, "Sara", names), "Agent");
  assert.equal(authorLabel({ sender: "ai" }), "AI assistant");
  assert.equal(authorLabel({ sender: "user" }, "Sara"), "Sara");
});

test("ticks follow the delivery status", () => {
  assert.equal(tick("sent").glyph, "✓");
  assert.equal(tick("delivered").glyph, "✓✓");
  assert.equal(tick("read").label, "Read");
  assert.equal(tick("queued").glyph, "clock");
  assert.equal(tick("failed").label, "Failed");
  assert.equal(tick("received"), null);
});

test("a failed message explains the 24-hour window", () => {
  const text = errorText({ code: 131047, title: "Re-engagement message" });
  assert.match(text, /outside the 24-hour window/i);
  assert.match(text, /131047/);
  assert.equal(errorText({ code: "not_configured", title: "WhatsApp is not configured" }), "WhatsApp is not configured (not_configured)");
  assert.equal(errorText(null), "Not delivered");
  const worded = "Outside the 24-hour customer-service window: more than 24 hours since the customer's last message";
  assert.equal(errorText({ code: 131047, title: worded }), `${worded} (131047)`);
});

test("media placeholders and previews", () => {
  assert.equal(mediaLabel({ type: "image" }), "Photo");
  assert.equal(mediaLabel({ type: "audio", extra: { voice: true } }), "Voice message");
  assert.equal(mediaLabel({ type: "document", media: { filename: "invoice.pdf" } }), "Document · invoice.pdf");
  assert.equal(mediaLabel({ type: "location", extra: { name: "Riyadh Park" } }), "Location · Riyadh Park");
  assert.equal(mediaLabel({ type: "location", extra: { latitude: 24.7136, longitude: 46.6753 } }), "Location · 24.7136, 46.6753");
  assert.equal(previewText({ type: "video", text: null }), "Video");
  assert.equal(previewText({ type: "image", text: "look" }), "look");
  assert.equal(previewText(null), "No messages yet");
});

test("initials in either script", () => {
  assert.equal(initials("Sara Haddad"), "SH");
  assert.equal(initials("سارة العتيبي"), "س");
  assert.equal(initials("سلطان Brown"), "س");
  assert.equal(initials(""), "?");
});

test("text direction from the first strong letter", () => {
  assert.equal(textDirection("مرحبا order 5"), "rtl");
  assert.equal(textDirection("48213 طلب"), "rtl");
  assert.equal(textDirection("Order مرحبا"), "ltr");
  assert.equal(textDirection(""), "ltr");
});

test("the 24-hour window and counts", () => {
  assert.equal(windowOpen(new Date(NOW - 3600_000).toISOString(), NOW), true);
  assert.equal(windowOpen(new Date(NOW - 25 * 3600_000).toISOString(), NOW), false);
  assert.equal(windowOpen(null, NOW), false);
  assert.equal(countLabel(300, "open"), "300 open conversations");
  assert.equal(countLabel(1, "all"), "1 conversation");
  assert.equal(countLabel(4, "open", "me"), "4 open conversations assigned to you");
  assert.equal(countLabel(1, "open", "none"), "1 open unassigned conversation");
});
