"""GET /api/live-chat/media/{message_id}: a message's media file, for signed-in agents.

Served from a local file (the media store's, or its cache of the bucket) by aiohttp's
FileResponse: sendfile, Content-Length, Range (audio and video seek), ETag and
Last-Modified. A message's media never changes once kept, so browsers may keep it; the
answer is private (agents only, behind the auth middleware like every /api/ route).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

from aiohttp import web

from server import keys
from server.handlers.errors import json_error
from server.media import MediaEntry
from server.models import Message

CACHE_CONTROL: Final = "private, max-age=31536000, immutable"
# Shown in the page; anything else (a PDF, an HTML file a customer sent) is downloaded,
# never rendered on the dashboard's origin.
INLINE_TYPES: Final = ("image/", "audio/", "video/")


def entry_for(message: Message) -> MediaEntry:
    """How a message's file is served: its type, inline or as a download with its name."""
    media = message.media
    assert media is not None
    content_type = media.mime_type or "application/octet-stream"
    inline = content_type.startswith(INLINE_TYPES) and message.type != "document"
    name = (media.filename or f"{message.type}-{message.id}").replace('"', "")
    ascii_name = name.encode("ascii", "replace").decode().replace("?", "_")
    disposition = f'{"inline" if inline else "attachment"}; filename="{ascii_name}"'
    return MediaEntry(content_type, disposition)


async def get_media(request: web.Request) -> web.StreamResponse:
    """The file of a message's media; 404 while it is on its way or when it failed (the
    error says which, and why)."""
    message_id = request.match_info["message_id"]
    index = request.app[keys.MEDIA_INDEX]
    entry = index.get(message_id)
    if entry is None:
        message = await request.app[keys.STORE].get_message(message_id)  # NotFound: 404
        media = message.media
        if media is None:
            return json_error(HTTPStatus.NOT_FOUND, "no_media", "this message has no media")
        if media.state == "failed":
            reason = media.error or "the download failed"
            return json_error(HTTPStatus.NOT_FOUND, "media_unavailable", reason)
        if media.state != "ready":
            return json_error(
                HTTPStatus.NOT_FOUND,
                "media_pending",
                "the file is still being downloaded from WhatsApp",
                headers={"Retry-After": "2"},
            )
        entry = entry_for(message)
        index.put(message_id, entry)
    path = await request.app[keys.MEDIA].local_path(message_id)
    if path is None:
        return json_error(HTTPStatus.NOT_FOUND, "media_unavailable", "the file is not stored")
    return web.FileResponse(
        path,
        headers={
            "Content-Type": entry.content_type,
            "Content-Disposition": entry.disposition,
            "Cache-Control": CACHE_CONTROL,
            "X-Content-Type-Options": "nosniff",
            # A file a customer sent never runs script on the dashboard's origin.
            "Content-Security-Policy": "sandbox; default-src 'none'; style-src 'unsafe-inline'",
        },
    )
