// The dashboard: wires the API, the event stream and the pure state modules to the views.
// State changes happen only in state/*.js; this file decides when, and redraws.

import { api } from "./api.js";
import { debounce, throttle } from "./debounce.js";
import { h } from "./dom.js";
import { agentName, countLabel, windowState } from "./format.js";
import { connectEvents } from "./live.js";
import {
  appendPage,
  applyMessageStatus,
  removeChat,
  applyNewMessage,
  emptyList,
  findChat,
  firstPage,
  patchChat,
  reconcileFirstPage,
  TABS,
  tabOf,
  upsertChat,
} from "./state/chats.js";
import { applyStatus, emptyThread, prependOlder, setLatestPage, upsertMessage } from "./state/messages.js";
import { addResults, emptyResults, resultsUnavailable, updateConversation as updateHits } from "./state/results.js";
import { avatar, createChatList } from "./views/chatlist.js";
import { createLightbox } from "./views/media.js";
import { createResults } from "./views/results.js";
import { createTemplatePicker } from "./views/templates.js";
import { REACTIONS, createThread } from "./views/thread.js";

// After live events the list is re-read at most once every 3 s, to reconcile.
const RECONCILE_MS = 3000;
// Typing in the search box waits for a pause before asking the server.
const SEARCH_MS = 250;
// A message arriving in the open conversation is marked read after this pause, so a burst
// costs one request.
const MARK_READ_MS = 1000;
const PAGE_SIZE = 30;
const HITS_SIZE = 20;
// Opening a conversation at an old message reads back at most this many pages of 200.
const FIND_PAGES = 25;

const $ = (id) => document.getElementById(id);

const ui = {
  signin: $("signin"),
  signinForm: $("signin-form"),
  email: $("email"),
  password: $("password"),
  signinError: $("signin-error"),
  app: $("app"),
  conn: $("conn"),
  me: $("me"),
  signout: $("signout"),
  inbox: $("inbox"),
  search: $("search"),
  tabs: [...document.querySelectorAll("#tabs [data-tab]")],
  total: $("total"),
  listScroll: $("list-scroll"),
  results: $("results"),
  hits: $("hits"),
  resultsNote: $("results-note"),
  moreHits: $("more-hits"),
  chatList: $("chat-list"),
  listEmpty: $("list-empty"),
  loadMore: $("load-more"),
  sentinel: $("list-sentinel"),
  convoEmpty: $("convo-empty"),
  convo: $("convo-main"),
  back: $("back"),
  convoAvatar: $("convo-avatar"),
  convoName: $("convo-name"),
  convoSub: $("convo-sub"),
  aiSwitch: $("ai-switch"),
  resolve: $("resolve"),
  assignee: $("assignee"),
  take: $("take"),
  messages: $("messages"),
  olderStatus: $("older-status"),
  messageList: $("message-list"),
  windowNotice: $("window-notice"),
  windowCountdown: $("window-countdown"),
  windowTemplate: $("window-template"),
  numberFilter: $("number-filter"),
  replyBar: $("reply-bar"),
  replyText: $("reply-text"),
  replyCancel: $("reply-cancel"),
  attachmentBar: $("attachment"),
  attachmentName: $("attachment-name"),
  attachmentRemove: $("attachment-remove"),
  attach: $("attach"),
  fileInput: $("file-input"),
  templateOpen: $("template-open"),
  reactMenu: $("react-menu"),
  composer: $("composer"),
  composerText: $("composer-text"),
  send: $("send"),
  toast: $("toast"),
};

const state = {
  me: null, // the signed-in agent
  team: [], // every agent, for assigning and for naming who replied
  names: new Map(), // agent id -> name (a new Map whenever the team changes)
  list: emptyList({ ...TABS.open, q: "" }),
  listLoading: false,
  listSeq: 0, // a newer list request makes older answers moot
  thread: emptyThread(null),
  results: emptyResults(""),
  resultsLoading: false,
  resultsSeq: 0,
  focusMessage: null, // a message to show (a search hit), once it is in the thread
  activeId: null,
  activeChat: null, // the open conversation's summary, even when the filter hides it
  olderLoading: false,
  sending: false,
  stickToBottom: false, // the next draw scrolls the messages to the newest
  replyTo: null, // the message the next reply answers
  attachment: null, // a File the next reply sends
};

let events = null;
let clockTimer = null;

const chatList = createChatList(ui.chatList, { onOpen: (id) => openConversation(id) });
const hitList = createResults(ui.hits, { onOpen: (id, messageId) => openConversation(id, { messageId }) });
const lightbox = createLightbox($("lightbox"));
const thread = createThread(ui.messageList, { onZoom: (src, label) => lightbox.open(src, label) });
const templatePicker = createTemplatePicker($("template-picker"), {
  load: async () => (await api.templates()).templates,
  onSend: (template) => sendTemplate(template),
});
ui.messageList.addEventListener("click", (event) => {
  const retry = event.target.closest("button[data-retry]");
  if (retry) retryReply(retry.dataset.retry);
  const reply = event.target.closest("button[data-reply]");
  if (reply) setReplyTo(reply.dataset.reply);
  const react = event.target.closest("button[data-react]");
  if (react) openReactMenu(react);
});

// ---------- drawing ----------

let drawQueued = false;
function draw() {
  if (drawQueued) return;
  drawQueued = true;
  queueMicrotask(() => {
    drawQueued = false;
    drawList();
    drawResults();
    drawConversation();
  });
}

function drawResults() {
  const r = state.results;
  ui.results.hidden = !r.q;
  if (!r.q) return;
  hitList.render(r.hits);
  let note = "";
  if (r.unavailable) note = "Message text cannot be searched on this server.";
  else if (r.loaded && !r.hits.length) note = `No messages match “${r.q}”.`;
  else if (!r.loaded) note = "Searching messages…";
  ui.resultsNote.hidden = !note;
  ui.resultsNote.textContent = note;
  ui.moreHits.hidden = !r.hasMore;
  ui.moreHits.disabled = state.resultsLoading;
}

function drawList() {
  const { list } = state;
  const tab = tabOf(list.filter);
  chatList.render(list.chats, { activeId: state.activeId, names: state.names });
  ui.chatList.dataset.filter = tab || list.filter.status;
  ui.total.textContent =
    state.listLoading && list.pages === 0
      ? "Loading…"
      : countLabel(list.total, list.filter.status, list.filter.assignee);
  ui.loadMore.hidden = !list.hasMore;
  ui.loadMore.disabled = state.listLoading;
  ui.loadMore.textContent = state.listLoading && list.pages > 0 ? "Loading…" : "Load more";
  const empty = list.pages > 0 && list.chats.length === 0;
  ui.listEmpty.hidden = !empty;
  ui.listEmpty.textContent = list.filter.q ? `No conversations match “${list.filter.q}”.` : "No conversations here yet.";
  for (const button of ui.tabs) {
    const selected = button.dataset.tab === tab;
    button.setAttribute("aria-selected", String(selected));
    button.tabIndex = selected ? 0 : -1;
  }
}

// The assignee picker is rebuilt only when the team or the conversation's assignee changes,
// never under an agent's open dropdown for an unrelated redraw.
let assigneeKey = null;
function drawAssignee(chat) {
  const me = state.me;
  const key = `${chat.id}|${chat.assignee}|${state.team.length}|${[...state.names.values()].join(",")}`;
  ui.take.hidden = !me || chat.assignee === me.id;
  if (key === assigneeKey) return;
  assigneeKey = key;
  const options = [h("option", { value: "" }, "Unassigned")];
  const enabled = state.team.filter((a) => !a.disabled);
  if (me) options.push(h("option", { value: me.id }, `Me · ${me.name}`));
  for (const agent of enabled.sort((a, b) => a.name.localeCompare(b.name))) {
    if (!me || agent.id !== me.id) options.push(h("option", { value: agent.id }, agent.name));
  }
  if (chat.assignee && !options.some((o) => o.value === chat.assignee)) {
    // Assigned to someone who cannot be picked (disabled, or not on this page's list yet).
    const name = agentName(chat.assignee, state.names) || "another agent";
    options.push(h("option", { value: chat.assignee, disabled: true }, name));
  }
  ui.assignee.replaceChildren(...options);
  ui.assignee.value = chat.assignee || "";
}

function drawConversation() {
  const chat = state.activeChat;
  ui.convoEmpty.hidden = chat !== null;
  ui.convo.hidden = chat === null;
  if (!chat) return;
  ui.convoAvatar.replaceChildren(avatar(chat, "avatar avatar-lg"));
  ui.convoName.textContent = chat.user_name || chat.phone;
  ui.convoSub.replaceChildren(
    h("span", { dir: "ltr" }, chat.phone || ""),
    h("span", { class: `status status-${chat.status} status-shown` }, chat.status === "resolved" ? "Resolved" : "Open"),
  );
  ui.aiSwitch.setAttribute("aria-checked", String(Boolean(chat.ai_enabled)));
  ui.aiSwitch.title = chat.ai_enabled ? "The AI answers this customer; switch off to take over" : "The AI is off: agents answer";
  ui.resolve.textContent = chat.status === "resolved" ? "Reopen" : "Resolve";
  ui.resolve.dataset.action = chat.status === "resolved" ? "reopen" : "resolve";
  drawComposer(chat);
  drawAssignee(chat);

  const box = ui.messages;
  const before = { height: box.scrollHeight, top: box.scrollTop };
  const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 120;
  const firstId = ui.messageList.querySelector(".msg")?.dataset.id;
  thread.render(state.thread.messages, { customerName: chat.user_name, names: state.names });
  ui.olderStatus.textContent = !state.thread.loaded
    ? "Loading messages…"
    : state.olderLoading
      ? "Loading earlier messages…"
      : state.thread.hasMore
        ? ""
        : state.thread.messages.length
          ? "Start of the conversation"
          : "No messages yet";
  const newFirstId = ui.messageList.querySelector(".msg")?.dataset.id;
  if (state.stickToBottom) {
    box.scrollTop = box.scrollHeight;
    state.stickToBottom = false;
  } else if (firstId && newFirstId !== firstId) {
    // Older messages went in above: keep what the agent was reading where it was.
    box.scrollTop = before.top + (box.scrollHeight - before.height);
  } else if (nearBottom) {
    box.scrollTop = box.scrollHeight;
  }
  if (state.focusMessage) {
    // A search hit was opened: show that message, marked, once it is in the thread.
    const el = ui.messageList.querySelector(`.msg[data-id="${CSS.escape(state.focusMessage)}"]`);
    if (el) {
      state.focusMessage = null;
      for (const old of ui.messageList.querySelectorAll(".msg-found")) old.classList.remove("msg-found");
      el.classList.add("msg-found");
      el.scrollIntoView({ block: "center" });
    }
  }
}

function drawComposer(chat) {
  const win = windowState(chat.window_closes_at);
  ui.windowNotice.hidden = win.open;
  ui.windowCountdown.hidden = !win.label || !win.open;
  ui.windowCountdown.textContent = win.open ? win.label : "";
  ui.composerText.disabled = !win.open;
  ui.composerText.placeholder = win.open
    ? state.attachment
      ? "Add a caption…"
      : "Write a reply…"
    : "The 24-hour window has closed: send a template";
  ui.attach.disabled = !win.open;
  ui.send.disabled = !win.open || state.sending;
  ui.templateOpen.classList.toggle("primary", !win.open);
  ui.templateOpen.classList.toggle("secondary", win.open);
  ui.composer.dataset.window = win.open ? "open" : "closed";
  const replying = state.replyTo && state.thread.messages.find((m) => m.id === state.replyTo);
  ui.replyBar.hidden = !replying;
  ui.replyText.textContent = replying ? replying.text || replying.media?.caption || replying.media?.filename || "a message" : "";
  ui.attachmentBar.hidden = !state.attachment;
  ui.attachmentName.textContent = state.attachment ? `${state.attachment.name || "file"} (${Math.max(1, Math.round(state.attachment.size / 1024))} KB)` : "";
}

function toast(message) {
  ui.toast.textContent = message;
  ui.toast.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (ui.toast.hidden = true), 5000);
}

function setConnection(connState) {
  ui.conn.dataset.state = connState;
  ui.conn.querySelector(".label").textContent =
    connState === "live" ? "Live" : connState === "reconnecting" ? "Reconnecting…" : "Connecting…";
}

function setView(view) {
  ui.inbox.dataset.view = view;
}

// ---------- the list ----------

async function loadList() {
  const seq = ++state.listSeq;
  const filter = state.list.filter;
  state.list = emptyList(filter);
  state.listLoading = true;
  draw();
  try {
    const page = await api.chats({ ...listQuery(filter), limit: PAGE_SIZE });
    if (seq !== state.listSeq) return;
    // Events that arrived while the page was on its way are kept (merged by id).
    state.list = firstPage(filter, { ...page, chats: [...state.list.chats, ...page.chats] });
  } catch (e) {
    if (seq === state.listSeq) handleError(e, "The conversations could not be loaded");
  } finally {
    if (seq === state.listSeq) state.listLoading = false;
    draw();
    // A screen taller than the first page: the next one follows (measured once drawn).
    requestAnimationFrame(() => {
      if (seq === state.listSeq && sentinelNear()) loadMore();
    });
  }
}

async function loadMore() {
  const { list } = state;
  if (state.listLoading || !list.hasMore || !list.nextCursor) return;
  const seq = state.listSeq;
  state.listLoading = true;
  draw();
  try {
    const page = await api.chats({ ...listQuery(list.filter), cursor: list.nextCursor, limit: PAGE_SIZE });
    if (seq === state.listSeq) state.list = appendPage(state.list, page);
  } catch (e) {
    handleError(e, "More conversations could not be loaded");
  } finally {
    if (seq === state.listSeq) state.listLoading = false;
    draw();
  }
}

// The reconciling refresh: re-read the first page and merge it in, at most every 3 s.
const reconcile = throttle(async () => {
  if (state.listLoading) {
    reconcile(); // a load is running; look again after the next interval
    return;
  }
  const seq = state.listSeq;
  const { filter } = state.list;
  try {
    const page = await api.chats({ ...listQuery(filter), limit: PAGE_SIZE });
    if (seq === state.listSeq) state.list = reconcileFirstPage(state.list, page);
    draw();
  } catch (e) {
    if (e.status === 401) handleError(e);
  }
}, RECONCILE_MS);

/** The list request's parameters for a filter. */
function listQuery(filter) {
  return { status: filter.status, assignee: filter.assignee, q: filter.q, number: filter.number };
}

function setFilter(changes) {
  const filter = { ...state.list.filter, ...changes };
  filter.q = (filter.q || "").trim();
  const same = ["status", "assignee", "q", "number"].every(
    (k) => (filter[k] || "") === (state.list.filter[k] || ""),
  );
  if (same) return;
  const newQuery = filter.q !== state.list.filter.q;
  state.list = emptyList(filter);
  reconcile.cancel();
  ui.listScroll.scrollTop = 0;
  loadList();
  if (newQuery) {
    state.results = emptyResults(filter.q);
    if (filter.q) loadResults();
  }
}

// ---------- message search ----------

async function loadResults() {
  const r = state.results;
  if (!r.q || (state.resultsLoading && r.loaded)) return; // More: a page is on its way
  const seq = ++state.resultsSeq;
  state.resultsLoading = true;
  draw();
  try {
    const page = await api.search({ q: r.q, cursor: r.nextCursor, limit: HITS_SIZE });
    if (seq === state.resultsSeq) state.results = addResults(state.results, page);
  } catch (e) {
    if (seq !== state.resultsSeq) return;
    if (e.code === "message_search_unavailable") state.results = resultsUnavailable(state.results);
    else handleError(e, "Messages could not be searched");
  } finally {
    if (seq === state.resultsSeq) state.resultsLoading = false;
    draw();
  }
}

// ---------- the conversation ----------

async function openConversation(id, { messageId = null } = {}) {
  const chat = findChat(state.list, id) || state.results.hits.find((hit) => hit.conversation.id === id)?.conversation || null;
  state.focusMessage = messageId;
  if (state.activeId !== id) {
    state.activeId = id;
    state.activeChat = chat;
    state.thread = emptyThread(id);
    state.olderLoading = false;
    thread.clear();
    ui.composerText.value = "";
    state.replyTo = null;
    state.attachment = null;
    autosize();
  }
  setView("convo");
  state.stickToBottom = true;
  draw();
  if (!chat) {
    try {
      state.activeChat = await api.conversation(id);
    } catch (e) {
      handleError(e, "That conversation could not be opened");
      return;
    }
    draw();
  }
  // Opening it reads it (on every dashboard); nothing to send when nothing is unread.
  if (state.activeChat && state.activeChat.unread_count) markRead(id);
  try {
    const page = await api.messages(id, { limit: 50 });
    if (state.activeId !== id) return;
    state.thread = setLatestPage(state.thread, page);
    state.stickToBottom = !messageId;
    if (messageId) await readBackTo(id, messageId);
    draw();
  } catch (e) {
    handleError(e, "The messages could not be loaded");
  }
}

/** Load older pages until a message (a search hit) is in the thread. */
async function readBackTo(id, messageId) {
  for (let n = 0; n < FIND_PAGES; n++) {
    const t = state.thread;
    if (t.messages.some((m) => m.id === messageId) || !t.hasMore || !t.nextCursor) return;
    const page = await api.messages(id, { before: t.nextCursor, limit: 200 });
    if (state.activeId !== id) return;
    state.thread = prependOlder(state.thread, page);
  }
}

async function reloadConversation() {
  const id = state.activeId;
  if (!id) return;
  try {
    const [summary, page] = await Promise.all([api.conversation(id), api.messages(id, { limit: 50 })]);
    if (state.activeId !== id) return;
    state.activeChat = summary;
    state.thread = setLatestPage(state.thread, page);
    draw();
  } catch (e) {
    handleError(e);
  }
}

async function loadOlder() {
  const t = state.thread;
  if (!t.loaded || !t.hasMore || state.olderLoading || !t.nextCursor) return;
  const id = t.conversationId;
  state.olderLoading = true;
  draw();
  try {
    const page = await api.messages(id, { before: t.nextCursor, limit: 50 });
    if (state.activeId === id) state.thread = prependOlder(state.thread, page);
  } catch (e) {
    handleError(e, "Earlier messages could not be loaded");
  } finally {
    state.olderLoading = false;
    draw();
  }
}

function applySummary(summary) {
  state.list = upsertChat(state.list, summary, { kind: "update" });
  if (summary.id === state.activeId) state.activeChat = summary;
  if (summary.assignee && !state.names.has(summary.assignee)) loadTeamSoon();
  draw();
}

// ---------- the team ----------

async function loadTeam() {
  try {
    const { agents } = await api.agents();
    state.team = agents;
    state.names = new Map(agents.map((a) => [a.id, a.name]));
    const me = state.me && agents.find((a) => a.id === state.me.id);
    if (me) state.me = me;
    draw();
  } catch (e) {
    handleError(e);
  }
}

// An assignee or a reply's author this page cannot name yet: an agent added since it loaded.
const loadTeamSoon = throttle(() => loadTeam(), RECONCILE_MS);

async function markRead(id) {
  state.list = patchChat(state.list, id, { unread_count: 0 });
  if (state.activeChat && state.activeChat.id === id) state.activeChat = { ...state.activeChat, unread_count: 0 };
  draw();
  try {
    applySummary(await api.markRead(id));
  } catch (e) {
    handleError(e);
  }
}

const markReadSoon = debounce((id) => {
  if (id === state.activeId && document.visibilityState === "visible") markRead(id);
}, MARK_READ_MS);

async function sendReply() {
  const id = state.activeId;
  const text = ui.composerText.value;
  const file = state.attachment;
  if (!id || (!text.trim() && !file) || state.sending) return;
  state.sending = true;
  ui.send.disabled = true;
  try {
    const replyTo = state.replyTo || undefined;
    const message = file
      ? await api.sendFile(id, file, { caption: text.trim(), replyTo })
      : await api.send(id, { text, reply_to: replyTo });
    if (state.activeId === id) {
      state.thread = upsertMessage(state.thread, message);
      state.stickToBottom = true;
      state.replyTo = null;
      state.attachment = null;
    }
    if (ui.composerText.value === text) ui.composerText.value = "";
    autosize();
  } catch (e) {
    handleError(e, file ? "The file was not sent" : "The reply was not sent");
  } finally {
    state.sending = false;
    draw();
  }
}

/** Send the template an agent filled in the picker; true when it was accepted. */
async function sendTemplate(template) {
  const id = state.activeId;
  if (!id) return false;
  try {
    const body = { template };
    const message = await api.send(id, body);
    if (state.activeId === id) {
      state.thread = upsertMessage(state.thread, message);
      state.stickToBottom = true;
    }
    draw();
    return true;
  } catch (e) {
    handleError(e, "The template was not sent");
    return false;
  }
}

async function react(messageId, emoji) {
  const id = state.activeId;
  if (!id) return;
  try {
    const message = await api.send(id, { reaction: { message_id: messageId, emoji } });
    if (state.activeId === id) state.thread = upsertMessage(state.thread, message);
    draw();
  } catch (e) {
    handleError(e, "The reaction was not sent");
  }
}

function setReplyTo(messageId) {
  state.replyTo = messageId;
  draw();
  ui.composerText.focus();
}

function setAttachment(file) {
  if (!file) return;
  state.attachment = file;
  draw();
  ui.composerText.focus();
}

function openReactMenu(button) {
  const messageId = button.dataset.react;
  const menu = ui.reactMenu;
  const items = REACTIONS.map((emoji) =>
    h("button", { type: "button", role: "menuitem", class: "react-choice", onclick: () => { closeReactMenu(); react(messageId, emoji); } }, emoji),
  );
  items.push(h("button", { type: "button", role: "menuitem", class: "react-remove", onclick: () => { closeReactMenu(); react(messageId, ""); } }, "Remove"));
  menu.replaceChildren(...items);
  const box = button.getBoundingClientRect();
  menu.style.top = `${Math.max(8, box.top - 48)}px`;
  menu.style.left = `${Math.max(8, Math.min(window.innerWidth - 300, box.left))}px`;
  menu.hidden = false;
  menu.querySelector("button").focus();
}

function closeReactMenu() {
  ui.reactMenu.hidden = true;
}

/** Send a failed reply again: the server queues it anew; its ticks follow as events. */
async function retryReply(messageId) {
  const id = state.activeId;
  if (!id) return;
  try {
    const message = await api.retry(id, messageId);
    if (state.activeId === id) state.thread = upsertMessage(state.thread, message);
    draw();
  } catch (e) {
    handleError(e, "The reply could not be sent again");
  }
}

async function updateConversation(changes, failure) {
  const id = state.activeId;
  if (!id) return;
  try {
    applySummary(await api.update(id, changes));
  } catch (e) {
    handleError(e, failure);
  }
}

function closeConversation() {
  setView("list");
  const item = ui.chatList.querySelector(`li[data-id="${CSS.escape(state.activeId || "")}"] button`);
  item?.focus();
}

// ---------- live events ----------

function onEvent(name, data) {
  switch (name) {
    case "new_message":
    case "new_conversation": {
      const isNew = name === "new_conversation";
      state.list = applyNewMessage(state.list, data, { isNew });
      const conversation = data.conversation;
      if (data.message && data.message.agent_id && !state.names.has(data.message.agent_id)) loadTeamSoon();
      if (conversation && conversation.id === state.activeId) {
        state.activeChat = conversation;
        state.thread = upsertMessage(state.thread, data.message);
        if (data.message && data.message.direction === "in") {
          // The agent is looking at it: it is read (on every dashboard, after a pause).
          state.activeChat = { ...conversation, unread_count: 0 };
          markReadSoon(conversation.id);
        }
      }
      // A new conversation is complete as it is; new activity gets the debounced check.
      if (!isNew) reconcile();
      break;
    }
    case "conversation_updated":
      if (data.conversation) {
        applySummary(data.conversation);
        state.results = updateHits(state.results, data.conversation);
      }
      break;
    case "message_status":
      state.list = applyMessageStatus(state.list, data);
      state.thread = applyStatus(state.thread, data);
      break;
    case "message_updated":
      // Its media was downloaded (or could not be): the thread shows it now.
      state.thread = upsertMessage(state.thread, data.message);
      break;
    case "conversation_deleted":
      state.list = removeChat(state.list, data.conversation_id);
      if (data.conversation_id === state.activeId) {
        state.activeId = null;
        state.activeChat = null;
        state.thread = emptyThread(null);
        thread.clear();
        setView("list");
      }
      break;
    case "conversation_resync":
      // Messages of this conversation reached the server only as a summary: read them.
      if (data.conversation_id === state.activeId) reloadConversation();
      break;
    case "resync":
      // The server could not replay what this page missed: read everything again.
      reconcile.cancel();
      loadList();
      reloadConversation();
      break;
  }
  draw();
}

function listen() {
  events?.close();
  events = connectEvents("/api/live-chat/events", {
    onEvent,
    onState: setConnection,
    onClosed: async () => {
      try {
        await api.me();
        return true;
      } catch (e) {
        if (e.status === 401) {
          signedOut("Your session has ended. Sign in again.");
          return false;
        }
        return true;
      }
    },
  });
}

// ---------- session ----------

function handleError(e, message) {
  if (e && e.status === 401) {
    signedOut("Your session has ended. Sign in again.");
    return;
  }
  if (message) toast(e && e.status === 0 ? `${message}: the server cannot be reached.` : `${message}${e?.message ? `: ${e.message}` : "."}`);
}

function signedOut(message = "") {
  events?.close();
  events = null;
  reconcile.cancel();
  markReadSoon.cancel();
  loadTeamSoon.cancel();
  clearInterval(clockTimer);
  state.me = null;
  state.team = [];
  state.names = new Map();
  state.list = emptyList({ ...TABS.open, q: "" });
  state.results = emptyResults("");
  state.activeId = null;
  state.activeChat = null;
  state.thread = emptyThread(null);
  assigneeKey = null;
  thread.clear();
  ui.app.hidden = true;
  ui.signin.hidden = false;
  ui.signinError.textContent = message;
  ui.password.value = "";
  (ui.email.value ? ui.password : ui.email).focus();
}

function start(principal) {
  state.me = principal.agent;
  ui.me.textContent = state.me ? state.me.name : "";
  ui.me.title = state.me ? state.me.email : "";
  state.list = emptyList({ ...TABS.open, me: state.me ? state.me.id : null, q: "" });
  ui.search.value = "";
  ui.signin.hidden = true;
  ui.app.hidden = false;
  setView("list");
  listen();
  loadTeam();
  loadList();
  clearInterval(clockTimer);
  clockTimer = setInterval(() => {
    chatList.refreshTimes();
    draw(); // the window's countdown, and whether it has closed
  }, 30_000);
  loadNumbers();
}

async function loadNumbers() {
  try {
    const { numbers } = await api.numbers();
    ui.numberFilter.replaceChildren(
      h("option", { value: "" }, "All numbers"),
      ...numbers.map((n) => h("option", { value: n.id }, `Number ${n.id}`)),
    );
    ui.numberFilter.hidden = numbers.length < 2;
  } catch (e) {
    handleError(e);
  }
}

function signInError(e) {
  if (e.status === 401) return "The email or password is wrong.";
  if (e.status === 403 && e.code === "account_disabled") return "This account is disabled. Ask an admin.";
  if (e.status === 429) return `Too many attempts. Try again in ${e.retryAfter || 60} seconds.`;
  if (e.status === 0) return "The server cannot be reached.";
  return e.message || "Signing in failed.";
}

async function boot() {
  try {
    start(await api.me());
  } catch (e) {
    signedOut(e.status === 401 ? "" : "The server cannot be reached. Try again in a moment.");
  }
}

// ---------- wiring ----------

ui.signinForm.addEventListener("submit", async (e) => {
  e.preventDefault();
  const email = ui.email.value.trim();
  const password = ui.password.value;
  if (!email || !password) return;
  ui.signinError.textContent = "";
  try {
    start(await api.signIn(email, password));
  } catch (err) {
    ui.signinError.textContent = signInError(err);
    ui.password.select();
  }
});

ui.signout.addEventListener("click", async () => {
  try {
    await api.signOut();
  } catch {
    // Signed out already (or the server is away): the page signs out either way.
  } finally {
    signedOut("You are signed out.");
  }
});

const search = debounce((q) => setFilter({ q }), SEARCH_MS);
ui.search.addEventListener("input", () => search(ui.search.value));
ui.search.addEventListener("keydown", (e) => {
  if (e.key === "Enter") search.flush();
  if (e.key === "Escape" && ui.search.value) {
    ui.search.value = "";
    search("");
    search.flush();
  }
});

for (const tab of ui.tabs) {
  tab.addEventListener("click", () => setFilter(TABS[tab.dataset.tab]));
  tab.addEventListener("keydown", (e) => {
    if (e.key !== "ArrowLeft" && e.key !== "ArrowRight") return;
    const i = ui.tabs.indexOf(tab);
    const next = ui.tabs[(i + (e.key === "ArrowRight" ? 1 : ui.tabs.length - 1)) % ui.tabs.length];
    next.focus();
    next.click();
  });
}

ui.loadMore.addEventListener("click", () => loadMore());
ui.moreHits.addEventListener("click", () => loadResults());
const SCROLL_AHEAD_PX = 240;
// The observer's entry can describe a layout from before the first page was drawn (a busy
// machine delivers it late): the sentinel's place is checked again when it arrives.
function sentinelNear() {
  const bottom = ui.listScroll.getBoundingClientRect().bottom + SCROLL_AHEAD_PX;
  return state.list.pages > 0 && ui.sentinel.getBoundingClientRect().top <= bottom;
}
new IntersectionObserver(
  (entries) => {
    if (entries.some((e) => e.isIntersecting) && sentinelNear()) loadMore();
  },
  { root: ui.listScroll, rootMargin: `0px 0px ${SCROLL_AHEAD_PX}px 0px` },
).observe(ui.sentinel);

ui.messages.addEventListener("scroll", () => {
  if (ui.messages.scrollTop < 160) loadOlder();
});

ui.back.addEventListener("click", closeConversation);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && ui.inbox.dataset.view === "convo" && !ui.app.hidden) closeConversation();
});

ui.aiSwitch.addEventListener("click", () => {
  const on = ui.aiSwitch.getAttribute("aria-checked") === "true";
  updateConversation({ ai_enabled: !on }, "The AI switch could not be changed");
});
ui.resolve.addEventListener("click", () => {
  const status = ui.resolve.dataset.action === "reopen" ? "open" : "resolved";
  updateConversation({ status }, "The conversation could not be updated");
});
async function assign(agentId) {
  await updateConversation({ assignee: agentId }, "The conversation could not be assigned");
  assigneeKey = null; // show what the server holds, also when it refused
  draw();
}
ui.assignee.addEventListener("change", () => assign(ui.assignee.value || null));
ui.take.addEventListener("click", () => {
  if (state.me) assign(state.me.id);
});

function autosize() {
  const el = ui.composerText;
  el.style.height = "auto";
  el.style.height = `${Math.min(el.scrollHeight, 160)}px`;
}
ui.composerText.addEventListener("input", autosize);
ui.composerText.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    sendReply();
  }
});
ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  sendReply();
});

ui.numberFilter.addEventListener("change", () => setFilter({ number: ui.numberFilter.value }));
ui.replyCancel.addEventListener("click", () => {
  state.replyTo = null;
  draw();
});
ui.attachmentRemove.addEventListener("click", () => {
  state.attachment = null;
  draw();
});
ui.attach.addEventListener("click", () => ui.fileInput.click());
ui.fileInput.addEventListener("change", () => {
  setAttachment(ui.fileInput.files[0]);
  ui.fileInput.value = "";
});
ui.templateOpen.addEventListener("click", () => templatePicker.open());
ui.windowTemplate.addEventListener("click", () => templatePicker.open());
// A file dropped on the conversation, or pasted into the composer, is attached.
ui.convo.addEventListener("dragover", (e) => {
  if (![...(e.dataTransfer?.types || [])].includes("Files")) return;
  e.preventDefault();
  ui.convo.classList.add("dropping");
});
ui.convo.addEventListener("dragleave", (e) => {
  if (e.target === ui.convo || !ui.convo.contains(e.relatedTarget)) ui.convo.classList.remove("dropping");
});
ui.convo.addEventListener("drop", (e) => {
  ui.convo.classList.remove("dropping");
  const file = e.dataTransfer?.files?.[0];
  if (!file) return;
  e.preventDefault();
  if (ui.composerText.disabled) {
    toast("The 24-hour window has closed: only a template can be sent.");
    return;
  }
  setAttachment(file);
});
ui.composerText.addEventListener("paste", (e) => {
  const file = e.clipboardData?.files?.[0];
  if (file) {
    e.preventDefault();
    setAttachment(file);
  }
});
document.addEventListener("click", (e) => {
  if (!ui.reactMenu.hidden && !e.target.closest("#react-menu") && !e.target.closest("[data-react]")) closeReactMenu();
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && !ui.reactMenu.hidden) closeReactMenu();
});

document.addEventListener("visibilitychange", () => {
  const chat = state.activeChat;
  if (document.visibilityState === "visible" && chat && chat.unread_count) markRead(chat.id);
});

boot();
