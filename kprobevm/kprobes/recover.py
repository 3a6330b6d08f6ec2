"""``kprobevm recover``: undo what a dead kprobevm session left in a guest.

The journal lists every write the session made and did not undo. Recovery restores
them newest first in two phases: kernel virtual memory first (probe int3s, the IDT
gate), then, once no vCPU runs inside the slot area, the page-table entry that mapped
it, with a TLB flush on every vCPU. A byte the guest changed since is left alone and
reported, never overwritten.
"""

from __future__ import annotations

import json
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from kprobevm import faults
from kprobevm.errors import GdbError, GdbErrorReply, JournalError, KprobeError, VMLost
from kprobevm.gdbstub.client import GdbClient
from kprobevm.gdbstub.target import vcpu_quiescent, vcpu_rips
from kprobevm.gdbstub.transport import parse_gdb_address
from kprobevm.kprobes.journal import (
    JournalEntry,
    drop_torn_tail,
    hold_journal,
    journal_gdb_address,
    journal_lost,
    journal_notes,
    pending_writes,
)
from kprobevm.trap.watchdog import Watchdog
from kprobevm.x86.constants import PAGE_SIZE
from kprobevm.x86.lowmem import ONE_MIB
from kprobevm.x86.slotmap import PMD_SPAN

__all__ = ["RecoveryReport", "recover"]

_AREA = re.compile(r"slot area (0x[0-9a-f]+)")


@dataclass
class RecoveryReport:
    """What recovery restored, found already restored, and had to leave alone."""

    restored: list[JournalEntry] = field(default_factory=list)
    returns_restored: int = 0
    """Calls in flight through the kretprobe trampoline given their return address back."""
    already: list[JournalEntry] = field(default_factory=list)
    conflicts: list[tuple[JournalEntry, bytes]] = field(default_factory=list)
    lost: str = ""
    """Why the session's guest went away with its writes (they went with it)."""
    wiped: int = 0
    """Slot pages of the first MiB zeroed again once unmapped (as a clean close does)."""

    @property
    def ok(self) -> bool:
        return not self.conflicts

    def summary(self) -> str:
        lines = [
            f"restored {len(self.restored)}, already restored {len(self.already)},"
            f" conflicts {len(self.conflicts)}"
        ]
        if self.lost:
            lines.append(f"  nothing to restore: the session's guest is gone ({self.lost})")
        if self.wiped:
            lines.append(f"  {self.wiped} slot pages of the first MiB zeroed again")
        for entry, found in self.conflicts:
            lines.append(
                f"  left alone: {entry.what} at {entry.address:#x}: expected"
                f" {entry.new.hex()} or {entry.old.hex()}, found {found.hex()}"
            )
        return "\n".join(lines)


def _restore(client: GdbClient, entry: JournalEntry, report: RecoveryReport) -> bool:
    phys = entry.space == "phys"
    read = client.read_phys if phys else client.read_memory
    write = client.write_phys if phys else client.write_memory
    current = read(entry.address, len(entry.new))
    if current == entry.new:
        faults.kill_point("recover_restore")
        write(entry.address, entry.old)
        report.restored.append(entry)
        return True
    if current == entry.old:
        report.already.append(entry)
        return True
    report.conflicts.append((entry, current))
    return False


def recover(journal: Path, *, gdb: str | None = None, timeout: float = 10.0) -> RecoveryReport:
    """Restore the guest behind ``journal`` (gdbstub address from the journal unless given).

    Raises :class:`JournalError` while the session that writes the journal is alive,
    and :class:`VMLost` when writes are pending and the gdbstub cannot be reached (a
    journal whose guest is known to be gone has none: its session settled it).
    """
    try:
        held = journal.open("a", encoding="utf-8")
    except OSError as exc:
        raise JournalError(f"cannot open journal: {exc}", path=str(journal)) from exc
    with held:
        hold_journal(held.fileno(), journal)
        drop_torn_tail(journal)  # recovery's records must not be glued to half a line
        return _recover(journal, gdb, timeout)


def _recover(journal: Path, gdb: str | None, timeout: float) -> RecoveryReport:
    entries = pending_writes(journal)
    address = gdb or journal_gdb_address(journal)
    if not address:
        raise JournalError("the journal names no gdbstub address: pass gdb=", path=str(journal))
    report = RecoveryReport(lost=journal_lost(journal))
    areas = [int(m[1], 16) for e in entries if (m := _AREA.search(e.what))]
    try:
        client = GdbClient.connect(parse_gdb_address(address))
    except (OSError, GdbError) as exc:
        if not entries:
            return report  # nothing to restore, and no guest to detach from
        raise VMLost(
            f"cannot reach the gdbstub at {address} ({exc}): {len(entries)} writes are"
            f" pending; if that QEMU has exited, they went with its guest",
        ) from exc
    # a recovery killed while it holds the VM stopped must not leave it so
    watchdog = Watchdog(client.fileno())
    try:
        for entry in entries:
            if entry.space == "virt":
                _restore(client, entry, report)
        if entries:
            report.returns_restored = _unhijack_returns(client, journal_notes(journal))
        if areas:
            _wait_out_of(client, areas, timeout)
        for entry in entries:
            if entry.space == "phys":
                _restore(client, entry, report)
        if areas:
            for thread in client.threads():
                cr3 = client.read_register("cr3", thread=thread)
                client.write_register("cr3", cr3, thread=thread)  # flushes the TLB
            if not report.conflicts:
                report.wiped = _wipe_first_mib(client, journal_notes(journal))
        _mark_undone(journal, report)
    finally:
        # a detach removes any breakpoint left behind and lets the guest run
        try:
            client.detach()
        finally:
            watchdog.stop()
            client.close()
    return report


def _wipe_first_mib(client: GdbClient, notes: dict[str, object]) -> int:
    """Zero the session's slot pages when they were taken from the first MiB (no
    ``memmap=``), as a clean close leaves them; the unmapped area is no longer reachable.
    A ``memmap=`` reserve is left as it is: nothing but kprobevm uses it."""
    base, size = notes.get("slot_reserve"), notes.get("slot_reserve_size")
    if not isinstance(base, int) or not isinstance(size, int) or base + size > ONE_MIB:
        return 0
    client.write_phys(base, bytes(size))
    return size // PAGE_SIZE


def _wait_out_of(client: GdbClient, areas: list[int], timeout: float) -> None:
    """Let the guest run until no vCPU is in a slot area, nor holds an interrupted
    context there: each seen quiescent (user mode, idle) at least once (VM stopped)."""
    def ours(rip: int) -> bool:
        return any(a <= rip < a + PMD_SPAN for a in areas)

    waiting = set(client.threads())
    deadline = time.monotonic() + timeout
    while True:
        waiting = {t for t in waiting if not vcpu_quiescent(client, t, ours)}
        if not waiting and not any(ours(rip) for rip in vcpu_rips(client)):
            return
        if time.monotonic() > deadline:
            raise KprobeError("vCPUs may still be inside the slot area; not unmapping it")
        client.cont()
        time.sleep(0.02)
        client.interrupt()


def _unhijack_returns(client: GdbClient, notes: dict[str, object]) -> int:
    """Give pending kretprobe returns their real return address back (VM stopped).

    The table entries stay: a vCPU may already be inside the trampoline (the slot still
    holds its address until the trampoline writes the real one back), and it must find
    its entry. Nothing new is hijacked, and the table goes with the slot area."""
    table, trampoline = notes.get("kretprobe_table"), notes.get("trampoline")
    if not isinstance(table, int) or not isinstance(trampoline, int):
        return 0
    restored = 0
    data = client.read_memory(table, 4096)
    for pos in range(0, len(data), 16):
        slot, ret = struct.unpack_from("<QQ", data, pos)
        if not slot:
            continue
        try:
            pending = struct.unpack("<Q", client.read_memory(slot, 8))[0] == trampoline
        except GdbErrorReply:
            pending = False  # the task and its stack are gone
        if pending:
            client.write_memory(slot, struct.pack("<Q", ret))
            restored += 1
    return restored


def _mark_undone(journal: Path, report: RecoveryReport) -> None:
    with journal.open("a", encoding="utf-8") as f:
        for entry in [*report.restored, *report.already]:
            f.write(json.dumps({"op": "undone", "seq": entry.seq}) + "\n")
        if report.ok:
            f.write(json.dumps({"op": "close", "clean": True, "by": "recover"}) + "\n")
