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

    async def _record(self, request: web.Request) -> Recorded:
        recorded = Recorded(request.path, dict(request.headers), await request.json())
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


class FakeGraph(_Fake):
    """WhatsApp Cloud API: POST /v21.0/{phone_number_id}/messages."""

    def __init__(self) -> None:
        super().__init__()
        self.token = "t"
        # Seconds every send waits before it is answered (a slow Graph API).
        self.delay_s = 0.0
        self._script: deque[tuple[int, dict[str, Any]]] = deque()
        self._ids = itertools.count(1)
        self.app.router.add_post("/v21.0/{phone_number_id}/messages", self._messages)

    @classmethod
    async def serve(cls, aiohttp_server: Any) -> FakeGraph:
        fake = cls()
        fake.server = await aiohttp_server(fake.app)
        return fake

    @property
    def base(self) -> str:
        """What WHATSAPP_API_BASE should be."""
        return self.url("/v21.0")

    def fail(self, code: int, *, http_status: int = 400, times: int = 1) -> None:
        """Answer the next `times` sends with a Graph API error of this code."""
        body = {
            "error": {
                "message": f"(#{code}) Message failed to send",
                "type": "OAuthException",
                "code": code,
                "error_data": {"messaging_product": "whatsapp", "details": "fake failure"},
                "fbtrace_id": "AbCdEfGh123",
            }
        }
        for _ in range(times):
            self._script.append((http_status, body))

    def fail_raw(self, http_status: int, *, times: int = 1) -> None:
        """Answer with a bare HTTP error and no Graph error body (a proxy in the way)."""
        for _ in range(times):
            self._script.append((http_status, {}))

    async def _messages(self, request: web.Request) -> web.Response:
        recorded = await self._record(request)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(
                {"error": {"message": "Invalid OAuth access token.", "code": 190}}, status=401
            )
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
