"""Command line: serve the Live Chat server (default), or simulate WhatsApp traffic."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Sequence

from aiohttp import web

from server.app import create_app
from server.config import ConfigError, Settings
from server.logging import configure_logging

DEMO_DB = "livechat-demo.db"
# The demo's webhook secret, so `run.py simulate` can sign requests out of the box.
DEMO_APP_SECRET = "demo-app-secret"


def serve_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of the server; each overrides its environment variable."""
    parser.add_argument("--host", help="interface to listen on (HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (PORT)")
    parser.add_argument("--db", help="SQLite file of the embedded store (LIVECHAT_DB)")
    parser.add_argument("--store", choices=("sqlite", "firestore"), help="LIVECHAT_STORE")
    parser.add_argument("--demo", action="store_true", help="seed demo data and serve it")
    parser.add_argument(
        "--demo-conversations", type=int, metavar="N", help="how many demo conversations (300)"
    )
    parser.add_argument("--log-format", choices=("console", "json"), help="LOG_FORMAT")


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted."""
    overrides = {
        "host": args.host,
        "port": args.port,
        "db": args.db,
        "store": args.store,
        "log_format": args.log_format,
        "demo_conversations": args.demo_conversations,
        "demo": True if args.demo else None,
    }
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
    configure_logging(settings.log_format, settings.log_level)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}/"
    print(f"Live Chat on {url}", flush=True)
    if generated:
        print(f"  sign in with the API token: {settings.api_token}", flush=True)
        print(f"  or open {url}#token={settings.api_token}", flush=True)
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        shutdown_timeout=5.0,
    )
    return 0


def simulate(argv: Sequence[str]) -> int:
    """`run.py simulate`: signed WhatsApp webhooks to a running server; 0 when all got 200."""
    import asyncio

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
    parser = argparse.ArgumentParser(description="Live Chat server")
    serve_parser(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
