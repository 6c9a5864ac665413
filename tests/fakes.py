"""Local stand-ins for what cannot run here: Meta's Graph API and an LLM server.

Both are real aiohttp apps served on loopback that speak the real wire formats
(../shared/WHATSAPP.md), so the server's HTTP clients are exercised end to end.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# Long enough that the client's timeout always fires first; short enough that nothing
# waits forever if a test forgets to release it.
HANG_S = 30.0


@dataclass
class Recorded:
    """One request a fake received."""

    path: str
    headers: dict[str, str]
    json: Any
    at: float = field(default_factory=time.monotonic)


class _Fake:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._arrived = asyncio.Condition()
        self._closing = asyncio.Event()
        self.app = web.Application()
        self.app.on_shutdown.append(self._shutdown)
        self.server: Any = None

    async def _shutdown(self, app: web.Application) -> None:
        self._closing.set()

    async def _record(self, request: web.Request, body: Any = None) -> Recorded:
        if body is None and request.content_type == "application/json":
            body = await request.json()
        recorded = Recorded(request.path, dict(request.headers), body)
        async with self._arrived:
            self.requests.append(recorded)
            self._arrived.notify_all()
        return recorded

    async def wait_for_requests(self, n: int, within: float = 5.0) -> list[Recorded]:
        """Wait until `n` requests have arrived; returns them all."""
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.requests) >= n), within)
        return self.requests

    async def _hang(self) -> None:
        try:
            await asyncio.wait_for(self._closing.wait(), HANG_S)
        except TimeoutError:
            pass

    def url(self, path: str) -> str:
        """The absolute URL of `path` on the running fake."""
        return str(self.server.make_url(path))


@dataclass
class FakeMedia:
    """A file the fake Graph API holds for a media id."""

    data: bytes
    mime_type: str
    sha256: str


class FakeGraph(_Fake):
    """WhatsApp Cloud API (../shared/WHATSAPP.md): sends and read receipts
    (POST /{phone-number-id}/messages), uploads (POST /{phone-number-id}/media, multipart),
    media lookups (GET /{media-id} -> a URL that expires), downloads (GET that URL with the
    bearer token) and templates (GET /{waba-id}/message_templates). Every call checks the
    token: the shared one, or a number's own (`tokens`)."""

    def __init__(self) -> None:
        super().__init__()
        self.token = "t"
        # Phone number id -> its own token (numbers without one use `token`).
        self.tokens: dict[str, str] = {}
        # Seconds every send waits before it is answered (a slow Graph API).
        self.delay_s = 0.0
        self._script: deque[tuple[int, dict[str, Any]]] = deque()
        self._ids = itertools.count(1)
        self._media_ids = itertools.count(1)
        self.media: dict[str, FakeMedia] = {}
        self.uploads: list[dict[str, Any]] = []
        self.templates: list[dict[str, Any]] = []
        # Issued media URLs: key -> (media id, when it expires, monotonic).
        self._urls: dict[str, tuple[str, float]] = {}
        self.url_ttl_s = 300.0  # Meta's URLs expire about 5 minutes after they are issued
        self.expire_urls = 0  # the next N URLs are issued already expired
        self.download_delay_s = 0.0
        self.downloads: list[str] = []  # media ids whose bytes were requested
        self.lookups: list[str] = []  # media ids looked up
        self.app.router.add_post("/v21.0/{phone_number_id}/messages", self._messages)
        self.app.router.add_post("/v21.0/{phone_number_id}/media", self._upload)
        self.app.router.add_get("/v21.0/{account_id}/message_templates", self._templates)
        self.app.router.add_get("/v21.0/{media_id}", self._media_info)
        self.app.router.add_get("/lookaside/{key}", self._download)

    @classmethod
    async def serve(cls, aiohttp_server: Any) -> FakeGraph:
        fake = cls()
        fake.server = await aiohttp_server(fake.app)
        return fake

    @property
    def base(self) -> str:
        """What WHATSAPP_API_BASE should be."""
        return self.url("/v21.0")

    def add_media(self, data: bytes, mime_type: str, media_id: str | None = None) -> FakeMedia:
        """Hold a file as WhatsApp holds a customer's upload; returns it with its sha256."""
        import base64
        import hashlib

        media = FakeMedia(data, mime_type, base64.b64encode(hashlib.sha256(data).digest()).decode())
        self.media[media_id or f"media-{next(self._media_ids)}"] = media
        return media

    def media_id(self, media: FakeMedia) -> str:
        return next(k for k, v in self.media.items() if v is media)

    def fail(self, code: int, *, http_status: int = 400, times: int = 1) -> None:
        """Answer the next `times` sends with a Graph API error of this code."""
        for _ in range(times):
            self._script.append((http_status, _graph_error(code)))

    def fail_raw(self, http_status: int, *, times: int = 1) -> None:
        """Answer with a bare HTTP error and no Graph error body (a proxy in the way)."""
        for _ in range(times):
            self._script.append((http_status, {}))

    def sends(self) -> list[Recorded]:
        """Message sends (not read receipts)."""
        return [
            r for r in self.requests if r.path.endswith("/messages") and "type" in (r.json or {})
        ]

    def receipts(self) -> list[Recorded]:
        """Read receipts (and typing indicators)."""
        return [r for r in self.requests if (r.json or {}).get("status") == "read"]

    def _authorized(self, request: web.Request, number: str | None = None) -> bool:
        token = self.tokens.get(number or "", self.token)
        return request.headers.get("Authorization") == f"Bearer {token}"

    @staticmethod
    def _unauthorized() -> web.Response:
        return web.json_response(
            {
                "error": {
                    "message": "Invalid OAuth access token.",
                    "type": "OAuthException",
                    "code": 190,
                }
            },
            status=401,
        )

    async def _messages(self, request: web.Request) -> web.Response:
        recorded = await self._record(request)
        if not self._authorized(request, request.match_info["phone_number_id"]):
            return self._unauthorized()
        if recorded.json.get("status") == "read":
            return web.json_response({"success": True})
        if self._script:
            status, body = self._script.popleft()
            if body:
                return web.json_response(body, status=status)
            return web.Response(status=status, text="bad gateway")
        to = recorded.json.get("to")
        contact = (
            {"input": to, "wa_id": to}
            if to
            else {
                "input": recorded.json["recipient"],
                "user_id": recorded.json["recipient"],
            }
        )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.json_response(
            {
                "messaging_product": "whatsapp",
                "contacts": [contact],
                "messages": [{"id": f"wamid.FAKE{next(self._ids):04d}"}],
            }
        )

    async def _upload(self, request: web.Request) -> web.Response:
        """POST /{phone-number-id}/media: multipart with file, type, messaging_product."""
        if not request.content_type.startswith("multipart/form-data"):
            return web.json_response(_graph_error(100, "expected multipart/form-data"), status=400)
        form = await request.post()
        upload = {
            "number": request.match_info["phone_number_id"],
            "authorization": request.headers.get("Authorization"),
            "messaging_product": form.get("messaging_product"),
            "type": form.get("type"),
        }
        file = form.get("file")
        if file is not None and not isinstance(file, str):
            upload["filename"] = file.filename
            upload["content_type"] = file.content_type
            upload["data"] = file.file.read()
        await self._record(request, upload)
        if not self._authorized(request, upload["number"]):
            return self._unauthorized()
        if (
            upload["messaging_product"] != "whatsapp"
            or not upload.get("data")
            or not upload["type"]
        ):
            return web.json_response(_graph_error(100, "missing a required parameter"), status=400)
        media = self.add_media(upload["data"], str(upload["type"]))
        self.uploads.append(upload)
        return web.json_response({"id": self.media_id(media)})

    async def _media_info(self, request: web.Request) -> web.Response:
        """GET /{media-id}: where the bytes are, for a few minutes."""
        media_id = request.match_info["media_id"]
        self.lookups.append(media_id)
        await self._record(request)
        if not self._authorized(request):
            return self._unauthorized()
        media = self.media.get(media_id)
        if media is None:
            return web.json_response(
                _graph_error(100, "Unsupported get request. Object does not exist"), status=400
            )
        key = f"u{len(self._urls) + 1}"
        ttl = self.url_ttl_s
        if self.expire_urls:
            self.expire_urls -= 1
            ttl = -1.0
        self._urls[key] = (media_id, time.monotonic() + ttl)
        return web.json_response(
            {
                "messaging_product": "whatsapp",
                "url": self.url(f"/lookaside/{key}") + f"?mid={media_id}&ext=1&hash=ATuv",
                "mime_type": media.mime_type,
                "sha256": media.sha256,
                "file_size": len(media.data),
                "id": media_id,
            }
        )

    async def _download(self, request: web.Request) -> web.StreamResponse:
        """GET a media URL with the bearer token: the bytes, until the URL expires."""
        await self._record(request)
        if not self._authorized(request):
            return self._unauthorized()
        issued = self._urls.get(request.match_info["key"])
        if issued is None or time.monotonic() > issued[1]:
            return web.Response(status=404, text="URL signature expired")
        media = self.media[issued[0]]
        self.downloads.append(issued[0])
        if self.download_delay_s:
            try:  # a slow transfer; ends early when the fake shuts down
                await asyncio.wait_for(self._closing.wait(), self.download_delay_s)
            except TimeoutError:
                pass
        return web.Response(body=media.data, content_type=media.mime_type.split(";")[0])

    async def _templates(self, request: web.Request) -> web.Response:
        """GET /{waba-id}/message_templates: the account's templates, one page."""
        await self._record(request)
        if not self._authorized(request):
            return self._unauthorized()
        return web.json_response(
            {"data": self.templates, "paging": {"cursors": {"before": "MAZDZD", "after": "MjQZD"}}}
        )


def _graph_error(code: int, message: str | None = None) -> dict[str, Any]:
    """A Graph API error body."""
    return {
        "error": {
            "message": message or f"(#{code}) Message failed to send",
            "type": "OAuthException",
            "code": code,
            "error_data": {"messaging_product": "whatsapp", "details": "fake failure"},
            "fbtrace_id": "AbCdEfGh123",
        }
    }


class FakeLLM(_Fake):
    """An OpenAI-compatible server: POST /v1/chat/completions."""

    def __init__(self, reply: str = "Hello! How can I help?") -> None:
        super().__init__()
        self.reply = reply
        self._script: deque[dict[str, Any]] = deque()
        self._released = asyncio.Event()
        self.app.router.add_post("/v1/chat/completions", self._completions)

    @classmethod
    async def serve(cls, aiohttp_server: Any) -> FakeLLM:
        fake = cls()
        fake.server = await aiohttp_server(fake.app)
        return fake

    @property
    def base(self) -> str:
        """What AI_BASE_URL should be."""
        return self.url("/v1")

    def block(self) -> None:
        """The next request waits for release() before it answers."""
        self._released.clear()
        self._script.append({"block": True})

    def release(self) -> None:
        """Let a blocked request answer."""
        self._released.set()

    def fail(
        self,
        status: int,
        *,
        times: int = 1,
        retry_after: str | None = None,
        code: str | None = None,
    ) -> None:
        """Answer the next `times` requests with an HTTP error in OpenAI's error shape."""
        for _ in range(times):
            self._script.append({"status": status, "retry_after": retry_after, "code": code})

    def hang(self, *, times: int = 1) -> None:
        """Never answer the next `times` requests (the client's timeout must fire)."""
        for _ in range(times):
            self._script.append({"hang": True})

    async def _completions(self, request: web.Request) -> web.Response:
        await self._record(request)
        step = self._script.popleft() if self._script else {}
        if step.get("hang"):
            await self._hang()
            return web.Response(status=504)
        if step.get("block"):
            waiter = asyncio.ensure_future(self._released.wait())
            closing = asyncio.ensure_future(self._closing.wait())
            await asyncio.wait({waiter, closing}, return_when=asyncio.FIRST_COMPLETED)
            for task in (waiter, closing):
                task.cancel()
        if "status" in step:
            headers = {"Retry-After": step["retry_after"]} if step["retry_after"] else None
            code = step["code"]
            return web.json_response(
                {
                    "error": {
                        "message": "fake failure",
                        "type": code or "server_error",
                        "param": None,
                        "code": code,
                    }
                },
                status=step["status"],
                headers=headers,
            )
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": "fake-model",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": self.reply},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        )


def graph_settings(graph: FakeGraph) -> dict:
    """Settings overrides that point the app's WhatsApp client at a fake Graph API."""
    return {
        "whatsapp_token": "t",
        "whatsapp_phone_number_id": "123",
        "whatsapp_api_base": graph.base,
    }


class FakeGcs(_Fake):
    """Cloud Storage's JSON API, as google-cloud-storage speaks it: multipart uploads
    (POST /upload/storage/v1/b/{bucket}/o?uploadType=multipart, a multipart/related body of
    the object's JSON metadata and its bytes) and media downloads
    (GET /download/storage/v1/b/{bucket}/o/{object}?alt=media, with x-goog-hash)."""

    def __init__(self) -> None:
        super().__init__()
        self.objects: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.app.router.add_post("/upload/storage/v1/b/{bucket}/o", self._upload)
        self.app.router.add_get("/download/storage/v1/b/{bucket}/o/{name:.+}", self._download)
        self.app.router.add_get("/storage/v1/b/{bucket}/o/{name:.+}", self._metadata)

    @classmethod
    async def serve(cls, aiohttp_server: Any) -> FakeGcs:
        fake = cls()
        fake.server = await aiohttp_server(fake.app)
        return fake

    @property
    def endpoint(self) -> str:
        return self.url("/").rstrip("/")

    def _resource(self, bucket: str, name: str) -> dict[str, Any]:
        import base64
        import hashlib

        data, content_type = self.objects[(bucket, name)]
        return {
            "kind": "storage#object",
            "id": f"{bucket}/{name}/1",
            "name": name,
            "bucket": bucket,
            "generation": "1",
            "metageneration": "1",
            "contentType": content_type,
            "size": str(len(data)),
            "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
            "crc32c": _crc32c(data),
        }

    async def _upload(self, request: web.Request) -> web.Response:
        bucket = request.match_info["bucket"]
        await self._record(request, {"query": dict(request.query)})
        if request.query.get("uploadType") != "multipart":
            return web.json_response(
                {"error": {"code": 400, "message": "only multipart"}}, status=400
            )
        reader = await request.multipart()
        meta_part = await reader.next()
        metadata = await meta_part.json()  # type: ignore[union-attr]
        data_part = await reader.next()
        data = await data_part.read(decode=False)  # type: ignore[union-attr]
        name = metadata.get("name") or request.query.get("name")
        content_type = data_part.headers.get("Content-Type", "application/octet-stream")  # type: ignore[union-attr]
        self.objects[(bucket, name)] = (bytes(data), content_type)
        return web.json_response(self._resource(bucket, name))

    async def _metadata(self, request: web.Request) -> web.Response:
        key = (request.match_info["bucket"], request.match_info["name"])
        if key not in self.objects:
            return web.json_response(
                {"error": {"code": 404, "message": "No such object"}}, status=404
            )
        return web.json_response(self._resource(*key))

    async def _download(self, request: web.Request) -> web.Response:
        await self._record(request, {"query": dict(request.query)})
        key = (request.match_info["bucket"], request.match_info["name"])
        if key not in self.objects:
            return web.json_response(
                {"error": {"code": 404, "message": "No such object"}}, status=404
            )
        resource = self._resource(*key)
        data, content_type = self.objects[key]
        return web.Response(
            body=data,
            content_type=content_type.split(";")[0],
            headers={
                "x-goog-hash": f"crc32c={resource['crc32c']},md5={resource['md5Hash']}",
                "x-goog-generation": "1",
                "x-goog-stored-content-length": str(len(data)),
            },
        )


def _crc32c(data: bytes) -> str:
    import base64
    import struct

    import google_crc32c

    return base64.b64encode(struct.pack(">I", google_crc32c.value(data))).decode()
