"""Agents, sessions and personal tokens in the embedded SQLite file.

A connection and a thread of their own, beside the chat store's: account writes are rare
and must not wait behind a burst of webhooks (WAL lets both connections read at once, and
SQLite's file lock orders the few writes). The command line (`run.py agents ...`) writes
the same tables from another process; the server sees it through `auth_version`.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from server.models import now_ms
from server.store.agents import (
    Agent,
    AgentExists,
    NoSuchAgent,
    SessionRecord,
    TokenRecord,
)
from server.store.base import NotFound, StoreUnavailable

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_sessions (
    token_hash TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS agent_sessions_by_agent ON agent_sessions (agent_id);
CREATE TABLE IF NOT EXISTS agent_tokens (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    label TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS auth_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT OR IGNORE INTO auth_version (id, version) VALUES (1, 0);
"""

AGENT_COLUMNS = "id, email, name, role, password_hash, disabled, created_at"


def _agent(row: tuple[Any, ...]) -> Agent:
    return Agent(
        id=row[0],
        email=row[1],
        name=row[2],
        role=row[3],
        password_hash=row[4],
        disabled=bool(row[5]),
        created_at=int(row[6]),
    )


def _token(row: tuple[Any, ...]) -> TokenRecord:
    return TokenRecord(
        id=row[0],
        token_hash=row[1],
        agent_id=row[2],
        label=row[3],
        created_at=int(row[4]),
        revoked=bool(row[5]),
    )


class SqliteAgents:
    """AgentStore on the embedded SQLite file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-agents")
        self._conn: sqlite3.Connection | None = None

    async def start(self) -> None:
        """Open the file and create the tables."""
        await self._run(self._open)

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        # The chat store's connection may hold the write lock for a batch: wait for it.
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        self._conn = conn

    async def close(self) -> None:
        """Close the connection and the thread."""
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable("the store is not open")
        return self._conn

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except sqlite3.Error as e:
            raise StoreUnavailable(f"agents: {type(e).__name__}") from e

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    @staticmethod
    def _bump(db: sqlite3.Connection) -> None:
        db.execute("UPDATE auth_version SET version = version + 1 WHERE id = 1")

    # -- reads --------------------------------------------------------------------------

    async def auth_version(self) -> int:
        """The revocation counter."""
        row = await self._run(
            lambda: self._db.execute("SELECT version FROM auth_version WHERE id = 1").fetchone()
        )
        return int(row[0]) if row else 0

    async def list_agents(self) -> list[Agent]:
        """Every agent, oldest first."""
        rows = await self._run(
            lambda: self._db.execute(
                f"SELECT {AGENT_COLUMNS} FROM agents ORDER BY created_at, id"
            ).fetchall()
        )
        return [_agent(r) for r in rows]

    async def get_agent(self, agent_id: str) -> Agent | None:
        """One agent by id."""
        row = await self._run(
            lambda: self._db.execute(
                f"SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?", (agent_id,)
            ).fetchone()
        )
        return _agent(row) if row else None

    async def agent_by_email(self, email: str) -> Agent | None:
        """One agent by email."""
        row = await self._run(
            lambda: self._db.execute(
                f"SELECT {AGENT_COLUMNS} FROM agents WHERE email = ?", (email,)
            ).fetchone()
        )
        return _agent(row) if row else None

    async def get_session(self, token_hash: str) -> SessionRecord | None:
        """A session by hash."""
        row = await self._run(
            lambda: self._db.execute(
                "SELECT token_hash, agent_id, created_at, expires_at FROM agent_sessions"
                " WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
        )
        return SessionRecord(row[0], row[1], int(row[2]), int(row[3])) if row else None

    async def get_token(self, token_hash: str) -> TokenRecord | None:
        """A personal token by hash."""
        row = await self._run(
            lambda: self._db.execute(
                "SELECT id, token_hash, agent_id, label, created_at, revoked FROM agent_tokens"
                " WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
        )
        return _token(row) if row else None

    async def list_tokens(self, agent_id: str) -> list[TokenRecord]:
        """An agent's tokens, oldest first."""
        rows = await self._run(
            lambda: self._db.execute(
                "SELECT id, token_hash, agent_id, label, created_at, revoked FROM agent_tokens"
                " WHERE agent_id = ? ORDER BY created_at, id",
                (agent_id,),
            ).fetchall()
        )
        return [_token(r) for r in rows]

    # -- writes -------------------------------------------------------------------------

    async def add_agent(self, agent: Agent) -> Agent:
        """Insert an agent; AgentExists when its email is taken."""

        def write(db: sqlite3.Connection) -> Agent:
            try:
                db.execute(
                    f"INSERT INTO agents ({AGENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        agent.id,
                        agent.email,
                        agent.name,
                        agent.role,
                        agent.password_hash,
                        int(agent.disabled),
                        agent.created_at,
                    ),
                )
            except sqlite3.IntegrityError as e:
                raise AgentExists(f"an agent with the email {agent.email} exists") from e
            self._bump(db)
            return agent

        return await self._run(lambda: self._transaction(write))

    async def update_agent(
        self,
        agent_id: str,
        *,
        name: str | None = None,
        role: str | None = None,
        disabled: bool | None = None,
        password_hash: str | None = None,
    ) -> Agent:
        """Change an agent; disabling or a new password ends its sessions everywhere."""

        def write(db: sqlite3.Connection) -> Agent:
            row = db.execute(
                f"SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?", (agent_id,)
            ).fetchone()
            if row is None:
                raise NoSuchAgent(f"no agent {agent_id!r}")
            before = _agent(row)
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
            db.execute(
                "UPDATE agents SET name = ?, role = ?, disabled = ?, password_hash = ?"
                " WHERE id = ?",
                (after.name, after.role, int(after.disabled), after.password_hash, agent_id),
            )
            if after.disabled or password_hash is not None:
                db.execute("DELETE FROM agent_sessions WHERE agent_id = ?", (agent_id,))
            if after != before:
                # Any change reaches every cache: a new role or name is visible at once too.
                self._bump(db)
            return after

        return await self._run(lambda: self._transaction(write))

    async def add_session(self, session: SessionRecord) -> None:
        """Insert a session and delete the expired ones."""

        def write(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM agent_sessions WHERE expires_at < ?", (now_ms(),))
            db.execute(
                "INSERT INTO agent_sessions (token_hash, agent_id, created_at, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (session.token_hash, session.agent_id, session.created_at, session.expires_at),
            )

        await self._run(lambda: self._transaction(write))

    async def delete_session(self, token_hash: str) -> None:
        """Delete a session (sign-out)."""

        def write(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM agent_sessions WHERE token_hash = ?", (token_hash,))
            self._bump(db)

        await self._run(lambda: self._transaction(write))

    async def add_token(self, token: TokenRecord) -> None:
        """Insert a personal token."""

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO agent_tokens (id, token_hash, agent_id, label, created_at, revoked)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    token.id,
                    token.token_hash,
                    token.agent_id,
                    token.label,
                    token.created_at,
                    int(token.revoked),
                ),
            )

        await self._run(lambda: self._transaction(write))

    async def revoke_token(self, token_id: str) -> TokenRecord:
        """Revoke a token; NotFound when no token has this id."""

        def write(db: sqlite3.Connection) -> TokenRecord:
            row = db.execute(
                "SELECT id, token_hash, agent_id, label, created_at, revoked FROM agent_tokens"
                " WHERE id = ?",
                (token_id,),
            ).fetchone()
            if row is None:
                raise NotFound(f"no token {token_id!r}")
            db.execute("UPDATE agent_tokens SET revoked = 1 WHERE id = ?", (token_id,))
            self._bump(db)
            return replace(_token(row), revoked=True)

        return await self._run(lambda: self._transaction(write))
