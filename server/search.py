"""Search text: one folding of Arabic and English for every index and every query.

Customers and agents write the same word many ways: with or without Arabic diacritics
(tashkeel), with any of the alef, yeh and teh marbuta variants, with the article glued on
(الفاتورة, فاتورة), in Arabic-Indic or Latin digits, with or without Latin accents, in any
case. Everything that is indexed and everything that is searched goes through `fold`, so
both sides meet in one form. The rules of what matches live here, once, for the snapshot
(names and numbers in memory), SQLite's full-text indexes and Firestore's search tokens.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Final

# Combining marks dropped after NFKD: Latin accents, Hebrew points, Arabic tashkeel, Quranic
# marks and the tatweel (a stretching stroke, not a letter). NFKD first splits a hamza or a
# madda off its alef, waw or yeh (أ إ آ ؤ ئ), so dropping the marks folds those too.
_MARK_RANGES: Final = (
    (0x0300, 0x036F),
    (0x0483, 0x0489),
    (0x0591, 0x05C7),
    (0x0610, 0x061A),
    (0x064B, 0x065F),
    (0x0670, 0x0670),
    (0x06D6, 0x06ED),
    (0x08D3, 0x08FF),
)
_LETTERS: Final = {
    "\u0640": None,  # tatweel
    "ٱ": "ا",  # alef wasla
    "ى": "ي",  # alef maksura, written for a final yeh
    "ی": "ي",  # Persian yeh, on many Arabic keyboards
    "ک": "ك",  # Persian kaf
    "ة": "ه",  # teh marbuta, often typed as heh
}
_FOLD: Final = str.maketrans(
    {
        **{
            chr(c): None
            for low, high in _MARK_RANGES
            for c in range(low, high + 1)
            if unicodedata.category(chr(c)) in ("Mn", "Me")
        },
        **_LETTERS,
        # Arabic-Indic and Extended Arabic-Indic digits: a number matches however typed.
        **{chr(0x0660 + d): str(d) for d in range(10)},
        **{chr(0x06F0 + d): str(d) for d in range(10)},
    }
)
# A word of folded text: letters and digits (underscore is punctuation here).
_WORD: Final = re.compile(r"[^\W_]+")
# A word of original text, its combining marks included (they are not \w in Python).
_RAW_WORD: Final = re.compile(
    r"[^\W_"
    + "".join(f"{chr(low)}-{chr(high)}" for low, high in _MARK_RANGES)
    + "\u0640]"
    + r"(?:[^\W_]|["
    + "".join(f"{chr(low)}-{chr(high)}" for low, high in _MARK_RANGES)
    + "\u0640])*"
)
# Arabic glues the article (and "and the", "with the", "like the", "so the", "for the") onto
# the word: indexes hold the bare word beside the whole one, so either is found.
ARTICLES: Final = ("وبال", "وال", "بال", "كال", "فال", "ولل", "لل", "ال")
# Digits of a phone number typed with the usual separators: "+966 50-123 4567".
_PHONE_LIKE: Final = re.compile(r"[\d\s+().\-]+")
# Firestore's search tokens: word prefixes up to this many characters (a longer query word
# is cut to it, then checked whole against the name), and number fragments from this
# many digits (shorter fragments match too many customers to be worth an index entry).
TOKEN_PREFIX_MAX: Final = 20
TOKEN_DIGITS_MIN: Final = 3
# A query has at most this many words; more add nothing but cost.
MAX_QUERY_WORDS: Final = 8


def fold(text: str) -> str:
    """The searchable form of a text: case, diacritics and letter variants folded."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFKD", text).translate(_FOLD).casefold()


def words(text: str) -> list[str]:
    """The folded words of a text."""
    return _WORD.findall(fold(text))


_ARTICLE_STARTS: Final = frozenset(a[0] for a in ARTICLES)


def bare(word: str) -> str | None:
    """An Arabic word without its glued-on article, or None when it has none."""
    if word[:1] not in _ARTICLE_STARTS:
        return None
    for article in ARTICLES:
        if word.startswith(article) and len(word) - len(article) >= 2:
            return word[len(article) :]
    return None


def index_words(text: str) -> list[str]:
    """The words an index holds for a text: its folded words, and each Arabic word again
    without its article."""
    out = words(text)
    out += [b for w in out if (b := bare(w)) is not None]
    return out


def index_text(text: str) -> str:
    """What a full-text index holds for a text (`index_words`, space separated)."""
    return " ".join(index_words(text))


def digits(phone: str) -> str:
    """The digits of a phone number (Arabic-Indic ones as Latin)."""
    return "".join(ch for ch in fold(phone) if ch.isdigit())


@dataclass(frozen=True, slots=True)
class Query:
    """A search as typed, folded: its words (each matches as a prefix, or by its stem in
    message text) and, when it looks like a phone number, its digits."""

    text: str
    words: tuple[str, ...]
    phone: str | None

    def __bool__(self) -> bool:
        return bool(self.words or self.phone)


def parse(text: str) -> Query:
    """A query from what an agent typed."""
    folded = fold(text.strip())
    found = tuple(_WORD.findall(folded))[:MAX_QUERY_WORDS]
    phone = None
    if _PHONE_LIKE.fullmatch(folded) and any(ch.isdigit() for ch in folded):
        # A local number ("0501234567") is found inside the international one.
        phone = "".join(ch for ch in folded if ch.isdigit()).lstrip("0") or None
    return Query(text=text, words=found, phone=phone)


def customer_key(name: str, phone: str) -> str:
    """What a customer is matched on in memory: their name's folded words, each after a
    space, then their number's digits after a newline."""
    return " " + " ".join(index_words(name)) + "\n" + digits(phone)


def customer_needles(query: Query) -> tuple[str, ...]:
    """What a customer's `customer_key` must contain, every one, to match: a typed number
    anywhere in theirs; every other word at the start of one of their name's words (a
    number word may also be part of their number). Empty for a query of no word."""
    if query.phone is not None:
        return (query.phone,)
    return tuple(w.lstrip("0") if w.isdigit() else " " + w for w in query.words)


def matches_customer(query: Query, key: str) -> bool:
    """Whether a customer (their `customer_key`) matches the query."""
    needles = customer_needles(query)
    return bool(needles) and all(needle in key for needle in needles)


def customer_tokens(name: str, phone: str) -> list[str]:
    """Firestore's search tokens of a customer: every prefix of each name word (to
    TOKEN_PREFIX_MAX characters) and every run of TOKEN_DIGITS_MIN or more digits of their
    number, so one `array-contains` finds a name as it is typed or any part of a number."""
    tokens: set[str] = set()
    for word in index_words(name):
        for end in range(1, min(len(word), TOKEN_PREFIX_MAX) + 1):
            tokens.add(word[:end])
    number = digits(phone)
    for start in range(len(number)):
        for end in range(start + TOKEN_DIGITS_MIN, len(number) + 1):
            tokens.add(number[start:end])
    return sorted(tokens)


def query_token(query: Query) -> str | None:
    """The one token a Firestore query looks up (the longest, so the fewest documents);
    the rest of the query is checked on what it returns. None when no token can match."""
    if query.phone is not None:
        return query.phone if len(query.phone) >= TOKEN_DIGITS_MIN else None
    candidates = [w.lstrip("0") if w.isdigit() else w for w in query.words]
    candidates = [w for w in candidates if w and (not w.isdigit() or len(w) >= TOKEN_DIGITS_MIN)]
    if not candidates:
        return None
    best = max(candidates, key=len)
    return best if best.isdigit() else best[:TOKEN_PREFIX_MAX]


def fts_match_messages(query: Query) -> str | None:
    """The FTS5 MATCH expression for message text: every word, by its stem or as a
    prefix (the porter tokenizer stems a quoted prefix query too)."""
    terms = query.words
    if not terms:
        return None
    return " AND ".join(f'"{w}"*' for w in terms)


def fts_match_customers(query: Query) -> str | None:
    """The FTS5 MATCH expression for names and numbers, with the same meaning as
    `matches_customer` (the `digits` column holds every suffix of a number, so a prefix
    query on it finds any part of the number)."""
    if query.phone is not None:
        return f'digits : "{query.phone}"*'
    parts = []
    for word in query.words:
        if word.isdigit():
            number = word.lstrip("0") or word
            parts.append(f'(names : "{word}"* OR digits : "{number}"*)')
        else:
            parts.append(f'names : "{word}"*')
    return " AND ".join(parts) or None


def suffixes(number: str) -> str:
    """Every suffix of a number, as words: what the `digits` column indexes."""
    return " ".join(number[i:] for i in range(len(number)))


# -- showing a match ---------------------------------------------------------------------

# A snippet shows this many characters of a long message around its first match.
SNIPPET_CHARS: Final = 160


def _hits(word: str, terms: tuple[str, ...]) -> bool:
    """Whether a folded word is one a query's terms found (as a prefix, or by a shared stem:
    "invoices" finds "invoice", "delivering" finds "deliveries")."""
    forms = (word,) if (b := bare(word)) is None else (word, b)
    for term in terms:
        for form in forms:
            if form.startswith(term):
                return True
            if term.isascii() and term.isalpha() and len(term) > 3:
                stem = max(3, len(term) - 3)
                if form[:stem] == term[:stem] and form.isascii():
                    return True
    return False


def snippet(text: str, query: Query, width: int = SNIPPET_CHARS) -> list[tuple[str, bool]]:
    """The part of a message to show for a match, as (text, matched) runs: the words the
    query found are marked. A long message is cut around its first match."""
    terms = query.words or ((query.phone,) if query.phone else ())
    spans = [
        (m.start(), m.end()) for m in _RAW_WORD.finditer(text) if _hits(fold(m.group()), terms)
    ]
    start, end = 0, len(text)
    if len(text) > width:
        first = spans[0][0] if spans else 0
        start = max(0, min(first - width // 3, len(text) - width))
        end = min(len(text), start + width)
    runs: list[tuple[str, bool]] = []
    if start > 0:
        runs.append(("…", False))
    at = start
    for s, e in spans:
        if e <= start or s >= end:
            continue
        s, e = max(s, start), min(e, end)
        if s > at:
            runs.append((text[at:s], False))
        runs.append((text[s:e], True))
        at = e
    if at < end:
        runs.append((text[at:end], False))
    if end < len(text):
        runs.append(("…", False))
    return runs
