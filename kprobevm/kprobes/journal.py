"""The write journal: every byte kprobevm writes to a guest is recorded here first.

One JSON object per line, flushed to the OS before the write it announces (that survives
a SIGKILL of the host; fsync at open and close only, to keep registration fast), so that
a host process killed at any moment leaves a journal that ``kprobevm recover`` can undo:
each write is replayed backwards, restoring ``old`` where the guest still holds ``new``.
A write undone in the normal course (unregister, close) is marked so recovery skips it.

A journal file may serve one session after another (a fixed path), never two at once:
a session holds an exclusive ``flock`` on it, and sequence numbers go on from the last
one in the file, so a later session's records never stand for an earlier one's. A
session will not start on a journal whose earlier session left writes pending: those
bytes are still in the guest, and only ``kprobevm recover`` may take them back.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kprobevm import faults
from kprobevm.errors import JournalError

__all__ = [
    "Journal",
    "JournalEntry",
    "Space",
    "drop_torn_tail",
    "hold_journal",
    "last_seq",
    "pending_writes",
]

Space = Literal["virt", "phys"]


@dataclass(frozen=True)
class JournalEntry:
    """One announced write: where, what was there, what we put, and why."""

    seq: int
    space: Space
    address: int
    old: bytes
    new: bytes
    what: str


class Journal:
    """Append-only write journal for one guest session."""

    def __init__(self, path: Path, *, gdb: str = "", meta: dict[str, object] | None = None):
        self.path = path
        self._lock = threading.Lock()
        try:
            self._file = path.open("a", encoding="utf-8")
        except OSError as exc:
            raise JournalError(f"cannot open journal: {exc}", path=str(path)) from exc
        try:
            hold_journal(self._file.fileno(), path)
            drop_torn_tail(path)
            pending = pending_writes(path)
            if pending:
                raise JournalError(
                    f"{len(pending)} writes of an earlier session are still in the guest"
                    f" (newest: {pending[0].what} at {pending[0].address:#x}): run"
                    f" 'kprobevm recover {path}' first, or use another journal path",
                    path=str(path),
                )
            self._seq = last_seq(path)
            self._append({"op": "open", "gdb": gdb, "pid": os.getpid(), **(meta or {})})
            os.fsync(self._file.fileno())
        except BaseException:
            self._file.close()
            raise

    def _append(self, record: dict[str, object]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def record(self, space: Space, address: int, old: bytes, new: bytes, what: str) -> int:
        """Announce a write before doing it; returns its sequence number."""
        with self._lock:
            self._seq += 1
            record = {
                "op": "write",
                "seq": self._seq,
                "space": space,
                "addr": address,
                "old": old.hex(),
                "new": new.hex(),
                "what": what,
            }
            if faults.due("journal_torn"):
                line = json.dumps(record, separators=(",", ":"))
                self._file.write(line[: len(line) // 2])
                self._file.flush()
                faults.kill()
            self._append(record)
            faults.kill_point("journal_write")
            return self._seq

    def note(self, **facts: int | str) -> None:
        """Record facts recovery needs (where the kretprobe table is, ...)."""
        with self._lock:
            self._append({"op": "note", **facts})

    def undone(self, seq: int) -> None:
        """Mark write ``seq`` as undone (its old bytes are back)."""
        with self._lock:
            self._append({"op": "undone", "seq": seq})

    def close(self, *, clean: bool, lost: str = "") -> None:
        """Close the journal; a clean close means nothing is left to recover. ``lost``
        says why the guest went away with the writes still in it (settled all the same:
        they went with it)."""
        with self._lock:
            if self._file.closed:
                return
            self._append({"op": "close", "clean": clean, **({"lost": lost} if lost else {})})
            os.fsync(self._file.fileno())
            self._file.close()


def hold_journal(fd: int, path: Path) -> None:
    """Take the journal's exclusive lock (held until ``fd`` closes), or say who has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner: object = "?"
        for record in _read(path):
            if record.get("op") == "open":
                owner = record.get("pid", "?")
        raise JournalError(f"journal is in use by a live session (pid {owner})",
                           path=str(path)) from None


def drop_torn_tail(path: Path) -> None:
    """Cut a last line left unfinished by a killed session (its write never happened),
    so that records appended next (a session's, recovery's) start on a line of their own."""
    with path.open("rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def last_seq(path: Path) -> int:
    """The highest sequence number written to the journal so far (0 for none)."""
    return max((int(str(r.get("seq", 0))) for r in _read(path) if r.get("op") == "write"),
               default=0)


def _read(path: Path) -> Iterator[dict[str, object]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise JournalError(f"cannot read journal: {exc}", path=str(path)) from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            # A host killed mid-line leaves a torn last line: that write never happened.
            if number == len(lines):
                return
            raise JournalError(f"line {number} is not JSON: {exc}", path=str(path)) from exc
        if not isinstance(record, dict):
            raise JournalError(f"line {number} is not an object", path=str(path))
        yield record


def journal_gdb_address(path: Path) -> str:
    """The gdbstub address the journal's last session used (from its ``open`` record)."""
    found: str | None = None
    for record in _read(path):
        if record.get("op") == "open":
            found = str(record.get("gdb", ""))
    if found is None:
        raise JournalError("journal has no 'open' record", path=str(path))
    return found


def journal_lost(path: Path) -> str:
    """Why the last session's guest went away with its writes in it ('' when it did not)."""
    lost = ""
    for record in _read(path):
        if record.get("op") == "open":
            lost = ""
        elif record.get("op") == "close" and record.get("lost"):
            lost = str(record["lost"])
    return lost


def journal_notes(path: Path) -> dict[str, object]:
    """Every fact the session noted (later notes win)."""
    notes: dict[str, object] = {}
    for record in _read(path):
        if record.get("op") == "note":
            notes.update({k: v for k, v in record.items() if k != "op"})
    return notes


def pending_writes(path: Path) -> list[JournalEntry]:
    """Writes that were announced and not undone, newest first (the order to undo them).

    A session's clean close settles its own writes; recovery's settles every one.
    """
    entries: dict[int, JournalEntry] = {}
    session: list[int] = []
    for record in _read(path):
        op = record.get("op")
        if op == "open":
            session = []
        elif op == "write":
            try:
                seq = int(str(record["seq"]))
                space = str(record["space"])
                if space not in ("virt", "phys"):
                    raise ValueError(f"bad space {space!r}")
                entries[seq] = JournalEntry(
                    seq=seq,
                    space="virt" if space == "virt" else "phys",
                    address=int(str(record["addr"])),
                    old=bytes.fromhex(str(record["old"])),
                    new=bytes.fromhex(str(record["new"])),
                    what=str(record.get("what", "")),
                )
            except (KeyError, ValueError) as exc:
                raise JournalError(f"malformed write record {record!r}", path=str(path)) from exc
            session.append(seq)
        elif op == "undone":
            entries.pop(int(str(record.get("seq", -1))), None)
        elif op == "close" and record.get("clean"):
            for seq in (list(entries) if record.get("by") == "recover" else session):
                entries.pop(seq, None)
    return sorted(entries.values(), key=lambda e: e.seq, reverse=True)
