"""What each route needs: who may call it, and how large a body it takes.

Every route is declared with a Policy (server/routes.py); the auth middleware enforces it,
and an app with a route that declares none refuses to start.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

# JSON bodies of the API are small: the longest is a 4,096-character reply (up to 16 KB of
# UTF-8, more when escaped). 64 KiB leaves room and bounds what a client makes us buffer.
API_BODY: Final = 64 * 1024
# WhatsApp batches up to 3 MB of updates into one webhook delivery.
WEBHOOK_BODY: Final = 4 * 1024 * 1024


class Access(enum.Enum):
    """Who may call a route."""

    OPEN = "open"  # anyone (health, the dashboard's files, sign-in, the signed webhook)
    AGENT = "agent"  # a signed-in agent, a personal token or the machine token
    ADMIN = "admin"  # an admin agent


@dataclass(slots=True, frozen=True)
class Policy:
    """A route's declaration.

    `max_upload`: a route that takes files as a multipart form streams them to its handler
    (which reads them in bounded chunks) instead of having the body read up front; this
    bounds the declared size of such a body.
    """

    access: Access
    max_body: int = API_BODY
    max_upload: int | None = None


class UndeclaredRoute(RuntimeError):
    """A route was added without a Policy: the app does not start."""
