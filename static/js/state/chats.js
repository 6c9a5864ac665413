// The unified chat list as plain data, and every change to it as a pure function.
// A state is never mutated: each function returns a new state (or the same one when
// nothing changed), so the view can tell what to redraw by identity.

import { customerKey, matchesCustomer, parse } from "../search.js";
import { mergeStatus } from "./messages.js";

export const STATUSES = ["open", "resolved", "all"];

/**
 * The list's tabs, each a filter: a status, and for Mine and Unassigned an assignee
 * ("me": the signed-in agent, "none": nobody), as the API takes them.
 */
export const TABS = {
  open: { status: "open", assignee: null },
  mine: { status: "open", assignee: "me" },
  unassigned: { status: "open", assignee: "none" },
  resolved: { status: "resolved", assignee: null },
  all: { status: "all", assignee: null },
};

/** The tab a filter is (null when none matches). */
export function tabOf(filter) {
  for (const [name, tab] of Object.entries(TABS)) {
    if (tab.status === filter.status && tab.assignee === (filter.assignee ?? null)) return name;
  }
  return null;
}

/**
 * An empty list for a filter: {status: open|resolved|all, assignee: null|"me"|"none",
 * me: the signed-in agent's id (what "me" means), q, number: a business number or null}.
 */
export function emptyList(filter = { status: "open", q: "" }) {
  return {
    filter: {
      status: filter.status || "open",
      assignee: filter.assignee ?? null,
      me: filter.me ?? null,
      q: (filter.q || "").trim(),
      number: filter.number || null,
    },
    chats: [],
    nextCursor: null,
    hasMore: false,
    total: 0,
    pages: 0,
  };
}

function activity(chat) {
  return Date.parse(chat.last_activity) || 0;
}

/** The list order of the API: newest activity first, then id ascending. */
export function compareChats(a, b) {
  const d = activity(b) - activity(a);
  if (d !== 0) return d;
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

/** Whether a chat belongs in the list under `filter` (the server's rules: status, assignee,
 * name/phone). */
export function matchesFilter(chat, filter) {
  if (filter.status && filter.status !== "all" && chat.status !== filter.status) return false;
  if (filter.assignee === "me" && (!filter.me || chat.assignee !== filter.me)) return false;
  if (filter.assignee === "none" && chat.assignee) return false;
  const q = (filter.q || "").trim();
  if (!q) return true;
  return matchesCustomer(parse(q), customerKey(chat.user_name, chat.phone));
}

/** The newer of two copies of one chat: a page never undoes a fresher local event. */
function fresher(local, incoming) {
  if (!local) return incoming;
  return activity(local) > activity(incoming) ? local : incoming;
}

function mergeById(chats, incoming) {
  const byId = new Map(chats.map((c) => [c.id, c]));
  for (const chat of incoming) byId.set(chat.id, fresher(byId.get(chat.id), chat));
  return [...byId.values()].sort(compareChats);
}

/** The first page of a filter: replaces whatever was shown. */
export function firstPage(filter, page) {
  const chats = mergeById([], page.chats || []);
  return {
    ...emptyList(filter),
    chats,
    nextCursor: page.next_cursor ?? null,
    hasMore: Boolean(page.has_more),
    total: page.total ?? chats.length,
    pages: 1,
  };
}

/** Load More: append the next page, merged by id so nothing shows twice. */
export function appendPage(state, page) {
  return {
    ...state,
    chats: mergeById(state.chats, page.chats || []),
    nextCursor: page.next_cursor ?? null,
    hasMore: Boolean(page.has_more),
    total: page.total ?? state.total,
    pages: state.pages + 1,
  };
}

/**
 * The reconciling refresh: a fresh first page is merged in, not swapped in, so the pages
 * an agent already loaded stay. The page is the truth for the range it covers: a chat the
 * list holds inside that range that the page no longer has has left the filter.
 */
export function reconcileFirstPage(state, page) {
  const fresh = page.chats || [];
  const freshIds = new Set(fresh.map((c) => c.id));
  const last = fresh[fresh.length - 1];
  const covered = (chat) =>
    !page.has_more || (last !== undefined && compareChats(chat, last) <= 0);
  const kept = state.chats.filter((chat) => freshIds.has(chat.id) || !covered(chat));
  const onlyFirst = state.pages <= 1;
  return {
    ...state,
    chats: mergeById(kept, fresh),
    // Keyset cursors stay valid: keep ours when the agent has paged further than page one.
    nextCursor: onlyFirst ? page.next_cursor ?? null : state.nextCursor,
    hasMore: onlyFirst ? Boolean(page.has_more) : state.hasMore,
    total: page.total ?? state.total,
    pages: Math.max(1, state.pages),
  };
}

/** Whether `chat` sorts inside the part of the list loaded so far. */
function withinLoaded(state, chat) {
  if (!state.hasMore) return true;
  const last = state.chats[state.chats.length - 1];
  return last !== undefined && compareChats(chat, last) <= 0;
}

/**
 * A conversation summary from an event: put it in its place (the top, for new activity),
 * drop it when it no longer fits the filter, and keep the total honest.
 * `kind`: "new" (new_conversation), "message" (new_message) or "update"
 * (conversation_updated, or a summary an action returned).
 */
export function upsertChat(state, chat, { kind = "update" } = {}) {
  const index = state.chats.findIndex((c) => c.id === chat.id);
  const present = index !== -1;
  if (!matchesFilter(chat, state.filter)) {
    if (!present) return state;
    return {
      ...state,
      chats: state.chats.filter((c) => c.id !== chat.id),
      total: Math.max(0, state.total - 1),
    };
  }
  if (present) {
    const chats = state.chats.slice();
    const [old] = chats.splice(index, 1);
    return { ...state, chats: insertSorted(chats, fresher(old, chat)) };
  }
  let added;
  if (kind === "new") {
    added = 1; // never counted before
  } else if (kind === "message") {
    // New activity puts it at the top. When more pages exist it was counted further
    // down; when the list was complete and lacked it, it has just entered the filter.
    added = state.hasMore ? 0 : 1;
  } else if (withinLoaded(state, chat)) {
    added = 1; // inside the loaded range yet absent: it was outside the filter before
  } else {
    return state; // an older chat changed further down; Load More brings it
  }
  return { ...state, chats: insertSorted(state.chats, chat), total: state.total + added };
}

function insertSorted(chats, chat) {
  const out = chats.slice();
  let i = 0;
  while (i < out.length && compareChats(out[i], chat) < 0) i++;
  out.splice(i, 0, chat);
  return out;
}

/** A new message event: the chat moves to the top with the event's summary. */
export function applyNewMessage(state, event, { isNew = false } = {}) {
  const conversation = event.conversation;
  if (!conversation) return state;
  return upsertChat(state, conversation, { kind: isNew ? "new" : "message" });
}

/** A delivery status for a message: the list shows ticks for the last message only. */
export function applyMessageStatus(state, event) {
  const index = state.chats.findIndex((c) => c.id === event.conversation_id);
  if (index === -1) return state;
  const chat = state.chats[index];
  const last = chat.last_message;
  if (!last || last.id !== event.message_id) return state;
  const status = mergeStatus(last.status, event.status);
  if (status === last.status) return state;
  const chats = state.chats.slice();
  chats[index] = { ...chat, last_message: { ...last, status } };
  return { ...state, chats };
}

/** A conversation was deleted: it leaves the list and the total. */
export function removeChat(state, id) {
  if (!state.chats.some((c) => c.id === id)) return state;
  return { ...state, chats: state.chats.filter((c) => c.id !== id), total: Math.max(0, state.total - 1) };
}

/** Patch one chat in place without moving it (used for local, optimistic changes). */
export function patchChat(state, id, changes) {
  const index = state.chats.findIndex((c) => c.id === id);
  if (index === -1) return state;
  const chats = state.chats.slice();
  chats[index] = { ...chats[index], ...changes };
  return { ...state, chats };
}

/** Find a chat by id. */
export function findChat(state, id) {
  return state.chats.find((c) => c.id === id) || null;
}
