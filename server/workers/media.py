"""Inbound media downloads: one task per media message in the outbox, run in the media lane.

A customer's photo, voice note, video, document or sticker records its download
(rules.media_task) in the same write as the message. The job asks WhatsApp where the bytes
are (`GET /{media-id}`: a URL that expires about 5 minutes later), downloads them with the
bearer token, checks them against the webhook's `sha256`, keeps them in the media store and
records the outcome in the write that completes the task. An expired URL is asked for
again; transient failures are retried a few times; what still fails is marked failed with
the reason, so an agent sees "media unavailable" and why, never a placeholder for ever. A
job cut off by a crash is resumed by the sweeper; one cut off again and again is failed.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import time
from typing import Final, Protocol

import structlog

from server.inbox import DeliveryError, Inbox
from server.integrations.whatsapp import MediaInfo
from server.media import MediaStore, MediaStoreError
from server.models import Media, MessageError
from server.store import rules
from server.store.base import ChatStore, NotFound, Task

log = structlog.get_logger(__name__)

# Tries of one job, with these waits between them (a network blip, a 5xx, a bad transfer).
RETRY_DELAYS_S: Final = (1.0, 4.0)
# A media URL that expired is asked for again at most this often in one try.
URL_REFRESHES: Final = 2
# A download resumed this many times after crashes or restarts is given up on: something
# about the file keeps killing the process, and the agent should know.
MAX_RESUMES: Final = 3


class MediaSource(Protocol):
    """Where inbound media comes from: WhatsApp's media endpoints."""

    async def media_info(self, media_id: str, *, number: str | None) -> MediaInfo:
        """Where a media id's bytes are now."""

    async def download(self, url: str, *, number: str | None, max_bytes: int) -> bytes:
        """The bytes at a media URL."""


def sha256_matches(data: bytes, expected: str) -> bool:
    """Whether `data` has the SHA-256 WhatsApp gave: base64 of the digest as documented for
    webhooks, or the hex digest some answers carry."""
    digest = hashlib.sha256(data).digest()
    wanted = expected.strip()
    return wanted in (base64.b64encode(digest).decode(), digest.hex())


class _Failed(Exception):
    """A try failed; `transient` when another may succeed."""

    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


class MediaDownloads:
    """Runs media tasks: download, check, keep, record."""

    def __init__(
        self,
        store: ChatStore,
        inbox: Inbox,
        media: MediaStore,
        source: MediaSource,
        *,
        retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S,
    ) -> None:
        self.store = store
        self.inbox = inbox
        self.media = media
        self.source = source
        self._delays = retry_delays_s

    async def run(self, task: Task) -> None:
        """Download the media of the message the task names; the outcome is recorded."""
        started = time.perf_counter()
        try:
            message = await self.store.get_message(task.message_id)
            conversation = await self.store.get_conversation(task.conversation_id)
        except NotFound:
            await self.store.finish_task(task)
            return
        media = message.media
        if media is None or media.state != "pending" or not media.id:
            await self.store.finish_task(task)  # done already
            return
        if task.attempts > MAX_RESUMES:
            await self._record(
                message.id, media, None, f"the download was interrupted {task.attempts} times"
            )
            return
        limit = rules.MEDIA_LIMITS.get(message.type, rules.MEDIA_LIMITS["document"])
        tries = len(self._delays) + 1
        for attempt in range(tries):
            try:
                data = await self._fetch(media, conversation.phone_number_id, limit)
                await self.media.put(
                    message.id, data, media.mime_type or "application/octet-stream"
                )
            except _Failed as e:
                if not e.transient or attempt == tries - 1:
                    await self._record(message.id, media, None, e.reason)
                    return
                log.info("media.retry", message_id=message.id, attempt=attempt + 1, reason=e.reason)
                await asyncio.sleep(self._delays[attempt])
                continue
            except MediaStoreError as e:
                if attempt == tries - 1:
                    await self._record(message.id, media, None, f"could not keep the file: {e}")
                    return
                await asyncio.sleep(self._delays[attempt])
                continue
            await self._record(message.id, media, len(data), None)
            log.info(
                "media.downloaded",
                message_id=message.id,
                bytes=len(data),
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )
            return

    async def _fetch(self, media: Media, number: str | None, limit: int) -> bytes:
        """The bytes of a media id, checked; an expired URL is asked for again."""
        assert media.id is not None
        try:
            info = await self.source.media_info(media.id, number=number)
            for refresh in range(URL_REFRESHES + 1):
                try:
                    data = await self.source.download(info.url, number=number, max_bytes=limit)
                    break
                except DeliveryError as e:
                    if e.error.code not in _EXPIRED or refresh == URL_REFRESHES:
                        raise
                    log.info("media.url_expired", media_id=media.id)
                    info = await self.source.media_info(media.id, number=number)
        except DeliveryError as e:
            raise _Failed(_reason(e.error), transient=e.transient) from e
        expected = media.sha256 or info.sha256
        if expected and not sha256_matches(data, expected):
            # A transfer cut short or garbled: another try fetches it anew.
            raise _Failed("the file does not match its SHA-256 checksum", transient=True)
        return data

    async def _record(
        self, message_id: str, media: Media, size: int | None, failure: str | None
    ) -> None:
        """Store the outcome, completing the task (the store's feed tells the dashboards)."""
        if failure is None:
            outcome = dataclasses.replace(media, state="ready", size=size, error=None)
        else:
            log.warning("media.failed", message_id=message_id, reason=failure[:300])
            outcome = dataclasses.replace(media, state="failed", error=failure[:300])
        await self.store.set_media(message_id, outcome)


# What WhatsApp's signed media URLs answer once expired (whatsapp.EXPIRED_STATUSES).
_EXPIRED: Final = frozenset({"http_401", "http_403", "http_404", "http_410"})


def _reason(error: MessageError) -> str:
    """Why a download failed, for the agent."""
    return error.title if error.title else f"WhatsApp error {error.code}"
