"""The media store: the bytes of photos, voice notes, videos and documents, by message id.

WhatsApp's media URLs expire about 5 minutes after they are issued and a webhook's media
id after 7 days, so inbound media is downloaded soon after its webhook and kept here; an
agent's attachment is kept here before it is uploaded to WhatsApp. Files on disk by
default (one instance); a Cloud Storage bucket for several instances, each keeping the
files its agents opened lately on its own disk, so the media route always serves a local
file (sendfile, ranges and all).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import structlog

from server.config import Settings

log = structlog.get_logger(__name__)

# Keys are message ids (`wa_<hex>`, `m_<hex>`): anything else never reaches the disk.
_KEY: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")


class MediaStoreError(Exception):
    """The media store could not keep or return a file."""


class TooLarge(ValueError):
    """A file past WhatsApp's size limit for its type."""


class MediaStore(Protocol):
    """Where media files are kept."""

    name: str

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Keep `data` under `key` (written whole, or not at all)."""

    async def local_path(self, key: str) -> Path | None:
        """A file on this machine holding the bytes of `key` (fetched first when they are
        elsewhere), or None when the store has none."""


# Ready media of this many messages is remembered by the media route (content type, file
# name): opening a conversation full of photos asks the store once per photo.
INDEX_SIZE: Final = 10_000


@dataclass(slots=True, frozen=True)
class MediaEntry:
    """How to serve a message's kept file."""

    content_type: str
    disposition: str


class MediaIndex:
    """What the route knows about ready media, by message id (bounded, least recent out)."""

    def __init__(self, size: int = INDEX_SIZE) -> None:
        self._entries: OrderedDict[str, MediaEntry] = OrderedDict()
        self._size = size

    def get(self, message_id: str) -> MediaEntry | None:
        """The entry, if known."""
        entry = self._entries.get(message_id)
        if entry is not None:
            self._entries.move_to_end(message_id)
        return entry

    def put(self, message_id: str, entry: MediaEntry) -> None:
        """Remember an entry."""
        self._entries[message_id] = entry
        self._entries.move_to_end(message_id)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


def check_key(key: str) -> str:
    """The key, when it is one a file may be named after; ValueError otherwise."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"not a media key: {key!r}")
    return key


def _write_whole(path: Path, data: bytes) -> None:
    """Write a file so that it is there whole or not at all, and on the disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FileMediaStore:
    """Media files in a folder (LIVECHAT_MEDIA_DIR), two levels of fan-out by key."""

    name = "file"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path_of(self, key: str) -> Path:
        """Where a key's file lives."""
        check_key(key)
        return self.root / key[-2:] / key

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write the file (off the event loop), fsynced before this returns."""
        path = self.path_of(key)
        try:
            await asyncio.to_thread(_write_whole, path, data)
        except OSError as e:
            raise MediaStoreError(f"could not write media: {e.strerror or e}") from e

    async def local_path(self, key: str) -> Path | None:
        """The file, when it exists."""
        path = self.path_of(key)
        return path if await asyncio.to_thread(path.is_file) else None


class GcsMediaStore:
    """Media files in a Cloud Storage bucket (google-cloud-storage), cached on local disk.

    The client library is synchronous: every call runs in a thread. The local cache keeps
    the files opened lately up to LIVECHAT_MEDIA_CACHE_MB, the least recently used
    dropped first.
    """

    name = "gcs"

    def __init__(self, bucket: Any, cache_dir: str | Path, cache_bytes: int) -> None:
        self._bucket = bucket
        self.cache = FileMediaStore(cache_dir)
        self._cache_bytes = cache_bytes
        self._cached: OrderedDict[str, int] = OrderedDict()
        self._cached_total = 0
        self._fetching: dict[str, asyncio.Future[Path | None]] = {}

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Upload to the bucket, then keep a copy in the local cache."""
        check_key(key)
        blob = self._bucket.blob(key)
        try:
            await asyncio.to_thread(blob.upload_from_string, data, content_type=content_type)
        except Exception as e:  # the library raises many kinds: all mean "not stored"
            raise MediaStoreError(
                f"could not upload media to the bucket ({type(e).__name__})"
            ) from e
        with contextlib.suppress(MediaStoreError):
            await self.cache.put(key, data, content_type)
            self._note(key, len(data))

    async def local_path(self, key: str) -> Path | None:
        """The cached file, downloaded from the bucket first when it is not cached."""
        path = await self.cache.local_path(key)
        if path is not None:
            if key in self._cached:
                self._cached.move_to_end(key)
            return path
        # One download per key at a time: a video opened by ten agents is fetched once.
        pending = self._fetching.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Path | None] = asyncio.get_running_loop().create_future()
        self._fetching[key] = future
        try:
            path = await self._fetch(key)
            future.set_result(path)
            return path
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._fetching[key]

    async def _fetch(self, key: str) -> Path | None:
        from google.api_core import exceptions as gexc

        path = self.cache.path_of(key)
        blob = self._bucket.blob(key)

        def download() -> int | None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.dl")
            try:
                blob.download_to_filename(str(tmp))
            except gexc.NotFound:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                return None
            os.replace(tmp, path)
            return path.stat().st_size

        try:
            size = await asyncio.to_thread(download)
        except Exception as e:
            raise MediaStoreError(
                f"could not read media from the bucket ({type(e).__name__})"
            ) from e
        if size is None:
            return None
        self._note(key, size)
        return path

    def _note(self, key: str, size: int) -> None:
        """Count a cached file, and drop the least recently used past the budget."""
        self._cached_total += size - self._cached.pop(key, 0)
        self._cached[key] = size
        while self._cached_total > self._cache_bytes and len(self._cached) > 1:
            old, old_size = self._cached.popitem(last=False)
            self._cached_total -= old_size
            with contextlib.suppress(OSError):
                self.cache.path_of(old).unlink()


def make_media_store(settings: Settings) -> MediaStore:
    """The media store the settings name."""
    if settings.media_store == "gcs":
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage  # type: ignore[attr-defined]

        if settings.gcs_endpoint:
            # An emulator (or a fake speaking the JSON API): no Google credentials.
            endpoint = settings.gcs_endpoint
            if not endpoint.startswith("http"):
                endpoint = "http://" + endpoint
            client = storage.Client(
                project=settings.google_cloud_project,
                credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                client_options={"api_endpoint": endpoint},
            )
        else:
            client = storage.Client(project=settings.google_cloud_project)
        return GcsMediaStore(
            client.bucket(settings.media_bucket),
            settings.media_dir,
            settings.media_cache_mb * 1024 * 1024,
        )
    return FileMediaStore(settings.media_dir)
