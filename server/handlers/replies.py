"""What an agent sends to a conversation, read from the request and checked: free text, a
template, a reaction (JSON), or a file with an optional caption (multipart form).

Whatever is sent is the signed-in agent's (the request's principal): a client never names
the agent, and a body that tries (`agent_id`) is refused."""

from __future__ import annotations

import mimetypes
from typing import Any, Final

from aiohttp import BodyPartReader, web

from server import keys
from server.handlers.errors import BadRequest
from server.handlers.errors import read_json as read_body
from server.integrations.templates import TemplateError
from server.store import rules
from server.store.base import Saved

# WhatsApp refuses a text body longer than this (a caption: 1,024).
MAX_TEXT: Final = 4096
MAX_CAPTION: Final = 1024
# The largest file WhatsApp takes (a document); each type's own limit is checked after.
MAX_FILE: Final = rules.MEDIA_LIMITS["document"]
# Form fields other than the file are short.
MAX_FIELD: Final = 8 * 1024
JSON_FIELDS: Final = frozenset({"text", "reply_to", "template", "reaction"})


async def post(request: web.Request, conversation_id: str) -> Saved:
    """Send what the request asks for; BadRequest (400) when it is malformed."""
    replies = request.app[keys.REPLIES]
    if request.content_type.startswith("multipart/"):
        return await _attachment(request, conversation_id)
    body = await read_body(request)
    unknown = set(body) - JSON_FIELDS
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}", "invalid_field")
    agent_id = request[keys.PRINCIPAL].agent_id
    reply_to = _opt_str(body, "reply_to", "invalid_reply_to")
    try:
        if "reaction" in body:
            reaction = body["reaction"]
            if not isinstance(reaction, dict) or not isinstance(reaction.get("message_id"), str):
                raise BadRequest(
                    'reaction must be {"message_id", "emoji"} (an empty emoji removes it)',
                    "invalid_reaction",
                )
            emoji = reaction.get("emoji") or ""
            if not isinstance(emoji, str) or len(emoji) > 16:
                raise BadRequest("emoji must be one emoji", "invalid_reaction")
            return await replies.reaction(
                conversation_id, reaction["message_id"], emoji, agent_id=agent_id
            )
        if "template" in body:
            template = body["template"]
            if not isinstance(template, dict) or not all(
                isinstance(template.get(k), str) for k in ("name", "language")
            ):
                raise BadRequest(
                    'template must be {"name", "language", "parameters": [...]}',
                    "invalid_template",
                )
            return await replies.template(
                conversation_id,
                template["name"],
                template["language"],
                template.get("parameters"),
                template.get("header_parameters"),
                reply_to=reply_to,
                agent_id=agent_id,
            )
    except TemplateError as e:
        if e.code == "invalid_template":
            raise BadRequest(str(e), e.code) from e
        raise
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("text must be a non-empty string", "invalid_text")
    if len(text) > MAX_TEXT:
        raise BadRequest(f"text must be at most {MAX_TEXT} characters", "invalid_text")
    return await replies.text(conversation_id, text, reply_to=reply_to, agent_id=agent_id)


def _opt_str(body: dict[str, Any], key: str, code: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{key} must be a string", code)
    return value


async def _attachment(request: web.Request, conversation_id: str) -> Saved:
    """A multipart form: `file` (required), `caption`, `reply_to`."""
    reader = await request.multipart()
    fields: dict[str, str] = {}
    data: bytes | None = None
    mime_type = filename = None
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise BadRequest("nested multipart bodies are not supported", "invalid_form")
        if part.name == "file":
            filename = part.filename
            mime_type = part.headers.get("Content-Type")
            data = await _read_part(part, MAX_FILE, "file")
        elif part.name in ("caption", "reply_to"):
            fields[part.name] = (await _read_part(part, MAX_FIELD, part.name)).decode(
                "utf-8", "replace"
            )
        else:
            raise BadRequest(f"unknown form field {part.name!r}", "invalid_field")
    if not data:
        raise BadRequest("attach a non-empty file in the form field 'file'", "invalid_file")
    if not mime_type or mime_type == "application/octet-stream":
        mime_type = mimetypes.guess_type(filename or "")[0] or "application/octet-stream"
    caption = fields.get("caption", "").strip() or None
    if caption and len(caption) > MAX_CAPTION:
        raise BadRequest(f"caption must be at most {MAX_CAPTION} characters", "invalid_caption")
    return await request.app[keys.REPLIES].attachment(
        conversation_id,
        data,
        mime_type,
        filename,
        caption,
        reply_to=fields.get("reply_to") or None,
        agent_id=request[keys.PRINCIPAL].agent_id,
    )


async def _read_part(part: BodyPartReader, limit: int, name: str) -> bytes:
    """A form part's bytes, refused past `limit` (read in chunks: never more in memory)."""
    data = bytearray()
    while chunk := await part.read_chunk(256 * 1024):
        data += chunk
        if len(data) > limit:
            raise BadRequest(
                f"{name} is larger than {limit // (1024 * 1024) or 1} MB", "body_too_large"
            )
    return bytes(data)
