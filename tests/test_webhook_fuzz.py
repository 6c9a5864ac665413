"""Property: whatever a signed webhook body holds, nothing well-formed is lost and nothing
is stored twice, and the server never answers 5xx.

Hypothesis builds bodies the way WhatsApp's documentation shapes them and the way an
attacker or a buggy proxy would not: valid messages of every type, messages with hostile
strings (lone UTF-16 surrogates, controls, bidi overrides, huge texts), numbers past 64
bits and NaN, nesting where an object is expected, senders known only by a business-scoped
user id, and envelopes broken as a whole. Each body goes, signed, to a real server process
on loopback (SQLite), some twice (Meta redelivers); then the database itself is read:
every well-formed message of an accepted body is stored exactly once (an unparseable one
once, as `unsupported`), and nothing is stored from a body refused whole.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.integrations.whatsapp_webhook import sign
from tests.conftest import APP_SECRET, TOKEN

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("LIVECHAT_FUZZ_EXAMPLES", "10000"))

pytestmark = pytest.mark.slow


@dataclass
class Plan:
    """What a generated body should do to the store."""

    body: Any  # the JSON value, or raw bytes
    envelope_ok: bool
    # Placeholder ids of messages that must be stored once (as their type, or unsupported).
    stored: dict[str, str | None] = field(default_factory=dict)
    # Placeholder ids that must never be stored.
    absent: list[str] = field(default_factory=list)
    redeliver: bool = False


# -- strategies ---------------------------------------------------------------------------

hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec=None, categories=["Cs", "Cc", "Cf", "Lo", "So"]), max_size=40),
    st.sampled_from(["\ud800", "a\udfffb", "\u202eevil\u202c", "\x00\x01", "مرحبا", "😀" * 3]),
    st.just("x" * 70_000),
)
# Never a plausible Unix time in seconds (WhatsApp's epoch to tomorrow).
bad_timestamps = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(),
    st.integers(max_value=1_000_000),
    st.integers(min_value=10**12),
    st.text(max_size=12).filter(lambda t: not t.isdigit()),
    st.lists(st.integers(), max_size=2),
)
huge_numbers = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
)
junk = st.recursive(
    st.one_of(st.none(), st.booleans(), huge_numbers, hostile_text),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(hostile_text, inner, max_size=3)
    ),
    max_leaves=8,
)
big_ints = st.integers(min_value=-(2**80), max_value=2**80)
not_an_object = st.one_of(st.none(), huge_numbers, hostile_text, st.lists(junk, max_size=2))
bad_content = st.one_of(
    not_an_object,
    st.just({"body": 2**70}),
    st.just({"latitude": "north", "longitude": float("nan")}),
)
not_a_message = st.one_of(st.lists(junk, max_size=2), hostile_text, huge_numbers)
bad_ids = st.one_of(huge_numbers, st.just(""), st.lists(junk, max_size=1))
status_times = st.one_of(st.just("now"), junk)
phones = st.sampled_from(["966501234567", "201001234567", "15550001111", "447700900123"])
bsuids = st.sampled_from(["US.13491208655302741918", "SA.88112233", "GB.ENT.42"])


def _now_s() -> str:
    return str(int(time.time()))


@st.composite
def valid_message(draw: st.DrawFn, pid: str) -> tuple[dict[str, Any], str]:
    """A message as WhatsApp sends it; returns it and the type it is stored as."""
    kind = draw(
        st.sampled_from(
            [
                "text",
                "image",
                "audio",
                "document",
                "location",
                "reaction",
                "sticker",
                "interactive",
                "button",
                "system",
                "unsupported",
            ]
        )
    )
    m: dict[str, Any] = {"id": pid, "timestamp": _now_s(), "type": kind}
    if draw(st.booleans()):
        m["from"] = draw(phones)
    else:
        m["from_user_id"] = draw(bsuids)
    stored_as = kind
    if kind == "text":
        m["text"] = {"body": draw(hostile_text)}
    elif kind in ("image", "audio", "document", "sticker"):
        m[kind] = {
            "id": "1234",
            "mime_type": "image/jpeg",
            "sha256": "abc",
            "caption": draw(hostile_text),
        }
        stored_as = "image" if kind == "sticker" else kind
    elif kind == "location":
        m["location"] = {
            "latitude": draw(st.floats(-90, 90)),
            "longitude": draw(st.floats(-180, 180)),
            "name": draw(hostile_text),
        }
    elif kind == "reaction":
        m["reaction"] = {
            "message_id": "wamid.target",
            "emoji": draw(st.sampled_from(["👍", "❤️", ""])),
        }
    elif kind == "interactive":
        m["interactive"] = {
            "type": "button_reply",
            "button_reply": {"id": "b1", "title": draw(hostile_text)},
        }
    elif kind == "button":
        m["button"] = {"payload": draw(hostile_text), "text": draw(hostile_text)}
        stored_as = "interactive"
    elif kind == "system":
        m["system"] = {
            "body": draw(hostile_text),
            "type": "user_changed_number",
            "wa_id": "966509999999",
        }
    else:
        m["errors"] = [
            {
                "code": draw(big_ints),
                "title": draw(hostile_text),
            }
        ]
    if draw(st.booleans()):
        m["context"] = {"from": "15550783881", "id": draw(hostile_text)}
    return m, stored_as


@st.composite
def bad_message(draw: st.DrawFn, pid: str) -> dict[str, Any]:
    """A message that names its id and sender but whose content cannot be parsed."""
    m: dict[str, Any] = {
        "id": pid,
        "from": draw(phones),
        "type": draw(st.sampled_from(["text", "image", "location", "interactive", "reaction"])),
    }
    breakage = draw(st.sampled_from(["content", "timestamp", "both"]))
    m["timestamp"] = draw(bad_timestamps) if breakage != "content" else _now_s()
    if breakage == "timestamp":
        m[m["type"]] = {
            "body": "fine",
            "id": "1",
            "latitude": 1,
            "longitude": 2,
            "type": "button_reply",
            "button_reply": {"id": "x", "title": "y"},
            "message_id": "w",
            "emoji": "👍",
        }
    else:
        m[m["type"]] = draw(bad_content)  # never an object with the fields its type needs
    return m


@st.composite
def unidentifiable_message(draw: st.DrawFn, pid: str) -> Any:
    """A message with no id or no sender: it cannot be kept once."""
    choice = draw(st.sampled_from(["no-id", "no-sender", "not-an-object", "bad-id"]))
    if choice == "not-an-object":
        return draw(not_a_message)
    m: dict[str, Any] = {
        "id": pid,
        "from": draw(phones),
        "timestamp": _now_s(),
        "type": "text",
        "text": {"body": "lost"},
    }
    if choice == "no-id":
        del m["id"]
    elif choice == "bad-id":
        m["id"] = draw(bad_ids)
    else:
        del m["from"]
        m["from_user_id"] = draw(st.sampled_from(["not a bsuid", "", "12345"]))
    return m


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    ids = (f"P{i}" for i in itertools.count())
    shape = draw(st.sampled_from(["ok"] * 8 + ["broken-envelope", "not-json"]))
    if shape == "not-json":
        raw = draw(
            st.one_of(
                st.binary(max_size=60),
                st.just(b"{" * 3000),
                st.just(b'{"entry": [' + b"[" * 6000 + b"]" * 6000 + b"]}"),
            )
        )
        return Plan(body=raw, envelope_ok=False)
    plan = Plan(body=None, envelope_ok=True, redeliver=draw(st.integers(0, 9)) == 0)
    messages: list[Any] = []
    for _ in range(draw(st.integers(0, 6))):
        pid = next(ids)
        kind = draw(st.sampled_from(["valid"] * 5 + ["bad", "unidentifiable"]))
        if kind == "valid":
            m, stored_as = draw(valid_message(pid))
            plan.stored[pid] = stored_as
        elif kind == "bad":
            m = draw(bad_message(pid))
            plan.stored[pid] = "unsupported"
        else:
            m = draw(unidentifiable_message(pid))
            plan.absent.append(pid)
        messages.append(m)
    contacts: list[Any] = [
        {
            "profile": {"name": draw(hostile_text), "username": draw(hostile_text)},
            "wa_id": p,
            "user_id": b,
        }
        for p, b in zip(
            ["966501234567", "201001234567"],
            ["US.13491208655302741918", "SA.88112233"],
            strict=True,
        )
    ]
    contacts.append(draw(junk))  # a malformed contact only names: it is skipped
    statuses: list[Any] = [
        {
            "id": f"wamid.out{draw(st.integers(0, 5))}",
            "status": draw(st.sampled_from(["sent", "delivered", "read", "failed", "deleted"])),
            "timestamp": _now_s() if (t := draw(status_times)) == "now" else t,
            "errors": [{"code": draw(huge_numbers)}],
        },
        draw(junk),
    ]
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": "123"},
        "contacts": contacts,
        "messages": messages,
        "statuses": statuses[: draw(st.integers(0, 2))],
    }
    body = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "1",
                "changes": [
                    {"field": "messages", "value": value},
                    {
                        "field": draw(st.sampled_from(["statuses", "account_update"])),
                        "value": draw(junk),
                    },
                ],
            }
        ],
    }
    if shape == "broken-envelope":
        where = draw(st.sampled_from(["entry", "changes", "value", "messages", "root"]))
        bad = draw(
            st.one_of(
                st.just("nope"),
                huge_numbers,
                st.just({"x": 1}) if where != "value" else st.just([]),
            )
        )
        if where == "root":
            body = draw(st.one_of(st.lists(junk, max_size=2), hostile_text))
        elif where == "entry":
            body["entry"] = bad if not isinstance(bad, list) else "nope"
        elif where == "changes":
            body["entry"][0]["changes"] = bad if not isinstance(bad, list) else "nope"
        elif where == "value":
            body["entry"][0]["changes"][0]["value"] = draw(
                st.one_of(st.just([]), st.just("nope"), huge_numbers)
            )
        else:
            value["messages"] = draw(st.one_of(st.just({"x": 1}), st.just("nope"), huge_numbers))
        plan.envelope_ok = False
        plan.absent.extend(plan.stored)
        plan.stored = {}
    plan.body = body
    return plan


# -- the server ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Target:
    """The server process under test, with one kept-alive connection to it and one
    read-only connection to its database."""

    port: int
    db: Path
    http: http.client.HTTPConnection
    read: sqlite3.Connection

    def post(self, raw: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in (1, 2):  # a kept-alive connection the server closed: open anew
            try:
                self.http.request("POST", "/webhooks/whatsapp", body=raw, headers=headers)
                resp = self.http.getresponse()
                return resp.status, resp.read()
            except (http.client.HTTPException, ConnectionError):
                self.http.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("fuzz")
    db, port = tmp / "fuzz.db", _free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LIVECHAT_", "WHATSAPP_", "AI_"))
    }
    env |= {
        "LIVECHAT_API_TOKEN": TOKEN,
        "WHATSAPP_APP_SECRET": APP_SECRET,
        "AI_PROVIDER": "off",
        "LOG_LEVEL": "error",
    }
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "--port", str(port), "--db", str(db)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(200):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.05)
            finally:
                conn.close()
        target = Target(
            port,
            db,
            http.client.HTTPConnection("127.0.0.1", port, timeout=30),
            sqlite3.connect(f"file:{db}?mode=ro", uri=True),
        )
        try:
            yield target
        finally:
            target.http.close()
            target.read.close()
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


_counter = itertools.count(1)


def _materialise(plan: Plan) -> tuple[bytes, dict[str, str]]:
    """The body's bytes with each placeholder id made unique across the whole run."""
    run = next(_counter)
    mapping = {pid: f"wamid.FUZZ.{run}.{pid}" for pid in [*plan.stored, *plan.absent]}
    if isinstance(plan.body, bytes):
        return plan.body, mapping
    text = json.dumps(plan.body)  # ensure_ascii: lone surrogates travel as \\udXXX escapes
    for pid, real in mapping.items():
        text = text.replace(f'"{pid}"', json.dumps(real))
    return text.encode(), mapping


@pytest.mark.timeout(900)  # about 2 minutes on a quiet machine; CI may share its cores
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("CI") == "true",
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
        HealthCheck.filter_too_much,
    ],
)
@given(plan=plans())
def test_no_signed_body_loses_or_doubles_a_message_or_answers_5xx(server, plan):
    raw, ids = _materialise(plan)
    headers = {"X-Hub-Signature-256": sign(APP_SECRET, raw), "Content-Type": "application/json"}
    for _ in range(2 if plan.redeliver else 1):
        status, answer = server.post(raw, headers)
        assert status < 500, answer
        assert status == (200 if plan.envelope_ok else 400), answer
        assert json.loads(answer)  # a JSON answer, never a traceback
    read = server.read
    if True:  # the database as the server committed it (WAL: a reader sees each commit)
        for pid, stored_as in plan.stored.items():
            rows = read.execute(
                "SELECT doc FROM messages WHERE wa_message_id = ?", (ids[pid],)
            ).fetchall()
            assert len(rows) == 1, (pid, plan.body)
            assert json.loads(rows[0][0])["type"] == stored_as
        for pid in plan.absent:
            found = read.execute(
                "SELECT count(*) FROM messages WHERE wa_message_id = ?", (ids[pid],)
            ).fetchone()[0]
            assert found == 0, (pid, plan.body)
