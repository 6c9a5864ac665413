// A message's media in the thread: photos inline (a click opens them larger), players for
// voice notes, audio and video, documents to download with their name and size, and
// "Media unavailable" with the reason when WhatsApp's file could not be kept.

import { h, icon } from "../dom.js";
import { fileSize } from "../format.js";

const PLAYABLE = new Set(["image", "audio", "video", "document"]);

/** The URL the server serves a message's file at (agents only: the session cookie). */
export function mediaUrl(message) {
  return `/api/live-chat/media/${encodeURIComponent(message.id)}`;
}

/** Whether a message's media is drawn by this module (otherwise: a placeholder). */
export function hasMedia(message) {
  return Boolean(message.media && message.media.state) && PLAYABLE.has(message.type);
}

function unavailable(message) {
  return h(
    "div",
    { class: "media media-unavailable", role: "note" },
    icon("unsupported", "icon media-icon"),
    h(
      "span",
      { class: "media-label" },
      h("strong", {}, "Media unavailable"),
      h("span", { class: "media-reason", dir: "auto" }, message.media.error || "The file could not be downloaded."),
    ),
  );
}

function pending(message) {
  return h(
    "div",
    { class: "media media-pending", role: "status" },
    icon(message.type, "icon media-icon"),
    h("span", { class: "media-label" }, "Downloading…"),
  );
}

/** The elements of a message's media (a caption is drawn by the bubble). */
export function mediaBody(message, { onZoom } = {}) {
  const media = message.media;
  if (media.state === "failed") return unavailable(message);
  if (media.state !== "ready") return pending(message);
  const src = mediaUrl(message);
  const extra = message.extra || {};
  if (message.type === "image") {
    const label = media.caption || (extra.sticker ? "Sticker" : "Photo");
    return h(
      "button",
      {
        type: "button",
        class: `media-image${extra.sticker ? " sticker" : ""}`,
        "aria-label": `Open ${label} larger`,
        onclick: () => onZoom && onZoom(src, label),
      },
      h("img", { src, alt: label, loading: "lazy", decoding: "async" }),
    );
  }
  if (message.type === "audio") {
    return h(
      "div",
      { class: "media-audio" },
      h("span", { class: "media-kind" }, icon("audio", "icon media-icon"), extra.voice ? "Voice message" : "Audio"),
      h("audio", { src, controls: true, preload: "metadata" }),
    );
  }
  if (message.type === "video") {
    return h("video", { class: "media-video", src, controls: true, preload: "metadata", playsinline: true });
  }
  const name = media.filename || "Document";
  return h(
    "a",
    { class: "media media-document", href: src, download: name, title: `Download ${name}` },
    icon("document", "icon media-icon"),
    h(
      "span",
      { class: "media-label" },
      h("span", { class: "media-name", dir: "auto" }, name),
      h("span", { class: "media-size" }, [fileSize(media.size), (media.mime_type || "").split(";")[0]].filter(Boolean).join(" · ")),
    ),
  );
}

/** The larger view of a photo: a modal dialog, closed by Escape, a click or its button. */
export function createLightbox(dialog) {
  const img = dialog.querySelector("img");
  const caption = dialog.querySelector("figcaption");
  dialog.addEventListener("click", (e) => {
    if (e.target === dialog || e.target.closest("[data-close]")) dialog.close();
  });
  return {
    open(src, label) {
      img.src = src;
      img.alt = label;
      caption.textContent = label;
      dialog.showModal();
    },
  };
}
