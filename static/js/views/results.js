// Message search results: one row per matching message, its words marked.

import { h } from "../dom.js";
import { relativeTime, speakerLabel } from "../format.js";
import { avatar } from "./chatlist.js";

function snippet(hit) {
  const runs = hit.snippet || [];
  return runs.map((run) => (run.match ? h("mark", {}, run.text) : run.text));
}

function hitItem(hit, { now, onOpen }) {
  const { conversation, message } = hit;
  const who = message.direction === "in" ? null : speakerLabel(message.sender);
  return h(
    "li",
    { class: "hit", "data-id": message.id, "data-conversation": conversation.id },
    h(
      "button",
      {
        type: "button",
        class: "chat-btn hit-btn",
        "aria-label": `${conversation.user_name || conversation.phone}: ${message.text || ""}`,
        onclick: () => onOpen(conversation.id, message.id),
      },
      avatar(conversation),
      h(
        "span",
        { class: "chat-body" },
        h(
          "span",
          { class: "chat-top" },
          h("span", { class: "chat-name", dir: "auto" }, conversation.user_name || conversation.phone),
          h("time", { class: "chat-time", datetime: message.at }, relativeTime(message.at, now)),
        ),
        h(
          "span",
          { class: "hit-text", dir: "auto" },
          who ? h("span", { class: "who" }, `${who}: `) : null,
          snippet(hit),
        ),
      ),
    ),
  );
}

/** The results view over a <ul>; render(hits) redraws it (a page is at most 50 rows). */
export function createResults(ul, { onOpen }) {
  function render(hits, { now = Date.now() } = {}) {
    ul.replaceChildren(...hits.map((hit) => hitItem(hit, { now, onOpen })));
  }
  return { render };
}
