"""The dashboard's pure state modules, tested with node's own test runner."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_dashboard_state_modules_pass_their_node_tests():
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed for the dashboard's unit tests (tests/js)")
    tests = sorted(str(p) for p in (ROOT / "tests" / "js").glob("*.test.mjs"))
    assert tests, "no tests in tests/js"
    result = subprocess.run(
        [node, "--test", *tests], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout
