"""A host killed with probes armed leaves a guest that runs on; ``recover`` restores it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kprobevm import cli
from kprobevm.errors import JournalError
from kprobevm.gdbstub.client import GdbClient
from kprobevm.guest.image import default_image
from kprobevm.guest.launcher import boot
from kprobevm.guest.qemu_builds import fetch_qemu
from kprobevm.guest.vm import VM
from kprobevm.kernel.kallsyms import KernelSymbols
from kprobevm.kprobes.journal import Journal, pending_writes
from kprobevm.kprobes.recover import recover
from tests.fakestub import QemuLike, serve_on_unix_socket

TROUBLE = ("int3:", "Oops", "BUG:", "general protection", "Kernel panic")

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
    return [line for line in log.splitlines() if any(t in line for t in TROUBLE)]


@pytest.fixture(params=["system", "bookworm-backports"])
def qemu(request: pytest.FixtureRequest) -> str | None:
    """The host's QEMU (None: as boot() resolves it), and QEMU 10.0 fetched into the cache."""
    return None if request.param == "system" else str(fetch_qemu(request.param).binary)


@pytest.mark.vm
def test_sigkill_with_armed_probe_then_recover(tmp_path: Path, qemu: str | None) -> None:
    image = default_image()
    with boot(name="recover", qemu=qemu) as vm:
        gdb, kallsyms, func, size, gate = _probe_facts(vm, tmp_path)
        text_before, gate_before = _read_text(gdb, func, size, gate)
        assert text_before[0] != 0xCC

        journal = tmp_path / "session.journal"
        cmdline = vm.read_file("/proc/cmdline").strip()
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, gdb, str(kallsyms), cmdline, str(image.vmlinux),
             str(journal)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line.startswith("armed watchpoint"), line
            vm.run(
                "(for i in $(seq 1500); do cat /proc/version; done >/tmp/out;"
                " echo done >/tmp/fin) >/dev/null 2>&1 &"
            )
            # wait until the host has handled hits, then kill it in the middle of them
            hits = 0
            while hits < 50:
                hits = int(child.stdout.readline().split()[1])
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()

        # Nobody handles the probe now: the guest must run the workload to the end.
        deadline = time.monotonic() + 120
        while vm.run("cat /tmp/fin 2>/dev/null").stdout.strip() != "done":
            assert time.monotonic() < deadline, "guest workload stalled after the host died"
            time.sleep(0.5)
        assert vm.run("wc -l </tmp/out").stdout.strip() == "1500"
        assert _trouble(vm.serial_log()) == []

        # The orphaned probe is still in the text (that is what made this a real test).
        orphan, _ = _read_text(gdb, func, 1, gate)
        assert orphan == b"\xcc"

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
