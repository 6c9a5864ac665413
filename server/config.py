"""Settings: read once at start-up from the environment and the command line, then frozen."""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent

STORES: Final = ("sqlite", "firestore")
ENVIRONMENTS: Final = ("development", "production")
LOG_FORMATS: Final = ("console", "json")
AI_PROVIDERS: Final = ("builtin", "openai", "off")
# Production secrets are at least this long: 32 random characters are beyond guessing,
# and a short one is a placeholder somebody forgot to replace.
MIN_SECRET: Final = 32
LOOPBACK_NAMES: Final = ("localhost",)


class ConfigError(ValueError):
    """A setting is missing or has a bad value; start-up stops with this message."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server is configured with. Built once; nothing reads os.environ later."""

    host: str = "127.0.0.1"
    port: int = 8080
    env: str = "development"
    store: str = "sqlite"
    db: str = "livechat.db"
    google_cloud_project: str = "livechat-dev"
    firestore_emulator_host: str | None = None
    # How many of the newest conversations each instance keeps in memory (about 1 KiB each);
    # pages past them are read from Firestore by keyset. The window is read once at start
    # and after an outage (one document read each); the listener follows recent changes
    # only, so the window does not slow writes. 10,000 is about 330 pages of the list.
    firestore_window: int = 10_000
    whatsapp_app_secret: str | None = None
    whatsapp_verify_token: str | None = None
    whatsapp_token: str | None = None
    whatsapp_phone_number_id: str | None = None
    whatsapp_api_base: str = "https://graph.facebook.com/v21.0"
    ai_provider: str = "builtin"
    ai_base_url: str = "https://api.openai.com/v1"
    ai_api_key: str | None = None
    ai_model: str = "gpt-4o-mini"
    ai_timeout_s: float = 20.0
    ai_max_retries: int = 3
    ai_context_messages: int = 12
    # How long this instance holds a task of the outbox (an AI reply, a send) without
    # renewing it; after a crash its work waits this long for another instance (the
    # embedded store resumes it at once on restart). Renewed every third of it.
    outbox_lease_s: float = 60.0
    faq_path: str = str(ROOT / "server" / "integrations" / "faq.json")
    log_format: str = "console"
    log_level: str = "info"
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    # The machine token of integrations and scripts (Bearer only); None: there is none.
    api_token: str | None = None
    instance_id: str = field(default_factory=lambda: secrets.token_hex(3))
    static_dir: str = str(ROOT / "static")
    demo: bool = False
    demo_conversations: int = 300
    # The demo admin's password (run.py generates one); None: the demo admin gets a random
    # one nobody knows.
    demo_password: str | None = None
    # Development listens on loopback only unless this is set (the dashboard and API are
    # then reachable by anyone who can reach the port).
    allow_remote: bool = False
    # A request body that has not fully arrived after this long is cut off (408): a slow
    # or stalled sender must not hold a connection. WhatsApp sends its 3 MB in well under it.
    body_timeout_s: float = 10.0
    # Event streams: at most this many on the instance, and per sign-in (an agent keeps a
    # few tabs open; more is a leak or an abuse).
    sse_max_streams: int = 1000
    sse_streams_per_session: int = 10
    # Proxies in front of the server that append to X-Forwarded-For (a load balancer: 1).
    # The client address the sign-in limits count is the entry that many from the right.
    proxy_hops: int = 0

    @property
    def whatsapp_configured(self) -> bool:
        """True when outbound messages can really be sent."""
        return bool(self.whatsapp_token and self.whatsapp_phone_number_id)

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some values replaced (CLI flags, tests), validated again."""
        return replace(self, **changes).validated()

    def validated(self) -> Settings:
        """Self, when every value is usable; ConfigError with the reason otherwise."""
        _choice("LIVECHAT_STORE", self.store, STORES)
        _choice("LIVECHAT_ENV", self.env, ENVIRONMENTS)
        _choice("LOG_FORMAT", self.log_format, LOG_FORMATS)
        _choice("AI_PROVIDER", self.ai_provider, AI_PROVIDERS)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"PORT must be 0..65535, got {self.port}")
        _choice("LOG_LEVEL", self.log_level, ("debug", "info", "warning", "error"))
        if self.ai_timeout_s <= 0:
            raise ConfigError("AI_TIMEOUT must be a positive number of seconds")
        if self.ai_max_retries < 0:
            raise ConfigError("AI_MAX_RETRIES must not be negative")
        if self.outbox_lease_s < 1:
            raise ConfigError("LIVECHAT_OUTBOX_LEASE must be at least 1 second")
        if self.firestore_window < 1:
            raise ConfigError("LIVECHAT_FIRESTORE_WINDOW must be at least 1")
        if self.demo_conversations < 0:
            raise ConfigError("--demo-conversations must not be negative")
        if self.ai_provider == "openai" and not self.ai_base_url:
            raise ConfigError("AI_PROVIDER=openai needs AI_BASE_URL")
        if self.body_timeout_s <= 0:
            raise ConfigError("LIVECHAT_BODY_TIMEOUT must be a positive number of seconds")
        if self.sse_max_streams < 1 or self.sse_streams_per_session < 1:
            raise ConfigError("LIVECHAT_SSE_MAX and LIVECHAT_SSE_PER_SESSION must be at least 1")
        if self.proxy_hops < 0:
            raise ConfigError("LIVECHAT_PROXY_HOPS must not be negative")
        if self.env == "production":
            self._check_production()
        elif not self.allow_remote and not is_loopback(self.host):
            raise ConfigError(
                f"HOST={self.host} is not a loopback address: development serves only this"
                " machine; set LIVECHAT_ALLOW_REMOTE=true (or --allow-remote) to listen there"
            )
        return self

    def _check_production(self) -> None:
        """ConfigError naming the first setting production refuses."""
        secrets_ = (
            ("LIVECHAT_SECRET_KEY", self.secret_key),
            ("WHATSAPP_APP_SECRET", self.whatsapp_app_secret),
            ("WHATSAPP_VERIFY_TOKEN", self.whatsapp_verify_token),
        )
        missing = [name for name, value in secrets_ if not value]
        if missing:
            raise ConfigError("production needs " + ", ".join(missing))
        optional = (("LIVECHAT_API_TOKEN", self.api_token),)
        for name, value in (*secrets_, *optional):
            if value is not None and len(value) < MIN_SECRET:
                raise ConfigError(
                    f"{name} must be at least {MIN_SECRET} characters in production"
                    f" (it has {len(value)})"
                )
        if self.firestore_emulator_host:
            raise ConfigError(
                "FIRESTORE_EMULATOR_HOST is set: production must not talk to the emulator"
            )
        urls = [("WHATSAPP_API_BASE", self.whatsapp_api_base)]
        if self.ai_provider == "openai":
            urls.append(("AI_BASE_URL", self.ai_base_url))
        for name, url in urls:
            if not url.lower().startswith("https://"):
                raise ConfigError(f"{name} must be an https:// URL in production")
        if self.demo:
            raise ConfigError("--demo is for development only")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from environment variables, then `overrides` (CLI flags) on top."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, key, convert in _ENV:
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            try:
                values[key] = convert(raw)
            except ValueError as e:
                raise ConfigError(f"{name}={raw!r} is not valid: {e}") from e
        if values.get("env") == "production" and "secret_key" not in values:
            values["secret_key"] = ""  # no random default in production: fail loudly
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validated()


def is_loopback(host: str) -> bool:
    """True when `host` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


_ENV: Final = (
    ("HOST", "host", str),
    ("PORT", "port", int),
    ("LIVECHAT_ENV", "env", str),
    ("LIVECHAT_STORE", "store", str),
    ("LIVECHAT_DB", "db", str),
    ("LIVECHAT_FIRESTORE_WINDOW", "firestore_window", int),
    ("GOOGLE_CLOUD_PROJECT", "google_cloud_project", str),
    ("FIRESTORE_EMULATOR_HOST", "firestore_emulator_host", str),
    ("WHATSAPP_APP_SECRET", "whatsapp_app_secret", str),
    ("WHATSAPP_VERIFY_TOKEN", "whatsapp_verify_token", str),
    ("WHATSAPP_TOKEN", "whatsapp_token", str),
    ("WHATSAPP_PHONE_NUMBER_ID", "whatsapp_phone_number_id", str),
    ("WHATSAPP_API_BASE", "whatsapp_api_base", str),
    ("AI_PROVIDER", "ai_provider", str),
    ("AI_BASE_URL", "ai_base_url", str),
    ("AI_API_KEY", "ai_api_key", str),
    ("AI_MODEL", "ai_model", str),
    ("AI_TIMEOUT", "ai_timeout_s", float),
    ("AI_MAX_RETRIES", "ai_max_retries", int),
    ("LIVECHAT_OUTBOX_LEASE", "outbox_lease_s", float),
    ("LIVECHAT_FAQ", "faq_path", str),
    ("LOG_FORMAT", "log_format", str),
    ("LOG_LEVEL", "log_level", str),
    ("LIVECHAT_SECRET_KEY", "secret_key", str),
    ("LIVECHAT_API_TOKEN", "api_token", str),
    ("LIVECHAT_INSTANCE_ID", "instance_id", str),
    ("LIVECHAT_DEMO", "demo", _bool),
    ("LIVECHAT_ALLOW_REMOTE", "allow_remote", _bool),
    ("LIVECHAT_BODY_TIMEOUT", "body_timeout_s", float),
    ("LIVECHAT_SSE_MAX", "sse_max_streams", int),
    ("LIVECHAT_SSE_PER_SESSION", "sse_streams_per_session", int),
    ("LIVECHAT_PROXY_HOPS", "proxy_hops", int),
)
