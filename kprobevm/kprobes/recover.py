"""``kprobevm recover``: undo what a dead kprobevm session left in a guest.

The journal lists every write the session made and did not undo. Recovery restores
them newest first in two phases: kernel virtual memory first (probe int3s, the IDT
gate), and the return addresses of calls still in flight through the kretprobe
trampoline; then, once nothing can reach the slot area any more and every vCPU has
been seen quiescent (so none is left interrupted inside it), the page-table entry that
mapped it, with a TLB flush on every vCPU. A byte the guest changed since is left alone
and reported, never overwritten.
"""

from __future__ import annotations

import json
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from kprobevm.errors import GdbErrorReply, JournalError, KprobeError
from kprobevm.gdbstub.client import GdbClient
from kprobevm.gdbstub.target import vcpu_rips
from kprobevm.gdbstub.transport import parse_gdb_address
from kprobevm.kprobes.journal import (
    JournalEntry,
    drop_torn_tail,
    hold_journal,
    journal_gdb_address,
    journal_notes,
    pending_writes,
)
from kprobevm.x86.arch import quiescent
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

    @property
    def ok(self) -> bool:
        return not self.conflicts

    def summary(self) -> str:
        lines = [
            f"restored {len(self.restored)}, already restored {len(self.already)},"
            f" conflicts {len(self.conflicts)}"
        ]
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

    Raises :class:`JournalError` while the session that writes the journal is alive.
    """
    try:
        held = journal.open("a", encoding="utf-8")
    except OSError as exc:
        raise JournalError(f"cannot open journal: {exc}", path=str(journal)) from exc
    with held:
        hold_journal(held.fileno(), journal)
        # recovery appends its own records: not onto a line the dead session left torn
        drop_torn_tail(journal)
        return _recover(journal, gdb, timeout)


def _recover(journal: Path, gdb: str | None, timeout: float) -> RecoveryReport:
    entries = pending_writes(journal)
    address = gdb or journal_gdb_address(journal)
    if not address:
        raise JournalError("the journal names no gdbstub address: pass gdb=", path=str(journal))
    report = RecoveryReport()
    areas = [int(m[1], 16) for e in entries if (m := _AREA.search(e.what))]
    client = GdbClient.connect(parse_gdb_address(address))
    try:
        for entry in entries:
            if entry.space == "virt":
                _restore(client, entry, report)
        if entries:
            report.returns_restored = _unhijack_returns(client, journal_notes(journal))
        if areas:
            _wait_until_quiescent(client, areas, timeout)
        for entry in entries:
            if entry.space == "phys":
                _restore(client, entry, report)
        if areas:
            for thread in client.threads():
                cr3 = client.read_register("cr3", thread=thread)
                client.write_register("cr3", cr3, thread=thread)  # flushes the TLB
        _mark_undone(journal, report)
    finally:
        # a detach removes any breakpoint left behind and lets the guest run
        try:
            client.detach()
        finally:
            client.close()
    return report


def _unhijack_returns(client: GdbClient, notes: dict[str, object]) -> int:
    """Give pending kretprobe returns their real return address back (VM stopped).

    The instance table is left as it is: a vCPU stopped inside the trampoline, past
    its ``ret`` and still looking for its entry, must find it (an entry gone makes it
    ``ud2``).
    """
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


def _wait_until_quiescent(client: GdbClient, areas: list[int], timeout: float) -> None:
    """Let the guest run until every vCPU has been seen quiescent and none is inside a
    slot area (VM stopped on return).

    With the gate, the int3s and the return addresses back, nothing enters the area
    any more; but a vCPU may have been interrupted inside a slot, the stub or the
    trampoline, its RIP now in an interrupt handler that returns there. Once seen in
    user mode or idle, it holds no such context (the kernel does not preempt kernel
    code), and unmapping the area cannot fault it.
    """

    def ours(rip: int) -> bool:
        return any(a <= rip < a + PMD_SPAN for a in areas)

    threads = client.threads()
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        for thread in threads:
            if thread not in seen:
                regs = client.read_registers(thread=thread, wide=False)
                if quiescent(regs["cs"], regs["rip"], ours=ours, read=client.read_memory):
                    seen.add(thread)
        inside = [rip for rip in vcpu_rips(client) if ours(rip)]
        if len(seen) == len(threads) and not inside:
            return
        if time.monotonic() > deadline:
            raise KprobeError(
                f"{len(threads) - len(seen)} vCPU(s) not seen quiescent, {len(inside)}"
                " inside the slot area: not unmapping it"
            )
        client.cont()
        time.sleep(0.02)
        client.interrupt()


def _mark_undone(journal: Path, report: RecoveryReport) -> None:
    with journal.open("a", encoding="utf-8") as f:
        for entry in [*report.restored, *report.already]:
            f.write(json.dumps({"op": "undone", "seq": entry.seq}) + "\n")
        if report.ok:
            f.write(json.dumps({"op": "close", "clean": True, "by": "recover"}) + "\n")
