"""Settings and logging: read once, typed, loud about bad values."""

from __future__ import annotations

import json
import re

import pytest
import structlog

from server.config import ConfigError, Settings
from server.logging import configure_logging


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


def test_json_logs_carry_event_level_timestamp_and_fields(capsys):
    configure_logging("json", "info")
    try:
        structlog.contextvars.bind_contextvars(request_id="r-1")
        structlog.get_logger("t").info("unified_chats.served", chats=3, duration_ms=0.2)
        structlog.get_logger("t").debug("hidden")
    finally:
        structlog.contextvars.clear_contextvars()
        # Back to structlog's defaults: the configured logger holds this test's captured stdout.
        structlog.reset_defaults()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["event"] == "unified_chats.served" and line["level"] == "info"
    assert line["timestamp"].endswith("Z") and line["request_id"] == "r-1"
    assert line["chats"] == 3
