"""Helpers for tests that sign in: agents added through the app, and a cookie-holding client."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from server import keys
from server.store.agents import Agent

PASSWORD = "correct horse battery"


async def add_agent(
    app: web.Application,
    email: str = "agent@example.com",
    *,
    role: str = "agent",
    name: str | None = None,
    password: str = PASSWORD,
) -> Agent:
    """An agent added through the app's accounts (as the admin API does)."""
    return await app[keys.ACCOUNTS].add_agent(
        email, name or email.split("@")[0].title(), role, password
    )


class Browser:
    """An HTTP client that signs in and then sends its session cookie, as the dashboard does.

    Writes carry the server's own Origin, as a page of the dashboard would; `origin=None`
    sends none.
    """

    def __init__(self, base: str, origin: str | None = "") -> None:
        self.base = base.rstrip("/")
        headers = {}
        if origin is not None:
            headers["Origin"] = origin or self.base
        # unsafe=True: aiohttp's jar ignores cookies of IP hosts; browsers keep them.
        self.http = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), headers=headers
        )

    @classmethod
    async def signed_in(cls, base: str, email: str, password: str = PASSWORD, **kw: Any) -> Browser:
        browser = cls(base, **kw)
        resp = await browser.post("/api/auth/login", json={"email": email, "password": password})
        assert resp.status == 200, await resp.text()
        return browser

    def url(self, path: str) -> str:
        return self.base + path

    async def get(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        return await self.http.get(self.url(path), **kw)

    async def post(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        return await self.http.post(self.url(path), **kw)

    async def patch(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        return await self.http.patch(self.url(path), **kw)

    @property
    def cookie(self) -> str | None:
        for cookie in self.http.cookie_jar:
            if cookie.key == "livechat_session":
                return cookie.value
        return None

    async def close(self) -> None:
        await self.http.close()


def base_url(client) -> str:
    """The base URL of an aiohttp TestClient."""
    return str(client.make_url("/")).rstrip("/")
