"""Malformed API input, thrown by hypothesis at one running server: no 500, no partial write.

One server process (`run.py`, SQLite in a temporary directory) serves every example over
loopback; the examples are plain HTTP/1.1 requests on a keep-alive connection. Every
request is built so that it must be refused (a missing conversation, a missing field, a
wrong credential or origin, a forged cursor), so after each group the store must hold
exactly what it held before, and every answer must be a JSON error below 500.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "fuzz-machine-token"
PASSWORD = "fuzzing password"
AGENT = "fuzz@example.com"
ADMIN = "fuzz-admin@example.com"
MISSING = "c_fuzz_missing"
# At least 10,000 examples in all (the groups below add up to 10,500); LIVECHAT_FUZZ_SCALE
# scales them for a quick local look.
EXAMPLES = {"bodies": 1000, "agents": 1000, "login": 500, "queries": 3000, "headers": 2500,
            "cursors": 2500}  # fmt: skip
SCALE = float(os.environ.get("LIVECHAT_FUZZ_SCALE", "1"))
EXAMPLES = {k: max(1, int(v * SCALE)) for k, v in EXAMPLES.items()}


def fuzz(group: str) -> settings:
    """Hypothesis settings of one group: its examples, no deadline (requests go over HTTP),
    no example database (each run is fresh)."""
    return settings(
        max_examples=EXAMPLES[group],
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


class Server:
    """The app in its own process, and a keep-alive connection to it."""

    def __init__(self, db: Path, port: int, proc: subprocess.Popen) -> None:
        self.db = db
        self.port = port
        self.proc = proc
        self.conn = self._connect()
        self.cookie = ""
        self.admin_cookie = ""
        self.conversation = ""
        self.cursor = ""
        self.requests = 0

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request; the connection is opened again when the server closed it."""
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = self._connect()
                self.requests += 1
                return resp.status, dict(resp.getheaders()), data
            except (http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine):
                self.conn.close()
                self.conn = self._connect()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def state(self) -> dict[str, Any]:
        """What the store holds (read from the file directly, as another reader would)."""
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as db:
            return {
                "conversations": db.execute(
                    "SELECT id, doc FROM conversations ORDER BY id"
                ).fetchall(),
                "messages": db.execute("SELECT id, doc FROM messages ORDER BY id").fetchall(),
                "agents": db.execute("SELECT * FROM agents ORDER BY id").fetchall(),
                "tokens": db.execute("SELECT * FROM agent_tokens ORDER BY id").fetchall(),
            }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(env: dict[str, str], *args: str, stdin: str = "") -> None:
    done = subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, env=env, input=stdin, text=True,
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def sign_in(server: Server, email: str) -> str:
    status, headers, body = server.request(
        "POST", "/api/auth/login", json.dumps({"email": email, "password": PASSWORD}).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 200, body
    return headers["Set-Cookie"].split(";")[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for every example of this module."""
    tmp = tmp_path_factory.mktemp("fuzz")
    db = tmp / "fuzz.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVECHAT_", "WHATSAPP_"))}
    env.pop("FIRESTORE_EMULATOR_HOST", None)
    env |= {"LIVECHAT_DB": str(db), "LIVECHAT_API_TOKEN": TOKEN, "AI_PROVIDER": "off",
            "LOG_LEVEL": "error", "LOG_FORMAT": "json"}  # fmt: skip
    cli(env, "agents", "add", AGENT, "--name", "Fuzz", stdin=PASSWORD)
    cli(env, "agents", "add", ADMIN, "--name", "Fuzz Admin", "--role", "admin", stdin=PASSWORD)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "run.py", "--port", str(port), "--demo", "--demo-conversations", "40"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    s = Server(db, port, proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if s.request("GET", "/readyz")[0] == 200:
                    break
            except OSError:
                s.conn.close()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        s.cookie = sign_in(s, AGENT)
        s.admin_cookie = sign_in(s, ADMIN)
        _, _, body = s.request(
            "GET",
            "/api/live-chat/unified-chats?limit=5",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        page = json.loads(body)
        s.conversation = page["chats"][0]["id"]
        s.cursor = page["next_cursor"]
        yield s
    finally:
        s.conn.close()
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0, "the server did not stop cleanly"


def check(status: int, headers: dict[str, str], body: bytes, *, write: bool) -> None:
    """No 500; an error is JSON with a code; a write that must be refused was refused."""
    assert status < 500, (status, body[:300])
    if write:
        assert status >= 400, (status, body[:300])
    if status >= 400:
        error = json.loads(body)["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str)


# ---------- strategies ----------

text = st.text(max_size=40)
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60
)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
FIELDS = ("text", "status", "ai_enabled", "assignee", "agent_id", "email", "name", "role",
          "disabled", "password", "token")  # fmt: skip
field_values = (
    json_values
    | st.sampled_from(["open", "resolved", "all", "", " ", "a_demo_reem", "x" * 5000, "\u0000"])
    | st.text(min_size=4090, max_size=4100)
)
objects = st.dictionaries(st.sampled_from(FIELDS) | text, field_values, max_size=5)
raw_bodies = (
    objects.map(lambda d: json.dumps(d).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=300)
    | st.sampled_from([b"", b"{", b"[" * 3000, b'{"text": "\xff"}', b"null", b'"text"'])
)


# ---------- the groups ----------


@fuzz("bodies")
@given(
    target=st.sampled_from(
        [
            ("POST", "/api/live-chat/conversations/{}/messages"),
            ("PATCH", "/api/live-chat/conversations/{}"),
            ("POST", "/api/live-chat/conversations/{}/read"),
        ]
    ),
    conversation=st.sampled_from([MISSING]) | text.map(lambda t: "c_" + quote(t, safe="")),
    body=raw_bodies,
    ctype=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"]),
)
def test_malformed_bodies_on_missing_conversations(server, target, conversation, body, ctype):
    assume(conversation != "c_" + server.conversation)
    method, path = target
    status, headers, data = server.request(
        method,
        path.format(conversation),
        body,
        {"Authorization": f"Bearer {TOKEN}", "Content-Type": ctype},
    )
    check(status, headers, data, write=True)


@fuzz("agents")
@given(
    method_path=st.sampled_from([("POST", "/api/agents"), ("PATCH", "/api/agents/a_fuzz_missing")]),
    body=st.dictionaries(
        st.sampled_from(["email", "name", "role", "disabled"]) | text, field_values, max_size=5
    ).map(lambda d: json.dumps(d).encode())
    | raw_bodies,
    as_admin=st.booleans(),
)
def test_malformed_agent_changes(server, method_path, body, as_admin):
    # Without a password an agent is never added; the PATCH names no agent.
    assume(b"password" not in body)
    method, path = method_path
    cookie = server.admin_cookie if as_admin else server.cookie
    headers = {"Cookie": cookie, "Origin": server.origin, "Content-Type": "application/json"}
    status, answer_headers, data = server.request(method, path, body, headers)
    check(status, answer_headers, data, write=True)


@fuzz("login")
@given(
    body=st.fixed_dictionaries({}, optional={"email": field_values, "password": field_values}).map(
        lambda d: json.dumps(d).encode()
    )
    | raw_bodies,
    origin=st.none() | st.sampled_from(["https://evil.example", "null"]),
)
def test_malformed_sign_ins(server, body, origin):
    headers = {"Content-Type": "application/json"} | ({"Origin": origin} if origin else {})
    status, answer_headers, data = server.request("POST", "/api/auth/login", body, headers)
    check(status, answer_headers, data, write=True)


@fuzz("queries")
@given(
    path=st.sampled_from(
        [
            "/api/live-chat/unified-chats",
            "/api/live-chat/conversations/{}/messages",
            "/api/live-chat/conversations/{}",
            "/api/agents",
            "/api/auth/me",
        ]
    ),
    params=st.dictionaries(
        st.sampled_from(["limit", "cursor", "before", "status", "q", "assignee"]) | text,
        st.sampled_from(
            ["0", "1", "100", "101", "-1", "1e3", "\u00b2", "all", "me", "none", "open", "x" * 200]
        )
        | text,
        max_size=6,
    ),
    real=st.booleans(),
)
def test_malformed_query_strings(server, path, params, real):
    target = path.format(server.conversation if real else quote(MISSING))
    query = urlencode(params)
    status, headers, data = server.request(
        "GET", f"{target}?{query}", headers={"Cookie": server.cookie}
    )
    check(status, headers, data, write=False)


@fuzz("headers")
@given(
    authorization=st.none()
    | header_text
    | st.just(f"Bearer {TOKEN}x")
    | st.just("Bearer lcp_" + "A" * 43),
    cookie=st.none() | header_text.map(lambda v: f"livechat_session={v}") | st.just("valid"),
    origin=st.none()
    | header_text
    | st.sampled_from(["https://evil.example", "null", "http://127.0.0.1"]),
    fetch_site=st.none() | st.sampled_from(["same-origin", "cross-site", "same-site", "none"]),
    ctype=st.none()
    | st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]),
    extra=st.dictionaries(
        st.sampled_from(["X-Request-ID", "Last-Event-ID", "Accept", "X-Forwarded-For", "Cookie2"]),
        header_text,
        max_size=3,
    ),
)
def test_malformed_credentials_and_origins_write_nothing(
    server, authorization, cookie, origin, fetch_site, ctype, extra
):
    headers = dict(extra)
    if authorization is not None:
        headers["Authorization"] = authorization
    if cookie == "valid":
        cookie = server.cookie
        # The one combination a page of the dashboard sends: it would (rightly) write.
        same = (origin == server.origin) or (origin is None and fetch_site == "same-origin")
        assume(not (authorization is None and ctype == "application/json" and same))
    if cookie is not None:
        headers["Cookie"] = cookie
    if origin is not None:
        headers["Origin"] = origin
    if fetch_site is not None:
        headers["Sec-Fetch-Site"] = fetch_site
    if ctype is not None:
        headers["Content-Type"] = ctype
    path = f"/api/live-chat/conversations/{server.conversation}/messages"
    status, answer_headers, data = server.request("POST", path, b'{"text": "fuzz"}', headers)
    check(status, answer_headers, data, write=True)


def mutations(cursor: str):
    position = st.integers(0, len(cursor) - 1)
    return st.one_of(
        st.tuples(position, st.characters(min_codepoint=33, max_codepoint=126)).map(
            lambda pc: cursor[: pc[0]] + pc[1] + cursor[pc[0] + 1 :]
        ),
        position.map(lambda p: cursor[:p]),
        text.map(lambda t: cursor + t),
        text.map(lambda t: t + cursor),
        st.binary(max_size=40).map(
            lambda b: base64.urlsafe_b64encode(b).decode() + "." + cursor.split(".")[-1]
        ),
        header_text,
    )


@fuzz("cursors")
@given(data=st.data(), kind=st.sampled_from(["list", "messages"]))
def test_forged_cursors(server, data, kind):
    forged = data.draw(mutations(server.cursor))
    assume(forged != server.cursor)
    if kind == "list":
        path = "/api/live-chat/unified-chats?" + urlencode({"cursor": forged})
    else:
        path = f"/api/live-chat/conversations/{server.conversation}/messages?" + urlencode(
            {"before": forged}
        )
    status, headers, body = server.request("GET", path, headers={"Cookie": server.cookie})
    check(status, headers, body, write=False)
    if not forged:
        assert status == 200  # no cursor: the first page
    elif kind == "messages":
        assert status == 400  # a list's cursor is never a messages cursor, forged or not
    elif status == 200:
        # Base64 ignores characters outside its alphabet: a forgery that decodes to the
        # very same signed key is the same cursor, and serves the same page.
        assert "chats" in json.loads(body)
    else:
        assert json.loads(body)["error"]["code"] == "invalid_cursor"


@pytest.fixture(autouse=True)
def nothing_written(server):
    """Around each group: the store holds exactly what it held before."""
    before = server.state()
    yield
    assert server.state() == before


def test_at_least_10000_malformed_requests_were_answered(server):
    if SCALE >= 1:
        assert sum(EXAMPLES.values()) >= 10_000
    assert server.requests >= sum(EXAMPLES.values())
