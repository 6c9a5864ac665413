"""Settings and logging: read once, typed, loud about bad values."""

from __future__ import annotations

import json

import pytest
import structlog

from server.config import ConfigError, Settings
from server.logging import configure_logging


def test_settings_come_from_the_environment_with_flags_on_top():
    env = {"PORT": "9001", "LIVECHAT_STORE": "sqlite", "AI_PROVIDER": "off", "HOST": "0.0.0.0"}
    s = Settings.from_env(env, port=9002, db="x.db")
    assert (s.port, s.host, s.db, s.ai_provider) == (9002, "0.0.0.0", "x.db", "off")


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


def test_production_starts_only_with_its_secrets():
    env = {
        "LIVECHAT_ENV": "production",
        "LIVECHAT_SECRET_KEY": "k" * 32,
        "LIVECHAT_API_TOKEN": "t",
        "WHATSAPP_APP_SECRET": "s",
        "WHATSAPP_VERIFY_TOKEN": "v",
    }
    assert Settings.from_env(env).env == "production"
    with pytest.raises(ConfigError, match="production needs LIVECHAT_API_TOKEN"):
        Settings.from_env({k: v for k, v in env.items() if k != "LIVECHAT_API_TOKEN"})


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
