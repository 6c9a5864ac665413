// The SSE hook: one EventSource for the page, its connection state, and typed events.

export const EVENTS = [
  "new_message",
  "new_conversation",
  "conversation_updated",
  "message_status",
  "conversation_resync",
  "conversation_deleted",
  "resync",
];

// When the browser gives up on a stream (a non-200 answer, say), try again after this long;
// network drops are retried by the EventSource itself every `retry` ms (3 s, from the server).
const REOPEN_MS = 3000;

/**
 * Listen to `url`. `onEvent(name, data)` gets each parsed event; `onState(state)` gets
 * "connecting", "live" or "reconnecting". `onClosed()` is asked before reopening a stream
 * the browser closed for good (return false to stay closed, e.g. when signed out).
 * Returns {close()}.
 */
export function connectEvents(
  url,
  { onEvent, onState, onClosed = async () => true, EventSourceImpl = globalThis.EventSource, setTimer = setTimeout, clearTimer = clearTimeout } = {},
) {
  let source = null;
  let timer = null;
  let closed = false;
  let state = null;
  // The id of the last event seen. The browser sends it back on its own reconnects (the
  // server then replays or says resync); a stream opened anew carries it in the query.
  let lastId = "";
  let dropped = false;

  const setState = (next) => {
    if (next !== state) {
      state = next;
      onState?.(next);
    }
  };

  const open = () => {
    const target = lastId ? `${url}?last_event_id=${encodeURIComponent(lastId)}` : url;
    source = new EventSourceImpl(target, { withCredentials: true });
    source.addEventListener("open", () => {
      setState("live");
      if (dropped && !lastId) {
        // Back after a drop with no event id to resume from: the server cannot know what
        // this page missed, so the page reloads, as if told to resync.
        onEvent?.("resync", {}, "");
      }
      dropped = false;
    });
    source.addEventListener("error", () => {
      if (closed) return;
      dropped = true;
      setState("reconnecting");
      if (source.readyState === 2 /* CLOSED */) {
        source.close();
        source = null;
        timer = setTimer(reopen, REOPEN_MS);
      }
    });
    for (const name of EVENTS) {
      source.addEventListener(name, (e) => {
        let data = {};
        try {
          data = e.data ? JSON.parse(e.data) : {};
        } catch {
          return; // a frame we cannot read is not worth breaking the page for
        }
        if (e.lastEventId) lastId = e.lastEventId;
        onEvent?.(name, data, e.lastEventId);
      });
    }
  };

  const reopen = async () => {
    timer = null;
    if (closed) return;
    let again = true;
    try {
      again = await onClosed();
    } catch {
      again = true;
    }
    if (closed) return;
    if (again) open(); // else the page has stopped listening (signed out)
  };

  setState("connecting");
  open();
  return {
    close() {
      closed = true;
      if (timer !== null) clearTimer(timer);
      source?.close();
      source = null;
    },
    get state() {
      return state;
    },
  };
}
