// Pure text helpers for the views: times, labels, ticks, error wording.

const MINUTE = 60_000;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;
// WhatsApp's customer-service window: free text only within 24 h of the customer's message.
export const WINDOW_MS = DAY;

const WEEKDAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

function startOfDay(ms) {
  const d = new Date(ms);
  d.setHours(0, 0, 0, 0);
  return d.getTime();
}

function pad(n) {
  return String(n).padStart(2, "0");
}

/** Clock time, 24-hour, local: "14:05". */
export function clockTime(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  return `${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

/** The list's short relative time: "now", "4m", "3h", "Yesterday", "Tue", "12 Nov", "12 Nov 2025". */
export function relativeTime(iso, now = Date.now()) {
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return "";
  const age = now - t;
  if (age < MINUTE) return "now";
  if (age < HOUR) return `${Math.floor(age / MINUTE)}m`;
  const days = Math.round((startOfDay(now) - startOfDay(t)) / DAY);
  if (days <= 0) return `${Math.floor(age / HOUR)}h`;
  if (days === 1) return "Yesterday";
  const d = new Date(t);
  if (days < 7) return WEEKDAYS[d.getDay()];
  const label = `${d.getDate()} ${MONTHS[d.getMonth()]}`;
  return d.getFullYear() === new Date(now).getFullYear() ? label : `${label} ${d.getFullYear()}`;
}

/** The separator above a day's messages: "Today", "Yesterday", "Tuesday 24 Nov". */
export function dayLabel(iso, now = Date.now()) {
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return "";
  const days = Math.round((startOfDay(now) - startOfDay(t)) / DAY);
  if (days === 0) return "Today";
  if (days === 1) return "Yesterday";
  const d = new Date(t);
  const long = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
  const label = `${long[d.getDay()]} ${d.getDate()} ${MONTHS[d.getMonth()]}`;
  return d.getFullYear() === new Date(now).getFullYear() ? label : `${label} ${d.getFullYear()}`;
}

/** The local calendar day of a time, to group messages by day. */
export function dayKey(iso) {
  const d = new Date(iso);
  return `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}`;
}

const ARABIC = /[\u0600-\u06ff\u0750-\u077f\ufb50-\ufdff\ufe70-\ufeff]/;

const RTL = /[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufeff]/;
const LTR = /[A-Za-z\u00c0-\u024f\u0370-\u03ff\u0400-\u04ff]/;

/** The direction a text reads in, from its first strong letter (what dir="auto" decides). */
export function textDirection(text) {
  for (const ch of String(text || "")) {
    if (RTL.test(ch)) return "rtl";
    if (LTR.test(ch)) return "ltr";
  }
  return "ltr";
}

/** Initials for an avatar: "Sara Haddad" -> "SH"; one letter for an Arabic name. */
export function initials(name) {
  const words = String(name || "").trim().split(/\s+/).filter(Boolean);
  if (words.length === 0) return "?";
  const first = [...words[0]][0] || "";
  const last = words.length > 1 ? [...words[words.length - 1]][0] || "" : "";
  // Arabic names are not abbreviated by initials, and two letters of different scripts
  // read in a jumbled order: one letter then.
  if (ARABIC.test(first) || (last && ARABIC.test(last))) return first.toUpperCase();
  return (first + last).toUpperCase();
}

/** A stable hue (0-359) for an avatar, from an id. */
export function hueFor(id) {
  let h = 0;
  for (const ch of String(id)) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

/** Who wrote a message, for the list and bubbles: customer, ai, agent or system. */
export function speaker(sender) {
  if (sender === "user") return "customer";
  if (sender === "ai" || sender === "agent" || sender === "system") return sender;
  return "customer";
}

const SPEAKER_LABELS = { customer: "Customer", ai: "AI", agent: "Agent", system: "System" };

/** The short label of who spoke last: "Customer", "AI", "Agent". */
export function speakerLabel(sender) {
  return SPEAKER_LABELS[speaker(sender)];
}

/** An agent's name from the team list (a Map of id to name); null when unknown. */
export function agentName(agentId, names) {
  return (agentId && names && names.get(agentId)) || null;
}

/** A bubble's author line: "AI assistant", "Agent · Reem", the customer's name. `names` maps
 * agent ids to names: a reply shows who sent it, never a raw id. */
export function authorLabel(message, customerName, names = null) {
  const who = speaker(message.sender);
  if (who === "ai") return "AI assistant";
  if (who === "agent") {
    const name = agentName(message.agent_id, names);
    return name ? `Agent · ${name}` : "Agent";
  }
  if (who === "system") return "System";
  return customerName || "Customer";
}

const MEDIA_LABELS = {
  image: "Photo",
  audio: "Audio",
  video: "Video",
  document: "Document",
  location: "Location",
  interactive: "Reply",
  reaction: "Reaction",
  unsupported: "Unsupported message",
};

/** Whether a message type shows as a media placeholder rather than plain text. */
export function isPlaceholder(type) {
  return type !== "text" && type in MEDIA_LABELS;
}

/** The placeholder's label, e.g. "Voice message", "Document · invoice.pdf", "Location · Riyadh". */
export function mediaLabel(message) {
  const type = message.type;
  const media = message.media || {};
  const extra = message.extra || {};
  if (type === "audio" && extra.voice) return "Voice message";
  if (type === "document" && media.filename) return `Document · ${media.filename}`;
  if (type === "location") {
    const place = extra.name || extra.address;
    if (place) return `Location · ${place}`;
    if (typeof extra.latitude === "number" && typeof extra.longitude === "number") {
      return `Location · ${extra.latitude.toFixed(4)}, ${extra.longitude.toFixed(4)}`;
    }
  }
  if (type === "reaction") {
    const emoji = extra.removed ? null : extra.emoji || message.text;
    return emoji ? `Reacted ${emoji}` : "Reaction removed";
  }
  return MEDIA_LABELS[type] || "Message";
}

/** The list's one-line preview of a last message. */
export function previewText(last) {
  if (!last) return "No messages yet";
  if (last.type === "reaction") return mediaLabel(last);
  if (last.text) return last.text;
  return isPlaceholder(last.type) ? mediaLabel(last) : "";
}

// Ticks as WhatsApp shows them. `queued` waits to be sent; `not_sent` and `failed` never left.
const TICKS = {
  queued: { glyph: "clock", label: "Sending" },
  sent: { glyph: "✓", label: "Sent" },
  delivered: { glyph: "✓✓", label: "Delivered" },
  read: { glyph: "✓✓", label: "Read" },
  played: { glyph: "✓✓", label: "Played" },
  failed: { glyph: "!", label: "Failed" },
  not_sent: { glyph: "!", label: "Not sent" },
};

/** The delivery tick of an outbound message, or null for an inbound one. */
export function tick(status) {
  const t = TICKS[status];
  return t ? { ...t, status } : null;
}

/** Whether a status means the message did not reach the customer. */
export function isFailure(status) {
  return status === "failed" || status === "not_sent";
}

// What an agent can do about the WhatsApp errors they will meet (../WHATSAPP facts).
// Meta's own titles are a few words; anything this short gets the explanation added.
const TERSE_TITLE = 40;
const ERROR_HINTS = {
  131047: "Outside the 24-hour window: the customer has not written for over a day, so only a template message can reach them.",
  131026: "Undeliverable: the number may not be on WhatsApp.",
  131048: "Held back by WhatsApp's spam limits.",
  131049: "Not delivered, to keep engagement healthy (WhatsApp's marketing limits).",
  131056: "Too many messages to this customer in a short time; try again shortly.",
  130429: "WhatsApp's rate limit was reached; it will be retried.",
  190: "The WhatsApp access token has expired.",
};

/**
 * The words shown under a failed message. The server words the errors an agent can act on;
 * a bare WhatsApp title ("Re-engagement message") gets the plain explanation for its code.
 */
export function errorText(error) {
  if (!error) return "Not delivered";
  const title = error.title || "";
  const hint = ERROR_HINTS[Number(error.code)];
  if (hint && title.length < TERSE_TITLE) return title ? `${hint} (${error.code}: ${title})` : `${hint} (${error.code})`;
  if (!title) return error.code != null ? `Not delivered (${error.code})` : "Not delivered";
  return error.code != null ? `${title} (${error.code})` : title;
}

/** Whether free text can still reach the customer (the 24-hour window is open). */
export function windowOpen(lastInboundAt, now = Date.now()) {
  if (!lastInboundAt) return false;
  const t = Date.parse(lastInboundAt);
  return !Number.isNaN(t) && now - t < WINDOW_MS;
}

/** "300 conversations", "1 open conversation", "4 open conversations assigned to you". */
export function countLabel(n, status, assignee = null) {
  const noun = n === 1 ? "conversation" : "conversations";
  const which = status === "all" ? "" : ` ${status}`;
  const count = n.toLocaleString("en-US");
  if (assignee === "me") return `${count}${which} ${noun} assigned to you`;
  if (assignee === "none") return `${count}${which} unassigned ${noun}`;
  return `${count}${which} ${noun}`;
}

/** "1h 12m", "42m", "under a minute": what is left of a span. */
export function formatRemaining(ms) {
  if (ms < MINUTE) return "under a minute";
  const minutes = Math.floor(ms / MINUTE);
  const h = Math.floor(minutes / 60);
  const m = minutes % 60;
  return h ? `${h}h ${m}m` : `${m}m`;
}

// The composer shows the time left once it is under this; the list flags a conversation
// whose window closes within the hour with the customer unanswered.
export const WINDOW_WARN_MS = 2 * HOUR;
export const WINDOW_URGENT_MS = HOUR;

/**
 * Where a conversation's 24-hour window stands: open or closed, and the time left when it
 * is under 2 hours ("Window closes in 1h 12m").
 */
export function windowState(closesAt, now = Date.now()) {
  const t = Date.parse(closesAt || "");
  if (Number.isNaN(t) || now >= t) return { open: false, remainingMs: 0, label: "The 24-hour window has closed" };
  const remainingMs = t - now;
  const label = remainingMs < WINDOW_WARN_MS ? `Window closes in ${formatRemaining(remainingMs)}` : "";
  return { open: true, remainingMs, label };
}

/** Whether the list should flag a conversation: its window closes within the hour and the
 * customer's message is the last word (nobody answered them). */
export function closingUnanswered(chat, now = Date.now()) {
  const state = windowState(chat.window_closes_at, now);
  const last = chat.last_message;
  return state.open && state.remainingMs < WINDOW_URGENT_MS && Boolean(last) && last.direction === "in";
}

/** A file size as people read it: "840 KB", "1.2 MB". */
export function fileSize(bytes) {
  if (typeof bytes !== "number" || bytes < 0) return "";
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${Math.round(bytes / 1024)} KB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
}
