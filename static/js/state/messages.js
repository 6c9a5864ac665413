// One conversation's messages (oldest first) as plain data, and pure changes to them.

// Delivery states ranked as the server ranks them (server/models.py STATUS_RANK), so a
// late or repeated status never moves a message backwards.
export const STATUS_RANK = {
  received: 0,
  queued: 1,
  not_sent: 2,
  sent: 3,
  delivered: 4,
  read: 5,
  played: 6,
  failed: 7,
};

/** The status to keep when `incoming` arrives for a message that is `current`. */
export function mergeStatus(current, incoming) {
  if (!incoming) return current;
  if (!current) return incoming;
  return (STATUS_RANK[incoming] ?? -1) > (STATUS_RANK[current] ?? -1) ? incoming : current;
}

/** An empty thread for a conversation; `loaded` turns true with the first page. */
export function emptyThread(conversationId = null) {
  return { conversationId, messages: [], nextCursor: null, hasMore: false, loaded: false };
}

function compareMessages(a, b) {
  const d = (Date.parse(a.at) || 0) - (Date.parse(b.at) || 0);
  if (d !== 0) return d;
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

/** Two copies of one message: the newest content with the furthest status (a newer
 * attempt, an agent's retry, starts its statuses over). */
function mergeMessage(old, incoming) {
  if (!old) return incoming;
  const attempt = (m) => m.attempt ?? 0;
  if (attempt(incoming) > attempt(old)) return { ...old, ...incoming, error: incoming.error ?? null };
  if (attempt(incoming) < attempt(old)) return old;
  const status = mergeStatus(old.status, incoming.status);
  const error = status === incoming.status ? incoming.error ?? old.error : old.error;
  // An older copy (the reply's own answer, after its "sent" event) lacks WhatsApp's id.
  const wa_message_id = incoming.wa_message_id ?? old.wa_message_id ?? null;
  return { ...old, ...incoming, status, error: error ?? null, wa_message_id };
}

function mergeAll(messages, incoming) {
  const byId = new Map(messages.map((m) => [m.id, m]));
  for (const m of incoming) byId.set(m.id, mergeMessage(byId.get(m.id), m));
  return [...byId.values()].sort(compareMessages);
}

/** The newest page of a conversation (what opening it loads). Keeps events that beat it. */
export function setLatestPage(thread, page) {
  return {
    ...thread,
    messages: mergeAll(thread.messages, page.messages || []),
    nextCursor: page.next_cursor ?? null,
    hasMore: Boolean(page.has_more),
    loaded: true,
  };
}

/** An older page (scrolling up): merged by id, in time order. */
export function prependOlder(thread, page) {
  return {
    ...thread,
    messages: mergeAll(thread.messages, page.messages || []),
    nextCursor: page.next_cursor ?? null,
    hasMore: Boolean(page.has_more),
  };
}

/** A message from an event or a reply: appended once; a second copy only merges. */
export function upsertMessage(thread, message) {
  if (!message || message.conversation_id !== thread.conversationId) return thread;
  const index = thread.messages.findIndex((m) => m.id === message.id);
  if (index !== -1) {
    const merged = mergeMessage(thread.messages[index], message);
    const messages = thread.messages.slice();
    messages[index] = merged;
    return { ...thread, messages };
  }
  const messages = thread.messages.slice();
  let i = messages.length;
  while (i > 0 && compareMessages(messages[i - 1], message) > 0) i--;
  messages.splice(i, 0, message);
  return { ...thread, messages };
}

/** A message_status event: the ticks move forward, never back; a failure keeps its error. */
export function applyStatus(thread, event) {
  if (event.conversation_id && event.conversation_id !== thread.conversationId) return thread;
  const index = thread.messages.findIndex((m) => m.id === event.message_id);
  if (index === -1) return thread;
  let old = thread.messages[index];
  if (event.wa_message_id && !old.wa_message_id) {
    // Sent: WhatsApp's id is what the customer's reactions and quotes will name.
    old = { ...old, wa_message_id: event.wa_message_id };
    const messages = thread.messages.slice();
    messages[index] = old;
    thread = { ...thread, messages };
  }
  const attempt = event.attempt ?? 0;
  if (attempt > (old.attempt ?? 0)) {
    const messages = thread.messages.slice();
    messages[index] = { ...old, attempt, status: event.status, error: event.error ?? null };
    return { ...thread, messages };
  }
  if (attempt < (old.attempt ?? 0)) return thread;
  const status = mergeStatus(old.status, event.status);
  if (status === old.status && !(status === event.status && event.error)) return thread;
  const messages = thread.messages.slice();
  messages[index] = {
    ...old,
    status,
    error: status === event.status ? event.error ?? old.error ?? null : old.error ?? null,
  };
  return { ...thread, messages };
}
