"""Unit tests of the write journal's replay logic (the guest side is tested in the engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kprobevm.errors import JournalError
from kprobevm.kprobes.journal import Journal, journal_gdb_address, pending_writes


def test_pending_writes_are_newest_first_and_skip_undone(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = Journal(path, gdb="/tmp/g.sock")
    a = j.record("virt", 0x1000, b"\x0f", b"\xcc", "int3 a")
    j.record("phys", 0x2000, b"\x00" * 8, b"\x01" * 8, "pmd")
    c = j.record("virt", 0x3000, b"\x55", b"\xcc", "int3 c")
    j.undone(a)
    pending = pending_writes(path)
    assert [e.seq for e in pending] == [c, 2]
    assert pending[1].space == "phys" and pending[1].new == b"\x01" * 8
    assert journal_gdb_address(path) == "/tmp/g.sock"
    j.close(clean=False)
    assert len(pending_writes(path)) == 2


def test_clean_close_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = Journal(path)
    j.record("virt", 0x1000, b"\x0f", b"\xcc", "int3")
    j.close(clean=True)
    assert pending_writes(path) == []


def test_torn_last_line_is_ignored_but_corruption_is_not(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = Journal(path)
    j.record("virt", 0x1000, b"\x0f", b"\xcc", "int3")
    j._file.write('{"op":"write","seq":2,"spa')  # killed mid-line
    j._file.flush()
    assert len(pending_writes(path)) == 1
    path.write_text('not json\n{"op":"open"}\n')
    with pytest.raises(JournalError):
        pending_writes(path)
