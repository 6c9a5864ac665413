"""Settings: read once at start-up from the environment and the command line, then frozen."""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent

STORES: Final = ("sqlite", "firestore")
ENVIRONMENTS: Final = ("development", "production")
LOG_FORMATS: Final = ("console", "json")
AI_PROVIDERS: Final = ("builtin", "openai", "off")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
MEDIA_STORES: Final = ("file", "gcs")
# Production secrets are at least this long: 32 random characters are beyond guessing,
# and a short one is a placeholder somebody forgot to replace.
MIN_SECRET: Final = 32
LOOPBACK_NAMES: Final = ("localhost",)


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
    # The same for the embedded store: memory and start-up time stay the same at any size
    # (about 1 KiB and 6 µs to load per conversation: 20 MB and a tenth of a second), and
    # the pages past the window are keyset reads of SQLite's prepared rows.
    sqlite_window: int = 20_000
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
    # The machine token of integrations and scripts (Bearer only); None: there is none.
    api_token: str | None = None
    instance_id: str = field(default_factory=lambda: secrets.token_hex(3))
    static_dir: str = str(ROOT / "static")
    # None: /metrics is served on the main port, behind the API token.
    metrics_port: int | None = None
    metrics_host: str | None = None
    # An LLM call takes seconds; a reply cut off half-way is not sent. Orchestrators wait
    # 30 s (Kubernetes' terminationGracePeriodSeconds) before they kill, 10 s (Cloud Run).
    shutdown_timeout_s: float = 10.0
    demo: bool = False
    demo_conversations: int = 300
    # The demo admin's password (run.py generates one); None: the demo team gets a password
    # nobody can type.
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
        _choice("LOG_LEVEL", self.log_level, LOG_LEVELS)
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"LIVECHAT_METRICS_PORT must be 0..65535, got {self.metrics_port}")
        if self.shutdown_timeout_s < 0:
            raise ConfigError("LIVECHAT_SHUTDOWN_TIMEOUT must not be negative")
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
        if self.sqlite_window < 1:
            raise ConfigError("LIVECHAT_SQLITE_WINDOW must be at least 1")
        if self.demo_conversations < 0:
            raise ConfigError("LIVECHAT_DEMO_CONVERSATIONS must not be negative")
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
        for variable in VARIABLES:
            raw = env.get(variable.name)
            if raw is None or raw == "":
                continue
            try:
                values[variable.key] = variable.convert(raw)
            except ValueError as e:
                raise ConfigError(f"{variable.name}={raw!r} is not valid: {e}") from e
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


@dataclass(frozen=True, slots=True)
class Variable:
    """One setting as operators see it: its environment variable, flag, default, meaning.

    The README's configuration table and `run.py --help` are both this list (a test checks
    the README against it), so what is documented is what the code reads.
    """

    name: str
    key: str  # the Settings field
    meaning: str
    convert: Callable[[str], Any] = str
    flag: str | None = None
    # How the default reads when the field's own default is not it (generated, a path).
    default_text: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def switch(self) -> bool:
        """True for an on/off setting: its flag takes no value."""
        return self.convert is _bool

    @property
    def help(self) -> str:
        """The flag's --help line: the meaning, the variable and the default."""
        default = f"; default {self.default}" if self.default else ""
        return f"{self.meaning} ({self.name}{default})".replace("`", "")

    @property
    def default(self) -> str:
        """The default as the README and --help show it ("" when there is none)."""
        if self.default_text is not None:
            return self.default_text
        value = _FIELD_DEFAULTS[self.key]
        if value is None:
            return ""
        if isinstance(value, bool):
            return "off" if not value else "on"
        if isinstance(value, float):
            return f"`{value:g}`"
        return f"`{value}`"


def _field_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(Settings) if f.default is not MISSING}


_FIELD_DEFAULTS: Final = _field_defaults()

VARIABLES: Final = (
    Variable("HOST", "host", "interface to listen on", flag="--host"),
    Variable("PORT", "port", "port to listen on", int, flag="--port"),
    Variable(
        "LIVECHAT_STORE",
        "store",
        "`sqlite` (embedded) or `firestore`",
        flag="--store",
        choices=STORES,
    ),
    Variable(
        "LIVECHAT_DB",
        "db",
        "the SQLite file (`--demo` uses a fresh `livechat-demo.db`)",
        flag="--db",
    ),
    Variable(
        "LIVECHAT_API_TOKEN",
        "api_token",
        "the machine token of integrations and scripts: `Authorization: Bearer` only, never "
        "a browser sign-in; acts as an agent, never as an admin",
        default_text="none",
    ),
    Variable(
        "LIVECHAT_SECRET_KEY",
        "secret_key",
        "signs list cursors and keys the hash of customer ids in logs; share it across instances",
        default_text="random per start in development",
    ),
    Variable(
        "LIVECHAT_ENV",
        "env",
        "`production` refuses to start with a missing or weak secret, the emulator or an "
        "`http://` API base",
        choices=ENVIRONMENTS,
    ),
    Variable(
        "LIVECHAT_ALLOW_REMOTE",
        "allow_remote",
        "in development, listen on a non-loopback `HOST` too",
        _bool,
        flag="--allow-remote",
    ),
    Variable(
        "LIVECHAT_BODY_TIMEOUT",
        "body_timeout_s",
        "seconds for a request body to arrive; a slower one is cut off (408)",
        float,
    ),
    Variable(
        "LIVECHAT_SSE_MAX",
        "sse_max_streams",
        "event streams this instance serves at once (more: 429)",
        int,
    ),
    Variable(
        "LIVECHAT_SSE_PER_SESSION",
        "sse_streams_per_session",
        "event streams per sign-in or token (more: 429)",
        int,
    ),
    Variable(
        "LIVECHAT_PROXY_HOPS",
        "proxy_hops",
        "proxies in front that append to `X-Forwarded-For`, so the sign-in limits count the "
        "client's address",
        int,
    ),
    Variable(
        "LIVECHAT_INSTANCE_ID",
        "instance_id",
        "names this instance in SSE event ids",
        default_text="random",
    ),
    Variable("GOOGLE_CLOUD_PROJECT", "google_cloud_project", "the Firestore project"),
    Variable(
        "FIRESTORE_EMULATOR_HOST",
        "firestore_emulator_host",
        "use the Firestore emulator at this `host:port`",
    ),
    Variable(
        "LIVECHAT_FIRESTORE_WINDOW",
        "firestore_window",
        "newest conversations each instance keeps in memory; later pages are read from "
        "Firestore by keyset",
        int,
    ),
    Variable(
        "LIVECHAT_SQLITE_WINDOW",
        "sqlite_window",
        "the same on the embedded store: newest conversations in memory (about 1 KiB each); "
        "later pages are read from SQLite by keyset",
        int,
    ),
    Variable(
        "WHATSAPP_APP_SECRET", "whatsapp_app_secret", "checks `X-Hub-Signature-256` on webhooks"
    ),
    Variable(
        "WHATSAPP_VERIFY_TOKEN", "whatsapp_verify_token", "the webhook subscription handshake"
    ),
    Variable(
        "WHATSAPP_TOKEN",
        "whatsapp_token",
        "sends replies (with `WHATSAPP_PHONE_NUMBER_ID`); without them replies are stored as "
        "not sent",
    ),
    Variable(
        "WHATSAPP_PHONE_NUMBER_ID",
        "whatsapp_phone_number_id",
        "the business number replies are sent from",
    ),
    Variable("WHATSAPP_API_BASE", "whatsapp_api_base", "the Graph API base"),
    Variable(
        "WHATSAPP_PHONE_NUMBERS",
        "whatsapp_numbers",
        "more business numbers on the same app: `id[:token],...` (a number without its own "
        "token uses `WHATSAPP_TOKEN`); a conversation answers from the number it was written to",
        parse_numbers,
        default_text="",
    ),
    Variable(
        "WHATSAPP_BUSINESS_ACCOUNT_ID",
        "whatsapp_business_account_id",
        "the WhatsApp Business Account whose approved templates agents may send",
    ),
    Variable(
        "LIVECHAT_READ_RECEIPTS",
        "read_receipts",
        "mark a customer's messages read on WhatsApp (blue ticks) when an agent opens them",
        _bool,
    ),
    Variable(
        "LIVECHAT_MEDIA_STORE",
        "media_store",
        "where media files are kept: `file` (under `LIVECHAT_MEDIA_DIR`) or `gcs` (a Cloud "
        "Storage bucket, for several instances)",
        choices=MEDIA_STORES,
    ),
    Variable(
        "LIVECHAT_MEDIA_DIR",
        "media_dir",
        "the media files; with `gcs`, each instance's cache of the bucket",
    ),
    Variable("LIVECHAT_MEDIA_BUCKET", "media_bucket", "the Cloud Storage bucket (with `gcs`)"),
    Variable(
        "LIVECHAT_MEDIA_CACHE_MB",
        "media_cache_mb",
        "MiB of the bucket each instance keeps on its disk, the least recently opened dropped "
        "first",
        int,
    ),
    Variable(
        "STORAGE_EMULATOR_HOST",
        "gcs_endpoint",
        "a Cloud Storage JSON API endpoint other than Google's (an emulator)",
    ),
    Variable(
        "AI_PROVIDER",
        "ai_provider",
        "`builtin` (offline FAQ), `openai` (any compatible server) or `off`",
        choices=AI_PROVIDERS,
    ),
    Variable("AI_BASE_URL", "ai_base_url", "the chat-completions server"),
    Variable("AI_API_KEY", "ai_api_key", "the chat-completions server's API key"),
    Variable("AI_MODEL", "ai_model", "the chat model to ask"),
    Variable("AI_TIMEOUT", "ai_timeout_s", "seconds per AI call", float),
    Variable(
        "AI_MAX_RETRIES",
        "ai_max_retries",
        "retries of an AI call after a 429, 5xx or timeout",
        int,
    ),
    Variable(
        "LIVECHAT_OUTBOX_LEASE",
        "outbox_lease_s",
        "seconds an instance holds a pending AI reply or send without renewing it; after a "
        "crash another instance takes it after this long",
        float,
    ),
    Variable(
        "LIVECHAT_FAQ",
        "faq_path",
        "the built-in responder's answers",
        default_text="`server/integrations/faq.json`",
    ),
    Variable(
        "LOG_FORMAT",
        "log_format",
        "`console`, or `json` lines for log pipelines",
        flag="--log-format",
        choices=LOG_FORMATS,
    ),
    Variable(
        "LOG_LEVEL",
        "log_level",
        "`debug`, `info`, `warning` or `error`",
        flag="--log-level",
        choices=LOG_LEVELS,
    ),
    Variable(
        "LIVECHAT_METRICS_PORT",
        "metrics_port",
        "serve `/metrics` on this port, without the token; unset: on `PORT`, with it",
        int,
        flag="--metrics-port",
    ),
    Variable(
        "LIVECHAT_METRICS_HOST",
        "metrics_host",
        "interface of the metrics port",
        default_text="`HOST`",
    ),
    Variable(
        "LIVECHAT_SHUTDOWN_TIMEOUT",
        "shutdown_timeout_s",
        "seconds running jobs get to finish after SIGTERM or SIGINT",
        float,
        flag="--shutdown-timeout",
    ),
    Variable(
        "LIVECHAT_DEMO",
        "demo",
        "seed demo data and the demo team into an empty store",
        _bool,
        flag="--demo",
    ),
    Variable(
        "LIVECHAT_DEMO_CONVERSATIONS",
        "demo_conversations",
        "how many demo conversations",
        int,
        flag="--demo-conversations",
    ),
)
