"""The AgentStore contract, on SQLite and on the Firestore emulator alike."""

from __future__ import annotations

import asyncio

import pytest

from server.accounts import new_agent, new_token
from server.models import now_ms
from server.store.agents import AgentExists, NoSuchAgent, SessionRecord
from server.store.base import NotFound
from tests.conftest import STORE_KINDS

PASSWORD = "a long enough password"


@pytest.fixture(params=STORE_KINDS)
async def agents(request, tmp_path):
    """A started, empty agent store of each kind."""
    if request.param == "firestore":
        from server.store.agents_firestore import FirestoreAgents
        from tests.firestore_emulator import firestore_settings

        emulator = request.getfixturevalue("firestore_emulator")
        project = request.getfixturevalue("firestore_project")
        store = FirestoreAgents(firestore_settings(emulator, project))
    else:
        from server.store.agents_sqlite import SqliteAgents

        store = SqliteAgents(str(tmp_path / "agents.db"))
    await store.start()
    yield store
    await store.close()


@pytest.fixture(scope="module")
def team():
    """Agents with hashed passwords, made once (each hash takes a tenth of a second)."""
    return [
        new_agent("reem@example.com", "Reem", "agent", PASSWORD),
        new_agent("admin@example.com", "Admin", "admin", PASSWORD),
    ]


async def test_agents_are_added_once_per_email_and_found_by_id_and_email(agents, team):
    reem, admin = team
    assert await agents.list_agents() == []
    version = await agents.auth_version()
    await agents.add_agent(reem)
    await agents.add_agent(admin)
    assert await agents.auth_version() > version  # every instance reloads its agents
    with pytest.raises(AgentExists):
        await agents.add_agent(reem.with_changes(id="a_other"))
    assert {a.id for a in await agents.list_agents()} == {reem.id, admin.id}
    assert await agents.get_agent(reem.id) == reem
    assert await agents.agent_by_email("reem@example.com") == reem
    assert await agents.agent_by_email("nobody@example.com") is None
    assert await agents.get_agent("a_missing") is None


async def test_disabling_or_a_new_password_ends_sessions_and_moves_the_version(agents, team):
    reem, admin = team
    await agents.add_agent(reem)
    await agents.add_agent(admin)
    now = now_ms()
    for i, agent in enumerate((reem, reem, admin)):
        await agents.add_session(SessionRecord(f"h{i}", agent.id, now, now + 60_000))
    assert (await agents.get_session("h0")).agent_id == reem.id
    version = await agents.auth_version()
    renamed = await agents.update_agent(reem.id, name="Reem S.")
    assert renamed.name == "Reem S." and await agents.auth_version() > version
    assert await agents.get_session("h0") is not None  # a new name ends nothing
    version = await agents.auth_version()
    disabled = await agents.update_agent(reem.id, disabled=True)
    assert disabled.disabled is True
    assert await agents.auth_version() > version
    assert await agents.get_session("h0") is None and await agents.get_session("h1") is None
    assert await agents.get_session("h2") is not None  # the admin's stays
    await agents.update_agent(admin.id, password_hash="new-hash")
    assert await agents.get_session("h2") is None
    assert (await agents.get_agent(admin.id)).password_hash == "new-hash"
    with pytest.raises(NoSuchAgent):
        await agents.update_agent("a_missing", disabled=True)


async def test_sign_out_deletes_the_session_and_moves_the_version(agents, team):
    reem, _ = team
    await agents.add_agent(reem)
    now = now_ms()
    await agents.add_session(SessionRecord("gone", reem.id, now, now + 60_000))
    version = await agents.auth_version()
    await agents.delete_session("gone")
    assert await agents.get_session("gone") is None
    assert await agents.auth_version() > version


async def test_tokens_are_kept_by_hash_listed_and_revoked(agents, team):
    reem, _ = team
    await agents.add_agent(reem)
    raw, record = new_token(reem, "export")
    await agents.add_token(record)
    assert raw not in str(await agents.list_tokens(reem.id))
    assert await agents.get_token(record.token_hash) == record
    version = await agents.auth_version()
    revoked = await agents.revoke_token(record.id)
    assert revoked.revoked is True
    assert (await agents.get_token(record.token_hash)).revoked is True
    assert await agents.auth_version() > version
    assert [t.id for t in await agents.list_tokens(reem.id)] == [record.id]
    with pytest.raises(NotFound):
        await agents.revoke_token("t_missing")


async def test_two_instances_adding_one_email_at_once_make_one_agent(agents, team):
    reem, _ = team
    results = await asyncio.gather(
        agents.add_agent(reem),
        agents.add_agent(reem.with_changes(id="a_twin")),
        return_exceptions=True,
    )
    assert sum(isinstance(r, AgentExists) for r in results) == 1
    assert len(await agents.list_agents()) == 1


async def test_the_demo_team_takes_the_password_of_each_start(agents):
    from server.demo import DEMO_ADMIN_EMAIL, DEMO_AGENTS, seed_demo_agents
    from server.passwords import verify_password

    assert await seed_demo_agents(agents, "first demo password") == len(DEMO_AGENTS)
    # Started again on the same store: the newly printed password is the one that works.
    assert await seed_demo_agents(agents, "second demo password") == len(DEMO_AGENTS)
    admin = await agents.agent_by_email(DEMO_ADMIN_EMAIL)
    assert admin.role == "admin"
    assert verify_password(admin.password_hash, "second demo password")
    assert not verify_password(admin.password_hash, "first demo password")
    assert len(await agents.list_agents()) == len(DEMO_AGENTS)
