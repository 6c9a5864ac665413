"""The one way integrations call a JSON API: post, read the JSON answer and Retry-After."""

from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

# The Graph API's and chat-completions servers' answers are a few kilobytes. A server that
# sends more (a misconfigured proxy, a hostile endpoint) is cut off here rather than held
# in memory whole.
MAX_RESPONSE_BYTES: Final = 1024 * 1024


class ResponseTooLarge(aiohttp.ClientPayloadError):
    """An answer longer than MAX_RESPONSE_BYTES (a client error: the caller's retry policy
    applies)."""


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
    async with session.post(
        url, json=payload, headers=headers, timeout=client_timeout, allow_redirects=False
    ) as resp:
        retry_after_s = retry_after(resp.headers.get("Retry-After"))
        raw = await read_capped(resp, MAX_RESPONSE_BYTES)
        try:
            body: Any = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            body = None
        return JsonReply(resp.status, body, retry_after_s)


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The answer's body; ResponseTooLarge as soon as it passes `limit` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        raise ResponseTooLarge(f"the answer declares {resp.content_length} bytes (limit {limit})")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge(f"the answer is longer than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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
