// Search text as the server folds it (server/search.py): Arabic diacritics and letter
// variants, the glued-on article, Arabic-Indic digits, accents and case. The list uses it
// to decide whether a live event's conversation still matches the search box.

// Combining marks dropped after NFKD (which splits a hamza or madda off its letter).
const MARKS = /[\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed\u08d3-\u08ff\u0640]/g;
const LETTERS = { "ٱ": "ا", "ى": "ي", "ی": "ي", "ک": "ك", "ة": "ه" };
const LETTER_RE = /[ٱىیکة]/g;
const DIGITS_RE = /[\u0660-\u0669\u06f0-\u06f9]/g;
const WORD = /[\p{L}\p{N}]+/gu;
const PHONE_LIKE = /^[\d\s+().-]+$/;
export const ARTICLES = ["وبال", "وال", "بال", "كال", "فال", "ولل", "لل", "ال"];

/** The searchable form of a text. */
export function fold(text) {
  return String(text || "")
    .normalize("NFKD")
    .replace(MARKS, "")
    .replace(LETTER_RE, (c) => LETTERS[c])
    .replace(DIGITS_RE, (c) => String(c.charCodeAt(0) & 0xf))
    .toLowerCase();
}

/** The folded words of a text. */
export function words(text) {
  return fold(text).match(WORD) || [];
}

/** An Arabic word without its article, or null. */
export function bare(word) {
  for (const article of ARTICLES) {
    if (word.startsWith(article) && word.length - article.length >= 2) return word.slice(article.length);
  }
  return null;
}

function indexWords(text) {
  const out = words(text);
  for (const w of [...out]) {
    const b = bare(w);
    if (b) out.push(b);
  }
  return out;
}

/** A query as typed: its words, and its digits when it looks like a phone number. */
export function parse(text) {
  const folded = fold(String(text || "").trim());
  const found = (folded.match(WORD) || []).slice(0, 8);
  let phone = null;
  if (PHONE_LIKE.test(folded) && /\d/.test(folded)) phone = folded.replace(/\D/g, "").replace(/^0+/, "") || null;
  return { words: found, phone };
}

/** What a customer is matched on: their name's words after spaces, then their digits. */
export function customerKey(name, phone) {
  return ` ${indexWords(name).join(" ")}\n${fold(phone).replace(/\D/g, "")}`;
}

/** Whether a customer matches a query (the server's rule, server/search.py). */
export function matchesCustomer(query, key) {
  if (query.phone !== null) return key.includes(query.phone);
  if (!query.words.length) return false;
  return query.words.every((w) => (/^\d+$/.test(w) ? key.includes(w.replace(/^0+/, "")) : key.includes(` ${w}`)));
}
