import assert from "node:assert/strict";
import { test } from "node:test";

import { debounce, manualClock, throttle } from "../../static/js/debounce.js";

test("debounce runs once after calls pause, with the latest arguments", () => {
  const clock = manualClock();
  const calls = [];
  const f = debounce((x) => calls.push([clock.now(), x]), 250, { clock });
  f("a");
  clock.advance(100);
  f("ab");
  clock.advance(100);
  f("abc");
  assert.deepEqual(calls, []);
  clock.advance(249);
  assert.deepEqual(calls, []);
  clock.advance(1);
  assert.deepEqual(calls, [[450, "abc"]]);
  clock.advance(1000);
  assert.equal(calls.length, 1);
});

test("debounce with maxWait still runs during a steady stream", () => {
  const clock = manualClock();
  const runs = [];
  const f = debounce(() => runs.push(clock.now()), 1000, { maxWait: 3000, clock });
  for (let t = 0; t < 7000; t += 200) {
    f();
    clock.advance(200);
  }
  assert.deepEqual(runs, [3000, 6000]);
});

test("debounce cancel and flush", () => {
  const clock = manualClock();
  let n = 0;
  const f = debounce(() => ++n, 100, { clock });
  f();
  assert.equal(f.pending(), true);
  f.cancel();
  clock.advance(500);
  assert.equal(n, 0);
  f();
  assert.equal(f.flush(), 1);
  assert.equal(f.pending(), false);
  clock.advance(500);
  assert.equal(n, 1);
});

test("throttle: 20 calls within one second make one run, 3 s after the first", () => {
  const clock = manualClock();
  const runs = [];
  const refresh = throttle(() => runs.push(clock.now()), 3000, { clock });
  for (let i = 0; i < 20; i++) {
    refresh();
    clock.advance(50);
  }
  assert.deepEqual(runs, []);
  clock.advance(3000);
  assert.deepEqual(runs, [3000]);
});

test("throttle: runs are never closer than the interval under a steady stream", () => {
  const clock = manualClock();
  const runs = [];
  const refresh = throttle(() => runs.push(clock.now()), 3000, { clock });
  for (let t = 0; t < 20_000; t += 137) {
    refresh();
    clock.advance(137);
  }
  clock.advance(3000);
  assert.ok(runs.length >= 6, `ran ${runs.length} times`);
  for (let i = 1; i < runs.length; i++) assert.ok(runs[i] - runs[i - 1] >= 3000, String(runs));
});

test("throttle: a quiet period means no run at all", () => {
  const clock = manualClock();
  let n = 0;
  throttle(() => n++, 3000, { clock });
  clock.advance(60_000);
  assert.equal(n, 0);
  assert.equal(clock.pendingTimers(), 0);
});
