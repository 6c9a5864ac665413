"""Shared fixtures: the real app from its factory, served over HTTP on loopback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestClient

from server import keys
from server.app import create_app
from server.config import Settings

pytest_plugins = ["tests.firestore_emulator"]

TOKEN = "test-token"
APP_SECRET = "test-app-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# Run a test on both stores: @pytest.mark.parametrize("store_kind", STORE_KINDS, indirect=True)
STORE_KINDS = ["sqlite", pytest.param("firestore", marks=pytest.mark.firestore)]


# The realtime behaviour (webhook, SSE, replies, AI) must hold on both stores: the tests of
# these modules that run an app run on each, unless they choose their store themselves.
BOTH_STORES = frozenset(
    {
        "test_webhook",
        "test_events",
        "test_agent_reply",
        "test_ai_replies",
        "test_media",
        "test_replies",
    }
)


def pytest_generate_tests(metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    if module not in BOTH_STORES or "store_kind" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):
        if "store_kind" in marker.args[0]:
            return
    metafunc.parametrize("store_kind", STORE_KINDS, indirect=True)


@pytest.fixture
def store_kind(request) -> str:
    """The store the test app runs on: SQLite unless a test is parametrized with STORE_KINDS."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def settings(request, tmp_path, store_kind) -> Settings:
    """Settings for a test app on a fresh store; the AI is off unless a test turns it on.

    SQLite: a fresh file. Firestore: the session's emulator and a project of the test's own.
    """
    s = Settings(
        db=str(tmp_path / "test.db"),
        media_dir=str(tmp_path / "media"),
        api_token=TOKEN,
        secret_key="test-secret-key",
        whatsapp_app_secret=APP_SECRET,
        whatsapp_verify_token="test-verify-token",
        ai_provider="off",
        instance_id="t1",
    )
    if store_kind == "firestore":
        s = replace(
            s,
            store="firestore",
            google_cloud_project=request.getfixturevalue("firestore_project"),
            firestore_emulator_host=request.getfixturevalue("firestore_emulator").host,
        )
    return s.validated()


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


@pytest.fixture(params=STORE_KINDS)
async def store(request, tmp_path):
    """A started, empty store of each kind; the contract suite runs on every one.

    Firestore's comes listening: its own commits are on the feed when a write returns, as
    with SQLite; the listener brings other instances' writes.
    """
    if request.param == "firestore":
        from tests.firestore_emulator import open_firestore_store

        project = request.getfixturevalue("firestore_project")
        emulator = request.getfixturevalue("firestore_emulator")
        async with open_firestore_store(emulator, project) as s:
            yield s
        return
    from server.store.sqlite import SqliteStore

    s = SqliteStore(str(tmp_path / "contract.db"))
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def graph(aiohttp_server):
    """A fake WhatsApp Cloud (Graph) API on loopback."""
    from tests.fakes import FakeGraph

    return await FakeGraph.serve(aiohttp_server)


@pytest.fixture
async def llm(aiohttp_server):
    """A fake OpenAI-compatible chat-completions server on loopback."""
    from tests.fakes import FakeLLM

    return await FakeLLM.serve(aiohttp_server)


@pytest.fixture
def logging_restored():
    """For a test that configures logging: structlog's defaults and the root logger's
    handlers and level come back afterwards (a configured logger holds the test's stdout)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
async def sign_in():
    """Sign in over HTTP as a dashboard would: `await sign_in(client, email)` -> a Browser
    holding the session cookie (closed after the test)."""
    from tests.accounts import PASSWORD, Browser, base_url

    opened = []

    async def sign_in_(target, email: str, password: str = PASSWORD, **kw: Any):
        base = target if isinstance(target, str) else base_url(target)
        browser = await Browser.signed_in(base, email, password, **kw)
        opened.append(browser)
        return browser

    yield sign_in_
    for browser in opened:
        await browser.close()
