"""Settings and logging: read once, typed, loud about bad values."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import structlog

from run import serve_parser
from server.config import VARIABLES, ConfigError, Settings
from server.logging import configure_logging

ROOT = Path(__file__).resolve().parent.parent


def test_settings_come_from_the_environment_with_flags_on_top():
    env = {"PORT": "9001", "LIVECHAT_STORE": "sqlite", "AI_PROVIDER": "off", "HOST": "::1"}
    s = Settings.from_env(env, port=9002, db="x.db")
    assert (s.port, s.host, s.db, s.ai_provider) == (9002, "::1", "x.db", "off")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "chat.example.com"])
def test_development_listens_on_loopback_unless_remote_is_allowed(host):
    with pytest.raises(ConfigError, match=f"HOST={host} is not a loopback address"):
        Settings.from_env({"HOST": host})
    assert Settings.from_env({"HOST": host, "LIVECHAT_ALLOW_REMOTE": "true"}).host == host
    assert Settings.from_env({"HOST": host}, allow_remote=True).allow_remote
    for loopback in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert Settings.from_env({"HOST": loopback}).host == loopback


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORT": "eighty"}, "PORT='eighty' is not valid"),
        ({"PORT": "70000"}, "PORT must be 0..65535"),
        ({"LIVECHAT_STORE": "postgres"}, "LIVECHAT_STORE must be one of sqlite, firestore"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT must be one of console, json"),
        ({"LIVECHAT_DEMO": "maybe"}, "LIVECHAT_DEMO='maybe' is not valid"),
        ({"LIVECHAT_ENV": "production"}, "production needs LIVECHAT_SECRET_KEY"),
    ],
)
def test_a_bad_value_stops_start_up_with_a_clear_message(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Settings.from_env(env)


PRODUCTION = {
    "LIVECHAT_ENV": "production",
    "HOST": "0.0.0.0",
    "LIVECHAT_SECRET_KEY": "k" * 32,
    "WHATSAPP_APP_SECRET": "s" * 32,
    "WHATSAPP_VERIFY_TOKEN": "v" * 32,
}


def test_production_starts_with_long_secrets_and_no_machine_token():
    s = Settings.from_env(PRODUCTION)
    assert (s.env, s.host, s.api_token) == ("production", "0.0.0.0", None)
    assert Settings.from_env(PRODUCTION | {"LIVECHAT_API_TOKEN": "t" * 32}).api_token == "t" * 32


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"LIVECHAT_SECRET_KEY": None}, "production needs LIVECHAT_SECRET_KEY"),
        ({"WHATSAPP_APP_SECRET": None}, "production needs WHATSAPP_APP_SECRET"),
        ({"WHATSAPP_VERIFY_TOKEN": None}, "production needs WHATSAPP_VERIFY_TOKEN"),
        ({"LIVECHAT_SECRET_KEY": "k"}, "LIVECHAT_SECRET_KEY must be at least 32 characters"),
        ({"LIVECHAT_SECRET_KEY": "k" * 31}, "LIVECHAT_SECRET_KEY must be at least 32 characters"),
        ({"WHATSAPP_APP_SECRET": "short"}, "WHATSAPP_APP_SECRET must be at least 32 characters"),
        ({"WHATSAPP_VERIFY_TOKEN": "v" * 8}, "WHATSAPP_VERIFY_TOKEN must be at least 32"),
        ({"LIVECHAT_API_TOKEN": "t"}, "LIVECHAT_API_TOKEN must be at least 32 characters"),
        ({"FIRESTORE_EMULATOR_HOST": "127.0.0.1:8681"}, "FIRESTORE_EMULATOR_HOST is set"),
        (
            {"WHATSAPP_API_BASE": "http://graph.facebook.com/v21.0"},
            "WHATSAPP_API_BASE must be an https:// URL in production",
        ),
        (
            {"AI_PROVIDER": "openai", "AI_BASE_URL": "http://llm.internal/v1"},
            "AI_BASE_URL must be an https:// URL in production",
        ),
        ({"LIVECHAT_DEMO": "true"}, "--demo is for development only"),
    ],
)
def test_production_refuses_each_weak_setting_naming_it(change, message):
    env = {k: v for k, v in (PRODUCTION | change).items() if v is not None}
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env(env)


def test_settings_are_frozen():
    s = Settings()
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_json_logs_carry_event_level_timestamp_and_fields(capsys, logging_restored):
    configure_logging("json", "info")
    structlog.contextvars.bind_contextvars(request_id="r-1")
    structlog.get_logger("t").info("unified_chats.served", chats=3, duration_ms=0.2)
    structlog.get_logger("t").debug("hidden")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["event"] == "unified_chats.served" and line["level"] == "info"
    assert line["timestamp"].endswith("Z") and line["request_id"] == "r-1"
    assert line["chats"] == 3


def readme_config_rows() -> list[list[str]]:
    """The rows of the README's configuration table, as cells."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0].split("|")[1:-1] == [" variable ", " flag ", " default ", " meaning "]
    return [[cell.strip() for cell in row.split("|")[1:-1]] for row in rows[2:]]


def test_the_readme_configuration_table_is_what_the_code_reads():
    rows = readme_config_rows()
    documented = {row[0].strip("`"): row for row in rows}
    assert len(documented) == len(rows), "a variable is documented twice"
    assert list(documented) == [v.name for v in VARIABLES]
    for variable in VARIABLES:
        _, flag, default, meaning = documented[variable.name]
        assert flag.strip("`") == (variable.flag or ""), variable.name
        assert default == variable.default, variable.name
        assert meaning == variable.meaning, variable.name
    # Every setting an operator can change has a row; the rest are internal on purpose.
    configurable = {v.key for v in VARIABLES}
    internal = {f.name for f in fields(Settings)} - configurable
    assert internal == {"ai_context_messages", "static_dir", "demo_password"}


def test_every_documented_variable_is_read_from_the_environment():
    env = {
        "HOST": "0.0.0.0",
        "PORT": "9100",
        "LIVECHAT_STORE": "firestore",
        "LIVECHAT_DB": "x.db",
        "LIVECHAT_API_TOKEN": "token-from-env",
        "LIVECHAT_SECRET_KEY": "key-from-env",
        "LIVECHAT_ENV": "development",  # production and --demo exclude each other
        "LIVECHAT_INSTANCE_ID": "i-7",
        "GOOGLE_CLOUD_PROJECT": "p-1",
        "FIRESTORE_EMULATOR_HOST": "127.0.0.1:1",
        "LIVECHAT_FIRESTORE_WINDOW": "77",
        "LIVECHAT_SQLITE_WINDOW": "88",
        "WHATSAPP_APP_SECRET": "s",
        "WHATSAPP_VERIFY_TOKEN": "v",
        "WHATSAPP_TOKEN": "t",
        "WHATSAPP_PHONE_NUMBER_ID": "123",
        "WHATSAPP_API_BASE": "http://127.0.0.1:2/v21.0",
        "WHATSAPP_PHONE_NUMBERS": "123,456:own-token",
        "WHATSAPP_BUSINESS_ACCOUNT_ID": "102290129340398",
        "LIVECHAT_READ_RECEIPTS": "false",
        "LIVECHAT_MEDIA_STORE": "gcs",
        "LIVECHAT_MEDIA_DIR": "/tmp/media-cache",
        "LIVECHAT_MEDIA_BUCKET": "livechat-media",
        "LIVECHAT_MEDIA_CACHE_MB": "64",
        "STORAGE_EMULATOR_HOST": "127.0.0.1:4",
        "AI_PROVIDER": "openai",
        "AI_BASE_URL": "http://127.0.0.1:3/v1",
        "AI_API_KEY": "k",
        "AI_MODEL": "m",
        "AI_TIMEOUT": "2.5",
        "AI_MAX_RETRIES": "1",
        "LIVECHAT_OUTBOX_LEASE": "5",
        "LIVECHAT_FAQ": "/tmp/faq.json",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "warning",
        "LIVECHAT_METRICS_PORT": "9101",
        "LIVECHAT_METRICS_HOST": "127.0.0.2",
        "LIVECHAT_SHUTDOWN_TIMEOUT": "4",
        "LIVECHAT_DEMO": "true",
        "LIVECHAT_DEMO_CONVERSATIONS": "12",
        "LIVECHAT_ALLOW_REMOTE": "true",  # HOST is not loopback
        "LIVECHAT_BODY_TIMEOUT": "3.5",
        "LIVECHAT_SSE_MAX": "50",
        "LIVECHAT_SSE_PER_SESSION": "3",
        "LIVECHAT_PROXY_HOPS": "1",
    }
    assert set(env) == {v.name for v in VARIABLES}
    s = Settings.from_env(env)
    defaults = Settings()
    for variable in VARIABLES:
        value = getattr(s, variable.key)
        assert value == variable.convert(env[variable.name]), variable.name
        if variable.name != "LIVECHAT_ENV":
            assert value != getattr(defaults, variable.key), variable.name


def test_help_lists_every_flag_with_its_variable_and_default():
    parser = argparse.ArgumentParser()
    serve_parser(parser)
    flags = {
        action.option_strings[0]: action for action in parser._actions if action.option_strings
    }
    flags.pop("-h")
    with_flags = [v for v in VARIABLES if v.flag]
    assert set(flags) == {v.flag for v in with_flags}
    out = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    words = " ".join(out.split())
    for variable in with_flags:
        assert flags[variable.flag].dest == variable.key
        assert variable.help in words, variable.help
        assert variable.name in variable.help
        default = variable.default.strip("`")
        assert not default or f"default {default}" in variable.help


def test_a_flag_overrides_its_variable():
    env = {"PORT": "9001", "LIVECHAT_SHUTDOWN_TIMEOUT": "4"}
    parser = argparse.ArgumentParser()
    serve_parser(parser)
    args = parser.parse_args(["--port", "9002", "--shutdown-timeout", "1.5", "--demo"])
    overrides = {v.key: getattr(args, v.key) for v in VARIABLES if v.flag}
    s = Settings.from_env(env, **overrides)
    assert (s.port, s.shutdown_timeout_s, s.demo, s.host) == (9002, 1.5, True, "127.0.0.1")


def test_several_numbers_each_with_its_token_or_the_shared_one():
    from server.config import WhatsAppNumber

    s = Settings.from_env(
        {
            "WHATSAPP_TOKEN": "shared",
            "WHATSAPP_PHONE_NUMBER_ID": "106540352242922",
            "WHATSAPP_PHONE_NUMBERS": "106540352242922, 106540352242923:own-token",
        }
    )
    assert s.numbers == (
        WhatsAppNumber("106540352242922", "shared"),
        WhatsAppNumber("106540352242923", "own-token"),
    )
    assert s.whatsapp_configured
    with pytest.raises(ConfigError, match="WHATSAPP_PHONE_NUMBERS"):
        Settings.from_env({"WHATSAPP_PHONE_NUMBERS": "not-a-number"})


def test_the_bucket_media_store_needs_its_bucket():
    with pytest.raises(ConfigError, match="LIVECHAT_MEDIA_BUCKET"):
        Settings.from_env({"LIVECHAT_MEDIA_STORE": "gcs"})
    with pytest.raises(ConfigError, match="LIVECHAT_MEDIA_STORE"):
        Settings.from_env({"LIVECHAT_MEDIA_STORE": "s3"})
    s = Settings.from_env({"LIVECHAT_MEDIA_STORE": "gcs", "LIVECHAT_MEDIA_BUCKET": "b"})
    assert s.media_bucket == "b" and s.read_receipts is True
