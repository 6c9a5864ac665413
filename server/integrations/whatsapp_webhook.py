"""WhatsApp Cloud API webhooks: signature check and parsing, pure functions with no I/O.

A body is refused whole (400) only when its envelope is broken: not JSON, or `entry`,
`changes`, `value` or the lists in it of the wrong kind. Inside a sound envelope every
message stands on its own: one that cannot be parsed is kept as `unsupported` with the
reason (an agent sees it in the thread), and the rest of its batch is stored as usual;
Meta redelivers a refused body for days and then drops it, so refusing a batch for one bad
message would lose the good ones. A message that names no id or no sender cannot be kept
once (nothing to deduplicate on, nobody to file it under): it is counted and logged.

Every string taken from the body is normalised: lone UTF-16 surrogates (legal in JSON,
not encodable as UTF-8) become U+FFFD; names also lose control and bidi-override
characters. Numbers copied into the record are checked for type and range.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from server.integrations.whatsapp import describe_error
from server.models import Media, MessageError
from server.store.base import InboundMessage

SIGNATURE_PREFIX: Final = "sha256="
# Statuses WhatsApp sends for outbound messages; anything else (Meta adds some now and
# then) is ignored rather than refused, since refusing makes Meta redeliver for days.
KNOWN_STATUSES: Final = frozenset({"sent", "delivered", "read", "played", "failed"})
MEDIA_TYPES: Final = ("image", "audio", "video", "document", "sticker")
# The webhook field of a template's review outcome (approved, rejected, paused, ...).
TEMPLATE_FIELD: Final = "message_template_status_update"
# Bounds on what we copy into `extra` from fields the customer or an ad controls.
MAX_EXTRA_CHARS: Final = 1000
MAX_ERRORS: Final = 5
# A customer's message text: WhatsApp caps a text at 4,096 characters; a body is at most
# 3 MB, so this only bounds what a forged (but signed) body could make us store.
MAX_TEXT_CHARS: Final = 65_536
MAX_NAME_CHARS: Final = 200
# Ids WhatsApp generates are well under 200 characters (wamids are about 60).
MAX_ID_CHARS: Final = 512
# Integers kept exactly: JSON numbers past 2^53 lose precision in browsers, and past 2^63
# they do not fit SQLite or orjson. Larger codes are kept as their decimal string.
MAX_SAFE_INT: Final = 2**53 - 1
_DIGITS: Final = re.compile(r"\d{1,20}")
# A business-scoped user id: a two-letter country code, a dot, up to 128 alphanumerics
# (parent BSUIDs carry "ENT." in between), e.g. "US.13491208655302741918".
_BSUID: Final = re.compile(r"[A-Z]{2}\.(?:ENT\.)?[A-Za-z0-9]{1,128}")
_SURROGATES: Final = re.compile(r"[\ud800-\udfff]")
# C0/C1 controls, zero-width and bidi embedding/override/isolate marks: a name carrying them
# can reorder or hide what agents read next to it.
_NAME_JUNK: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


# WhatsApp launched in 2009; clocks may disagree, but not by a day.
EARLIEST_S: Final = 1_230_768_000
MAX_AHEAD_S: Final = 24 * 3600


class ParseError(ValueError):
    """The body is not a webhook we understand; the message says where and why."""


@dataclass(slots=True, frozen=True)
class StatusUpdate:
    """A delivery status for one of our outbound messages."""

    wa_message_id: str
    status: str
    at: int
    recipient_id: str | None = None
    error: MessageError | None = None


@dataclass(slots=True)
class Parsed:
    """Everything one webhook body carries, in the order it carried it."""

    messages: list[InboundMessage] = field(default_factory=list)
    statuses: list[StatusUpdate] = field(default_factory=list)
    # Updates we do not act on (other webhook fields, unknown statuses), counted for the log.
    ignored: int = 0
    # `message_template_status_update` changes: a template was approved, rejected, paused...
    template_updates: int = 0
    # Messages and statuses that could not be kept at all, with why (no id, no sender).
    refused: list[str] = field(default_factory=list)


def signature_ok(secret: str | None, body: bytes, header: str | None) -> bool:
    """True when `header` is the HMAC-SHA256 of the raw `body` with the app `secret`."""
    if not secret or not header or not header.startswith(SIGNATURE_PREFIX):
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(header[len(SIGNATURE_PREFIX) :].strip().lower(), expected)


def sign(secret: str, body: bytes) -> str:
    """The X-Hub-Signature-256 header value Meta would send for `body`."""
    return SIGNATURE_PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def parse_body(raw: bytes, received_ms: int | None = None) -> Parsed:
    """Decode and parse a webhook body; ParseError when its envelope is malformed.

    `received_ms` (when the body arrived) refines WhatsApp's whole-second timestamps.
    """
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ParseError(f"body is not valid JSON ({type(e).__name__})") from e
    except RecursionError as e:
        raise ParseError("body is nested too deeply") from e
    return parse_payload(body, received_ms)


def parse_payload(body: Any, received_ms: int | None = None) -> Parsed:
    """Every message and status of a decoded webhook body."""
    root = _obj(body, "body")
    entries = _list(root.get("entry"), "entry")
    parsed = Parsed()
    for i, entry_raw in enumerate(entries):
        entry = _obj(entry_raw, f"entry[{i}]")
        changes = _list(entry.get("changes", []), f"entry[{i}].changes")
        for j, change_raw in enumerate(changes):
            where = f"entry[{i}].changes[{j}]"
            change = _obj(change_raw, where)
            if change.get("field") == TEMPLATE_FIELD:
                parsed.template_updates += 1
                continue
            if change.get("field") != "messages":
                parsed.ignored += 1
                continue
            value = _obj(change.get("value"), f"{where}.value")
            _parse_value(value, f"{where}.value", parsed, received_ms)
    return parsed


def _parse_value(
    value: Mapping[str, Any], where: str, parsed: Parsed, received_ms: int | None
) -> None:
    contacts = _contacts(_list(value.get("contacts", []), f"{where}.contacts"))
    metadata = value.get("metadata")
    number = clean(metadata.get("phone_number_id"), 64) if isinstance(metadata, dict) else None
    number = number if number and _DIGITS.fullmatch(number) else None
    for k, raw in enumerate(_list(value.get("messages", []), f"{where}.messages")):
        m_where = f"{where}.messages[{k}]"
        try:
            m = _obj(raw, m_where)
            message = _message(m, contacts, m_where, received_ms, len(parsed.messages))
            if number:
                message = _replace(message, phone_number_id=number)
        except ParseError as e:
            parsed.refused.append(str(e))
            continue
        parsed.messages.append(message)
    for k, raw in enumerate(_list(value.get("statuses", []), f"{where}.statuses")):
        s_where = f"{where}.statuses[{k}]"
        try:
            status = _status(_obj(raw, s_where), s_where)
        except ParseError as e:
            parsed.refused.append(str(e))
            continue
        if status is None:
            parsed.ignored += 1
        else:
            parsed.statuses.append(status)


@dataclass(slots=True, frozen=True)
class _Contact:
    """A `contacts[]` element: how WhatsApp names the sender of the messages beside it."""

    wa_id: str | None
    user_id: str | None
    name: str | None
    username: str | None


def _contacts(raw: list[Any]) -> list[_Contact]:
    """The usable `contacts[]` elements; a malformed one is skipped (it only names)."""
    contacts = []
    for item in raw:
        if not isinstance(item, dict):
            continue
        profile = item.get("profile")
        profile = profile if isinstance(profile, dict) else {}
        wa_id = clean(item.get("wa_id"))
        user_id = clean(item.get("user_id"))
        contacts.append(
            _Contact(
                wa_id=wa_id if wa_id and _DIGITS.fullmatch(wa_id) else None,
                user_id=user_id if user_id and _BSUID.fullmatch(user_id) else None,
                name=clean_name(profile.get("name")),
                username=clean_name(profile.get("username")),
            )
        )
    return contacts


def _contact_for(contacts: list[_Contact], phone: str | None, bsuid: str | None) -> _Contact | None:
    """The contact that names this sender; the only one when none matches exactly."""
    for contact in contacts:
        if (phone and contact.wa_id == phone) or (bsuid and contact.user_id == bsuid):
            return contact
    return contacts[0] if len(contacts) == 1 else None


def clean(value: Any, limit: int = MAX_EXTRA_CHARS) -> str | None:
    """A string from the body, bounded and encodable (lone surrogates become U+FFFD)."""
    if not isinstance(value, str) or not value:
        return None
    return _encodable(value[:limit])


def clean_name(value: Any) -> str | None:
    """A display name: cleaned, without control or bidi-override characters, trimmed."""
    text = clean(value, MAX_NAME_CHARS * 2)
    if text is None:
        return None
    text = _NAME_JUNK.sub("", text).strip()[:MAX_NAME_CHARS]
    return text or None


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", text)
    return text


def _message(
    m: Mapping[str, Any],
    contacts: list[_Contact],
    where: str,
    received_ms: int | None,
    position: int,
) -> InboundMessage:
    """One message; ParseError only when it has no id or no sender (it cannot be kept)."""
    wamid = _str(m.get("id"), f"{where}.id")
    if len(wamid) > MAX_ID_CHARS:
        raise ParseError(f"{where}.id is too long")
    phone = _opt_str(m.get("from"))
    if phone is not None and not _DIGITS.fullmatch(phone):
        phone = None
    bsuid = _opt_str(m.get("from_user_id"))
    if bsuid is not None and not _BSUID.fullmatch(bsuid):
        bsuid = None
    contact = _contact_for(contacts, phone, bsuid)
    if contact is not None:
        phone = phone or contact.wa_id
        bsuid = bsuid or contact.user_id
    if phone is None and bsuid is None:
        raise ParseError(f"{where} names no sender (from or from_user_id)")
    identities = tuple(
        identity
        for identity in (f"phone:{phone}" if phone else None, f"bsuid:{bsuid}" if bsuid else None)
        if identity
    )
    kind = clean(m.get("type"), 64) or "unknown"
    name = contact.name or contact.username if contact is not None else None
    # In body order whatever else is wrong with it: WhatsApp's time, made precise by ours.
    arrived = received_ms if received_ms is not None else int(time.time() * 1000)
    try:
        at = _refine(_timestamp(m.get("timestamp"), f"{where}.timestamp"), received_ms, position)
        problem = None
    except ParseError as e:
        at, problem = arrived + position, e
    base = InboundMessage(
        wa_message_id=wamid,
        user_id=phone or str(bsuid),
        user_name=name,
        phone="+" + phone if phone else "",
        type="unsupported",
        text=None,
        at=at,
        identities=identities,
    )
    try:
        if problem is not None:
            raise problem
        msg_type, text, media, extra = _content(m, kind, where)
        extra = {**extra, **_context(m)}
    except ParseError as e:
        # Kept, with why: the customer wrote something, and an agent should know.
        return _replace(base, extra={"original_type": kind, "reason": str(e)[:300]})
    if contact is not None and contact.username:
        extra["username"] = contact.username
    return _replace(base, type=msg_type, text=text, media=media, extra=extra or None)


def _replace(message: InboundMessage, **changes: Any) -> InboundMessage:
    return dataclasses.replace(message, **changes)


Content = tuple[str, str | None, Media | None, dict[str, Any]]


def _content(m: Mapping[str, Any], kind: str, where: str) -> Content:
    """The stored type, text, media and extras of one message, by its WhatsApp type."""
    errors = m.get("errors")
    if errors is not None and not isinstance(m.get(kind), dict):
        # WhatsApp could not deliver the content (131000 "unsupported webhook payload",
        # 131051 "message type unknown"): whatever the type says, keep what it told us.
        return "unsupported", None, None, {"original_type": kind, "errors": _errors(errors)}
    if kind == "text":
        body = _obj(m.get("text"), f"{where}.text")
        text = _str(body.get("body"), f"{where}.text.body", empty_ok=True)
        return "text", text[:MAX_TEXT_CHARS], None, {}
    if kind == "system":
        return _system(_obj(m.get("system"), f"{where}.system"))
    if kind in MEDIA_TYPES:
        return _media(m, kind, where)
    if kind == "location":
        return _location(_obj(m.get("location"), f"{where}.location"), f"{where}.location")
    if kind == "interactive":
        return _interactive(_obj(m.get("interactive"), f"{where}.interactive"), where)
    if kind == "button":
        # A quick-reply button of a template message: the customer's choice, like a reply.
        button = _obj(m.get("button"), f"{where}.button")
        text = _str(button.get("text"), f"{where}.button.text", empty_ok=True)
        extra = {"interactive_type": "button", "payload": _opt_str(button.get("payload"))}
        return "interactive", text, None, extra
    if kind == "reaction":
        reaction = _obj(m.get("reaction"), f"{where}.reaction")
        target = _str(reaction.get("message_id"), f"{where}.reaction.message_id")
        emoji = _opt_str(reaction.get("emoji"))
        # No emoji means the customer removed their reaction.
        return "reaction", emoji, None, {"reacted_to": target, "removed": emoji is None}
    return "unsupported", None, None, {"original_type": kind, "errors": _errors(m.get("errors"))}


def _media(m: Mapping[str, Any], kind: str, where: str) -> Content:
    body = _obj(m.get(kind), f"{where}.{kind}")
    media = Media(
        id=_str(body.get("id"), f"{where}.{kind}.id"),
        mime_type=_opt_str(body.get("mime_type")),
        caption=_opt_str(body.get("caption")),
        filename=_opt_str(body.get("filename")),
        sha256=clean(body.get("sha256"), 128),
    )
    extra: dict[str, Any] = {}
    if kind == "sticker":
        # The model has no sticker type; a sticker is an image that says what it was.
        extra = {"sticker": True, "animated": bool(body.get("animated"))}
        kind = "image"
    elif kind == "audio":
        extra = {"voice": bool(body.get("voice"))}
    return kind, None, media, extra


def _system(body: Mapping[str, Any]) -> Content:
    """A notice about the customer (changed their number or their user id): shown in the
    thread, never answered by the AI, and it carries no profile name."""
    extra: dict[str, Any] = {"system_type": _opt_str(body.get("type"))}
    for key in ("wa_id", "new_wa_id", "user_id", "customer"):
        if value := _opt_str(body.get(key)):
            extra[key] = value
    return "system", _opt_str(body.get("body")), None, extra


def _location(loc: Mapping[str, Any], where: str) -> Content:
    lat = _number(loc.get("latitude"), f"{where}.latitude")
    lng = _number(loc.get("longitude"), f"{where}.longitude")
    name = _opt_str(loc.get("name"))
    address = _opt_str(loc.get("address"))
    label = ", ".join(p for p in (name, address) if p)
    text = label or f"{lat:.5f}, {lng:.5f}"
    extra = {"latitude": lat, "longitude": lng, "name": name, "address": address}
    if url := _opt_str(loc.get("url")):
        extra["url"] = url
    return "location", text, None, extra


def _interactive(body: Mapping[str, Any], where: str) -> Content:
    kind = _str(body.get("type"), f"{where}.interactive.type")
    if kind in ("button_reply", "list_reply"):
        reply = _obj(body.get(kind), f"{where}.interactive.{kind}")
        title = _str(reply.get("title"), f"{where}.interactive.{kind}.title", empty_ok=True)
        extra: dict[str, Any] = {
            "interactive_type": kind,
            "reply_id": _str(reply.get("id"), f"{where}.interactive.{kind}.id"),
        }
        if description := _opt_str(reply.get("description")):
            extra["description"] = description
        return "interactive", title, None, extra
    # Flow replies (nfm_reply) and types added later: keep what a person can read.
    inner = body.get(kind)
    text = _opt_str(inner.get("body")) if isinstance(inner, dict) else None
    return "interactive", text, None, {"interactive_type": kind}


def _context(m: Mapping[str, Any]) -> dict[str, Any]:
    """What the message replies to, and the ad it came from, when WhatsApp says so."""
    extra: dict[str, Any] = {}
    context = m.get("context")
    if isinstance(context, dict) and (reply_to := clean(context.get("id"), MAX_ID_CHARS)):
        extra["reply_to"] = reply_to
    referral = m.get("referral")
    if isinstance(referral, dict):
        extra["referral"] = {
            key: _opt_str(referral.get(key))
            for key in ("source_type", "source_id", "source_url", "headline")
            if _opt_str(referral.get(key))
        }
    return extra


def _errors(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        return []
    errors = []
    for item in raw[:MAX_ERRORS]:
        if isinstance(item, dict):
            errors.append(
                {
                    "code": _code(item.get("code")),
                    "title": _opt_str(item.get("title")),
                    "message": _opt_str(item.get("message")),
                }
            )
    return errors


def _code(value: Any) -> int | str:
    """An error code as WhatsApp sent it, kept exactly: huge integers as their digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if abs(value) <= MAX_SAFE_INT else str(value)
    if isinstance(value, str) and value:
        return _encodable(value[:64])
    return "unknown"


def _status(s: Mapping[str, Any], where: str) -> StatusUpdate | None:
    wamid = _str(s.get("id"), f"{where}.id")
    status = _str(s.get("status"), f"{where}.status")
    if status not in KNOWN_STATUSES:
        return None
    try:
        at = _timestamp(s.get("timestamp"), f"{where}.timestamp")
    except ParseError:
        at = int(time.time() * 1000)  # the status itself is what matters, not its time
    error = None
    errors = s.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        first = errors[0]
        code = _code(first.get("code"))
        error = MessageError(code=code, title=describe_error(code, _opt_str(first.get("title"))))
    return StatusUpdate(
        wa_message_id=wamid,
        status=status,
        at=at,
        recipient_id=_opt_str(s.get("recipient_id")),
        error=error,
    )


# -- shape checks: each names the path of what is wrong, never the value ------------------


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ParseError(f"{where} must be an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ParseError(f"{where} must be a list")
    return value


def _str(value: Any, where: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise ParseError(f"{where} must be a string")
    if not value and not empty_ok:
        raise ParseError(f"{where} must not be empty")
    return _encodable(value)


def _opt_str(value: Any) -> str | None:
    return clean(value)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ParseError(f"{where} must be a number")
    try:
        number = float(value)
    except ValueError as e:
        raise ParseError(f"{where} must be a number") from e
    if not math.isfinite(number):
        raise ParseError(f"{where} must be a finite number")
    return number


def _refine(at: int, received_ms: int | None, position: int) -> int:
    """A whole-second WhatsApp time made precise by our clock, when it arrived that second.

    Replies are stamped in milliseconds; without this a customer's quick answer could sort
    before the reply it answers (12:00:05.000 < 12:00:05.400), and the AI would read the
    conversation out of order. A late delivery (a retry) keeps WhatsApp's own time. Either
    way the messages of one body are `position` ms apart, so they keep WhatsApp's order
    (even past the second's end: order matters more than the last millisecond).
    """
    if received_ms is not None and at <= received_ms < at + 1000:
        return received_ms + position
    return at + position


def _timestamp(value: Any, where: str) -> int:
    """Unix seconds (WhatsApp sends a string of digits) as milliseconds."""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        seconds = int(value)
    else:
        raise ParseError(f"{where} must be Unix seconds")
    # A time before WhatsApp existed, or more than a day ahead of our clock, is not one it
    # sent; kept, it would pin a conversation to the top of the list for ever.
    if not EARLIEST_S <= seconds <= time.time() + MAX_AHEAD_S:
        raise ParseError(f"{where} is not a plausible time")
    return seconds * 1000
