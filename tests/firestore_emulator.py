"""pytest plugin: the Firestore emulator, started by the tests themselves.

One emulator serves the whole session on a free loopback port. Each test gets its own
project id (the emulator keeps projects apart), and that project is wiped when the test ends.
Without the gcloud CLI the Firestore tests skip, saying why; under CI=true they fail instead,
because a CI run that silently skipped them would prove nothing.

gcloud starts a shell wrapper that starts java, and neither execs: killing gcloud leaves java
running. So the emulator runs in its own process group and the whole group is stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

# The emulator is ready in 10-20 s here; a cold JVM on a busy CI machine can take longer.
START_TIMEOUT_S = 60.0
# SIGTERM first so java can exit cleanly; whatever is left after this is killed.
STOP_GRACE_S = 5.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Emulator:
    """One Firestore emulator process group on 127.0.0.1:port."""

    def __init__(self, port: int | None = None, workdir: Path | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def host(self) -> str:
        """What FIRESTORE_EMULATOR_HOST must say."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self, import_data: str | None = None) -> None:
        """Start the emulator and wait until it answers Ok (fails the test after a minute)."""
        args = ["gcloud", "emulators", "firestore", "start", f"--host-port={self.host}"]
        if import_data:
            args.append(f"--import-data={import_data}")
        log_path = (self.workdir or Path("/tmp")) / f"firestore-emulator-{self.port}.log"
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches java too
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Firestore emulator exited; see {log_path}")
            if self.answers():
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the Firestore emulator did not answer within {START_TIMEOUT_S} s")

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/", timeout=1) as resp:
                return resp.read().strip() == b"Ok"
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL what is left."""
        process, self.process = self.process, None
        if process is None:
            return
        self._signal(process, signal.SIGTERM)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        # The wrapper may be gone while java lingers in the group: always sweep it.
        self._signal(process, signal.SIGKILL)
        process.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """An outage: kill the whole group at once, as a crash or a network cut would."""
        process, self.process = self.process, None
        if process is None:
            return
        self._signal(process, signal.SIGKILL)
        process.wait()
        self._close_log()
        deadline = time.monotonic() + STOP_GRACE_S
        while self.answers() and time.monotonic() < deadline:
            time.sleep(0.05)

    def freeze(self) -> None:
        """An outage of the worst kind: the server keeps its connections but never
        answers (SIGSTOP to the whole group)."""
        assert self.process is not None
        self._signal(self.process, signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen emulator answer again."""
        assert self.process is not None
        self._signal(self.process, signal.SIGCONT)

    @staticmethod
    def _signal(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass

    def _request(self, method: str, path: str, body: bytes | None = None) -> None:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()

    def wipe(self, project: str) -> None:
        """Delete every document of a project."""
        self._request("DELETE", f"/emulator/v1/projects/{project}/databases/(default)/documents")

    def export(self, project: str, directory: Path) -> str:
        """Export a project's data; returns the path --import-data takes."""
        directory.mkdir(parents=True, exist_ok=True)
        body = json.dumps(
            {
                "database": f"projects/{project}/databases/(default)",
                "export_directory": str(directory),
            }
        ).encode()
        self._request("POST", f"/emulator/v1/projects/{project}:export", body)
        return str(next(directory.glob("*/*.overall_export_metadata")))


def require_gcloud() -> None:
    """Skip (or under CI=true, fail) when the emulator cannot run here."""
    if shutil.which("gcloud") is not None:
        return
    reason = "the Firestore emulator needs the gcloud CLI, which is not on PATH"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def firestore_emulator(tmp_path_factory) -> Iterator[Emulator]:
    """The session's emulator on a free port, stopped (java included) at the end."""
    require_gcloud()
    emulator = Emulator(workdir=tmp_path_factory.mktemp("firestore"))
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


_projects = itertools.count(1)


@pytest.fixture
def firestore_project(firestore_emulator) -> Iterator[str]:
    """A project of its own for one test (so leftovers never leak), wiped afterwards."""
    project = f"livechat-test-{os.getpid()}-{next(_projects)}"
    yield project
    try:
        firestore_emulator.wipe(project)
    except OSError:
        pass  # a test that stopped the emulator on purpose has nothing left to wipe


def firestore_settings(emulator: Emulator, project: str, **overrides: Any):
    """Settings for a FirestoreStore on the emulator."""
    from server.config import Settings

    return Settings(
        store="firestore",
        google_cloud_project=project,
        firestore_emulator_host=emulator.host,
        **overrides,
    ).validated()


@contextlib.asynccontextmanager
async def open_firestore_store(
    emulator: Emulator, project: str, **overrides: Any
) -> AsyncIterator[Any]:
    """A started FirestoreStore that listens (streaming already), closed after."""
    from server.store.firestore import FirestoreStore

    store = FirestoreStore(firestore_settings(emulator, project, **overrides))
    await store.start()
    try:
        await store.listen()
        yield store
    finally:
        await store.close()
