"""The team: agents listed for everyone (to assign and to name who replied), managed by admins."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from aiohttp import web

from server import keys
from server.accounts import InvalidAccount
from server.handlers.errors import BadRequest, json_error, read_json
from server.store.agents import AgentExists


def _fields(body: dict[str, Any], allowed: set[str], types: dict[str, type]) -> dict[str, Any]:
    unknown = set(body) - allowed
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}", "invalid_field")
    for name, value in body.items():
        if not isinstance(value, types[name]) or (types[name] is int and isinstance(value, bool)):
            kind = "true or false" if types[name] is bool else "a string"
            raise BadRequest(f"{name} must be {kind}", f"invalid_{name}")
    return body


async def list_agents(request: web.Request) -> web.Response:
    """GET /api/agents: every agent (disabled ones too: their replies keep their names)."""
    agents = request.app[keys.ACCOUNTS].agents()
    return web.json_response({"agents": [a.to_json() for a in agents]})


async def add_agent(request: web.Request) -> web.Response:
    """POST /api/agents {"email", "name", "role", "password"} (admins): 201 and the agent."""
    body = _fields(
        await read_json(request),
        {"email", "name", "role", "password"},
        {"email": str, "name": str, "role": str, "password": str},
    )
    missing = {"email", "name", "password"} - set(body)
    if missing:
        raise BadRequest(f"missing fields: {', '.join(sorted(missing))}", "missing_field")
    try:
        agent = await request.app[keys.ACCOUNTS].add_agent(
            body["email"], body["name"], body.get("role", "agent"), body["password"]
        )
    except InvalidAccount as e:
        raise BadRequest(str(e), e.code) from e
    except AgentExists as e:
        return json_error(HTTPStatus.CONFLICT, "agent_exists", str(e))
    return web.json_response(agent.to_json(), status=HTTPStatus.CREATED)


async def update_agent(request: web.Request) -> web.Response:
    """PATCH /api/agents/{id} {"name", "role", "disabled", "password"} (admins).

    Disabling an agent ends their sessions, tokens and open streams at once; a new
    password ends their sessions.
    """
    body = _fields(
        await read_json(request),
        {"name", "role", "disabled", "password"},
        {"name": str, "role": str, "disabled": bool, "password": str},
    )
    if not body:
        raise BadRequest("nothing to change: send name, role, disabled or password", "empty_patch")
    agent_id = request.match_info["id"]
    me = request[keys.PRINCIPAL]
    if agent_id == me.agent_id and (body.get("disabled") or body.get("role") == "agent"):
        # The last admin locking themself out would need the command line to undo.
        raise BadRequest("admins cannot disable or demote themselves", "cannot_change_self")
    try:
        agent = await request.app[keys.ACCOUNTS].update_agent(
            agent_id,
            name=body.get("name"),
            role=body.get("role"),
            disabled=body.get("disabled"),
            password=body.get("password"),
        )
    except InvalidAccount as e:
        raise BadRequest(str(e), e.code) from e
    return web.json_response(agent.to_json())
