"""MiSession: a real gdb on a gdbstub, spoken to over GDB/MI (the gdb/MI adapters' base).

pygdbmi starts gdb and parses its records, but its ``write()`` waits 0.2 s after gdb's
last output by default. We never let it wait: commands go straight to gdb's stdin with
a token, and we select() on gdb's stdout ourselves until the result record that carries
the token. ``*stopped`` records read on the way are kept for the stop methods; until one
of them takes a record, ``running`` stays true (the engine's trap thread looks at both).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from kprobevm.closing import Closing
from kprobevm.errors import (
    GdbConnectionClosed,
    GdbError,
    GdbErrorReply,
    GdbProtocolError,
    GdbTimeout,
)
from kprobevm.gdbstub.memory import EFAULT
from kprobevm.gdbstub.packet import BreakpointKind, StopReply, WatchHit
from kprobevm.gdbstub.transport import GdbAddress

__all__ = ["BASE_SETTINGS", "DEFAULT_TIMEOUT", "MiSession", "MiStats", "Record"]

Record = dict[str, Any]
"""One parsed MI output record (pygdbmi's shape)."""

DEFAULT_TIMEOUT = 10.0
BASE_SETTINGS = ("pagination off", "confirm off", "mi-async on", "architecture i386:x86-64")
"""What any scripted gdb on a QEMU gdbstub sets (mi-async: without it gdb reads no
command while the target runs, so ``-exec-interrupt`` would never be seen)."""
_SIGNALS = {"SIGTRAP": 5, "SIGINT": 2, "0": 0}
_EXITS = ("exited", "exited-normally", "exited-signalled")
_WATCH_FLAGS = {BreakpointKind.WRITE_WATCH: "", BreakpointKind.READ_WATCH: " -r",
                BreakpointKind.ACCESS_WATCH: " -a"}
_WATCH_TYPES = {1: "char", 2: "short", 4: "int", 8: "long"}


@dataclass
class MiStats:
    """Counters for the conversation (mutable: the session updates them)."""

    commands: int = 0
    raw_packets: int = 0
    stops: int = 0


class MiSession(Closing):
    """gdb connected to a gdbstub: MI commands, raw packets, and its stop records."""

    settings: Sequence[str] = BASE_SETTINGS
    """What ``-gdb-set`` sets before connecting, unless the caller says otherwise."""

    def __init__(
        self,
        address: GdbAddress,
        *,
        gdb: str = "gdb",
        timeout: float = DEFAULT_TIMEOUT,
        settings: Sequence[str] | None = None,
    ) -> None:
        from pygdbmi.gdbcontroller import GdbController

        self.timeout = timeout
        self.stats = MiStats()
        self.running = False
        self.last_stop: StopReply | None = None
        self._events: deque[Record] = deque()
        """``*stopped`` records read but not yet handed out."""
        self._tokens = itertools.count(1)
        self._buf = b""
        self._closed = False
        self._names: list[str] = []
        """Register names by gdb register number ("" for a gap in the numbering)."""
        self._gdb_num: dict[str, int] = {}
        self._process = GdbController(
            command=[gdb, "--nx", "--quiet", "--interpreter=mi3"],
            time_to_check_for_additional_output_sec=0,
        )
        proc = self._process.gdb_process
        assert proc is not None and proc.stdout is not None and proc.stdin is not None
        self._stdin = proc.stdin
        self._fd = proc.stdout.fileno()
        try:
            self._setup(address, self.settings if settings is None else settings)
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, address: GdbAddress, timeout: float = DEFAULT_TIMEOUT, *,
                gdb: str = "gdb", settings: Sequence[str] | None = None) -> Self:
        """Start gdb and connect it to the gdbstub (this stops a running VM, as QEMU does
        for any client)."""
        return cls(address, gdb=gdb, timeout=timeout, settings=settings)

    def _setup(self, address: GdbAddress, settings: Sequence[str]) -> None:
        """Apply ``settings``, connect, and learn the register names."""
        for setting in settings:
            self.command(f"-gdb-set {setting}")
        where = (f"{address[0]}:{address[1]}" if isinstance(address, tuple)
                 else os.fspath(Path(address)))
        self.command(f"-target-select remote {where}")
        self.running = False  # connecting stopped the VM
        self._events.clear()
        self._names = list(self.command("-data-list-register-names")["register-names"])
        self._gdb_num = {name: i for i, name in enumerate(self._names) if name}

    # -- MI plumbing -----------------------------------------------------------------------

    def fileno(self) -> int:
        """gdb's stdout pipe, to select() on (after :attr:`stop_buffered`)."""
        return self._fd

    @property
    def stop_buffered(self) -> bool:
        """True when ``*stopped`` records were read and not yet taken: select() on
        :meth:`fileno` would not wake for them, so :meth:`poll_stop` first."""
        return bool(self._events)

    def _records(self, deadline: float | None, what: str, *, wait: bool = True) -> list[Record]:
        """Parse every complete line gdb wrote; with ``wait``, block until there is one
        (or ``deadline`` passes: GdbTimeout)."""
        from pygdbmi.gdbmiparser import parse_response

        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._fd], [], [], left if wait else 0.0)
            if not ready:
                if not wait:
                    return []
                raise GdbTimeout(f"gdb did not answer {what!r} in time", sent=what.encode())
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            if not data:
                self._closed = True
                raise GdbConnectionClosed("gdb exited", sent=what.encode())
            self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        out: list[Record] = []
        for line in lines:
            text = line.decode("utf-8", "replace").rstrip("\r")
            if text and text != "(gdb) ":
                out.append(parse_response(text))
        return out

    def drain(self) -> None:
        """Read what gdb has written so far, without waiting: a script whose breakpoints
        continue by themselves must call it while the VM runs, or gdb blocks on a full
        stdout pipe (a few records per hit) and the VM stays stopped."""
        while True:
            records = self._records(None, "drain", wait=False)
            if not records:
                return
            for rec in records:
                self._note(rec)

    def _note(self, rec: Record) -> None:
        """Keep a record read on the way if it is a ``*stopped``; others are dropped."""
        if rec.get("type") == "notify" and rec.get("message") == "stopped":
            self._events.append(rec)

    def command(self, cmd: str, timeout: float | None = None,
                console: list[str] | None = None) -> dict[str, Any]:
        """Run one MI command; its ``^done``/``^running`` payload (``^error`` raises)."""
        if self._closed:
            raise GdbConnectionClosed("gdb is closed", sent=cmd.encode())
        token = next(self._tokens)
        self.stats.commands += 1
        try:
            self._stdin.write(f"{token}{cmd}\n".encode())
            self._stdin.flush()
        except OSError as exc:
            self._closed = True
            raise GdbConnectionClosed(f"gdb stopped reading: {exc}", sent=cmd.encode()) from exc
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            records = self._records(deadline, cmd)
            while records:
                rec = records.pop(0)
                kind = rec.get("type")
                if kind == "result" and rec.get("token") == token:
                    for later in records:  # read in the same chunk: keep the stops
                        self._note(later)
                    if rec.get("message") == "error":
                        msg = str((rec.get("payload") or {}).get("msg", ""))
                        raise _mi_error(cmd, msg)
                    payload = rec.get("payload")
                    return payload if isinstance(payload, dict) else {}
                if kind == "console" and console is not None:
                    console.append(str(rec.get("payload") or ""))
                else:
                    self._note(rec)

    def console(self, cli: str) -> str:
        """A CLI command through ``-interpreter-exec console``; its console output."""
        out: list[str] = []
        self.command(f'-interpreter-exec console "{cli}"', console=out)
        return "".join(out)

    def packet(self, payload: bytes) -> bytes:
        """One raw packet with ``maint packet``; the stub's reply (``Exx`` included)."""
        self.stats.raw_packets += 1
        text = self.console("maint packet " + payload.decode("ascii"))
        for line in text.splitlines():
            if line.startswith("received: "):
                return _unquote(line[len("received: "):])
        raise GdbProtocolError("gdb printed no reply to maint packet", sent=payload,
                               received=text.encode())

    # -- registers, memory, breakpoints ----------------------------------------------------

    def _register_values(self, res: dict[str, Any]) -> dict[str, int]:
        """The values of a ``-data-list-register-values x`` result, by register name."""
        out: dict[str, int] = {}
        for item in res.get("register-values", []):
            num = int(item["number"])
            name = self._names[num] if num < len(self._names) else ""
            value = item.get("value", "")
            if name and isinstance(value, str) and value.startswith("0x"):
                out[name] = int(value, 16)
        return out

    def _register_number(self, name: str) -> int:
        """gdb's number for a register name (a GdbError if gdb has none)."""
        try:
            return self._gdb_num[name]
        except KeyError:
            raise GdbError(f"gdb has no register {name!r}") from None

    def _read_memory_bytes(self, addr: int, n: int, where: str = "") -> bytes:
        """``n`` bytes at ``addr`` (``where``: a ``--thread`` option); what gdb cannot
        read is an ``E0e`` as from the stub."""
        if n <= 0:
            return b""
        res = self.command(f"-data-read-memory-bytes{where} {addr:#x} {n}")
        out = bytearray()
        for block in res.get("memory", []):
            if int(block["begin"], 16) != addr + len(out):
                break
            out += bytes.fromhex(block["contents"])
        if len(out) < n:
            raise GdbErrorReply(EFAULT, sent=f"-data-read-memory-bytes {addr:#x} {n}".encode(),
                                received=bytes(out[:64]))
        return bytes(out[:n])

    def _write_memory_bytes(self, addr: int, data: bytes, where: str = "") -> None:
        """Write ``data`` at ``addr`` (``where``: a ``--thread`` option)."""
        if data:
            self.command(f"-data-write-memory-bytes{where} {addr:#x} {data.hex()}")

    def _insert(self, kind: BreakpointKind, addr: int, length: int, *,
                write_flag: str = "") -> dict[str, Any]:
        """``-break-insert`` or ``-break-watch`` for a ``Z`` kind; gdb's result.

        ``write_flag`` is the ``-break-watch`` option a write watchpoint gets ("": gdb's
        own ``watch``, which ignores a store that leaves the value unchanged).
        """
        if kind in (BreakpointKind.SOFTWARE, BreakpointKind.HARDWARE):
            hw = " -h" if kind is BreakpointKind.HARDWARE else ""
            return self.command(f"-break-insert{hw} *{addr:#x}")
        flag = write_flag if kind is BreakpointKind.WRITE_WATCH else _WATCH_FLAGS[kind]
        size = _WATCH_TYPES.get(length, "char")
        return self.command(f'-break-watch{flag} "*({size} *){addr:#x}"')

    # -- run control -----------------------------------------------------------------------

    def _resume(self, cmd: str) -> None:
        """Run a resuming command (``-exec-continue``, a step): the target runs."""
        self.command(cmd)
        self.running = True

    def interrupt(self, *, wait: bool = True, timeout: float | None = None) -> StopReply | None:
        """Stop a running target; a stop that raced the interrupt is returned instead."""
        if not self.running:
            return None
        self.drain()
        if not self._events:
            # an error means gdb already saw the target stop: its *stopped is on the way
            with contextlib.suppress(GdbProtocolError):
                self.command("-exec-interrupt")
        if not wait:
            return None
        return self.wait_stop(timeout if timeout is not None else self.timeout)

    def poll_stop(self) -> StopReply | None:
        """A stop if one has arrived, without blocking."""
        if not self.running:
            return None
        self.drain()
        return self._take_stop() if self._events else None

    def wait_stop(self, timeout: float | None = None) -> StopReply:
        """Block until the target stops."""
        if not self.running:
            raise GdbError("wait_stop: the target is stopped and no stop is queued")
        return self.next_stop(timeout)

    def next_stop(self, timeout: float | None) -> StopReply:
        """The next ``*stopped`` gdb reports, whatever ``running`` says (for scripts whose
        breakpoints stop and continue by themselves); None waits forever."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._events:
            for rec in self._records(deadline, "wait for *stopped"):
                self._note(rec)
        return self._take_stop()

    def _take_stop(self) -> StopReply:
        """The oldest ``*stopped`` record as a stop reply: the target is stopped."""
        stop = self._stop_from_mi(self._events.popleft().get("payload") or {})
        self.running = False
        self.last_stop = stop
        self.stats.stops += 1
        return stop

    def _stop_from_mi(self, payload: dict[str, Any]) -> StopReply:
        """A ``*stopped`` record as a stop reply (thread: gdb's thread number)."""
        thread = str(payload.get("thread-id", ""))
        return stop_reply(payload, thread or None)

    # -- lifetime --------------------------------------------------------------------------

    def detach(self) -> None:
        """Let the VM run on without gdb (``-target-detach``), then close."""
        try:
            if self.running:
                self.interrupt()
            self.command("-target-detach")
        finally:
            self.close()

    def close(self) -> None:
        """End gdb (the stub sees its client go; a stopped VM stays stopped)."""
        if self._closed:
            return
        self._closed = True
        self._process.exit()

    @property
    def closed(self) -> bool:
        """True once gdb is gone (closed by us, or it exited)."""
        return self._closed


def stop_reply(payload: dict[str, Any], thread: str | None,
               watch: WatchHit | None = None) -> StopReply:
    """A ``*stopped`` record's payload as the stop reply the stub sent gdb."""
    reason = str(payload.get("reason", ""))
    if reason in _EXITS:
        code = payload.get("exit-code")
        return StopReply("W", exit_status=int(str(code), 8) if code else 0)
    signal = _SIGNALS.get(str(payload.get("signal-name", "")), 5)
    info = tuple((k, str(v)) for k, v in payload.items() if isinstance(v, str))
    return StopReply("T", signal=signal, thread=thread, watch=watch,
                     swbreak=reason == "breakpoint-hit", info=info)


def _unquote(text: str) -> bytes:
    """The packet gdb printed between quotes, with its ``\\xNN`` and ``\\c`` escapes undone."""
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1]
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            if text[i + 1] == "x" and i + 3 < len(text):
                out.append(int(text[i + 2:i + 4], 16))
                i += 4
                continue
            out += text[i + 1].encode()
            i += 2
            continue
        out += c.encode("latin-1", "replace")
        i += 1
    return bytes(out)


def _mi_error(cmd: str, msg: str) -> GdbError:
    """An ``^error`` as the error the stub's reply would be (``E0e`` for memory)."""
    if "Cannot access memory" in msg or "Unable to read memory" in msg:
        return GdbErrorReply(EFAULT, sent=cmd.encode(), received=msg.encode())
    return GdbProtocolError(f"gdb refused: {msg}", sent=cmd.encode(), received=msg.encode())
