"""Command line: serve the Live Chat server (default), simulate WhatsApp traffic, or manage
the agents who sign in."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from server.accounts import InvalidAccount, check_email, new_agent, new_password_hash, new_token
from server.config import VARIABLES, ConfigError, Settings
from server.demo import DEMO_ADMIN_EMAIL
from server.logging import configure_logging
from server.serve import serve as run_server
from server.store import make_agent_store
from server.store.agents import AgentExists, AgentStore
from server.store.base import NotFound, StoreError

DEMO_DB = "livechat-demo.db"
# The demo's webhook secret, so `run.py simulate` can sign requests out of the box.
DEMO_APP_SECRET = "demo-app-secret"


def serve_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of the server, one per setting that has one; each overrides its variable."""
    for variable in VARIABLES:
        if variable.flag is None:
            continue
        help_text = variable.help.replace("%", "%%")  # argparse %-formats help
        if variable.switch:
            parser.add_argument(
                variable.flag, dest=variable.key, action="store_true", default=None, help=help_text
            )
        else:
            parser.add_argument(
                variable.flag,
                dest=variable.key,
                type=variable.convert,
                choices=variable.choices,
                metavar=None if variable.choices else variable.flag[2:].upper().replace("-", "_"),
                help=help_text,
            )


def serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM or SIGINT; 0 once it has stopped gracefully."""
    overrides = {v.key: getattr(args, v.key) for v in VARIABLES if v.flag is not None}
    try:
        settings = Settings.from_env(**overrides)
        fresh_demo_db = settings.demo and args.db is None and "LIVECHAT_DB" not in os.environ
        if fresh_demo_db:
            # The demo starts from the same data every time.
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(DEMO_DB + suffix):
                    os.remove(DEMO_DB + suffix)
            settings = settings.with_overrides(db=DEMO_DB)
        if settings.demo and not settings.whatsapp_app_secret:
            settings = settings.with_overrides(
                whatsapp_app_secret=DEMO_APP_SECRET, whatsapp_verify_token="demo-verify-token"
            )
        if settings.demo:
            settings = settings.with_overrides(demo_password=secrets.token_urlsafe(12))
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    configure_logging(
        settings.log_format,
        settings.log_level,
        secret_values=(
            settings.secret_key,
            settings.whatsapp_app_secret or "",
            settings.whatsapp_verify_token or "",
            settings.whatsapp_token or "",
            settings.ai_api_key or "",
            settings.api_token or "",
            # A generated password is printed for the developer below, never logged.
            settings.demo_password or "",
        ),
        redact_key=settings.secret_key.encode(),
    )
    # Under LOG_FORMAT=json stdout carries log lines only; the greeting goes to stderr.
    out = sys.stderr if settings.log_format == "json" else sys.stdout
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}/"

    def greet() -> None:
        print(f"Live Chat on {url}", file=out, flush=True)
        if not settings.demo:
            return
        print(f"  sign in as {DEMO_ADMIN_EMAIL} (an admin)", file=out, flush=True)
        # A generated secret goes to a person at a terminal, never into a log file.
        if out.isatty():
            print(f"  password: {settings.demo_password}", file=out, flush=True)
        else:
            print(
                "  the password is shown only on a terminal; set one with"
                f" `python run.py agents set-password {DEMO_ADMIN_EMAIL} --db {settings.db}`",
                file=out,
                flush=True,
            )

    try:
        asyncio.run(run_server(settings, listening=greet))
    except OSError as e:
        print(f"cannot serve on {settings.host}:{settings.port}: {e}", file=sys.stderr)
        return 1
    return 0


def simulate(argv: Sequence[str]) -> int:
    """`run.py simulate`: signed WhatsApp webhooks to a running server; 0 when all got 200."""
    from server.simulate import WEBHOOK_PATH, is_loopback, parse_args, report
    from server.simulate import simulate as run_simulation

    args = parse_args(argv)
    if not args.allow_remote and not is_loopback(args.url):
        print(
            f"refusing to send to {args.url}: not a loopback address (use --allow-remote)",
            file=sys.stderr,
        )
        return 2
    print(f"simulating WhatsApp webhooks to {args.url.rstrip('/')}{WEBHOOK_PATH}", flush=True)
    try:
        summary = asyncio.run(run_simulation(args))
    except KeyboardInterrupt:
        return 130
    print(report(summary), flush=True)
    if summary.answers.get("401"):
        print("401: the server uses another app secret (--secret)", file=sys.stderr)
    return 0 if summary.ok else 1


def agents_parser() -> argparse.ArgumentParser:
    """`run.py agents ...`: the team's accounts, in the store the settings name."""
    parser = argparse.ArgumentParser(
        prog="run.py agents", description="Manage the agents who sign in to the dashboard."
    )
    parser.add_argument("--db", help="SQLite file of the embedded store (LIVECHAT_DB)")
    parser.add_argument("--store", choices=("sqlite", "firestore"), help="LIVECHAT_STORE")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add an agent (the password is read from stdin)")
    add.add_argument("email")
    add.add_argument("--name", required=True)
    add.add_argument("--role", choices=("admin", "agent"), default="agent")
    commands.add_parser("list", help="list every agent")
    for name, what in (("disable", "end their sign-ins at once"), ("enable", "allow again")):
        command = commands.add_parser(name, help=f"{name} an agent: {what}")
        command.add_argument("email")
    password = commands.add_parser(
        "set-password", help="set a new password (read from stdin); ends their sign-ins"
    )
    password.add_argument("email")
    token = commands.add_parser("token", help="create a personal API token (printed once)")
    token.add_argument("email")
    token.add_argument("--label", default="token", help="what the token is for")
    tokens = commands.add_parser("tokens", help="list an agent's personal API tokens")
    tokens.add_argument("email")
    revoke = commands.add_parser("revoke-token", help="revoke a personal API token by its id")
    revoke.add_argument("token_id")
    return parser


def read_password() -> str:
    """A new password: asked twice on a terminal, else the first line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != first:
            raise InvalidAccount("the two passwords differ", "password_mismatch")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def agents(argv: Sequence[str]) -> int:
    """Run one `agents` command; 0 on success, 1 when refused, 2 on a usage error."""
    args = agents_parser().parse_args(argv)
    try:
        # The command listens on nothing: the host setting is not its concern.
        settings = Settings.from_env(db=args.db, store=args.store, allow_remote=True)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    command: Callable[[AgentStore, argparse.Namespace], Awaitable[int]] = AGENT_COMMANDS[
        args.command
    ]

    async def run() -> int:
        store = make_agent_store(settings)
        await store.start()
        try:
            return await command(store, args)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except InvalidAccount as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    except (AgentExists, NotFound) as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    except StoreError as e:
        print(f"the store failed: {e}", file=sys.stderr)
        return 1


async def _agent(store: AgentStore, email: str) -> Any:
    agent = await store.agent_by_email(check_email(email))
    if agent is None:
        raise NotFound(f"no agent has the email {email}")
    return agent


async def _add(store: AgentStore, args: argparse.Namespace) -> int:
    agent = new_agent(args.email, args.name, args.role, read_password())
    await store.add_agent(agent)
    print(f"added {agent.email} ({agent.role}), id {agent.id}")
    return 0


async def _list(store: AgentStore, args: argparse.Namespace) -> int:
    for agent in await store.list_agents():
        state = "disabled" if agent.disabled else "active"
        print(f"{agent.email}\t{agent.name}\t{agent.role}\t{state}\t{agent.id}")
    return 0


async def _disable(store: AgentStore, args: argparse.Namespace) -> int:
    agent = await _agent(store, args.email)
    await store.update_agent(agent.id, disabled=True)
    print(f"disabled {agent.email}: their sign-ins and tokens stopped")
    return 0


async def _enable(store: AgentStore, args: argparse.Namespace) -> int:
    agent = await _agent(store, args.email)
    await store.update_agent(agent.id, disabled=False)
    print(f"enabled {agent.email}")
    return 0


async def _set_password(store: AgentStore, args: argparse.Namespace) -> int:
    agent = await _agent(store, args.email)
    await store.update_agent(agent.id, password_hash=new_password_hash(read_password()))
    print(f"new password for {agent.email}; their sign-ins ended")
    return 0


async def _token(store: AgentStore, args: argparse.Namespace) -> int:
    agent = await _agent(store, args.email)
    raw, record = new_token(agent, args.label)
    await store.add_token(record)
    # The token itself goes to stdout alone, so a script can capture it; it is shown once.
    print(
        f"token {record.id} for {agent.email} (send as 'Authorization: Bearer ...'):",
        file=sys.stderr,
    )
    print(raw)
    return 0


async def _tokens(store: AgentStore, args: argparse.Namespace) -> int:
    agent = await _agent(store, args.email)
    for token in await store.list_tokens(agent.id):
        state = "revoked" if token.revoked else "active"
        print(f"{token.id}\t{token.label}\t{state}")
    return 0


async def _revoke(store: AgentStore, args: argparse.Namespace) -> int:
    token = await store.revoke_token(args.token_id)
    print(f"revoked {token.id}")
    return 0


AGENT_COMMANDS: dict[str, Callable[[AgentStore, argparse.Namespace], Awaitable[int]]] = {
    "add": _add,
    "list": _list,
    "disable": _disable,
    "enable": _enable,
    "set-password": _set_password,
    "token": _token,
    "tokens": _tokens,
    "revoke-token": _revoke,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":
        return simulate(argv[1:])
    if argv and argv[0] == "agents":
        return agents(argv[1:])
    if argv and argv[0] == "serve":
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        description="Live Chat server. Commands: serve (the default), simulate "
        "(signed WhatsApp webhooks to a running server; see `simulate --help`), agents "
        "(the accounts agents sign in with; see `agents --help`).",
    )
    serve_parser(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
