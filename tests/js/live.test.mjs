import assert from "node:assert/strict";
import { test } from "node:test";

import { connectEvents } from "../../static/js/live.js";

// A stand-in for the browser's EventSource: the test plays the server.
class FakeEventSource {
  static instances = [];
  constructor(url, init) {
    this.url = url;
    this.init = init;
    this.readyState = 0;
    this.listeners = new Map();
    this.closed = false;
    FakeEventSource.instances.push(this);
  }
  addEventListener(name, fn) {
    if (!this.listeners.has(name)) this.listeners.set(name, []);
    this.listeners.get(name).push(fn);
  }
  emit(name, event = {}) {
    for (const fn of this.listeners.get(name) || []) fn(event);
  }
  close() {
    this.closed = true;
    this.readyState = 2;
  }
}

function setup(options = {}) {
  FakeEventSource.instances = [];
  const states = [];
  const events = [];
  const timers = [];
  const conn = connectEvents("/api/live-chat/events", {
    onEvent: (name, data, id) => events.push([name, data, id]),
    onState: (s) => states.push(s),
    EventSourceImpl: FakeEventSource,
    setTimer: (fn, ms) => timers.push({ fn, ms }),
    clearTimer: () => {},
    ...options,
  });
  return { conn, states, events, timers, source: () => FakeEventSource.instances.at(-1) };
}

test("one stream with the cookie; connecting, live, reconnecting, live", () => {
  const { states, source } = setup();
  assert.equal(FakeEventSource.instances.length, 1);
  assert.equal(source().url, "/api/live-chat/events");
  assert.deepEqual(source().init, { withCredentials: true });
  source().readyState = 1;
  source().emit("open");
  source().readyState = 0; // the browser retries by itself
  source().emit("error");
  source().emit("open");
  assert.deepEqual(states, ["connecting", "live", "reconnecting", "live"]);
  assert.equal(FakeEventSource.instances.length, 1, "the browser's own retry, no new stream");
});

test("named events arrive parsed, with their ids; a broken frame is skipped", () => {
  const { events, source } = setup();
  source().emit("new_message", { data: '{"conversation":{"id":"c1"}}', lastEventId: "i-1" });
  source().emit("resync", { data: "{}", lastEventId: "i-2" });
  source().emit("new_message", { data: "{oops" });
  assert.deepEqual(events, [
    ["new_message", { conversation: { id: "c1" } }, "i-1"],
    ["resync", {}, "i-2"],
  ]);
});

test("a stream the browser gave up on is reopened after a pause, unless signed out", async () => {
  let allowed = true;
  const { timers, source, conn } = setup({ onClosed: async () => allowed });
  const first = source();
  first.readyState = 2;
  first.emit("error");
  assert.equal(timers.length, 1);
  assert.equal(timers[0].ms, 3000);
  await timers[0].fn();
  assert.equal(FakeEventSource.instances.length, 2);
  allowed = false;
  source().readyState = 2;
  source().emit("error");
  await timers[1].fn();
  assert.equal(FakeEventSource.instances.length, 2, "signed out: no new stream");
  conn.close();
});

test("a reconnect with no event id to resume from reloads, as a resync would", () => {
  const { events, source } = setup();
  source().emit("open");
  assert.deepEqual(events, [], "the first connection needs nothing");
  source().emit("error");
  source().emit("open");
  assert.deepEqual(events, [["resync", {}, ""]]);
});

test("a reconnect that can resume leaves it to the server", () => {
  const { events, source } = setup();
  source().emit("open");
  source().emit("conversation_updated", { data: "{}", lastEventId: "i-7" });
  source().emit("error");
  source().emit("open");
  assert.deepEqual(events.map((e) => e[0]), ["conversation_updated"]);
});

test("a stream opened anew resumes from the last id through the query", async () => {
  const { timers, source } = setup();
  source().emit("open");
  source().emit("new_message", { data: "{}", lastEventId: "abc-12" });
  source().readyState = 2;
  source().emit("error");
  await timers[0].fn();
  assert.equal(source().url, "/api/live-chat/events?last_event_id=abc-12");
});

test("close() ends the stream", () => {
  const { conn, source } = setup();
  conn.close();
  assert.equal(source().closed, true);
});
