"""The gdb/MI adapters: a real gdb driven through pygdbmi, against a paused BIOS-only QEMU."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from kprobevm.errors import GdbErrorReply
from kprobevm.gdbstub.client import BreakpointKind, GdbClient
from kprobevm.gdbstub.gdbmi import GdbMiTransport
from kprobevm.gdbstub.gdbmi_client import GdbMiClient
from tests.test_gdb_client import paused_qemu, qemu_binary, qemu_sock  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb not installed")


@pytest.mark.vm
def test_gdbmi_matches_our_client(qemu_sock: Path) -> None:  # noqa: F811
    with GdbClient.connect(qemu_sock) as c:
        ours = c.read_registers()
        c.write_memory(0x30000, b"gdb/mi sees this")
    with GdbMiTransport(qemu_sock, timeout=10.0) as mi:
        regs = mi.read_registers()
        for name in ("rip", "rax", "rdx", "cr0"):
            assert regs[name] == ours[name], name
        assert mi.read_memory(0x30000, 16) == b"gdb/mi sees this"
        mi.write_memory(0x30000, b"GDB")
        assert mi.read_memory(0x30000, 6) == b"GDB/mi"
        with pytest.raises(GdbErrorReply):
            mi.read_memory(0x10000000, 8)
        mi.insert_breakpoint(BreakpointKind.HARDWARE, 0xFFFF0)
        mi.remove_breakpoint(BreakpointKind.HARDWARE, 0xFFFF0)
        t0 = time.perf_counter()
        for _ in range(5):
            mi.read_register("rip")
        assert time.perf_counter() - t0 < 0.95  # five of pygdbmi's 0.2 s lingers would be 1 s
        mi.cont()
        stop = mi.interrupt()
        assert stop is not None and not mi.running


@pytest.mark.vm
def test_gdbmi_client_steps_one_vcpu(qemu_binary: str, tmp_path: Path) -> None:  # noqa: F811
    # A QEMU of its own: a vCPU that ran may sit in hlt, and a halted vCPU never steps.
    with paused_qemu(qemu_binary, tmp_path) as sock, GdbMiClient(sock, timeout=10.0) as mi:
        assert mi.threads() == ["p01.01", "p01.02"]
        assert mi.read_registers("p01.01", wide=False)["rip"] == 0xFFF0
        ap = mi.read_register("rip", thread="p01.02")
        stop = mi.step("p01.01")
        assert stop is not None and stop.thread == "p01.01" and not mi.running
        assert mi.read_register("rip", thread="p01.01") != 0xFFF0  # the far jump ran
        assert mi.read_register("rip", thread="p01.02") == ap  # the other vCPU did not
        mi.write_memory(0x30000, b"phys")
        assert mi.read_phys(0x30000, 4) == b"phys"
        mi.cont()
        assert mi.poll_stop() is None
        stop = mi.interrupt()
        assert stop is not None and stop.signal == 2 and not mi.running
