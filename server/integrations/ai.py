"""AI responders: a built-in one that works offline, and OpenAI-compatible servers."""

from __future__ import annotations

import aiohttp

from server.config import Settings
from server.inbox import Responder


def make_responder(settings: Settings, session: aiohttp.ClientSession) -> Responder | None:
    """The responder the settings name (None: AI replies are off)."""
    return None
