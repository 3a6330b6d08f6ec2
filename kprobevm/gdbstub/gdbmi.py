"""GdbMiTransport: gdb as a user drives it over GDB/MI, for the benchmarks to compare with.

A plain gdb (:data:`~kprobevm.gdbstub.mi.BASE_SETTINGS`): registers, memory,
breakpoints and watchpoints as gdb's own commands set them, continue, interrupt and
stop. The plumbing is :class:`~kprobevm.gdbstub.mi.MiSession`'s, which never pays
pygdbmi's 0.2 s wait for more output.
"""

from __future__ import annotations

from kprobevm.errors import GdbError
from kprobevm.gdbstub.mi import MiSession
from kprobevm.gdbstub.packet import BreakpointKind

__all__ = ["GdbMiTransport"]


class GdbMiTransport(MiSession):
    """Drive ``gdb`` over GDB/MI: registers, memory, breakpoints, continue and stop."""

    def read_registers(self) -> dict[str, int]:
        """All registers as gdb reports them (hex), by name."""
        return self._register_values(
            self.command("-data-list-register-values --skip-unavailable x"))

    def read_register(self, name: str) -> int:
        """One register by name."""
        res = self.command(f"-data-list-register-values x {self._register_number(name)}")
        return int(res["register-values"][0]["value"], 16)

    def read_memory(self, addr: int, n: int) -> bytes:
        """``n`` bytes at ``addr``."""
        return self._read_memory_bytes(addr, n)

    def write_memory(self, addr: int, data: bytes) -> None:
        """Write ``data`` at ``addr``."""
        self._write_memory_bytes(addr, data)

    def insert_breakpoint(self, kind: BreakpointKind | int, addr: int, length: int = 1) -> None:
        """A gdb breakpoint (software/hardware) or watchpoint at ``addr``."""
        self._insert(BreakpointKind(kind), addr, length)

    def remove_breakpoint(self, kind: BreakpointKind | int, addr: int, length: int = 1) -> None:
        """Delete the breakpoint(s) gdb has at ``addr``."""
        del kind, length  # gdb's table says which ones are there
        table = self.command("-break-list").get("BreakpointTable", {}).get("body", [])
        numbers = [b["number"] for b in table
                   if int(b.get("addr", "0x0") if b.get("addr", "").startswith("0x") else "0", 16)
                   == addr or f"{addr:#x}" in b.get("what", "")]
        if not numbers:
            raise GdbError(f"no gdb breakpoint at {addr:#x}")
        self.command("-break-delete " + " ".join(numbers))

    def cont(self) -> None:
        """Resume all vCPUs."""
        self._resume("-exec-continue")
