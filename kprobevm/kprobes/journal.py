"""The write journal: every byte kprobevm writes to a guest is recorded here first.

One JSON object per line, flushed to the OS before the write it announces (that survives
a SIGKILL of the host; fsync at open and close only, to keep registration fast), so that
a host process killed at any moment leaves a journal that ``kprobevm recover`` can undo:
each write is replayed backwards, restoring ``old`` where the guest still holds ``new``.
A write undone in the normal course (unregister, close) is marked so recovery skips it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kprobevm.errors import JournalError

__all__ = ["Journal", "JournalEntry", "Space", "pending_writes"]

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
        self._seq = 0
        self._file = path.open("a", encoding="utf-8")
        self._append({"op": "open", "gdb": gdb, "pid": os.getpid(), **(meta or {})})
        os.fsync(self._file.fileno())

    def _append(self, record: dict[str, object]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def record(self, space: Space, address: int, old: bytes, new: bytes, what: str) -> int:
        """Announce a write before doing it; returns its sequence number."""
        with self._lock:
            self._seq += 1
            self._append(
                {
                    "op": "write",
                    "seq": self._seq,
                    "space": space,
                    "addr": address,
                    "old": old.hex(),
                    "new": new.hex(),
                    "what": what,
                }
            )
            return self._seq

    def note(self, **facts: int | str) -> None:
        """Record facts recovery needs (where the kretprobe table is, ...)."""
        with self._lock:
            self._append({"op": "note", **facts})

    def undone(self, seq: int) -> None:
        """Mark write ``seq`` as undone (its old bytes are back)."""
        with self._lock:
            self._append({"op": "undone", "seq": seq})

    def close(self, *, clean: bool) -> None:
        """Close the journal; a clean close means nothing is left to recover."""
        with self._lock:
            if self._file.closed:
                return
            self._append({"op": "close", "clean": clean})
            os.fsync(self._file.fileno())
            self._file.close()


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
    """The gdbstub address the journal's session used (from its first record)."""
    for record in _read(path):
        if record.get("op") == "open":
            return str(record.get("gdb", ""))
    raise JournalError("journal has no 'open' record", path=str(path))


def journal_notes(path: Path) -> dict[str, object]:
    """Every fact the session noted (later notes win)."""
    notes: dict[str, object] = {}
    for record in _read(path):
        if record.get("op") == "note":
            notes.update({k: v for k, v in record.items() if k != "op"})
    return notes


def pending_writes(path: Path) -> list[JournalEntry]:
    """Writes that were announced and not undone, newest first (the order to undo them)."""
    entries: dict[int, JournalEntry] = {}
    for record in _read(path):
        op = record.get("op")
        if op == "write":
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
        elif op == "undone":
            entries.pop(int(str(record.get("seq", -1))), None)
        elif op == "close" and record.get("clean"):
            entries.clear()
    return sorted(entries.values(), key=lambda e: e.seq, reverse=True)
