"""Agents, their sign-in sessions and personal API tokens: the records and the AgentStore protocol.

Kept apart from the ChatStore (conversations and messages): accounts change rarely, are
read through an in-memory cache (server/accounts.py), and each store keeps them in tables
or collections of their own.

Every change to an agent, and every write that takes access away (sign-out, disabling an
agent, a new password, a revoked token), also increments the store's `auth_version`. Each
instance polls that one number, so a change made anywhere (another instance, the command
line) reaches every cache within a poll interval.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Final, Literal, Protocol

from server.store.base import NotFound, StoreError

Role = Literal["admin", "agent"]
ROLES: Final = ("admin", "agent")


class AgentExists(StoreError):
    """An agent with this email exists already."""


class NoSuchAgent(NotFound):
    """No agent has this id or email."""


@dataclass(slots=True, frozen=True)
class Agent:
    """A person who signs in to the dashboard."""

    id: str
    email: str  # lower case: the sign-in name, unique
    name: str
    role: str  # "admin" or "agent"
    password_hash: str
    disabled: bool
    created_at: int

    def to_json(self) -> dict[str, Any]:
        """The API shape (never the password hash)."""
        return {
            "id": self.id,
            "email": self.email,
            "name": self.name,
            "role": self.role,
            "disabled": self.disabled,
        }

    def with_changes(self, **changes: Any) -> Agent:
        """A copy with some fields changed."""
        return replace(self, **changes)


@dataclass(slots=True, frozen=True)
class SessionRecord:
    """A dashboard sign-in: the SHA-256 of the cookie's random value, never the value."""

    token_hash: str
    agent_id: str
    created_at: int
    expires_at: int


@dataclass(slots=True, frozen=True)
class TokenRecord:
    """A personal API token for scripts and integrations, stored as its SHA-256."""

    id: str
    token_hash: str
    agent_id: str
    label: str
    created_at: int
    revoked: bool = False

    def to_json(self) -> dict[str, Any]:
        """What listing shows (never the hash)."""
        return {
            "id": self.id,
            "agent_id": self.agent_id,
            "label": self.label,
            "created_at": self.created_at,
            "revoked": self.revoked,
        }


def agent_to_doc(a: Agent) -> dict[str, Any]:
    """An agent as a flat document (both stores)."""
    return {
        "id": a.id,
        "email": a.email,
        "name": a.name,
        "role": a.role,
        "password_hash": a.password_hash,
        "disabled": a.disabled,
        "created_at": a.created_at,
    }


def agent_from_doc(d: dict[str, Any]) -> Agent:
    """An agent from its flat document."""
    return Agent(
        id=str(d["id"]),
        email=str(d["email"]),
        name=str(d.get("name") or ""),
        role=str(d.get("role") or "agent"),
        password_hash=str(d.get("password_hash") or ""),
        disabled=bool(d.get("disabled", False)),
        created_at=int(d.get("created_at") or 0),
    )


class AgentStore(Protocol):
    """Where agents, sessions and personal tokens are kept."""

    async def start(self) -> None:
        """Open connections and create what is missing."""

    async def close(self) -> None:
        """Release every resource."""

    async def auth_version(self) -> int:
        """A number that grows with every write that takes access away."""

    async def list_agents(self) -> list[Agent]:
        """Every agent, disabled ones included, oldest first."""

    async def get_agent(self, agent_id: str) -> Agent | None:
        """One agent by id."""

    async def agent_by_email(self, email: str) -> Agent | None:
        """One agent by (lower-case) email."""

    async def add_agent(self, agent: Agent) -> Agent:
        """Store a new agent; AgentExists when the email is taken."""

    async def update_agent(
        self,
        agent_id: str,
        *,
        name: str | None = None,
        role: str | None = None,
        disabled: bool | None = None,
        password_hash: str | None = None,
    ) -> Agent:
        """Change an agent; disabling it or a new password also ends its sessions."""

    async def add_session(self, session: SessionRecord) -> None:
        """Store a new sign-in session (and forget expired ones)."""

    async def get_session(self, token_hash: str) -> SessionRecord | None:
        """The session with this hash, if it exists (expired ones included)."""

    async def delete_session(self, token_hash: str) -> None:
        """Sign out: the session stops working on every instance."""

    async def add_token(self, token: TokenRecord) -> None:
        """Store a new personal API token."""

    async def get_token(self, token_hash: str) -> TokenRecord | None:
        """The token with this hash, if it exists."""

    async def list_tokens(self, agent_id: str) -> list[TokenRecord]:
        """An agent's tokens, revoked ones included."""

    async def revoke_token(self, token_id: str) -> TokenRecord:
        """Revoke a token by id; NotFound when no token has it."""
