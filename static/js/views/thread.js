// The conversation's messages: keyed bubbles, day separators, ticks, media, quoted
// replies, reactions on the message they react to, and the Reply and React actions.

import { h, icon } from "../dom.js";
import { bubbleMessages, quotedOf, reactionsByTarget } from "../state/extras.js";
import { hasMedia, mediaBody } from "./media.js";
import {
  authorLabel,
  clockTime,
  dayKey,
  dayLabel,
  errorText,
  isFailure,
  isPlaceholder,
  mediaLabel,
  speaker,
  textDirection,
  tick,
} from "../format.js";

function tickMark(message) {
  const t = tick(message.status);
  if (!t || message.direction !== "out") return null;
  const el = h("span", { class: `tick tick-${message.status}`, title: t.label, "aria-label": t.label });
  if (t.glyph === "clock") el.append(icon("clock", "icon tick-icon"));
  else el.append(t.glyph);
  return el;
}

function placeholder(message) {
  const caption = message.media && message.media.caption;
  return [
    h(
      "div",
      { class: `media media-${message.type}` },
      icon(message.type in { image: 1, audio: 1, video: 1, document: 1, location: 1, interactive: 1, reaction: 1 } ? message.type : "unsupported", "icon media-icon"),
      h("span", { class: "media-label", dir: "auto" }, mediaLabel(message)),
    ),
    caption ? h("p", { class: "text", dir: "auto" }, caption) : null,
  ];
}

/** A failed reply an agent can send again (a note of the AI's failure is never sent). */
function retryable(message) {
  return message.direction === "out" && (message.sender === "agent" || message.sender === "ai");
}

// The reactions an agent can choose from (WhatsApp takes any emoji).
export const REACTIONS = ["👍", "❤️", "😂", "😮", "🙏", "✅"];

function quoteBlock(quote, customerName) {
  if (!quote) return null;
  const who = quote.sender ? authorLabel({ sender: quote.sender }, customerName) : "";
  return h(
    "div",
    { class: "quote", "data-quoted": quote.id || "" },
    who ? h("span", { class: "quote-who" }, who) : null,
    h("span", { class: "quote-text", dir: "auto" }, quote.text || (quote.type ? mediaLabel(quote) : "An earlier message")),
  );
}

function reactionRow(reactions) {
  if (!reactions) return null;
  const items = [];
  if (reactions.customer) items.push(h("span", { class: "reaction reaction-customer", title: "The customer reacted" }, reactions.customer));
  if (reactions.business) items.push(h("span", { class: "reaction reaction-business", title: "You reacted" }, reactions.business));
  return items.length ? h("div", { class: "reactions", "aria-label": "Reactions" }, items) : null;
}

function actions(message) {
  if (!message.wa_message_id || message.type === "reaction" || message.sender === "system") return null;
  return h(
    "div",
    { class: "msg-actions" },
    h("button", { type: "button", class: "msg-action", "data-reply": message.id, title: "Reply to this message" }, "Reply"),
    h("button", { type: "button", class: "msg-action", "data-react": message.id, title: "React to this message" }, "React"),
  );
}

function bubble(message, { showAuthor, customerName, names, quote, reactions }) {
  const who = speaker(message.sender);
  const failed = isFailure(message.status);
  const body = [];
  if (showAuthor) {
    body.push(
      h(
        "div",
        { class: "author", dir: "auto" },
        who === "ai" ? icon("bot", "icon author-icon") : null,
        authorLabel(message, customerName, names),
      ),
    );
  }
  body.push(quoteBlock(quote, customerName));
  if (hasMedia(message)) {
    body.push(mediaBody(message, { onZoom: zoom }));
    if (message.media.caption) body.push(h("p", { class: "text", dir: "auto" }, message.media.caption));
  } else if (isPlaceholder(message.type)) {
    body.push(...placeholder(message));
  }
  const captionShown = isPlaceholder(message.type) && message.media && message.text === message.media.caption;
  if (message.text && message.type !== "reaction" && !captionShown) {
    body.push(h("p", { class: "text", dir: "auto" }, message.text));
  }
  body.push(
    h(
      "div",
      { class: "meta" },
      h("time", { datetime: message.at, title: new Date(message.at).toLocaleString() }, clockTime(message.at)),
      tickMark(message),
    ),
  );
  return h(
    "li",
    {
      class: `msg msg-${who}${failed ? " msg-failed" : ""}${showAuthor ? " first" : ""}`,
      "data-id": message.id,
      "data-status": message.status,
    },
    // The author line lines up with the text: right for Arabic, left for English.
    h("div", { class: "bubble", "data-dir": textDirection(message.text || message.media?.caption) }, body),
    reactionRow(reactions),
    actions(message),
    failed
      ? h(
          "p",
          { class: "msg-error", role: "note", dir: "auto" },
          errorText(message.error),
          retryable(message)
            ? h("button", { type: "button", class: "retry", "data-retry": message.id }, "Retry")
            : null,
        )
      : null,
  );
}

let zoom = null;

/** The thread view over an <ol>; render(messages, {customerName, names}) reconciles the
 * DOM. `names` maps agent ids to names (a new Map redraws the author lines); `onZoom(src,
 * label)` opens a photo larger. */
export function createThread(ol, { onZoom } = {}) {
  zoom = onZoom || null;
  const bubbles = new Map(); // id -> {el, message, showAuthor, decor}
  const days = new Map(); // dayKey -> {el, label}

  function render(all, { customerName, names = null, now = Date.now() }) {
    const wanted = [];
    let prevDay = null;
    let prev = null;
    const reactions = reactionsByTarget(all);
    const messages = bubbleMessages(all);
    for (const m of messages) {
      const day = dayKey(m.at);
      if (day !== prevDay) {
        const label = dayLabel(m.at, now);
        let sep = days.get(day);
        if (!sep || sep.label !== label) {
          const el = h("li", { class: "day", role: "separator" }, h("span", {}, label));
          if (sep) sep.el.replaceWith(el);
          sep = { el, label };
          days.set(day, sep);
        }
        wanted.push(sep.el);
        prevDay = day;
        prev = null;
      }
      const showAuthor =
        !prev || speaker(prev.sender) !== speaker(m.sender) || prev.agent_id !== m.agent_id;
      const quote = quotedOf(m, all);
      const mine = m.wa_message_id ? reactions.get(m.wa_message_id) : undefined;
      const decor = JSON.stringify([quote, mine || null]);
      let item = bubbles.get(m.id);
      if (
        !item ||
        item.message !== m ||
        item.showAuthor !== showAuthor ||
        item.customerName !== customerName ||
        item.names !== names ||
        item.decor !== decor
      ) {
        const el = bubble(m, { showAuthor, customerName, names, quote, reactions: mine });
        if (item) item.el.replaceWith(el);
        item = { el, message: m, showAuthor, customerName, names, decor };
        bubbles.set(m.id, item);
      }
      wanted.push(item.el);
      prev = m;
    }
    const keep = new Set(wanted);
    for (const child of [...ol.children]) if (!keep.has(child)) child.remove();
    let cursor = ol.firstElementChild;
    for (const el of wanted) {
      if (el !== cursor) ol.insertBefore(el, cursor);
      else cursor = cursor.nextElementSibling;
    }
    for (const [id, item] of bubbles) if (!keep.has(item.el)) bubbles.delete(id);
    for (const [day, sep] of days) if (!keep.has(sep.el)) days.delete(day);
  }

  function clear() {
    ol.replaceChildren();
    bubbles.clear();
    days.clear();
  }

  return { render, clear };
}
