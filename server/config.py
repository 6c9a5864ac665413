"""Settings: read once at start-up from the environment and the command line, then frozen."""

from __future__ import annotations

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
MEDIA_STORES: Final = ("file", "gcs")


@dataclass(frozen=True, slots=True)
class WhatsAppNumber:
    """A business phone number replies can go out from, with its own token or none (the
    shared WHATSAPP_TOKEN then)."""

    id: str
    token: str | None = None


def parse_numbers(raw: str) -> tuple[WhatsAppNumber, ...]:
    """`WHATSAPP_PHONE_NUMBERS`: comma-separated phone number ids, each optionally with its
    own token after a colon (`106540352242922,106540352242923:EAAG...`)."""
    numbers = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        number, _, token = item.partition(":")
        number = number.strip()
        if not number.isdigit():
            raise ValueError(f"{number!r} is not a phone number id (digits)")
        numbers.append(WhatsAppNumber(number, token.strip() or None))
    return tuple(numbers)


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
    # More business numbers on the same app (WHATSAPP_PHONE_NUMBERS); the first of all is
    # WHATSAPP_PHONE_NUMBER_ID when set. A conversation answers from the number its
    # customer wrote to.
    whatsapp_numbers: tuple[WhatsAppNumber, ...] = ()
    # The WhatsApp Business Account whose approved templates agents may send.
    whatsapp_business_account_id: str | None = None
    # Mark a customer's messages read on WhatsApp (blue ticks) when an agent opens them.
    read_receipts: bool = True
    # Where inbound and outbound media files are kept: files under media_dir, or a Cloud
    # Storage bucket (several instances) with media_dir as each instance's local cache.
    media_store: str = "file"
    media_dir: str = "livechat-media"
    media_bucket: str | None = None
    # The Cloud Storage JSON API endpoint when not Google's (an emulator).
    gcs_endpoint: str | None = None
    # The local cache of a bucket's files, in MiB: what agents opened lately.
    media_cache_mb: int = 512
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
    api_token: str | None = None
    instance_id: str = field(default_factory=lambda: secrets.token_hex(3))
    static_dir: str = str(ROOT / "static")
    demo: bool = False
    demo_conversations: int = 300

    @property
    def whatsapp_configured(self) -> bool:
        """True when outbound messages can really be sent."""
        return bool(self.numbers) and all(n.token for n in self.numbers)

    @property
    def numbers(self) -> tuple[WhatsAppNumber, ...]:
        """Every business number, the default (WHATSAPP_PHONE_NUMBER_ID) first, each with
        the token to use for it."""
        listed = list(self.whatsapp_numbers)
        if self.whatsapp_phone_number_id and all(
            n.id != self.whatsapp_phone_number_id for n in listed
        ):
            listed.insert(0, WhatsAppNumber(self.whatsapp_phone_number_id))
        return tuple(WhatsAppNumber(n.id, n.token or self.whatsapp_token) for n in listed)

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
        _choice("LIVECHAT_MEDIA_STORE", self.media_store, MEDIA_STORES)
        if self.media_store == "gcs" and not self.media_bucket:
            raise ConfigError("LIVECHAT_MEDIA_STORE=gcs needs LIVECHAT_MEDIA_BUCKET")
        if self.media_cache_mb < 1:
            raise ConfigError("LIVECHAT_MEDIA_CACHE_MB must be at least 1")
        if self.firestore_window < 1:
            raise ConfigError("LIVECHAT_FIRESTORE_WINDOW must be at least 1")
        if self.demo_conversations < 0:
            raise ConfigError("--demo-conversations must not be negative")
        if self.ai_provider == "openai" and not self.ai_base_url:
            raise ConfigError("AI_PROVIDER=openai needs AI_BASE_URL")
        if self.env == "production":
            missing = [
                name
                for name, value in (
                    ("LIVECHAT_SECRET_KEY", self.secret_key),
                    ("LIVECHAT_API_TOKEN", self.api_token),
                    ("WHATSAPP_APP_SECRET", self.whatsapp_app_secret),
                    ("WHATSAPP_VERIFY_TOKEN", self.whatsapp_verify_token),
                )
                if not value
            ]
            if missing:
                raise ConfigError("production needs " + ", ".join(missing))
            if self.demo:
                raise ConfigError("--demo is for development only")
        return self

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
    ("WHATSAPP_PHONE_NUMBERS", "whatsapp_numbers", parse_numbers),
    ("WHATSAPP_BUSINESS_ACCOUNT_ID", "whatsapp_business_account_id", str),
    ("LIVECHAT_READ_RECEIPTS", "read_receipts", _bool),
    ("LIVECHAT_MEDIA_STORE", "media_store", str),
    ("LIVECHAT_MEDIA_DIR", "media_dir", str),
    ("LIVECHAT_MEDIA_BUCKET", "media_bucket", str),
    ("STORAGE_EMULATOR_HOST", "gcs_endpoint", str),
    ("LIVECHAT_MEDIA_CACHE_MB", "media_cache_mb", int),
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
)
