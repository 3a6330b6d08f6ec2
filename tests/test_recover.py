"""A host killed with probes armed leaves a guest that runs on; ``recover`` restores it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kprobevm import cli
from kprobevm.errors import JournalError, VMLost
from kprobevm.gdbstub.client import GdbClient
from kprobevm.guest.console import kernel_trouble
from kprobevm.guest.image import default_image, kernel_package_image
from kprobevm.guest.launcher import boot
from kprobevm.guest.qemu_builds import fetch_qemu
from kprobevm.guest.vm import VM
from kprobevm.kernel.kallsyms import KernelSymbols
from kprobevm.kprobes.journal import Journal, pending_writes
from kprobevm.kprobes.kretprobes import Kretprobe, KretprobeInstance, KretprobeManager
from kprobevm.kprobes.recover import recover
from tests.fakestub import QemuLike, serve_on_unix_socket

# The host that gets killed: attaches to the guest, arms a probe on a hot function.
CHILD = r"""
import sys, time
from pathlib import Path
import kprobevm
from kprobevm.kprobes.core import Kprobe
gdb, kallsyms, cmdline, vmlinux, journal = sys.argv[1:6]
vm = kprobevm.attach(gdb=gdb, kallsyms=kallsyms, kernel_cmdline=cmdline, vmlinux=vmlinux)
vm.journal_path = Path(journal)
kp = Kprobe(symbol_name="do_sys_openat2", pre_handler=lambda kp, regs: None)
vm.register_kprobe(kp)
print("armed", vm.trap_channel, flush=True)
while True:
    time.sleep(0.2)
    print("hits", kp.nhit, flush=True)
"""


def _read_text(gdb: str, addr: int, size: int, idt_gate: int) -> tuple[bytes, bytes]:
    client = GdbClient.connect(gdb)
    try:
        return client.read_memory(addr, size), client.read_memory(idt_gate, 16)
    finally:
        client.detach()


def _probe_facts(vm: VM, tmp_path: Path) -> tuple[str, Path, int, int, int]:
    """The gdbstub path, a kallsyms file for the child, do_sys_openat2 (address, size)
    and the address of the #BP IDT gate: what both tests compare before and after."""
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text(vm.read_file("/proc/kallsyms"))
    syms = KernelSymbols.from_file(kallsyms)
    gdb = vm.endpoints.gdb
    assert isinstance(gdb, str)
    func = syms["do_sys_openat2"]
    return gdb, kallsyms, func, syms.size("do_sys_openat2"), syms["idt_table"] + 3 * 16


def _trouble(log: str) -> list[str]:
    return kernel_trouble(log)


GUESTS = {
    "system": ("system", None),
    "bookworm-backports": ("bookworm-backports", None),
    "6.12-cloud": ("system", "linux-image-6.12-cloud-amd64"),
}
"""(QEMU, kernel package) of each guest the SIGKILL test runs on: the host's QEMU (as
boot() resolves it) and QEMU 10.0 fetched into the cache, on the default kernel; the
host's QEMU on Debian's 6.12 cloud kernel (IBT, CALL_PADDING)."""


def sigkill_mid_hits(vm: VM, gdb: str, kallsyms: Path, vmlinux: Path, journal: Path, *,
                     workload: str, hits: int) -> None:
    """Start a host (:data:`CHILD`) that arms a probe on do_sys_openat2, start
    ``workload`` in the guest, and SIGKILL that host in the middle of its hits, once it
    has handled ``hits`` of them."""
    cmdline = vm.read_file("/proc/cmdline").strip()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, gdb, str(kallsyms), cmdline, str(vmlinux), str(journal)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.startswith("armed watchpoint"), line
        vm.run(workload)
        handled = 0
        while handled < hits:
            handled = int(child.stdout.readline().split()[1])
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()


@pytest.fixture(params=sorted(GUESTS))
def guest(request: pytest.FixtureRequest) -> tuple[str | None, str | None]:
    """The QEMU binary (None: as boot() resolves it) and kernel package (None: the default)."""
    qemu, package = GUESTS[request.param]
    return (None if qemu == "system" else str(fetch_qemu(qemu).binary)), package


@pytest.mark.vm
def test_sigkill_with_armed_probe_then_recover(
    tmp_path: Path, guest: tuple[str | None, str | None]
) -> None:
    qemu, package = guest
    image = default_image() if package is None else kernel_package_image(package)
    with boot(name="recover", qemu=qemu, kernel_package=package) as vm:
        gdb, kallsyms, func, size, gate = _probe_facts(vm, tmp_path)
        text_before, gate_before = _read_text(gdb, func, size, gate)
        assert text_before[0] != 0xCC

        journal = tmp_path / "session.journal"
        sigkill_mid_hits(
            vm, gdb, kallsyms, image.vmlinux, journal, hits=50,
            workload="(for i in $(seq 1500); do cat /proc/version; done >/tmp/out;"
                     " echo done >/tmp/fin) >/dev/null 2>&1 &",
        )  # fmt: skip

        # Nobody handles the probe now: the guest must run the workload to the end.
        deadline = time.monotonic() + 120
        while vm.run("cat /tmp/fin 2>/dev/null").stdout.strip() != "done":
            assert time.monotonic() < deadline, "guest workload stalled after the host died"
            time.sleep(0.5)
        assert vm.run("wc -l </tmp/out").stdout.strip() == "1500"
        assert _trouble(vm.serial_log()) == []

        # The orphaned probe is still in the text (that is what made this a real test).
        orphan, _ = _read_text(gdb, func + 5, 1, gate)  # past the ftrace NOP
        assert orphan == b"\xcc"

        # a recovery killed while it holds the VM stopped leaves it running (its watchdog)
        killed = subprocess.run(
            [sys.executable, "-m", "kprobevm.cli", "recover", str(journal)],
            env=os.environ | {"KPROBEVM_KILL_POINT": "recover_restore"}, timeout=60,
        )  # fmt: skip
        assert killed.returncode == -signal.SIGKILL
        assert vm.run("cat /proc/version", timeout=30).stdout.startswith("Linux version")

        report = recover(journal)
        assert report.ok, report.summary()
        whats = " ".join(e.what for e in report.restored)
        assert "int3" in whats and "IDT" in whats and "PMD" in whats

        text_after, gate_after = _read_text(gdb, func, size, gate)
        assert text_after == text_before
        assert gate_after == gate_before
        assert vm.run("for i in $(seq 50); do cat /proc/version; done | wc -l").stdout.strip() \
            == "50"
        assert _trouble(vm.serial_log()) == []
        # a second recovery finds nothing left to do
        assert recover(journal).restored == []


# A host that places a probe, then either waits for SIGTERM or just ends without close().
ENDING = r"""
import sys, time
from pathlib import Path
import kprobevm
from kprobevm.kprobes.core import Kprobe
gdb, kallsyms, cmdline, vmlinux, journal, how = sys.argv[1:7]
vm = kprobevm.attach(gdb=gdb, kallsyms=kallsyms, kernel_cmdline=cmdline, vmlinux=vmlinux)
vm.journal_path = Path(journal)
vm.register_kprobe(Kprobe(symbol_name="do_sys_openat2", pre_handler=lambda kp, regs: None))
print("armed", flush=True)
if how == "sigterm":
    while True:
        time.sleep(0.1)
"""


@pytest.mark.vm
@pytest.mark.parametrize("how", ["sigterm", "exit"])
def test_sigterm_and_plain_exit_restore_the_guest(tmp_path: Path, how: str) -> None:
    from kprobevm.kprobes.journal import pending_writes

    image = default_image()
    with boot(name=f"ending-{how}") as vm:
        gdb, kallsyms, func, size, gate = _probe_facts(vm, tmp_path)
        before = _read_text(gdb, func, size, gate)
        journal = tmp_path / "j"
        child = subprocess.Popen(
            [sys.executable, "-c", ENDING, gdb, str(kallsyms),
             vm.read_file("/proc/cmdline").strip(), str(image.vmlinux), str(journal), how],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "armed"
        assert len(pending_writes(journal)) >= 3  # int3, IDT gate, PMD: really armed
        if how == "sigterm":
            child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == (128 + signal.SIGTERM if how == "sigterm" else 0)
        assert _read_text(gdb, func, size, gate) == before
        assert pending_writes(journal) == []
        assert vm.run("cat /proc/version >/dev/null; echo ok").stdout.strip() == "ok"
        assert _trouble(vm.serial_log()) == []


def test_a_byte_the_guest_changed_is_left_alone_and_recover_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The conflict path, on a fake stub: the guest holds neither the old nor the new
    byte, so recovery reports it, writes nothing there, and the CLI exits 2."""
    target = QemuLike()
    target.ram[0x1000] = 0x90  # guest address 0x2000
    sock = tmp_path / "g.sock"
    serve_on_unix_socket(target, sock)
    journal = tmp_path / "dead.journal"
    dead = Journal(journal, gdb=str(sock))
    dead.record("virt", 0x2000, b"\x0f", b"\xcc", "int3 f")
    dead.record("virt", 0x2001, b"\x00", b"\xcc", "int3 g")  # this one is still ours
    dead._file.close()  # killed: no close record
    target.ram[0x1001] = 0xCC
    code = cli.main(["recover", str(journal)])
    out = capsys.readouterr().out
    assert code == cli.EXIT_VM == 2, out
    assert "restored 1, already restored 0, conflicts 1" in out
    assert "left alone: int3 f at 0x2000: expected cc or 0f, found 90" in out
    assert target.ram[0x1000:0x1002] == b"\x90\x00"
    assert [e.what for e in pending_writes(journal)] == ["int3 f"]
    with pytest.raises(JournalError, match="kprobevm recover"):
        Journal(journal)  # no new session over the byte left pending


def _dead_session(tmp_path: Path, target: QemuLike) -> Path:
    """A journal of a killed session on a fake stub: one int3 still in (at 0x2000)."""
    sock = tmp_path / "g.sock"
    serve_on_unix_socket(target, sock)
    journal = tmp_path / "dead.journal"
    dead = Journal(journal, gdb=str(sock))
    target.ram[0x1000] = 0xCC
    dead.record("virt", 0x2000, b"\x0f", b"\xcc", "int3 f")
    return journal


def test_returns_in_flight_get_their_address_and_keep_their_entry(tmp_path: Path) -> None:
    """A vCPU stopped inside the trampoline still looks for its entry: recovery puts
    each pending return address back on its stack and leaves the table alone (the
    first entry for a slot is the trampoline's: a later one is a call that never came
    back, and the slot holds the trampoline no more once the first is given back)."""
    import struct

    target = QemuLike()
    trampoline, table, slot, other = 0xFFFFFFFFC0001000, 0x8000, 0x3000, 0x3008
    journal = _dead_session(tmp_path, target)
    entries = struct.pack("<QQQQQQ", slot, 0xAAAA, other, 0xBBBB, slot, 0xDEAD)
    target.ram[table - 0x1000:table - 0x1000 + len(entries)] = entries
    for addr in (slot, other):
        target.ram[addr - 0x1000:addr - 0x1000 + 8] = struct.pack("<Q", trampoline)
    with journal.open("a") as f:
        f.write(f'{{"op":"note","kretprobe_table":{table},"trampoline":{trampoline}}}\n')
    report = recover(journal)
    assert report.ok and report.returns_restored == 2
    assert target.ram[slot - 0x1000:slot - 0x1000 + 8] == struct.pack("<Q", 0xAAAA)
    assert target.ram[other - 0x1000:other - 0x1000 + 8] == struct.pack("<Q", 0xBBBB)
    assert target.ram[table - 0x1000:table - 0x1000 + len(entries)] == entries


def test_the_slot_area_is_unmapped_only_once_every_vcpu_was_seen_quiescent(
    tmp_path: Path,
) -> None:
    """A vCPU in kernel mode outside the slot area may be in an interrupt handler that
    returns into a slot: the PMD entry goes only after each vCPU was seen in user mode."""
    target = QemuLike()
    journal = _dead_session(tmp_path, target)
    pmd, mapped = 0x9000, bytes.fromhex("2300001f00000000")
    target.ram[pmd - 0x1000:pmd - 0x1000 + 8] = mapped
    with journal.open("a") as f:
        f.write(json.dumps({"op": "write", "seq": 9, "space": "phys", "addr": pmd,
                            "old": "00" * 8, "new": mapped.hex(),
                            "what": "PMD for slot area 0xffffffffc0000000"}) + "\n")
    conts: list[int] = []
    unmapped_after: list[int] = []

    def cont(p: bytes) -> None:
        conts.append(1)
        if len(conts) >= 3:
            target.regs[4] = 0x33  # cs: user mode from now on
        target.running = target.allow_stop_reply = True

    def write_pmd(p: bytes) -> bytes | list[bytes] | None:
        unmapped_after.append(len(conts))
        del target.hooks[b"M9000,"]
        return target(p)

    target.hooks.update({b"c": cont, b"vCont;c": cont, b"M9000,": write_pmd})
    report = recover(journal)
    assert report.ok, report.summary()
    assert unmapped_after == [3]
    assert target.ram[pmd - 0x1000:pmd - 0x1000 + 8] == bytes(8)


class _Stack:
    """Guest memory as a dict of u64 words: the stack slots and the instance table."""

    def __init__(self, words: dict[int, int]) -> None:
        self.words = words
        self.writes: list[int] = []

    def u64(self, addr: int) -> int:
        return self.words[addr]

    def write(self, addr: int, data: bytes) -> None:
        self.writes.append(addr)
        self.words[addr] = int.from_bytes(data[:8], "little")


def test_giving_returns_back_leaves_the_guest_table_to_the_trampoline() -> None:
    """A vCPU stopped inside the trampoline, past its ``ret``, still looks for its
    entry: closing gives the return address back on the stack and clears no entry."""
    trampoline, table, slot = 0xFFFFFFFFC0001000, 0xFFFFFFFFC0002000, 0xFFFFC90000003FF8
    memory = _Stack({slot: trampoline, table: slot, table + 8: 0xFFFFFFFF81234567})
    returns = KretprobeManager(
        SimpleNamespace(), symbols=SimpleNamespace(), target=SimpleNamespace(),  # type: ignore[arg-type]
        memory=memory, task_layout=lambda: None,  # type: ignore[arg-type]
    )  # fmt: skip
    returns.trampoline, returns.table = trampoline, table
    rp = Kretprobe(symbol_name="do_nanosleep")
    ri = KretprobeInstance(rp=rp, slot=slot, ret_addr=0xFFFFFFFF81234567, cpu=0,
                           data=bytearray(), index=0)  # fmt: skip
    returns.entries[0] = returns.by_slot[slot] = [ri]
    rp.active = 1
    assert returns.unhijack_all() == 1
    assert memory.words[slot] == 0xFFFFFFFF81234567
    assert memory.writes == [slot]
    assert memory.words[table] == slot and rp.active == 0 and not returns.by_slot


def test_a_torn_last_line_is_cut_before_recovery_writes_its_own(tmp_path: Path) -> None:
    """A session killed mid-line leaves half a record; recovery's records must not be
    glued to it, or the journal can be read by no one after (a second recover, the
    next session on the same path)."""
    target = QemuLike()
    journal = _dead_session(tmp_path, target)
    with journal.open("a") as f:
        f.write('{"op":"write","seq":2,"space":"virt","addr":8192')  # killed here
    report = recover(journal)
    assert report.ok and [e.what for e in report.restored] == ["int3 f"]
    assert pending_writes(journal) == []  # readable, and settled
    Journal(journal).close(clean=True)  # a new session starts on it


def test_recover_with_the_gdbstub_gone_says_so_in_the_tree(tmp_path: Path) -> None:
    """A journal whose QEMU has exited: with writes pending, VMLost says they went with
    the guest (a raw FileNotFoundError before); a journal its session settled when the
    guest went needs no gdbstub, and the summary says why there was nothing to do."""
    gone = str(tmp_path / "no-such-gdb.sock")
    pending = tmp_path / "pending.journal"
    j = Journal(pending, gdb=gone)
    j.record("virt", 0x1000, b"\x0f", b"\xcc", "int3 f")
    j.close(clean=False)
    with pytest.raises(VMLost, match="1 writes are pending"):
        recover(pending)
    assert len(pending_writes(pending)) == 1  # left for a recover that can reach it

    settled = tmp_path / "settled.journal"
    j = Journal(settled, gdb=gone)
    j.record("virt", 0x1000, b"\x0f", b"\xcc", "int3 f")
    j.close(clean=True, lost="vm1: the guest exited (W00, status 0)")
    report = recover(settled)
    assert report.ok and not report.restored
    assert "the session's guest is gone (vm1: the guest exited" in report.summary()
    assert cli.main(["recover", str(pending)]) == cli.EXIT_VM
