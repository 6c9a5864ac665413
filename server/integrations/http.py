"""The one way integrations call a JSON API: post, read the JSON answer and Retry-After."""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass(slots=True, frozen=True)
class JsonReply:
    """An HTTP answer: its status, its JSON body (None when not JSON) and Retry-After."""

    status: int
    body: Any
    retry_after_s: float | None


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    payload: dict[str, Any],
    headers: dict[str, str],
    client_timeout: aiohttp.ClientTimeout,
) -> JsonReply:
    """POST `payload`; TimeoutError and aiohttp.ClientError reach the caller, who retries."""
    async with session.post(url, json=payload, headers=headers, timeout=client_timeout) as resp:
        retry_after_s = retry_after(resp.headers.get("Retry-After"))
        try:
            body: Any = await resp.json(content_type=None)
        except ValueError:
            body = None
        return JsonReply(resp.status, body, retry_after_s)


def retry_after(raw: str | None) -> float | None:
    """Seconds from a Retry-After header (a number of seconds or an HTTP date)."""
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
