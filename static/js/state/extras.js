// Reactions and quoted replies in a thread: pure functions over its messages (oldest first).

/** Which side a message is from: the customer, or the business (AI, agents). */
function side(message) {
  return message.direction === "in" ? "customer" : "business";
}

/**
 * The reactions to show on each message, by its WhatsApp id: the latest reaction of each
 * side wins (WhatsApp keeps one per person), and one that was removed shows nothing.
 * A reply that failed to send never reached the customer: it is not shown.
 */
export function reactionsByTarget(messages) {
  const out = new Map();
  for (const m of messages) {
    if (m.type !== "reaction") continue;
    const target = m.extra && m.extra.reacted_to;
    if (!target) continue;
    if (m.direction === "out" && (m.status === "failed" || m.status === "not_sent")) continue;
    const entry = out.get(target) || {};
    const removed = (m.extra && m.extra.removed) || !m.text;
    entry[side(m)] = removed ? null : m.text;
    out.set(target, entry);
  }
  for (const [target, entry] of out) {
    if (!entry.customer && !entry.business) out.delete(target);
  }
  return out;
}

/** The messages drawn as bubbles: a reaction shows on the message it reacts to, and
 * only stands alone when that message is not in the thread (it is pages back). */
export function bubbleMessages(messages) {
  const known = new Set(messages.map((m) => m.wa_message_id).filter(Boolean));
  return messages.filter(
    (m) => m.type !== "reaction" || !(m.extra && m.extra.reacted_to && known.has(m.extra.reacted_to)),
  );
}

/** What a reply quotes: the message itself when it is in the thread (its latest text),
 * else the copy the server kept with the reply. */
export function quotedOf(message, messages) {
  const extra = message.extra || {};
  if (!extra.reply_to && !extra.quoted) return null;
  const found = extra.reply_to ? messages.find((m) => m.wa_message_id === extra.reply_to) : null;
  if (found) {
    const text = found.text || (found.media && (found.media.caption || found.media.filename)) || null;
    return { id: found.id, sender: found.sender, type: found.type, text };
  }
  return extra.quoted || { id: null, sender: null, type: null, text: null };
}
