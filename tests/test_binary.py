"""The single executable: built by the documented command from a fresh copy of the checkout,
run from a folder outside it with an empty environment, and the container image around it.

Slow (the build takes about half a minute of two cores); `.ci/run` runs these tests too.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.test_run import free_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "binary-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BUILD_TIMEOUT_S = 600
# What is not part of a fresh clone: earlier builds, caches, local databases.
NOT_COPIED = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "node_modules",
    "__pycache__",
    "*.egg-info",
    ".*_cache",
    "*.db",
    "*.db-*",
)

pytestmark = pytest.mark.slow


def pyinstaller() -> str:
    """The pyinstaller command of this environment (a test dependency: missing, it fails)."""
    beside = Path(sys.executable).with_name("pyinstaller")
    found = str(beside) if beside.exists() else shutil.which("pyinstaller")
    assert found, "pyinstaller is not installed: pip install -e '.[test]'"
    return found


@pytest.fixture(scope="module")
def executable(tmp_path_factory) -> Path:
    """dist/livechat, built by `pyinstaller livechat.spec --noconfirm` in a copy of the
    checkout with an empty PyInstaller cache, then copied to a folder of its own."""
    work = tmp_path_factory.mktemp("build")
    source = work / "livechat"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    env = os.environ | {"PYINSTALLER_CONFIG_DIR": str(work / "pyinstaller-cache")}
    started = time.monotonic()
    build = subprocess.run(
        [pyinstaller(), "livechat.spec", "--noconfirm"],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    built = source / "dist" / "livechat"
    assert built.is_file()
    print(f"built in {time.monotonic() - started:.0f} s: {built.stat().st_size / 2**20:.1f} MiB")
    folder = tmp_path_factory.mktemp("bin")
    binary = folder / "livechat"
    shutil.copy2(built, binary)
    shutil.rmtree(source)  # nothing of the checkout is left to lean on
    return binary


class Running:
    """The executable serving, started with `env -i` and only what is given."""

    def __init__(self, binary: Path, env: dict[str, str], *args: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = binary.parent / f"server-{self.port}.log"
        assignments = [f"{k}={v}" for k, v in env.items()]
        self._out = self.log.open("wb")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            ["env", "-i", *assignments, str(binary), *args, "--port", str(self.port)],
            cwd=binary.parent,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    async def ready(self, http: aiohttp.ClientSession, within: float = 60) -> float:
        """Seconds from the start to the first 200 from /readyz."""
        deadline = self.started + within
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                async with http.get(f"{self.base}/readyz") as r:
                    if r.status == 200:
                        return time.monotonic() - self.started
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.02)
        raise AssertionError(f"not ready in {within} s: {self.log.read_text()}")

    async def stop(self, within: float = 10) -> tuple[int | None, float]:
        """SIGTERM; the exit code and how long it took."""
        signalled = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        while self.process.poll() is None and time.monotonic() - signalled < within:
            await asyncio.sleep(0.02)
        return self.process.poll(), time.monotonic() - signalled

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self._out.close()


def run_simulate(binary: Path, base: str, count: int) -> subprocess.CompletedProcess[str]:
    """`livechat simulate` from the same file, with an empty environment."""
    return subprocess.run(
        ["env", "-i", str(binary), "simulate", "--url", base, "--count", str(count)],
        cwd=binary.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def total(http: aiohttp.ClientSession, base: str) -> int:
    async with http.get(f"{base}/api/live-chat/unified-chats", headers=AUTH) as r:
        assert r.status == 200
        return (await r.json())["total"]


async def test_the_executable_serves_the_demo_with_an_empty_environment(executable):
    # No Python of the machine's: the file needs only the C library's shared objects.
    ldd = subprocess.run(["ldd", str(executable)], capture_output=True, text=True)
    assert "python" not in ldd.stdout.lower()

    server = Running(executable, {"LIVECHAT_API_TOKEN": TOKEN}, "--demo")
    try:
        async with aiohttp.ClientSession() as http:
            seconds = await server.ready(http)
            print(f"/readyz 200 after {seconds:.2f} s; {executable.stat().st_size} bytes")
            async with http.get(f"{server.base}/healthz") as r:
                assert r.status == 200 and (await r.json())["status"] == "ok"
            async with http.get(f"{server.base}/readyz") as r:
                body = await r.json()
                assert body["status"] == "ok" and body["snapshot"]["conversations"] == 300
            async with http.get(f"{server.base}/") as r:
                assert r.status == 200 and "text/html" in r.headers["Content-Type"]
                page = await r.text()
            assert '<script type="module" src="/static/js/app.js"' in page
            async with http.get(f"{server.base}/static/js/app.js") as r:
                assert r.status == 200
                assert "javascript" in r.headers["Content-Type"]
                assert (await r.text()) == (ROOT / "static" / "js" / "app.js").read_text()
            assert await total(http, server.base) == 300

            # A subcommand from the same file: signed webhooks to the running server.
            simulated = await asyncio.to_thread(run_simulate, executable, server.base, 5)
            assert simulated.returncode == 0, simulated.stdout + simulated.stderr
            assert "answers: 200: 5" in simulated.stdout
            assert await total(http, server.base) > 300  # the simulated customers' chats

            code, took = await server.stop()
    finally:
        server.kill()
    assert code == 0, server.log.read_text()
    assert took < 10


@pytest.mark.firestore
async def test_the_executable_runs_on_firestore(executable, firestore_emulator, firestore_project):
    env = {
        "LIVECHAT_API_TOKEN": TOKEN,
        "LIVECHAT_STORE": "firestore",
        "FIRESTORE_EMULATOR_HOST": firestore_emulator.host,
        "GOOGLE_CLOUD_PROJECT": firestore_project,
    }
    server = Running(executable, env, "--demo", "--demo-conversations", "20")
    try:
        async with aiohttp.ClientSession() as http:
            await server.ready(http)
            assert await total(http, server.base) == 20
            simulated = await asyncio.to_thread(run_simulate, executable, server.base, 3)
            assert simulated.returncode == 0, simulated.stdout + simulated.stderr
            assert await total(http, server.base) > 20
            code, _ = await server.stop()
    finally:
        server.kill()
    assert code == 0, server.log.read_text()


def docker_unavailable() -> str | None:
    """Why the image cannot be built here, or None when Docker answers."""
    if shutil.which("docker") is None:
        return "the docker command is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
        return f"the Docker daemon is not reachable: {reason}"
    return None


async def test_the_container_image_runs_the_executable_as_a_user(tmp_path):
    reason = docker_unavailable()
    if reason:
        pytest.skip(reason)
    context = tmp_path / "context"
    shutil.copytree(ROOT, context, ignore=NOT_COPIED)
    tag = f"livechat-test:{uuid.uuid4().hex[:8]}"
    port = free_port()
    build = subprocess.run(
        ["docker", "build", "-t", tag, str(context)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    container = None
    try:
        run = subprocess.run(
            [
                "docker",
                "run",
                "-d",
                "-p",
                f"127.0.0.1:{port}:8080",
                "-e",
                f"LIVECHAT_API_TOKEN={TOKEN}",
                tag,
                "--demo",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        container = run.stdout.strip()
        inspect = subprocess.run(
            ["docker", "image", "inspect", tag], capture_output=True, text=True, check=True
        )
        config = json.loads(inspect.stdout)[0]["Config"]
        assert config["User"] not in ("", "0", "root")
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                try:
                    async with http.get(f"{base}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            assert await total(http, base) == 300
            async with http.get(f"{base}/") as r:
                assert r.status == 200
        uid = subprocess.run(
            ["docker", "exec", container, "id", "-u"], capture_output=True, text=True
        )
        assert uid.stdout.strip() not in ("", "0")
        subprocess.run(["docker", "stop", "-t", "10", container], check=True, timeout=30)
        state = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.ExitCode}}", container],
            capture_output=True,
            text=True,
            check=True,
        )
        assert state.stdout.strip() == "0"
    finally:
        if container:
            subprocess.run(["docker", "rm", "-f", container], capture_output=True)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
