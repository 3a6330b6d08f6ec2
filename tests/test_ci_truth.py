"""Under CI a skipped test fails the run: a guest test that could not boot, or one whose
tool is missing, has checked nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIPPING = """
import pytest

@pytest.mark.vm
def test_guest():
    pytest.skip("no QEMU here")

def test_tool():
    pytest.importorskip("no_such_emulator_module")
"""


@pytest.mark.parametrize(("ci", "code", "says"), [
    ("true", 1, "2 failed"), ("", 0, "2 skipped"),
])
def test_a_skip_fails_only_under_ci(tmp_path: Path, ci: str, code: int, says: str) -> None:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         str(tmp_path / "test_skipping.py")],
        cwd=ROOT, env={**os.environ, "CI": ci}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == code, done.stdout + done.stderr
    assert says in done.stdout
    if ci:
        assert "skipped under CI" in done.stdout and "no_such_emulator_module" in done.stdout
