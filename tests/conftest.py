"""Shared fixtures: the real app from its factory, served over HTTP on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server import keys
from server.app import create_app
from server.config import Settings

TOKEN = "test-token"
APP_SECRET = "test-app-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Settings for a test app on a fresh SQLite file; the AI is off unless a test turns it on."""
    return Settings(
        db=str(tmp_path / "test.db"),
        api_token=TOKEN,
        secret_key="test-secret-key",
        whatsapp_app_secret=APP_SECRET,
        whatsapp_verify_token="test-verify-token",
        ai_provider="off",
        instance_id="t1",
    ).validated()


MakeClient = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_client(aiohttp_client, settings) -> MakeClient:
    """Start an app from the factory (settings may be overridden) and wait until it is warm."""

    async def make(settings_: Settings | None = None, **overrides: Any) -> TestClient:
        s = replace(settings_ or settings, **overrides).validated()
        app = create_app(s)
        client = await aiohttp_client(app, headers=AUTH)
        await asyncio.wait_for(app[keys.WARMER].loaded.wait(), 10)
        return client

    return make


@pytest.fixture
async def client(make_client) -> TestClient:
    """The app on the embedded store with no data."""
    return await make_client()


@pytest.fixture(params=["sqlite"])
async def store(request, tmp_path):
    """A started, empty store of each kind; the contract suite runs on every one."""
    from server.store.sqlite import SqliteStore

    s = SqliteStore(str(tmp_path / "contract.db"))
    await s.start()
    yield s
    await s.close()
