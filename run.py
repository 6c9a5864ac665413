"""Command line: serve the Live Chat server (default), or simulate WhatsApp traffic."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from collections.abc import Sequence

from server.config import VARIABLES, ConfigError, Settings
from server.logging import configure_logging
from server.serve import serve as run_server

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
        generated = settings.api_token is None
        if generated:
            settings = settings.with_overrides(api_token=secrets.token_urlsafe(18))
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
            # A generated token is printed for the developer below, never logged.
            settings.api_token or "",
        ),
    )
    # Under LOG_FORMAT=json stdout carries log lines only; the greeting goes to stderr.
    out = sys.stderr if settings.log_format == "json" else sys.stdout
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}/"

    def greet() -> None:
        print(f"Live Chat on {url}", file=out, flush=True)
        if generated:
            print(f"  sign in with the API token: {settings.api_token}", file=out, flush=True)
            print(f"  or open {url}#token={settings.api_token}", file=out, flush=True)

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


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "simulate":
        return simulate(argv[1:])
    if argv and argv[0] == "serve":
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        description="Live Chat server. Commands: serve (the default), simulate "
        "(signed WhatsApp webhooks to a running server; see `simulate --help`).",
    )
    serve_parser(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
