"""GdbMiTransport: the same small interface as GdbClient, through a real gdb (pygdbmi).

This is what a user would do without kprobevm, and the benchmarks compare against it.
pygdbmi's ``write()`` waits 0.2 s after gdb's last output by default; we never let it
wait: commands go out with ``read_response=False``, and we select() on gdb's stdout
ourselves, collecting output with ``get_gdb_response(timeout_sec=0)`` until the result
record that carries our command's token.
"""

from __future__ import annotations

import itertools
import os
import select
import time
from pathlib import Path
from typing import Any

from kprobevm.closing import Closing
from kprobevm.errors import GdbError, GdbErrorReply, GdbProtocolError, GdbTimeout
from kprobevm.gdbstub.packet import BreakpointKind, StopReply
from kprobevm.gdbstub.transport import GdbAddress

__all__ = ["GdbMiTransport"]

Record = dict[str, Any]
_SIGNALS = {"SIGTRAP": 5, "SIGINT": 2, "0": 0}


class GdbMiTransport(Closing):
    """Drive ``gdb`` over GDB/MI: registers, memory, breakpoints, continue and stop."""

    def __init__(
        self,
        address: GdbAddress,
        *,
        gdb: str = "gdb",
        timeout: float = 10.0,
        architecture: str = "i386:x86-64",
    ) -> None:
        from pygdbmi.gdbcontroller import GdbController

        self.timeout = timeout
        self._tokens = itertools.count(1)
        self._async: list[Record] = []
        # time_to_check_for_additional_output_sec=0: never linger for more output.
        self._gdb = GdbController(
            command=[gdb, "--nx", "--quiet", "--interpreter=mi3"],
            time_to_check_for_additional_output_sec=0,
        )
        proc = self._gdb.gdb_process
        assert proc is not None and proc.stdout is not None
        self._stdout = proc.stdout
        self.running = False
        self._reg_names: list[str] = []
        try:
            self.command(f"-gdb-set architecture {architecture}")
            self.command("-gdb-set pagination off")
            self.command("-gdb-set confirm off")
            # Without mi-async gdb stops reading commands while the target runs, so
            # -exec-interrupt would never be seen.
            self.command("-gdb-set mi-async on")
            target = address if isinstance(address, tuple) else os.fspath(Path(address))
            where = f"{target[0]}:{target[1]}" if isinstance(target, tuple) else target
            self.command(f"-target-select remote {where}")
            names = self.command("-data-list-register-names")["register-names"]
            self._reg_names = list(names)
        except BaseException:
            self.close()
            raise

    # -- MI plumbing -------------------------------------------------------------------

    def command(self, cmd: str, timeout: float | None = None) -> dict[str, Any]:
        """Run one MI command; returns the payload of its ``^done``/``^running`` record."""
        token = next(self._tokens)
        self._gdb.write(f"{token}{cmd}", read_response=False)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for rec in self._read(deadline, cmd):
                if rec.get("type") == "result" and rec.get("token") == token:
                    if rec.get("message") == "error":
                        msg = (rec.get("payload") or {}).get("msg", "")
                        raise _mi_error(cmd, msg)
                    if rec.get("message") == "running":
                        self.running = True
                    payload = rec.get("payload")
                    return payload if isinstance(payload, dict) else {}
                self._note(rec)

    def _read(self, deadline: float | None, cmd: str = "") -> list[Record]:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([self._stdout], [], [], wait)
        if not ready:
            raise GdbTimeout(f"gdb did not answer {cmd!r} in time", sent=cmd.encode())
        out: list[Record] = self._gdb.get_gdb_response(timeout_sec=0, raise_error_on_timeout=False)
        return out

    def _note(self, rec: Record) -> None:
        if rec.get("type") == "notify" and rec.get("message") in ("stopped", "running"):
            self._async.append(rec)

    # -- registers and memory ----------------------------------------------------------

    def read_registers(self) -> dict[str, int]:
        """All registers as gdb reports them (hex), by name."""
        res = self.command("-data-list-register-values --skip-unavailable x")
        out: dict[str, int] = {}
        for item in res.get("register-values", []):
            num = int(item["number"])
            name = self._reg_names[num] if num < len(self._reg_names) else str(num)
            value = item.get("value", "")
            if name and isinstance(value, str) and value.startswith("0x"):
                out[name] = int(value, 16)
        return out

    def read_register(self, name: str) -> int:
        """One register by name."""
        num = self._reg_names.index(name)
        res = self.command(f"-data-list-register-values x {num}")
        return int(res["register-values"][0]["value"], 16)

    def read_memory(self, addr: int, n: int) -> bytes:
        """``n`` bytes at ``addr``."""
        res = self.command(f"-data-read-memory-bytes {addr:#x} {n}")
        out = bytearray()
        for block in res.get("memory", []):
            out += bytes.fromhex(block["contents"])
        if len(out) != n:
            raise GdbErrorReply(0x0E, sent=f"read {n} at {addr:#x}".encode(),
                                received=bytes(out[:64]))
        return bytes(out)

    def write_memory(self, addr: int, data: bytes) -> None:
        """Write ``data`` at ``addr``."""
        self.command(f"-data-write-memory-bytes {addr:#x} {data.hex()}")

    # -- breakpoints and execution -----------------------------------------------------

    def insert_breakpoint(self, kind: BreakpointKind | int, addr: int, length: int = 1) -> None:
        """A gdb breakpoint (software/hardware) or watchpoint at ``addr``."""
        kind = BreakpointKind(kind)
        if kind in (BreakpointKind.SOFTWARE, BreakpointKind.HARDWARE):
            hw = " -h" if kind is BreakpointKind.HARDWARE else ""
            self.command(f"-break-insert{hw} *{addr:#x}")
            return
        flag = {BreakpointKind.WRITE_WATCH: "", BreakpointKind.READ_WATCH: " -r",
                BreakpointKind.ACCESS_WATCH: " -a"}[kind]
        size = {1: "char", 2: "short", 4: "int", 8: "long"}.get(length, "char")
        self.command(f"-break-watch{flag} *({size} *){addr:#x}")

    def remove_breakpoint(self, kind: BreakpointKind | int, addr: int, length: int = 1) -> None:
        """Delete the breakpoint(s) gdb has at ``addr``."""
        table = self.command("-break-list").get("BreakpointTable", {}).get("body", [])
        numbers = [b["number"] for b in table
                   if int(b.get("addr", "0x0") if b.get("addr", "").startswith("0x") else "0", 16)
                   == addr or f"{addr:#x}" in b.get("what", "")]
        if not numbers:
            raise GdbError(f"no gdb breakpoint at {addr:#x}")
        self.command("-break-delete " + " ".join(numbers))

    def cont(self) -> None:
        """Resume all vCPUs."""
        self.command("-exec-continue")
        self.running = True

    def interrupt(self, *, wait: bool = True, timeout: float | None = None) -> StopReply | None:
        """Stop the target (only when it runs)."""
        if not self.running:
            return None
        self.command("-exec-interrupt")
        return self.wait_stop(timeout if timeout is not None else self.timeout) if wait else None

    def wait_stop(self, timeout: float | None = None) -> StopReply:
        """Block until gdb reports ``*stopped``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._async:
                rec = self._async.pop(0)
                if rec.get("message") == "stopped":
                    self.running = False
                    return _stop_from_mi(rec.get("payload") or {})
            for rec in self._read(deadline, "wait for *stopped"):
                self._note(rec)

    def close(self) -> None:
        """Detach-free exit: kill gdb (the stub sees the connection close)."""
        self._gdb.exit()


def _mi_error(cmd: str, msg: str) -> GdbError:
    if "Cannot access memory" in msg or "Unable to read memory" in msg:
        return GdbErrorReply(0x0E, sent=cmd.encode(), received=msg.encode())
    return GdbProtocolError(f"gdb refused: {msg}", sent=cmd.encode(), received=msg.encode())


def _stop_from_mi(payload: dict[str, Any]) -> StopReply:
    signal = _SIGNALS.get(str(payload.get("signal-name", "")))
    reason = str(payload.get("reason", ""))
    if signal is None and reason in ("breakpoint-hit", "watchpoint-trigger", "end-stepping-range"):
        signal = 5
    thread = payload.get("thread-id")
    info = tuple((k, str(v)) for k, v in payload.items() if isinstance(v, str))
    return StopReply("T", signal=signal, thread=str(thread) if thread else None,
                     swbreak=reason == "breakpoint-hit", info=info)
