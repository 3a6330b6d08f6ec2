"""Kill points: named, counted, fatal only when the environment names them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kprobevm.faults import ENV, parse_kill_point
from kprobevm.kprobes.journal import Journal, pending_writes

ROOT = Path(__file__).parent.parent

# Records three journal writes; the kill point decides where it dies.
WRITER = r"""
import sys
from pathlib import Path
from kprobevm.kprobes.journal import Journal
j = Journal(Path(sys.argv[1]))
for i in range(3):
    j.record("virt", 0x1000 + i, b"\x00", b"\xcc", f"int3 {i}")
    print("wrote", i, flush=True)
"""


def _run(journal: Path, point: str | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(ENV, None)
    if point is not None:
        env[ENV] = point
    return subprocess.run([sys.executable, "-c", WRITER, str(journal)], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_names_and_counts_are_checked() -> None:
    assert parse_kill_point("arm_kprobe") == ("arm_kprobe", 1)
    assert parse_kill_point("set_pte:7") == ("set_pte", 7)
    with pytest.raises(ValueError, match="unknown kill point"):
        parse_kill_point("arm_kprob")
    with pytest.raises(ValueError, match="counts from 1"):
        parse_kill_point("set_pte:0")


def test_unset_nothing_dies(tmp_path: Path) -> None:
    done = _run(tmp_path / "j", None)
    assert done.returncode == 0 and done.stdout.count("wrote") == 3


def test_the_nth_arrival_dies_after_its_record_before_its_write(tmp_path: Path) -> None:
    died = _run(tmp_path / "j", "journal_write:2")
    assert died.returncode == -signal.SIGKILL
    assert died.stdout.split("\n")[:-1] == ["wrote 0"]
    assert [e.what for e in pending_writes(tmp_path / "j")] == ["int3 1", "int3 0"]


def test_a_torn_record_is_no_write_and_the_next_session_starts_clean(tmp_path: Path) -> None:
    journal = tmp_path / "j"
    died = _run(journal, "journal_torn:2")
    assert died.returncode == -signal.SIGKILL
    assert not journal.read_text().endswith("\n")
    assert [e.what for e in pending_writes(journal)] == ["int3 0"]
    with pytest.raises(Exception, match="kprobevm recover"):
        Journal(journal)  # int3 0 is still pending: the torn line changes nothing
