"""Accounts: who is asking. Agents, sign-in sessions, personal API tokens and the machine token.

Requests are checked against memory: every agent is held here (a team is tens to a few
thousand people), and each session or token is read from the store once and then cached.
Every change to the agents, and access taken away anywhere (sign-out, a disabled agent, a
new password, a revoked token, on any instance or from the command line), increments the
store's `auth_version`; `run()`
polls it every AUTH_POLL_S and, when it moved, reloads the agents, empties the caches and
re-checks every open event stream, ending the ones that lost their access. Changes made
through this instance apply before the call returns.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog

from server.config import Settings
from server.hub import Client, Hub
from server.models import now_ms
from server.passwords import DUMMY_HASH, WeakPassword, check_password, hash_password
from server.passwords import verify_password as _verify
from server.ratelimit import SignInLimiter
from server.store.agents import (
    ROLES,
    Agent,
    AgentStore,
    NoSuchAgent,
    SessionRecord,
    TokenRecord,
)
from server.store.base import StoreError, new_id

log = structlog.get_logger(__name__)

# How often each instance asks the store whether access was taken away anywhere: a
# disabled agent's open stream ends within this (plus a moment). One small read a poll.
AUTH_POLL_S: Final = 0.5
# A sign-in lasts a working week: agents sign in on Monday, not every morning.
SESSION_TTL_MS: Final = 7 * 24 * 3600 * 1000
# Sessions and tokens held in memory (valid ones and unknown ones): a bounded LRU.
CACHE_SIZE: Final = 10_000
# Unknown cookies and tokens one address may present a minute before its lookups wait: a
# dashboard with an expired cookie presents a few; a script guessing tokens, thousands.
# Counted apart from wrong passwords, so a misconfigured script cannot lock its office out
# of signing in.
CREDENTIAL_LIMIT: Final = 100
# Passwords verified at once: each Argon2 verification takes 64 MiB for about 0.15 s.
HASHING_AT_ONCE: Final = 2
SESSION_BYTES: Final = 32
TOKEN_PREFIX: Final = "lcp_"
MAX_EMAIL: Final = 254  # RFC 5321's limit on a forward path
MAX_NAME: Final = 100
MAX_LABEL: Final = 100
# A cookie or token that does not have our shape is refused without a store read.
_SESSION_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]{43}")
_TOKEN_SHAPE: Final = re.compile(r"lcp_[A-Za-z0-9_-]{43}")
_EMAIL_SHAPE: Final = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


class InvalidAccount(ValueError):
    """An agent's email, name, role or password is not acceptable; the message says why."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class SignInRefused(Exception):
    """A sign-in that did not succeed: wrong credentials, a disabled account, or too many tries."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


@dataclass(slots=True, frozen=True)
class Principal:
    """Who a request comes from: an agent (through a session or a personal token), or the
    machine token of integrations, which acts for no agent."""

    kind: str  # "session", "token" or "machine"
    key: str  # what identifies the credential: its hash, or "machine"
    agent: Agent | None
    expires_at: int | None = None

    @property
    def agent_id(self) -> str | None:
        """The agent's id (None for the machine token)."""
        return self.agent.id if self.agent is not None else None

    @property
    def is_admin(self) -> bool:
        """True for an admin agent; the machine token is never an admin."""
        return self.agent is not None and self.agent.role == "admin" and not self.agent.disabled

    def to_json(self) -> dict[str, object]:
        """What GET /api/auth/me answers."""
        return {"kind": self.kind, "agent": self.agent.to_json() if self.agent else None}


MACHINE: Final = Principal("machine", "machine", None)


def digest(raw: str) -> str:
    """The stored form of a session value or token: SHA-256 (they are 256 random bits, so
    a fast hash is enough; a slow one would cost on every cache miss and add nothing)."""
    return hashlib.sha256(raw.encode()).hexdigest()


def normalize_email(email: str) -> str:
    """Emails compare without case or surrounding space."""
    return email.strip().lower()


def check_email(email: str) -> str:
    """The normalized email, or InvalidAccount."""
    email = normalize_email(email)
    if len(email) > MAX_EMAIL or not _EMAIL_SHAPE.fullmatch(email):
        raise InvalidAccount("email must look like name@example.com", "invalid_email")
    return email


def check_name(name: str) -> str:
    """The trimmed display name, or InvalidAccount."""
    name = name.strip()
    if not name or len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
        raise InvalidAccount(f"name must be 1 to {MAX_NAME} printable characters", "invalid_name")
    return name


def check_role(role: str) -> str:
    """The role, or InvalidAccount."""
    if role not in ROLES:
        raise InvalidAccount("role must be admin or agent", "invalid_role")
    return role


def new_password_hash(password: str) -> str:
    """The hash of an acceptable password, or InvalidAccount (CPU-bound: off the loop)."""
    try:
        return hash_password(password)
    except WeakPassword as e:
        raise InvalidAccount(str(e), "weak_password") from e


def new_agent(email: str, name: str, role: str, password: str) -> Agent:
    """A new agent record with its password hashed (CPU-bound: off the loop)."""
    email, name, role = check_email(email), check_name(name), check_role(role)
    try:
        check_password(password)
    except WeakPassword as e:
        raise InvalidAccount(str(e), "weak_password") from e
    now = now_ms()
    return Agent(
        id=new_id("a", now),
        email=email,
        name=name,
        role=role,
        password_hash=new_password_hash(password),
        disabled=False,
        created_at=now,
    )


def new_token(agent: Agent, label: str) -> tuple[str, TokenRecord]:
    """A new personal API token: the value (shown once) and the record that stores its hash."""
    label = label.strip()[:MAX_LABEL] or "token"
    raw = TOKEN_PREFIX + secrets.token_urlsafe(SESSION_BYTES)
    now = now_ms()
    record = TokenRecord(
        id=new_id("t", now), token_hash=digest(raw), agent_id=agent.id, label=label, created_at=now
    )
    return raw, record


class _Streams:
    """Open event streams by credential: counted for the caps, ended when access is lost."""

    def __init__(self) -> None:
        self.by_key: dict[str, tuple[Principal, set[Client]]] = {}

    def count(self, key: str) -> int:
        held = self.by_key.get(key)
        return len(held[1]) if held else 0

    def add(self, principal: Principal, client: Client) -> None:
        held = self.by_key.setdefault(principal.key, (principal, set()))
        held[1].add(client)

    def discard(self, principal: Principal, client: Client) -> None:
        held = self.by_key.get(principal.key)
        if held is None:
            return
        held[1].discard(client)
        if not held[1]:
            del self.by_key[principal.key]


class Accounts:
    """Authenticates requests and keeps agents, sessions and tokens in step with the store."""

    def __init__(
        self,
        store: AgentStore,
        settings: Settings,
        hub: Hub,
        *,
        limiter: SignInLimiter | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.hub = hub
        self.settings = settings
        self.limiter = limiter or SignInLimiter()
        self.credentials = SignInLimiter(address_limit=CREDENTIAL_LIMIT)
        self._clock = clock
        self._machine = settings.api_token.encode() if settings.api_token else None
        self._agents: dict[str, Agent] = {}
        self._version = -1
        # Bumped whenever the caches are emptied: a lookup that began before must not put
        # back what a revocation took away.
        self._generation = 0
        self._cache: OrderedDict[str, Principal | None] = OrderedDict()
        self._hashing = asyncio.Semaphore(HASHING_AT_ONCE)
        self._streams = _Streams()
        self._refresh_lock = asyncio.Lock()

    # -- lifecycle ----------------------------------------------------------------------

    async def load(self) -> None:
        """Read every agent and the version (start-up)."""
        version = await self.store.auth_version()
        agents = await self.store.list_agents()
        self._agents = {a.id: a for a in agents}
        self._version = version
        log.info("accounts.loaded", agents=len(agents), version=version)

    async def run(self) -> None:
        """Poll the store's auth version until cancelled; refresh when it moved."""
        while True:
            await asyncio.sleep(AUTH_POLL_S)
            try:
                version = await self.store.auth_version()
            except StoreError as e:
                # Caches stay as they are; sign-ins and new credentials need the store anyway.
                log.warning("accounts.poll_failed", error=str(e))
                continue
            if version != self._version:
                await self.refresh()
            self._end_expired_streams()

    async def refresh(self) -> None:
        """Reload the agents, empty the caches and end the streams that lost their access."""
        async with self._refresh_lock:
            try:
                version = await self.store.auth_version()
                agents = await self.store.list_agents()
            except StoreError as e:
                log.warning("accounts.refresh_failed", error=str(e))
                return
            self._agents = {a.id: a for a in agents}
            self._version = version
            self._generation += 1
            self._cache.clear()
            ended = 0
            for principal, clients in list(self._streams.by_key.values()):
                if not await self._still_valid(principal):
                    for client in list(clients):
                        self.hub.drop(client, "access_revoked")
                        ended += 1
            log.info("accounts.refreshed", agents=len(agents), version=version, streams_ended=ended)

    def _end_expired_streams(self) -> None:
        now = self._clock()
        for principal, clients in list(self._streams.by_key.values()):
            if principal.expires_at is not None and principal.expires_at <= now:
                for client in list(clients):
                    self.hub.drop(client, "session_expired")

    async def _still_valid(self, principal: Principal) -> bool:
        if principal.kind == "machine":
            return True
        try:
            if principal.kind == "session":
                return await self._session(principal.key) is not None
            return await self._token(principal.key) is not None
        except StoreError as e:
            log.warning("accounts.recheck_failed", error=str(e))
            return True  # an outage is not a revocation; the next refresh checks again

    # -- agents -------------------------------------------------------------------------

    def agents(self) -> list[Agent]:
        """Every agent, oldest first (disabled ones included)."""
        return sorted(self._agents.values(), key=lambda a: (a.created_at, a.id))

    def agent(self, agent_id: str) -> Agent | None:
        """An agent by id, from memory."""
        return self._agents.get(agent_id)

    async def add_agent(self, email: str, name: str, role: str, password: str) -> Agent:
        """Create an agent (InvalidAccount, or AgentExists when the email is taken)."""
        async with self._hashing:
            agent = await asyncio.to_thread(new_agent, email, name, role, password)
        stored = await self.store.add_agent(agent)
        self._agents[stored.id] = stored
        log.info("agent.added", agent_id=stored.id, role=stored.role)
        await self.refresh()
        return stored

    async def find_agent(self, agent_id: str) -> Agent | None:
        """An agent by id: from memory, else from the store (added on another instance)."""
        agent = self._agents.get(agent_id)
        if agent is None:
            agent = await self.store.get_agent(agent_id)
            if agent is not None:
                self._agents[agent.id] = agent
        return agent

    async def update_agent(
        self,
        agent_id: str,
        *,
        name: str | None = None,
        role: str | None = None,
        disabled: bool | None = None,
        password: str | None = None,
    ) -> Agent:
        """Change an agent; a disabled agent's sessions, tokens and streams stop at once."""
        name = check_name(name) if name is not None else None
        role = check_role(role) if role is not None else None
        password_hash = None
        if password is not None:
            async with self._hashing:
                password_hash = await asyncio.to_thread(new_password_hash, password)
        agent = await self.store.update_agent(
            agent_id, name=name, role=role, disabled=disabled, password_hash=password_hash
        )
        log.info("agent.updated", agent_id=agent_id, role=agent.role, disabled=agent.disabled)
        await self.refresh()
        return agent

    # -- authentication -----------------------------------------------------------------

    def machine(self, presented: str) -> Principal | None:
        """The machine token's principal when `presented` is LIVECHAT_API_TOKEN."""
        if self._machine is None:
            return None
        if hmac.compare_digest(presented.encode(), self._machine):
            return MACHINE
        return None

    async def from_cookie(self, raw: str) -> Principal | None:
        """The principal of a session cookie; None when it is not a live session."""
        if not _SESSION_SHAPE.fullmatch(raw):
            return None
        return await self._session("s:" + digest(raw))

    async def from_bearer(self, raw: str) -> Principal | None:
        """The principal of a Bearer credential: the machine token or a personal token."""
        found = self.machine(raw)
        if found is not None:
            return found
        if not _TOKEN_SHAPE.fullmatch(raw):
            return None
        return await self._token("t:" + digest(raw))

    async def _session(self, key: str) -> Principal | None:
        cached = self._cached(key)
        if cached is not False:
            return cached if isinstance(cached, Principal) else None
        generation = self._generation
        record = await self.store.get_session(key[2:])
        principal = None
        if record is not None and record.expires_at > self._clock():
            agent = await self._agent_for(record.agent_id)
            if agent is not None:
                principal = Principal("session", key, agent, record.expires_at)
        self._remember(key, principal, generation)
        return principal

    async def _token(self, key: str) -> Principal | None:
        cached = self._cached(key)
        if cached is not False:
            return cached if isinstance(cached, Principal) else None
        generation = self._generation
        record = await self.store.get_token(key[2:])
        principal = None
        if record is not None and not record.revoked:
            agent = await self._agent_for(record.agent_id)
            if agent is not None:
                principal = Principal("token", key, agent)
        self._remember(key, principal, generation)
        return principal

    async def _agent_for(self, agent_id: str) -> Agent | None:
        """The enabled agent with this id (read from the store when added elsewhere)."""
        agent = await self.find_agent(agent_id)
        if agent is None or agent.disabled:
            return None
        return agent

    def _cached(self, key: str) -> Principal | bool | None:
        """The cached answer for a credential, or False when none is cached."""
        if key not in self._cache:
            return False
        principal = self._cache[key]
        self._cache.move_to_end(key)
        if principal is not None and principal.expires_at is not None:
            if principal.expires_at <= self._clock():
                self._cache[key] = None
                return None
        if principal is not None and principal.agent is not None:
            # The agent as it is now (a name change reaches the cache without a reload).
            agent = self._agents.get(principal.agent.id)
            if agent is None or agent.disabled:
                return None
        return principal

    def _remember(self, key: str, principal: Principal | None, generation: int) -> None:
        if generation != self._generation:
            return  # the caches were emptied meanwhile: this answer may be stale
        self._cache[key] = principal
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    # -- sign-in ------------------------------------------------------------------------

    async def sign_in(self, email: str, password: str, address: str) -> tuple[Principal, str]:
        """Check a password; a new session's principal and cookie value, or SignInRefused."""
        email = normalize_email(email)
        wait = self.limiter.retry_after(email, address)
        if wait is not None:
            log.warning("signin.limited", address=address, retry_after_s=wait)
            raise SignInRefused(429, "too_many_attempts", "too many sign-in attempts", wait)
        agent = await self.store.agent_by_email(email)
        async with self._hashing:
            ok = await asyncio.to_thread(
                _verify, agent.password_hash if agent is not None else DUMMY_HASH, password
            )
        if agent is None or not ok:
            self.limiter.failed(email, address)
            log.warning("signin.failed", address=address, known=agent is not None)
            raise SignInRefused(401, "invalid_credentials", "the email or password is wrong")
        if agent.disabled:
            log.warning("signin.disabled", agent_id=agent.id)
            raise SignInRefused(403, "account_disabled", "this account is disabled")
        self.limiter.succeeded(email)
        raw = secrets.token_urlsafe(SESSION_BYTES)
        now = self._clock()
        record = SessionRecord(digest(raw), agent.id, now, now + SESSION_TTL_MS)
        await self.store.add_session(record)
        self._agents[agent.id] = agent
        principal = Principal("session", "s:" + record.token_hash, agent, record.expires_at)
        self._remember(principal.key, principal, self._generation)
        log.info("signin.ok", agent_id=agent.id)
        return principal, raw

    def refused_credential(self, address: str) -> None:
        """An unknown cookie or token was presented: it counts against the address."""
        self.credentials.failed(None, address)

    def credential_wait(self, address: str) -> int | None:
        """Seconds an address must wait before its unknown credentials are looked up again."""
        return self.credentials.retry_after(None, address)

    async def sign_out(self, principal: Principal) -> None:
        """End a session on every instance (its open streams too)."""
        if principal.kind != "session":
            return
        await self.store.delete_session(principal.key[2:])
        log.info("signout", agent_id=principal.agent_id)
        await self.refresh()

    async def create_token(self, agent_id: str, label: str) -> tuple[str, TokenRecord]:
        """A personal API token for an agent (NoSuchAgent when there is none)."""
        agent = await self.store.get_agent(agent_id)
        if agent is None:
            raise NoSuchAgent(f"no agent {agent_id!r}")
        raw, record = new_token(agent, label)
        await self.store.add_token(record)
        return raw, record

    # -- event streams ------------------------------------------------------------------

    def stream_refusal(self, principal: Principal) -> str | None:
        """Why a new event stream for this principal is refused, or None."""
        if self.hub.clients >= self.settings.sse_max_streams:
            return "this server has as many event streams open as it allows"
        if self._streams.count(principal.key) >= self.settings.sse_streams_per_session:
            return "this sign-in has as many event streams open as it allows"
        return None

    def add_stream(self, principal: Principal, client: Client) -> None:
        """Track an open stream, so it ends when its access does."""
        self._streams.add(principal, client)

    def remove_stream(self, principal: Principal, client: Client) -> None:
        """Forget a stream that ended."""
        self._streams.discard(principal, client)
