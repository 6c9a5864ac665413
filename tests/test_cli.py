"""`python run.py agents ...`: the team's accounts from the command line, as an operator runs it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from server import keys
from tests.accounts import PASSWORD, base_url
from tests.conftest import STORE_KINDS

ROOT = Path(__file__).resolve().parent.parent


def cli_env(settings) -> dict[str, str]:
    """The environment of an operator's shell pointed at the test's store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVECHAT_", "WHATSAPP_"))}
    env.pop("FIRESTORE_EMULATOR_HOST", None)
    if settings.store == "firestore":
        env |= {
            "LIVECHAT_STORE": "firestore",
            "FIRESTORE_EMULATOR_HOST": settings.firestore_emulator_host,
            "GOOGLE_CLOUD_PROJECT": settings.google_cloud_project,
        }
    else:
        env["LIVECHAT_DB"] = settings.db
    return env


async def agents_cli(settings, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """Run `run.py agents ARGS` in its own process, from the repository root."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "run.py", "agents", *args],
        cwd=ROOT,
        env=cli_env(settings),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_add_list_token_set_password_and_disable_from_the_command_line(make_client, settings):
    client = await make_client()
    added = await agents_cli(
        settings,
        "add",
        "Reem@Example.com",
        "--name",
        "Reem Saleh",
        "--role",
        "admin",
        stdin=PASSWORD + "\n",
    )
    assert added.returncode == 0, added.stderr
    assert "added reem@example.com (admin)" in added.stdout
    assert PASSWORD not in added.stdout + added.stderr
    twice = await agents_cli(settings, "add", "reem@example.com", "--name", "R", stdin=PASSWORD)
    assert twice.returncode == 1 and "exists" in twice.stderr
    weak = await agents_cli(settings, "add", "new@example.com", "--name", "N", stdin="short\n")
    assert weak.returncode == 2 and "at least 10 characters" in weak.stderr

    listed = await agents_cli(settings, "list")
    [line] = listed.stdout.splitlines()
    email, name, role, state, agent_id = line.split("\t")
    assert (email, name, role, state) == ("reem@example.com", "Reem Saleh", "admin", "active")

    # The server sees the new agent: she signs in with the password given on stdin.
    async with aiohttp.ClientSession() as browser:
        login = await browser.post(
            base_url(client) + "/api/auth/login",
            json={"email": "reem@example.com", "password": PASSWORD},
        )
        assert login.status == 200

    token = await agents_cli(settings, "token", "reem@example.com", "--label", "export")
    assert token.returncode == 0, token.stderr
    raw = token.stdout.strip()
    assert raw.startswith("lcp_") and "\n" not in raw
    headers = {"Authorization": f"Bearer {raw}"}
    async with aiohttp.ClientSession(headers=headers) as script:
        me = await (await script.get(base_url(client) + "/api/auth/me")).json()
        assert me["agent"]["id"] == agent_id and me["kind"] == "token"
        tokens = await agents_cli(settings, "tokens", "reem@example.com")
        token_id, label, state = tokens.stdout.strip().split("\t")
        assert (label, state) == ("export", "active")
        revoked = await agents_cli(settings, "revoke-token", token_id)
        assert revoked.returncode == 0
        deadline = time.monotonic() + 2
        while (await script.get(base_url(client) + "/api/auth/me")).status != 401:
            assert time.monotonic() < deadline, "a revoked token still works"
            await asyncio.sleep(0.05)

    new_password = "another long password"
    changed = await agents_cli(
        settings, "set-password", "reem@example.com", stdin=new_password + "\n"
    )
    assert changed.returncode == 0, changed.stderr
    async with aiohttp.ClientSession() as browser:
        url = base_url(client) + "/api/auth/login"
        old = await browser.post(url, json={"email": "reem@example.com", "password": PASSWORD})
        assert old.status == 401
        new = await browser.post(url, json={"email": "reem@example.com", "password": new_password})
        assert new.status == 200
    missing = await agents_cli(settings, "disable", "nobody@example.com")
    assert missing.returncode == 1 and "no agent" in missing.stderr


@pytest.mark.parametrize("store_kind", STORE_KINDS, indirect=True)
async def test_disabling_from_the_command_line_ends_the_open_stream_within_2s(
    make_client, settings, sign_in, store_kind
):
    client = await make_client()
    await client.app[keys.ACCOUNTS].add_agent("leaver@example.com", "Leaver", "agent", PASSWORD)
    browser = await sign_in(client, "leaver@example.com")
    stream = await browser.get("/api/live-chat/events")
    assert stream.status == 200
    async with asyncio.timeout(5):
        assert (await stream.content.readuntil(b"\n\n")).startswith(b"retry:")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "run.py", "agents", "disable", "leaver@example.com",
        cwd=ROOT, env=cli_env(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await process.communicate()
    assert process.returncode == 0, err
    disabled_at = time.monotonic()  # the write has committed in the other process
    async with asyncio.timeout(2):
        while await stream.content.readany():
            pass
    assert time.monotonic() - disabled_at < 2
    assert (await browser.get("/api/live-chat/unified-chats")).status == 401
