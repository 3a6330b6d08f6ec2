"""Unit tests of the write journal's replay logic (the guest side is tested in the engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kprobevm.errors import JournalError
from kprobevm.kprobes.journal import Journal, journal_gdb_address, journal_lost, pending_writes


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


def test_a_second_session_goes_on_numbering_and_settles_only_its_own(tmp_path: Path) -> None:
    path = tmp_path / "j"
    first = Journal(path, gdb="/a.sock")
    first.record("virt", 0x1000, b"\x0f", b"\xcc", "int3 a")
    first.close(clean=True)
    second = Journal(path, gdb="/b.sock")
    seq = second.record("virt", 0x2000, b"\x55", b"\xcc", "int3 b")
    assert seq == 2  # not 1 again: an "undone 1" must never stand for the other session
    second.close(clean=False)
    assert [e.what for e in pending_writes(path)] == ["int3 b"]
    assert journal_gdb_address(path) == "/b.sock"


def test_a_session_will_not_start_over_pending_writes(tmp_path: Path) -> None:
    path = tmp_path / "j"
    dead = Journal(path)
    dead.record("virt", 0x1000, b"\x0f", b"\xcc", "int3 a")
    dead._file.write('{"op":"undone","se')  # killed mid-line
    dead._file.close()  # as a SIGKILL would: no close record
    with pytest.raises(JournalError, match="kprobevm recover") as info:
        Journal(path)
    assert "1 writes of an earlier session" in str(info.value)
    assert [e.what for e in pending_writes(path)] == ["int3 a"]  # nothing was appended


def test_one_session_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "j"
    live = Journal(path)
    with pytest.raises(JournalError, match="in use by a live session"):
        Journal(path)
    live.close(clean=True)
    Journal(path).close(clean=True)


def test_a_clean_close_settles_its_own_session_and_recovery_every_one(tmp_path: Path) -> None:
    path = tmp_path / "j"
    path.write_text(
        '{"op":"open","gdb":"/a"}\n'
        '{"op":"write","seq":1,"space":"virt","addr":4096,"old":"0f","new":"cc","what":"a"}\n'
        '{"op":"open","gdb":"/b"}\n'
        '{"op":"write","seq":2,"space":"virt","addr":8192,"old":"55","new":"cc","what":"b"}\n'
        '{"op":"close","clean":true}\n'
    )
    assert [e.what for e in pending_writes(path)] == ["a"]
    path.write_text(path.read_text() + '{"op":"close","clean":true,"by":"recover"}\n')
    assert pending_writes(path) == []


def test_a_session_whose_guest_went_settles_and_says_why(tmp_path: Path) -> None:
    """A guest that exited took our writes with it: the session settles its journal
    and says why, so that ``kprobevm recover`` has nothing to do and can say so."""
    path = tmp_path / "j"
    j = Journal(path)
    j.record("virt", 0x1000, b"\x0f", b"\xcc", "int3")
    j.close(clean=True, lost="vm1: the guest exited (W00, status 0)")
    assert pending_writes(path) == []
    assert journal_lost(path) == "vm1: the guest exited (W00, status 0)"
    Journal(path).close(clean=True)  # the next session on the path: no loss of its own
    assert journal_lost(path) == ""
