"""WhatsApp Cloud API webhooks: signature check and parsing, pure functions with no I/O.

The whole body is turned into domain records before anything is saved, so a malformed
update anywhere in a batch rejects the batch and nothing is half-written.
"""

from __future__ import annotations

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
# Bounds on what we copy into `extra` from fields the customer or an ad controls.
MAX_EXTRA_CHARS: Final = 1000
MAX_ERRORS: Final = 5
_DIGITS: Final = re.compile(r"\d{1,20}")


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
    """Decode and parse a webhook body; ParseError when any part of it is malformed.

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
            if change.get("field") != "messages":
                parsed.ignored += 1
                continue
            value = _obj(change.get("value"), f"{where}.value")
            _parse_value(value, f"{where}.value", parsed, received_ms)
    return parsed


def _parse_value(
    value: Mapping[str, Any], where: str, parsed: Parsed, received_ms: int | None
) -> None:
    names = _contact_names(value.get("contacts", []), f"{where}.contacts")
    for k, raw in enumerate(_list(value.get("messages", []), f"{where}.messages")):
        m = _obj(raw, f"{where}.messages[{k}]")
        parsed.messages.append(_message(m, names, where, k, received_ms, len(parsed.messages)))
    for k, raw in enumerate(_list(value.get("statuses", []), f"{where}.statuses")):
        status = _status(_obj(raw, f"{where}.statuses[{k}]"), f"{where}.statuses[{k}]")
        if status is None:
            parsed.ignored += 1
        else:
            parsed.statuses.append(status)


def _contact_names(raw: Any, where: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for k, item in enumerate(_list(raw, where)):
        contact = _obj(item, f"{where}[{k}]")
        wa_id = contact.get("wa_id")
        profile = contact.get("profile")
        name = profile.get("name") if isinstance(profile, dict) else None
        if isinstance(wa_id, str) and isinstance(name, str) and name.strip():
            names[wa_id] = name.strip()[:200]
    return names


def _message(
    m: Mapping[str, Any],
    names: dict[str, str],
    value_where: str,
    k: int,
    received_ms: int | None,
    position: int,
) -> InboundMessage:
    where = f"{value_where}.messages[{k}]"
    wamid = _str(m.get("id"), f"{where}.id")
    sender = _str(m.get("from"), f"{where}.from")
    if not _DIGITS.fullmatch(sender):
        raise ParseError(f"{where}.from must be a phone number in digits")
    at = _refine(_timestamp(m.get("timestamp"), f"{where}.timestamp"), received_ms, position)
    kind = _str(m.get("type"), f"{where}.type")
    # wa_id and `from` usually agree; when they do not and there is one contact, it is them.
    name = names.get(sender) or (next(iter(names.values())) if len(names) == 1 else None)
    msg_type, text, media, extra = _content(m, kind, where)
    extra = {**extra, **_context(m)}
    return InboundMessage(
        wa_message_id=wamid,
        user_id=sender,
        user_name=name or "+" + sender,
        phone="+" + sender,
        type=msg_type,
        text=text,
        at=at,
        media=media,
        extra=extra or None,
    )


Content = tuple[str, str | None, Media | None, dict[str, Any]]


def _content(m: Mapping[str, Any], kind: str, where: str) -> Content:
    """The stored type, text, media and extras of one message, by its WhatsApp type."""
    if kind == "text":
        body = _obj(m.get("text"), f"{where}.text")
        return "text", _str(body.get("body"), f"{where}.text.body", empty_ok=True), None, {}
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
    )
    extra: dict[str, Any] = {}
    if kind == "sticker":
        # The model has no sticker type; a sticker is an image that says what it was.
        extra = {"sticker": True, "animated": bool(body.get("animated"))}
        kind = "image"
    elif kind == "audio":
        extra = {"voice": bool(body.get("voice"))}
    return kind, None, media, extra


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
    if isinstance(context, dict) and isinstance(context.get("id"), str):
        extra["reply_to"] = context["id"]
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
            errors.append({"code": item.get("code"), "title": _opt_str(item.get("title"))})
    return errors


def _status(s: Mapping[str, Any], where: str) -> StatusUpdate | None:
    wamid = _str(s.get("id"), f"{where}.id")
    status = _str(s.get("status"), f"{where}.status")
    at = _timestamp(s.get("timestamp"), f"{where}.timestamp")
    if status not in KNOWN_STATUSES:
        return None
    error = None
    errors = s.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        first = errors[0]
        code = first.get("code")
        if not isinstance(code, int | str):
            code = "unknown"
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
    return value


def _opt_str(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value[:MAX_EXTRA_CHARS]


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
