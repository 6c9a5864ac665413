"""Agents, sessions and personal tokens in Cloud Firestore (or its emulator).

Collections, beside the chat data:

- `agents/{agent_id}`: the agent (server/store/agents.py's flat form).
- `agent_emails/{sha256(email)}`: `{"agent_id"}`. Created in the same transaction as the
  agent: `create()` fails when the document exists, so two instances can never add two
  agents with one email (a query cannot guarantee that).
- `agent_sessions/{sha256(cookie value)}`: agent_id, created_at, expires_at (ms) and
  `expire_at`, a timestamp a TTL policy can delete expired sessions by (docs/PRODUCTION.md).
- `agent_tokens/{sha256(token)}`: id, agent_id, label, created_at, revoked.
- `_livechat/auth`: `{"version"}`, incremented (a server-side `Increment`, atomic with the
  write it goes with) by every change to an agent and every write that takes access away;
  instances poll this one document (one read a poll).

The client is an AsyncClient of its own: accounts are read rarely (the server caches them)
and must not share a channel with the chat store's listener hand-overs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from google.api_core import exceptions as gexc
from google.cloud import firestore
from google.cloud.firestore_v1 import FieldFilter, async_transactional

from server.config import Settings
from server.store.agents import (
    Agent,
    AgentExists,
    NoSuchAgent,
    SessionRecord,
    TokenRecord,
    agent_from_doc,
    agent_to_doc,
)
from server.store.base import NotFound, StoreError, StoreUnavailable

T = TypeVar("T")

AGENTS: Final = "agents"
AGENT_EMAILS: Final = "agent_emails"
SESSIONS: Final = "agent_sessions"
TOKENS: Final = "agent_tokens"
VERSION_DOC: Final = "_livechat/auth"
# As the chat store: a sign-in must not hang while Firestore is down.
OP_TIMEOUT_S: Final = 10.0
# The version poll's read answers in milliseconds when Firestore is up.
VERSION_TIMEOUT_S: Final = 5.0
# Firestore accepts at most 500 writes in one transaction; an agent with more sessions
# than this has the rest ended by expiry (each session is also checked against the agent).
MAX_SESSIONS_ENDED: Final = 400

_UNAVAILABLE: Final = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.RetryError,
    gexc.InternalServerError,
    gexc.Unknown,
    gexc.Cancelled,
)


def email_key(email: str) -> str:
    """The document id of an email's uniqueness marker (emails may hold '/')."""
    return hashlib.sha256(email.encode()).hexdigest()


def _session_from(d: dict[str, Any], token_hash: str) -> SessionRecord:
    return SessionRecord(
        token_hash=token_hash,
        agent_id=str(d["agent_id"]),
        created_at=int(d["created_at"]),
        expires_at=int(d["expires_at"]),
    )


def _token_from(d: dict[str, Any], token_hash: str) -> TokenRecord:
    return TokenRecord(
        id=str(d["id"]),
        token_hash=token_hash,
        agent_id=str(d["agent_id"]),
        label=str(d.get("label") or ""),
        created_at=int(d.get("created_at") or 0),
        revoked=bool(d.get("revoked", False)),
    )


class FirestoreAgents:
    """AgentStore on Cloud Firestore."""

    def __init__(self, settings: Settings) -> None:
        self.project = settings.google_cloud_project
        self.emulator_host = settings.firestore_emulator_host
        self._db: Any = None

    async def start(self) -> None:
        """Create the client (Firestore is reached on the first call)."""
        if self.emulator_host:
            # The client library reads the emulator address only from the environment.
            os.environ["FIRESTORE_EMULATOR_HOST"] = self.emulator_host
        self._db = firestore.AsyncClient(project=self.project)

    async def close(self) -> None:
        """Close the client's channel."""
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(Exception):  # a broken channel may fail to close
                await db._firestore_api.transport.close()

    @property
    def _client(self) -> Any:
        if self._db is None:
            raise StoreUnavailable("the store is not open")
        return self._db

    @contextlib.asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(OP_TIMEOUT_S):
                yield
        except TimeoutError as e:
            raise StoreUnavailable(f"firestore did not answer ({what})") from e
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"firestore unavailable ({what}): {type(e).__name__}") from e
        except gexc.GoogleAPICallError as e:
            raise StoreError(f"firestore refused {what}: {type(e).__name__}") from e

    async def _transact(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        async with self._guard(what):
            result: T = await async_transactional(fn)(self._client.transaction())
        return result

    def _bump(self, tx: Any) -> None:
        tx.set(self._client.document(VERSION_DOC), {"version": firestore.Increment(1)}, merge=True)

    # -- reads --------------------------------------------------------------------------

    async def auth_version(self) -> int:
        """The revocation counter: one document read, not retried (it is read again within
        a second anyway, and retries would keep a call open through an outage)."""
        async with self._guard("auth version"):
            snap = await self._client.document(VERSION_DOC).get(
                retry=None, timeout=VERSION_TIMEOUT_S
            )
        return int(snap.get("version") or 0) if snap.exists else 0

    async def list_agents(self) -> list[Agent]:
        """Every agent, oldest first."""
        async with self._guard("list agents"):
            snaps = await self._client.collection(AGENTS).get()
        agents = [agent_from_doc(s.to_dict()) for s in snaps]
        return sorted(agents, key=lambda a: (a.created_at, a.id))

    async def get_agent(self, agent_id: str) -> Agent | None:
        """One agent by id."""
        async with self._guard("get agent"):
            snap = await self._client.collection(AGENTS).document(agent_id).get()
        return agent_from_doc(snap.to_dict()) if snap.exists else None

    async def agent_by_email(self, email: str) -> Agent | None:
        """One agent by email (a query on the automatic single-field index)."""
        query = self._client.collection(AGENTS).where(filter=FieldFilter("email", "==", email))
        async with self._guard("find agent"):
            snaps = await query.limit(1).get()
        return agent_from_doc(snaps[0].to_dict()) if snaps else None

    async def get_session(self, token_hash: str) -> SessionRecord | None:
        """A session by hash: one document read."""
        async with self._guard("get session"):
            snap = await self._client.collection(SESSIONS).document(token_hash).get()
        return _session_from(snap.to_dict(), token_hash) if snap.exists else None

    async def get_token(self, token_hash: str) -> TokenRecord | None:
        """A personal token by hash: one document read."""
        async with self._guard("get token"):
            snap = await self._client.collection(TOKENS).document(token_hash).get()
        return _token_from(snap.to_dict(), token_hash) if snap.exists else None

    async def list_tokens(self, agent_id: str) -> list[TokenRecord]:
        """An agent's tokens, oldest first."""
        query = self._client.collection(TOKENS).where(
            filter=FieldFilter("agent_id", "==", agent_id)
        )
        async with self._guard("list tokens"):
            snaps = await query.get()
        tokens = [_token_from(s.to_dict(), s.id) for s in snaps]
        return sorted(tokens, key=lambda t: (t.created_at, t.id))

    # -- writes -------------------------------------------------------------------------

    async def add_agent(self, agent: Agent) -> Agent:
        """Create the agent and its email marker in one transaction."""
        db = self._client
        marker = db.collection(AGENT_EMAILS).document(email_key(agent.email))

        async def write(tx: Any) -> Agent:
            tx.create(marker, {"agent_id": agent.id})
            tx.create(db.collection(AGENTS).document(agent.id), agent_to_doc(agent))
            self._bump(tx)
            return agent

        try:
            return await self._transact("add agent", write)
        except StoreError as e:
            if isinstance(e.__cause__, gexc.AlreadyExists | gexc.Conflict):
                raise AgentExists(f"an agent with the email {agent.email} exists") from e
            raise

    async def update_agent(
        self,
        agent_id: str,
        *,
        name: str | None = None,
        role: str | None = None,
        disabled: bool | None = None,
        password_hash: str | None = None,
    ) -> Agent:
        """Change an agent; disabling or a new password also deletes its sessions."""
        db = self._client
        ref = db.collection(AGENTS).document(agent_id)
        sessions = (
            db.collection(SESSIONS)
            .where(filter=FieldFilter("agent_id", "==", agent_id))
            .limit(MAX_SESSIONS_ENDED)
        )

        async def write(tx: Any) -> Agent:
            snap = await ref.get(transaction=tx)
            if not snap.exists:
                raise NoSuchAgent(f"no agent {agent_id!r}")
            before = agent_from_doc(snap.to_dict())
            changes: dict[str, Any] = {}
            if name is not None:
                changes["name"] = name
            if role is not None:
                changes["role"] = role
            if disabled is not None:
                changes["disabled"] = disabled
            if password_hash is not None:
                changes["password_hash"] = password_hash
            after = before.with_changes(**changes)
            ended = []
            if after.disabled or password_hash is not None:
                ended = await sessions.get(transaction=tx)  # reads come before writes
            tx.set(ref, agent_to_doc(after))
            for session in ended:
                tx.delete(session.reference)
            if after != before:
                self._bump(tx)
            return after

        return await self._transact("update agent", write)

    async def add_session(self, session: SessionRecord) -> None:
        """Store a session; expired ones are left to the TTL policy (and refused when read)."""
        doc = {
            "agent_id": session.agent_id,
            "created_at": session.created_at,
            "expires_at": session.expires_at,
            # A timestamp field for a Firestore TTL policy on agent_sessions.
            "expire_at": datetime.fromtimestamp(session.expires_at / 1000, UTC),
        }
        async with self._guard("add session"):
            await self._client.collection(SESSIONS).document(session.token_hash).create(doc)

    async def delete_session(self, token_hash: str) -> None:
        """Delete a session and bump the version, in one batch."""
        batch = self._client.batch()
        batch.delete(self._client.collection(SESSIONS).document(token_hash))
        self._bump(batch)
        async with self._guard("delete session"):
            await batch.commit()

    async def add_token(self, token: TokenRecord) -> None:
        """Store a personal token."""
        doc = {
            "id": token.id,
            "agent_id": token.agent_id,
            "label": token.label,
            "created_at": token.created_at,
            "revoked": token.revoked,
        }
        async with self._guard("add token"):
            await self._client.collection(TOKENS).document(token.token_hash).create(doc)

    async def revoke_token(self, token_id: str) -> TokenRecord:
        """Mark a token revoked (found by its id) and bump the version."""
        query = self._client.collection(TOKENS).where(filter=FieldFilter("id", "==", token_id))
        async with self._guard("find token"):
            snaps = await query.limit(1).get()
        if not snaps:
            raise NotFound(f"no token {token_id!r}")
        snap = snaps[0]
        batch = self._client.batch()
        batch.update(snap.reference, {"revoked": True})
        self._bump(batch)
        async with self._guard("revoke token"):
            await batch.commit()
        return replace(_token_from(snap.to_dict(), snap.id), revoked=True)
