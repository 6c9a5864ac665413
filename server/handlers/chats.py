"""The live-chat API: the unified chat list, one conversation, its messages, agent actions."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Final

from aiohttp import web

from server import keys
from server.chatlist import NotReady
from server.handlers import replies
from server.handlers.errors import BadRequest, json_error, read_json
from server.models import CONVERSATION_STATUSES, dumps
from server.snapshot import Assignee
from server.store.base import UNSET, NotFound, Unset

LIST_LIMIT: Final = (1, 100, 30)
SEARCH_LIMIT: Final = (1, 50, 20)
MESSAGES_LIMIT: Final = (1, 200, 50)
MAX_QUERY: Final = 100
# Our ids are about 22 characters (server/store/base.py new_id); anything far longer is
# not one of ours.
MAX_ID: Final = 64


def parse_assignee(request: web.Request) -> Assignee:
    """The `assignee` filter: `me`, `none`, an agent's id, or absent (no filter)."""
    raw = request.query.get("assignee")
    if raw is None or raw == "":
        return UNSET
    if raw == "none":
        return None
    if raw == "me":
        agent_id = request[keys.PRINCIPAL].agent_id
        if agent_id is None:
            raise BadRequest("assignee=me needs an agent's sign-in or token", "invalid_assignee")
        return agent_id
    if len(raw) > MAX_ID:
        raise BadRequest(f"assignee must be at most {MAX_ID} characters", "invalid_assignee")
    return raw


def parse_limit(request: web.Request, bounds: tuple[int, int, int]) -> int:
    """The `limit` query parameter within its bounds, or BadRequest."""
    low, high, default = bounds
    raw = request.query.get("limit")
    if raw is None or raw == "":
        return default
    # isascii: str.isdigit() also accepts digits int() refuses ('²').
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise BadRequest(f"limit must be an integer from {low} to {high}", "invalid_limit")
    return int(raw)


def json_bytes(body: bytes, status: int = HTTPStatus.OK) -> web.Response:
    """A response from JSON prepared in advance."""
    return web.Response(body=body, status=status, content_type="application/json")


async def unified_chats(request: web.Request) -> web.Response:
    """GET the unified chat list: newest activity first, keyset paginated."""
    limit = parse_limit(request, LIST_LIMIT)
    status = request.query.get("status") or "all"
    if status not in (*CONVERSATION_STATUSES, "all"):
        raise BadRequest("status must be open, resolved or all", "invalid_status")
    q = parse_query(request)
    assignee = parse_assignee(request)
    number = request.query.get("number") or None
    if number is not None and not (number.isascii() and number.isdigit() and len(number) <= 20):
        raise BadRequest("number must be a phone number id (digits)", "invalid_number")
    try:
        page = await request.app[keys.CHATLIST].page(
            limit=limit,
            cursor=request.query.get("cursor") or None,
            status=None if status == "all" else status,
            q=q or None,
            assignee=assignee,
            number=number,
        )
    except NotReady:
        return json_error(
            HTTPStatus.SERVICE_UNAVAILABLE,
            "warming_up",
            "the chat list is loading; try again in a moment",
            headers={"Retry-After": "1"},
        )
    return json_bytes(page.body)


def parse_query(request: web.Request) -> str:
    """The `q` query parameter, stripped and bounded, or BadRequest."""
    q = request.query.get("q", "").strip()
    if len(q) > MAX_QUERY:
        raise BadRequest(f"q must be at most {MAX_QUERY} characters", "invalid_query")
    return q


async def search_messages(request: web.Request) -> web.Response:
    """GET messages whose text matches `q`, newest first, each with its conversation and
    the matching part of the text; keyset paginated."""
    limit = parse_limit(request, SEARCH_LIMIT)
    q = parse_query(request)
    if not q:
        raise BadRequest("q is required", "invalid_query")
    body = await request.app[keys.CHATLIST].messages(
        q=q, cursor=request.query.get("cursor") or None, limit=limit
    )
    return json_bytes(body)


async def get_conversation(request: web.Request) -> web.Response:
    """GET one conversation summary (from the snapshot when it holds it)."""
    conversation_id = request.match_info["id"]
    row = request.app[keys.SNAPSHOT].get(conversation_id)
    if row is not None:
        return json_bytes(row.body)
    conversation = await request.app[keys.STORE].get_conversation(conversation_id)
    return json_bytes(dumps(conversation.to_json()))


async def list_messages(request: web.Request) -> web.Response:
    """GET a page of a conversation's messages: oldest first, `before` pages back in time."""
    conversation_id = request.match_info["id"]
    limit = parse_limit(request, MESSAGES_LIMIT)
    kind = f"messages:{conversation_id}"
    cursors = request.app[keys.CURSORS]
    before_raw = request.query.get("before") or request.query.get("cursor")
    before = cursors.decode(kind, before_raw) if before_raw else None
    messages, has_more = await request.app[keys.STORE].list_messages(conversation_id, limit, before)
    next_cursor = (
        cursors.encode(kind, (messages[0].at, messages[0].id)) if has_more and messages else None
    )
    return json_bytes(
        dumps(
            {
                "messages": [m.to_json() for m in messages],
                "next_cursor": next_cursor,
                "has_more": has_more,
            }
        )
    )


async def post_message(request: web.Request) -> web.Response:
    """POST an agent's message (text, a file, a template or a reaction, optionally as a
    reply to a message): saved, broadcast, sent to WhatsApp; turns the AI off. Free-form
    messages outside the customer-service window are 422 `window_closed`."""
    saved = await replies.post(request, request.match_info["id"])
    return json_bytes(dumps(saved.message.to_json()), status=HTTPStatus.CREATED)


async def retry_message(request: web.Request) -> web.Response:
    """POST retry: send a failed reply again (queued, then sent); 409 unless it failed."""
    conversation_id = request.match_info["id"]
    message = await request.app[keys.STORE].get_message(request.match_info["message_id"])
    if message.conversation_id != conversation_id:
        raise NotFound(f"no message {message.id!r} in conversation {conversation_id!r}")
    saved = await request.app[keys.INBOX].retry(message.id)
    return json_bytes(dumps(saved.message.to_json()), status=HTTPStatus.ACCEPTED)


async def delete_conversation(request: web.Request) -> web.Response:
    """DELETE a conversation with its messages; every dashboard drops it."""
    conversation = await request.app[keys.INBOX].delete(request.match_info["id"])
    return json_bytes(dumps({"deleted": conversation.id}))


async def mark_read(request: web.Request) -> web.Response:
    """POST read: the unread count goes to 0 on every dashboard, and the customer sees
    blue ticks (unless LIVECHAT_READ_RECEIPTS is off)."""
    conversation = await request.app[keys.INBOX].read(request.match_info["id"])
    return json_bytes(dumps(conversation.to_json()))


async def patch_conversation(request: web.Request) -> web.Response:
    """PATCH status, ai_enabled or assignee."""
    body = await read_json(request)
    unknown = set(body) - {"status", "ai_enabled", "assignee"}
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}", "invalid_field")
    if not body:
        raise BadRequest("nothing to change: send status, ai_enabled or assignee", "empty_patch")
    changes: dict[str, Any] = {}
    if "status" in body:
        if body["status"] not in CONVERSATION_STATUSES:
            raise BadRequest("status must be open or resolved", "invalid_status")
        changes["status"] = body["status"]
    if "ai_enabled" in body:
        if not isinstance(body["ai_enabled"], bool):
            raise BadRequest("ai_enabled must be true or false", "invalid_ai_enabled")
        changes["ai_enabled"] = body["ai_enabled"]
    assignee: str | Unset | None = UNSET
    if "assignee" in body:
        assignee = await _assignee(request, body["assignee"])
    conversation = await request.app[keys.INBOX].update(
        request.match_info["id"], assignee=assignee, **changes
    )
    return json_bytes(dumps(conversation.to_json()))


async def _assignee(request: web.Request, value: object) -> str | None:
    """An assignee from a PATCH: null, or the id of an existing, enabled agent."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_ID:
        raise BadRequest("assignee must be an agent's id or null", "invalid_assignee")
    agent = await request.app[keys.ACCOUNTS].find_agent(value)
    if agent is None:
        raise BadRequest(f"no agent has the id {value!r}", "unknown_assignee")
    if agent.disabled:
        raise BadRequest("that agent is disabled", "unknown_assignee")
    return agent.id


async def list_templates(request: web.Request) -> web.Response:
    """GET the account's message templates (`?refresh=1` reads them from WhatsApp now)."""
    catalog = request.app[keys.TEMPLATES]
    templates = await catalog.templates(refresh=request.query.get("refresh") == "1")
    return json_bytes(
        dumps(
            {
                "templates": [t.to_json() for t in templates if t.approved],
                "configured": catalog.configured,
            }
        )
    )


async def list_numbers(request: web.Request) -> web.Response:
    """GET the business numbers replies go out from (the list's number filter)."""
    numbers = request.app[keys.SETTINGS].numbers
    return json_bytes(dumps({"numbers": [{"id": n.id} for n in numbers]}))
