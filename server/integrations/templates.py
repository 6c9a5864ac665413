"""WhatsApp message templates: read from the Business Account, cached, rendered.

Outside the 24-hour customer-service window only an approved template reaches a customer.
The catalog reads the account's templates (`GET /{waba-id}/message_templates`), keeps them,
and reads them again when a `message_template_status_update` webhook says one changed,
when an agent asks, or once they are older than REFRESH_S (another instance may have
received the webhook).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog

from server.inbox import DeliveryError

log = structlog.get_logger(__name__)

# Templates change when Meta reviews them (minutes to a day): a listing older than this is
# read again on the next request.
REFRESH_S: Final = 600.0
# Positional placeholders: {{1}}, {{2}}, ...
PLACEHOLDER: Final = re.compile(r"\{\{\s*(\d{1,2})\s*\}\}")
# A parameter is one line of a customer-facing message; WhatsApp refuses newlines and tabs
# in body parameters and caps the body at 1,024 characters.
MAX_PARAMETER_CHARS: Final = 1024


class TemplateError(ValueError):
    """A template send that cannot be made: unknown, not approved, wrong parameters."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class TemplateSource(Protocol):
    """Where templates come from: the Graph API."""

    async def templates(self, account_id: str) -> list[dict[str, Any]]:
        """Every template of the account, as Graph lists them."""


def placeholders(text: str | None) -> int:
    """How many positional parameters a text takes ({{1}}..{{n}})."""
    return max((int(n) for n in PLACEHOLDER.findall(text or "")), default=0)


def render(text: str | None, values: list[str]) -> str:
    """A text with its placeholders filled ({{n}} stays when no value is given for it)."""

    def fill(match: re.Match[str]) -> str:
        i = int(match.group(1)) - 1
        return values[i] if 0 <= i < len(values) else match.group(0)

    return PLACEHOLDER.sub(fill, text or "")


@dataclass(slots=True, frozen=True)
class Template:
    """One message template as the account lists it."""

    name: str
    language: str
    status: str
    category: str | None
    components: tuple[dict[str, Any], ...]

    def _text(self, kind: str) -> str | None:
        for component in self.components:
            if str(component.get("type", "")).upper() == kind:
                text = component.get("text")
                if kind != "HEADER" or component.get("format", "TEXT") == "TEXT":
                    return text if isinstance(text, str) else None
        return None

    @property
    def header(self) -> str | None:
        """The text header, if it has one."""
        return self._text("HEADER")

    @property
    def body(self) -> str:
        """The body text, with its placeholders."""
        return self._text("BODY") or ""

    @property
    def footer(self) -> str | None:
        """The footer text, if it has one."""
        return self._text("FOOTER")

    @property
    def approved(self) -> bool:
        """Only approved templates can be sent."""
        return self.status.upper() == "APPROVED"

    def preview(self, parameters: list[str], header_parameters: list[str] | None = None) -> str:
        """The text the customer will read."""
        parts = [
            render(self.header, header_parameters or []) if self.header else None,
            render(self.body, parameters),
            self.footer,
        ]
        return "\n\n".join(p for p in parts if p)

    def to_json(self) -> dict[str, Any]:
        """The API shape."""
        return {
            "name": self.name,
            "language": self.language,
            "status": self.status,
            "category": self.category,
            "header": self.header,
            "body": self.body,
            "footer": self.footer,
            "parameters": placeholders(self.body),
            "header_parameters": placeholders(self.header),
            "components": list(self.components),
        }


def parse_templates(raw: list[dict[str, Any]]) -> list[Template]:
    """Templates from Graph's listing; malformed entries are skipped."""
    out = []
    for item in raw:
        name, language = item.get("name"), item.get("language")
        if not isinstance(name, str) or not isinstance(language, str):
            continue
        components = item.get("components")
        out.append(
            Template(
                name=name,
                language=language,
                status=str(item.get("status") or "UNKNOWN"),
                category=item.get("category") if isinstance(item.get("category"), str) else None,
                components=tuple(c for c in components if isinstance(c, dict))
                if isinstance(components, list)
                else (),
            )
        )
    return out


def check_parameters(template: Template, values: Any, expected: int, what: str) -> list[str]:
    """The parameters an agent filled, when they fit the template; TemplateError otherwise."""
    values = values if values is not None else []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise TemplateError(f"{what} must be a list of strings", "invalid_template")
    if len(values) != expected:
        raise TemplateError(
            f"template {template.name!r} takes {expected} {what}, got {len(values)}",
            "invalid_template",
        )
    for value in values:
        if not value.strip() or len(value) > MAX_PARAMETER_CHARS or "\n" in value or "\t" in value:
            raise TemplateError(
                f"each of {what} must be one non-empty line of at most"
                f" {MAX_PARAMETER_CHARS} characters",
                "invalid_template",
            )
    return values


class TemplateCatalog:
    """The account's templates, cached; refreshed on webhooks, on demand and when old."""

    def __init__(self, source: TemplateSource | None, account_id: str | None) -> None:
        self._source = source
        self._account_id = account_id
        self._templates: list[Template] = []
        self._loaded_at: float | None = None
        self._lock = asyncio.Lock()
        self._stale = asyncio.Event()

    @property
    def configured(self) -> bool:
        """Whether there is an account to read templates from."""
        return self._source is not None and bool(self._account_id)

    async def templates(self, *, refresh: bool = False) -> list[Template]:
        """Every template (read again when asked, when told it changed, or when old)."""
        old = self._loaded_at is None or time.monotonic() - self._loaded_at > REFRESH_S
        if self.configured and (refresh or old or self._stale.is_set()):
            await self.refresh()
        return list(self._templates)

    async def find(self, name: str, language: str) -> Template:
        """The template an agent chose; TemplateError when it cannot be sent."""
        for refresh in (False, True):  # approved a moment ago: read once more
            for template in await self.templates(refresh=refresh):
                if template.name == name and template.language == language:
                    if not template.approved:
                        raise TemplateError(
                            f"template {name!r} is {template.status}, not approved",
                            "template_not_approved",
                        )
                    return template
        raise TemplateError(f"no template {name!r} in {language!r}", "unknown_template")

    async def refresh(self) -> None:
        """Read the templates now (one read at a time); a failure keeps the last listing."""
        if self._source is None or not self._account_id:
            return
        async with self._lock:
            self._stale.clear()
            started = time.perf_counter()
            try:
                raw = await self._source.templates(self._account_id)
            except DeliveryError as e:
                log.warning("templates.refresh_failed", error=e.error.title)
                return
            self._templates = parse_templates(raw)
            self._loaded_at = time.monotonic()
            log.info(
                "templates.loaded",
                templates=len(self._templates),
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )

    def changed(self) -> None:
        """A webhook said a template changed: the next listing reads them again, and the
        refresher reads them now."""
        self._stale.set()

    async def run(self) -> None:
        """Read the templates whenever a webhook says they changed, until cancelled."""
        if not self.configured:
            return
        while True:
            await self._stale.wait()
            await self.refresh()
