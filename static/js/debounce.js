// Timing helpers with an injectable clock, so tests drive time by hand.

/** The real clock: wall time and the browser's (or node's) timers. */
export const systemClock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (handle) => clearTimeout(handle),
};

/**
 * Call `fn` once calls have paused for `wait` ms, with the latest arguments.
 * With `maxWait`, a steady stream of calls still runs `fn` at least that often.
 * Returns the debounced function with cancel(), flush() and pending().
 */
export function debounce(fn, wait, { maxWait = Infinity, clock = systemClock } = {}) {
  let handle = null;
  let firstCall = 0;
  let lastArgs = [];

  const run = () => {
    handle = null;
    const args = lastArgs;
    lastArgs = [];
    return fn(...args);
  };

  function debounced(...args) {
    const now = clock.now();
    lastArgs = args;
    if (handle === null) {
      firstCall = now;
    } else {
      clock.clearTimeout(handle);
    }
    const due = Math.min(now + wait, firstCall + maxWait);
    handle = clock.setTimeout(run, Math.max(0, due - now));
  }

  debounced.cancel = () => {
    if (handle !== null) clock.clearTimeout(handle);
    handle = null;
    lastArgs = [];
  };
  debounced.flush = () => {
    if (handle === null) return undefined;
    clock.clearTimeout(handle);
    return run();
  };
  debounced.pending = () => handle !== null;
  return debounced;
}

/**
 * Run `fn` at most once every `interval` ms, on the trailing edge: the first call of a
 * quiet period schedules one run `interval` ms later, and calls until then join that run.
 * Two runs are therefore always at least `interval` ms apart.
 * Returns the throttled function with cancel(), flush() and pending().
 */
export function throttle(fn, interval, { clock = systemClock } = {}) {
  let handle = null;
  let lastArgs = [];

  const run = () => {
    handle = null;
    const args = lastArgs;
    lastArgs = [];
    return fn(...args);
  };

  function throttled(...args) {
    lastArgs = args;
    if (handle === null) handle = clock.setTimeout(run, interval);
  }

  throttled.cancel = () => {
    if (handle !== null) clock.clearTimeout(handle);
    handle = null;
    lastArgs = [];
  };
  throttled.flush = () => {
    if (handle === null) return undefined;
    clock.clearTimeout(handle);
    return run();
  };
  throttled.pending = () => handle !== null;
  return throttled;
}

/** A clock for tests: time moves only when advance() is called. */
export function manualClock(start = 0) {
  let now = start;
  let nextId = 1;
  const timers = new Map();
  return {
    now: () => now,
    setTimeout(fn, ms) {
      const id = nextId++;
      timers.set(id, { at: now + Math.max(0, ms), fn });
      return id;
    },
    clearTimeout(id) {
      timers.delete(id);
    },
    /** Move time forward, running each timer that falls due, in order. */
    advance(ms) {
      const end = now + ms;
      for (;;) {
        let nextKey = null;
        let next = null;
        for (const [id, t] of timers) {
          if (t.at <= end && (next === null || t.at < next.at)) {
            nextKey = id;
            next = t;
          }
        }
        if (next === null) break;
        timers.delete(nextKey);
        now = next.at;
        next.fn();
      }
      now = end;
    },
    pendingTimers: () => timers.size,
  };
}
