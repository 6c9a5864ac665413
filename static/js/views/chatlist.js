// The chat list view: keyed DOM, redrawn per chat only when that chat's data changed.

import { h, icon } from "../dom.js";
import {
  agentName,
  closingUnanswered,
  formatRemaining,
  hueFor,
  initials,
  previewText,
  relativeTime,
  speaker,
  speakerLabel,
  tick,
} from "../format.js";

export function avatar(chat, cls = "avatar") {
  return h(
    "span",
    { class: cls, style: { "--hue": String(hueFor(chat.id)) }, "aria-hidden": "true" },
    initials(chat.user_name),
  );
}

function tickMark(status) {
  const t = tick(status);
  if (!t) return null;
  const el = h("span", { class: `tick tick-${status}`, title: t.label, "aria-label": t.label });
  if (t.glyph === "clock") el.append(icon("clock", "icon tick-icon"));
  else el.append(t.glyph);
  return el;
}

function chatItem(chat, { active, now, onOpen, names }) {
  const last = chat.last_message;
  const assignee = chat.assignee ? agentName(chat.assignee, names) || "Assigned" : null;
  const who = last ? speaker(last.sender) : null;
  const unread = active ? 0 : chat.unread_count || 0;
  const button = h(
    "button",
    {
      type: "button",
      class: "chat-btn",
      "aria-current": active ? "true" : null,
      "aria-label": `${chat.user_name}${unread ? `, ${unread} unread` : ""}`,
      onclick: () => onOpen(chat.id),
    },
    avatar(chat),
    h(
      "span",
      { class: "chat-body" },
      h(
        "span",
        { class: "chat-top" },
        h("span", { class: "chat-name", dir: "auto" }, chat.user_name || chat.phone),
        h("span", { class: `status status-${chat.status}` }, chat.status === "resolved" ? "Resolved" : "Open"),
        assignee ? h("span", { class: "assignee-chip", title: `Assigned to ${assignee}`, dir: "auto" }, assignee) : null,
        h("time", { class: "chat-time", datetime: chat.last_activity }, relativeTime(chat.last_activity, now)),
      ),
      h(
        "span",
        { class: "chat-bottom" },
        who ? h("span", { class: `who who-${who}` }, speakerLabel(last.sender)) : null,
        last && last.direction === "out" ? tickMark(last.status) : null,
        h("span", { class: "chat-preview", dir: "auto" }, previewText(last)),
        closingUnanswered(chat, now)
          ? h(
              "span",
              { class: "closing", title: "The 24-hour window closes soon and the customer is waiting for an answer" },
              icon("clock", "icon closing-icon"),
              h("span", { class: "closing-left" }, formatRemaining(Date.parse(chat.window_closes_at) - now)),
            )
          : null,
        unread ? h("span", { class: "badge", "aria-hidden": "true" }, unread > 99 ? "99+" : String(unread)) : null,
      ),
    ),
  );
  return h(
    "li",
    { class: `chat${unread ? " unread" : ""}${active ? " active" : ""}`, "data-id": chat.id, "data-status": chat.status },
    button,
  );
}

/** The list view over a <ul>; render(chats, {activeId, names, now}) reconciles the DOM.
 * `names` maps agent ids to names, for the assignee of each chat. */
export function createChatList(ul, { onOpen }) {
  const items = new Map(); // id -> {el, chat, active}

  function render(chats, { activeId, names = null, now = Date.now() }) {
    const seen = new Set();
    let cursor = ul.firstElementChild;
    for (const chat of chats) {
      seen.add(chat.id);
      const active = chat.id === activeId;
      let item = items.get(chat.id);
      if (!item || item.chat !== chat || item.active !== active || item.names !== names) {
        const el = chatItem(chat, { active, now, onOpen, names });
        const hadFocus = item && item.el.contains(document.activeElement);
        if (item) {
          if (cursor === item.el) cursor = el;
          item.el.replaceWith(el);
        }
        item = { el, chat, active, names };
        items.set(chat.id, item);
        if (hadFocus) el.querySelector("button").focus();
      }
      if (item.el !== cursor) ul.insertBefore(item.el, cursor);
      else cursor = cursor.nextElementSibling;
    }
    for (const [id, item] of items) {
      if (!seen.has(id)) {
        item.el.remove();
        items.delete(id);
      }
    }
  }

  /** Refresh the relative times and the window flags (called every half minute). */
  function refreshTimes(now = Date.now()) {
    for (const { el, chat } of items.values()) {
      const t = el.querySelector(".chat-time");
      if (t) t.textContent = relativeTime(chat.last_activity, now);
      const flag = el.querySelector(".closing");
      if (flag && !closingUnanswered(chat, now)) flag.remove();
      else if (flag) flag.querySelector(".closing-left").textContent = formatRemaining(Date.parse(chat.window_closes_at) - now);
    }
  }

  // Arrow keys move between chats; Enter (a button's own behaviour) opens one.
  ul.addEventListener("keydown", (e) => {
    if (e.key !== "ArrowDown" && e.key !== "ArrowUp" && e.key !== "Home" && e.key !== "End") return;
    const buttons = [...ul.querySelectorAll(".chat-btn")];
    const i = buttons.indexOf(document.activeElement);
    if (i === -1) return;
    e.preventDefault();
    const next =
      e.key === "Home" ? 0 : e.key === "End" ? buttons.length - 1 : i + (e.key === "ArrowDown" ? 1 : -1);
    buttons[Math.max(0, Math.min(buttons.length - 1, next))].focus();
  });

  return { render, refreshTimes };
}
