"""GdbMiClient: the part of GdbClient the kprobes engine uses, spoken through a real gdb.

The benchmark runs the same engine with its gdbstub client swapped for this adapter, so
the difference measures the transport alone. Registers, memory, threads, breakpoints
and run control go through gdb/MI commands; raw packets the engine builds (``P``
register writes, ``M`` writes, QEMU's ``Qqemu.PhyMemMode``) go through ``maint packet``,
except ``P`` writes, which become one ``-data-write-register-values`` so gdb's register
cache stays true.

gdb quirks this adapter works around:

- gdb's ``watch`` ignores a store that leaves the value unchanged (the slot stores the
  same byte every hit), so a ``Z2`` request becomes an ``awatch``; QEMU then reports
  every access, and only the slot code touches the mailbox.
- gdb removes breakpoints at each stop unless ``breakpoint always-inserted`` is on.
- gdb caches code and stack memory; ``maint packet`` writes bypass it, so both caches
  are off.
- Stop records read while waiting for a command's result stay queued in ``_events``
  and ``running`` stays true until :meth:`poll_stop`/:meth:`wait_stop` takes them (the
  engine's trap thread looks at both, as it does with GdbClient).
"""

from __future__ import annotations

import binascii
import contextlib
import itertools
import os
import re
import select
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kprobevm.closing import Closing
from kprobevm.errors import (
    GdbConnectionClosed,
    GdbError,
    GdbErrorReply,
    GdbProtocolError,
    GdbTimeout,
)
from kprobevm.gdbstub.packet import (
    BreakpointKind,
    StopReply,
    WatchHit,
    check_replies,
    check_reply,
    join_memory_replies,
    memory_read_packets,
    memory_write_packets,
)
from kprobevm.gdbstub.transport import GdbAddress
from kprobevm.x86.constants import MASK64

__all__ = ["BASE_SETTINGS", "ENGINE_SETTINGS", "GdbMiClient", "MiStats"]

Record = dict[str, Any]

DEFAULT_TIMEOUT = 10.0
_CHUNK = 0x400
"""Bytes per raw ``m``/``M`` packet: QEMU drops a packet that fills its 4 KiB buffer."""
_NARROW = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs",
    "fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer",
)  # fmt: skip
"""What ``read_registers(wide=False)`` returns: no x87/xmm (as GdbClient)."""
BASE_SETTINGS = ("pagination off", "confirm off", "mi-async on", "architecture i386:x86-64")
"""What any scripted gdb on a QEMU gdbstub sets (mi-async: commands while it runs)."""
ENGINE_SETTINGS = (*BASE_SETTINGS, "breakpoint always-inserted on", "code-cache off",
                   "stack-cache off", "can-use-hw-watchpoints 1")
"""For the engine: see the module docstring."""
_SIGNALS = {"SIGTRAP": 5, "SIGINT": 2, "0": 0}
_WATCH_REASONS = {
    "watchpoint-trigger": "watch",
    "read-watchpoint-trigger": "rwatch",
    "access-watchpoint-trigger": "awatch",
}
_THREAD_TARGET_ID = re.compile(r"Thread (?:p)?([0-9a-fA-F]+)\.([0-9a-fA-F]+)")


@dataclass
class MiStats:
    """Counters for the conversation (mutable: the client updates them)."""

    commands: int = 0
    raw_packets: int = 0
    stops: int = 0


class GdbMiClient(Closing):
    """GdbClient's engine-facing interface over GDB/MI; :meth:`connect` makes one."""

    def __init__(
        self,
        address: GdbAddress,
        *,
        gdb: str = "gdb",
        timeout: float = DEFAULT_TIMEOUT,
        settings: Sequence[str] = ENGINE_SETTINGS,
    ) -> None:
        from pygdbmi.gdbcontroller import GdbController

        self.timeout = timeout
        self._settings = tuple(settings)
        self.stats = MiStats()
        self.running = False
        self.last_stop: StopReply | None = None
        self._stops: deque[StopReply] = deque()
        self._events: deque[Record] = deque()
        """``*stopped`` records read but not yet handed out."""
        self._tokens = itertools.count(1)
        self._buf = b""
        self._closed = False
        self._phys_mode = False
        self._gdb_num: dict[str, int] = {}
        self._remote_num: dict[int, int] = {}
        """Remote (``P`` packet) register number -> gdb register number."""
        self._names: list[str] = []
        self._threads: dict[str, str] = {}
        """gdb thread number -> RSP thread id (``p01.02``)."""
        self._watch: dict[str, tuple[str, int]] = {}
        """gdb breakpoint number -> (watch kind, address)."""
        self._breaks: dict[tuple[int, int], str] = {}
        """(kind, address) -> gdb breakpoint number."""
        self._process = GdbController(
            command=[gdb, "--nx", "--quiet", "--interpreter=mi3"],
            time_to_check_for_additional_output_sec=0,
        )
        proc = self._process.gdb_process
        assert proc is not None and proc.stdout is not None and proc.stdin is not None
        self._stdin = proc.stdin
        self._fd = proc.stdout.fileno()
        try:
            self._setup(address)
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, address: GdbAddress, timeout: float = DEFAULT_TIMEOUT,
                **kwargs: Any) -> GdbMiClient:
        """Start gdb and connect it to the gdbstub (this stops a running VM, as QEMU does
        for any client)."""
        return cls(address, timeout=timeout, **kwargs)

    def _setup(self, address: GdbAddress) -> None:
        for setting in self._settings:
            self.command(f"-gdb-set {setting}")
        where = (f"{address[0]}:{address[1]}" if isinstance(address, tuple)
                 else os.fspath(Path(address)))
        self.command(f"-target-select remote {where}")
        self.running = False  # connecting stopped the VM
        self._events.clear()
        self._names = list(self.command("-data-list-register-names")["register-names"])
        self._gdb_num = {name: i for i, name in enumerate(self._names) if name}
        self._remote_num = self._remote_register_numbers()
        self._refresh_threads()

    def _remote_register_numbers(self) -> dict[int, int]:
        """gdb's table of remote register numbers (``maint print remote-registers``)."""
        lines = self.console("maint print remote-registers").splitlines()
        header = next((ln for ln in lines if "Rmt Nr" in ln), None)
        if header is None:
            raise GdbProtocolError("gdb printed no remote register table")
        # values are right-aligned under the header's "Rmt Nr"
        end = header.index("Rmt Nr") + len("Rmt Nr")
        out: dict[int, int] = {}
        for line in lines:
            cols = line.split()
            if len(cols) < 2 or cols[0] not in self._gdb_num or not cols[1].isdigit():
                continue
            remote = line[:end].split()[-1]
            if remote.isdigit():
                out[int(remote)] = int(cols[1])
        return out

    # -- MI plumbing ----------------------------------------------------------------------

    def fileno(self) -> int:
        """gdb's stdout pipe, to select() on (call :meth:`poll_stop` first)."""
        return self._fd

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
        self._drain()

    def _drain(self) -> None:
        """Read what gdb has written so far, without waiting."""
        while True:
            records = self._records(None, "drain", wait=False)
            if not records:
                return
            for rec in records:
                self._note(rec)

    def _note(self, rec: Record) -> None:
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

    def pipeline(self, payloads: Sequence[bytes], *, window: int = 32) -> list[bytes]:
        """Replies to packets in order; ``P`` register writes go through gdb itself."""
        del window  # gdb sends one packet at a time
        replies: list[bytes] = []
        writes: list[tuple[int, int]] = []

        def flush() -> None:
            if writes:
                self._write_gdb_registers(writes)
                replies.extend(b"OK" for _ in writes)
                writes.clear()

        for payload in payloads:
            parsed = self._parse_p(payload)
            if parsed is not None:
                writes.append(parsed)
                continue
            flush()
            replies.append(self.packet(payload))
        flush()
        return replies

    def _parse_p(self, payload: bytes) -> tuple[int, int] | None:
        """``P<regnum>=<little-endian hex>`` -> (gdb register number, value)."""
        if payload[:1] != b"P" or b"=" not in payload:
            return None
        num, _, value = payload[1:].partition(b"=")
        gdb_num = self._remote_num.get(int(num, 16))
        if gdb_num is None:
            return None
        return gdb_num, int.from_bytes(binascii.unhexlify(value), "little")

    def _write_gdb_registers(self, writes: Sequence[tuple[int, int]]) -> None:
        pairs = " ".join(f"{num} {value:#x}" for num, value in writes)
        self.command(f"-data-write-register-values x {pairs}")

    # -- registers --------------------------------------------------------------------------

    def read_registers(self, thread: str | None = None, *, wide: bool = True) -> dict[str, int]:
        """Registers by gdb name (``wide=False``: general and system registers only)."""
        names = self._names if wide else [n for n in _NARROW if n in self._gdb_num]
        nums = "" if wide else " " + " ".join(str(self._gdb_num[n]) for n in names)
        res = self.command(f"-data-list-register-values{self._thread_opt(thread)}"
                           f" --skip-unavailable x{nums}")
        out: dict[str, int] = {}
        for item in res.get("register-values", []):
            num = int(item["number"])
            value = item.get("value", "")
            if num < len(self._names) and isinstance(value, str) and value.startswith("0x"):
                out[self._names[num]] = int(value, 16)
        return out

    def read_registers_along(
        self, packets: Sequence[bytes], thread: str | None = None, *, wide: bool = False
    ) -> tuple[dict[str, int], list[bytes]]:
        """:meth:`read_registers`, then ``packets`` in that thread (one command each: gdb
        has no pipelining); their replies as they are (``Exx`` included)."""
        if thread is not None:
            self.select_thread("g", thread)
        return self.read_registers(wide=wide), self.pipeline(packets)

    def read_register(self, name: str, thread: str | None = None) -> int:
        """One register by gdb name."""
        res = self.command(f"-data-list-register-values{self._thread_opt(thread)}"
                           f" x {self._register_number(name)}")
        return int(res["register-values"][0]["value"], 16)

    def write_register(self, name: str, value: int, thread: str | None = None) -> None:
        """Write one register through gdb."""
        self.command(f"-data-write-register-values{self._thread_opt(thread)}"
                     f" x {self._register_number(name)} {value:#x}")

    def write_registers(self, values: dict[str, int], thread: str | None = None) -> int:
        """Write several registers in one MI command; returns how many."""
        if values:
            pairs = " ".join(f"{self._register_number(n)} {v:#x}" for n, v in values.items())
            self.command(f"-data-write-register-values{self._thread_opt(thread)} x {pairs}")
        return len(values)

    def read_register_each(self, name: str, threads: Sequence[str]) -> dict[str, int]:
        """One register of each thread (one MI command each: gdb has no pipelining)."""
        return {t: self.read_register(name, thread=t) for t in threads}

    def register_write_packets(
        self, values: dict[str, int], thread: str | None = None
    ) -> list[bytes]:
        """``P`` packets (remote numbering) for :meth:`cont`'s ``before``.

        gdb applies them to its current thread: ``thread`` is selected now.
        """
        if thread is not None:
            self.select_thread("g", thread)
        by_gdb = {g: r for r, g in self._remote_num.items()}
        out = []
        for name, value in values.items():
            remote = by_gdb[self._register_number(name)]
            out.append(b"P%x=%s" % (remote, binascii.hexlify(
                (value & MASK64).to_bytes(8, "little"))))
        return out

    def _register_number(self, name: str) -> int:
        try:
            return self._gdb_num[name]
        except KeyError:
            raise GdbError(f"gdb has no register {name!r}") from None

    # -- memory ------------------------------------------------------------------------------

    def read_memory(self, addr: int, n: int, thread: str | None = None) -> bytes:
        """``n`` bytes of virtual memory through gdb (``-data-read-memory-bytes``)."""
        if n <= 0:
            return b""
        res = self.command(f"-data-read-memory-bytes{self._thread_opt(thread)} {addr:#x} {n}")
        out = bytearray()
        for block in res.get("memory", []):
            if int(block["begin"], 16) != addr + len(out):
                break
            out += bytes.fromhex(block["contents"])
        if len(out) < n:
            raise GdbErrorReply(0x0E, sent=f"-data-read-memory-bytes {addr:#x} {n}".encode(),
                                received=bytes(out[:64]))
        return bytes(out[:n])

    def write_memory(self, addr: int, data: bytes, thread: str | None = None) -> None:
        """Write virtual memory through gdb."""
        if data:
            self.command(f"-data-write-memory-bytes{self._thread_opt(thread)}"
                         f" {addr:#x} {data.hex()}")

    def memory_write_packets(self, addr: int, data: bytes) -> list[bytes]:
        """Raw ``M`` packets for ``data`` at ``addr`` (for :meth:`cont`'s ``before``)."""
        return memory_write_packets(addr, data, _CHUNK)

    def read_phys(self, addr: int, n: int) -> bytes:
        """Guest-physical memory: ``maint packet`` in QEMU's PhyMemMode, then back out."""
        packets = memory_read_packets(addr, n, _CHUNK)
        return join_memory_replies(packets, self._phys(packets))

    def write_phys(self, addr: int, data: bytes) -> None:
        """Write guest-physical memory."""
        packets = memory_write_packets(addr, data, _CHUNK)
        check_replies(packets, self._phys(packets))

    def _phys(self, packets: list[bytes]) -> list[bytes]:
        # gdb's own reads must never run in phys mode: switch on, run, switch off.
        self.set_phys_mode(True)
        try:
            return [self.packet(p) for p in packets]
        finally:
            self.set_phys_mode(False)

    def set_phys_mode(self, on: bool, *, force: bool = False) -> None:
        """``Qqemu.PhyMemMode`` through ``maint packet``."""
        if self._phys_mode == on and not force:
            return
        payload = b"Qqemu.PhyMemMode:%d" % int(on)
        check_reply(payload, self.packet(payload))
        self._phys_mode = on

    def mode_packets(self, phys: bool) -> list[bytes]:
        """Nothing to queue: outside :meth:`_phys` gdb's stub is never in phys mode."""
        if phys:
            raise GdbError("gdbmi transport: physical-mode packets cannot be queued")
        return []

    @property
    def phys_mode(self) -> bool:
        return self._phys_mode

    # -- threads -------------------------------------------------------------------------------

    def _refresh_threads(self) -> None:
        res = self.command("-thread-info")
        self._threads = {}
        for t in res.get("threads", []):
            m = _THREAD_TARGET_ID.search(str(t.get("target-id", "")))
            if m:
                self._threads[str(t["id"])] = f"p{int(m[1], 16):02x}.{int(m[2], 16):02x}"

    def _gdb_thread(self, thread: str) -> str:
        for _ in range(2):
            for num, tid in self._threads.items():
                if tid == thread:
                    return num
            self._refresh_threads()
        raise GdbError(f"gdb knows no thread {thread!r}")

    def _thread_opt(self, thread: str | None) -> str:
        return "" if thread is None else f" --thread {self._gdb_thread(thread)}"

    def threads(self) -> list[str]:
        """vCPU thread ids in RSP form (``p01.01`` ...)."""
        self._refresh_threads()
        return list(self._threads.values())

    def select_thread(self, op: str, thread: str) -> None:
        """Make ``thread`` gdb's current thread (gdb sends ``Hg``/``Hc`` itself)."""
        if op not in ("g", "c"):
            raise ValueError(f"op must be 'g' or 'c', not {op!r}")
        if op == "g":
            self.command(f"-thread-select {self._gdb_thread(thread)}")

    # -- breakpoints ---------------------------------------------------------------------------

    def insert_breakpoint(self, kind: BreakpointKind | int, addr: int, length: int = 1) -> None:
        """A gdb breakpoint or watchpoint (``Z2`` becomes an ``awatch``: see the module)."""
        kind = BreakpointKind(kind)
        if kind in (BreakpointKind.SOFTWARE, BreakpointKind.HARDWARE):
            hw = " -h" if kind is BreakpointKind.HARDWARE else ""
            res = self.command(f"-break-insert{hw} *{addr:#x}")
            self._breaks[(int(kind), addr)] = str(res["bkpt"]["number"])
            return
        flag = " -r" if kind is BreakpointKind.READ_WATCH else " -a"
        size = {1: "char", 2: "short", 4: "int", 8: "long"}.get(length, "char")
        res = self.command(f'-break-watch{flag} "*({size} *){addr:#x}"')
        wpt = res.get("wpt") or res.get("hw-awpt") or res.get("hw-rwpt") or {}
        number = str(wpt.get("number", ""))
        if not number:
            raise GdbProtocolError("gdb gave no watchpoint number", sent=b"-break-watch",
                                   received=repr(res).encode())
        self._breaks[(int(kind), addr)] = number
        self._watch[number] = ({2: "watch", 3: "rwatch", 4: "awatch"}[int(kind)], addr)

    def remove_breakpoint(self, kind: BreakpointKind | int, addr: int, length: int = 1) -> None:
        """Delete what :meth:`insert_breakpoint` made at ``addr``."""
        number = self._breaks.pop((int(kind), addr), None)
        if number is None:
            raise GdbErrorReply(0x16, sent=f"z{int(kind)},{addr:x},{length:x}".encode())
        self._watch.pop(number, None)
        self.command(f"-break-delete {number}")

    # -- run control ----------------------------------------------------------------------------

    def cont(self, *, before: Sequence[bytes] = (), thread: str | None = None,
             defer: bool = False) -> None:
        """Run ``before`` packets (register writes through gdb), then continue every vCPU.

        ``defer`` (GdbClient: check the replies later) changes nothing here: gdb answers
        each command before the next.
        """
        del thread, defer  # gdb continues every vCPU (scheduler-locking off)
        if self.running:
            raise GdbError("cont: the target is running (wait_stop or interrupt first)")
        check_replies(before, self.pipeline(before))
        self.command("-exec-continue")
        self.running = True

    def interrupt(self, *, wait: bool = True, timeout: float | None = None) -> StopReply | None:
        """Stop a running target; a stop that raced the interrupt is returned instead."""
        if not self.running:
            return None
        self._drain()
        if not self._events:
            # an error means gdb already saw the target stop: its *stopped is on the way
            with contextlib.suppress(GdbProtocolError):
                self.command("-exec-interrupt")
        if not wait:
            return None
        return self.wait_stop(timeout if timeout is not None else self.timeout)

    def poll_stop(self) -> StopReply | None:
        """A stop if one has arrived, without blocking."""
        if self._stops:
            return self._stops.popleft()
        if not self.running:
            return None
        self._drain()
        return self._take_stop()

    def wait_stop(self, timeout: float | None = None) -> StopReply:
        """Block until the target stops."""
        if self._stops:
            return self._stops.popleft()
        if not self.running:
            raise GdbError("wait_stop: the target is stopped and no stop is queued")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            stop = self._take_stop()
            if stop is not None:
                return stop
            for rec in self._records(deadline, "wait for *stopped"):
                self._note(rec)

    def next_stop(self, timeout: float) -> StopReply:
        """The next ``*stopped`` gdb reports, whatever ``running`` says (for scripts whose
        breakpoints stop and continue by themselves)."""
        deadline = time.monotonic() + timeout
        while not self._events:
            for rec in self._records(deadline, "wait for *stopped"):
                self._note(rec)
        stop = self._take_stop()
        assert stop is not None
        return stop

    def _take_stop(self) -> StopReply | None:
        if not self._events:
            return None
        stop = self._stop_from_mi(self._events.popleft().get("payload") or {})
        self.running = False
        self.last_stop = stop
        self.stats.stops += 1
        return stop

    def _stop_from_mi(self, payload: dict[str, Any]) -> StopReply:
        reason = str(payload.get("reason", ""))
        if reason in ("exited", "exited-normally", "exited-signalled"):
            code = payload.get("exit-code")
            return StopReply("W", exit_status=int(str(code), 8) if code else 0)
        signal = _SIGNALS.get(str(payload.get("signal-name", "")), 5)
        thread_num = str(payload.get("thread-id", ""))
        if thread_num and thread_num not in self._threads:
            self._refresh_threads()
        watch = None
        if reason in _WATCH_REASONS:
            number = str((payload.get("wpt") or payload.get("hw-awpt")
                          or payload.get("hw-rwpt") or {}).get("number", ""))
            known = self._watch.get(number)
            if known is not None:
                watch = WatchHit(known[0], known[1])
        info = tuple((k, str(v)) for k, v in payload.items() if isinstance(v, str))
        return StopReply("T", signal=signal, thread=self._threads.get(thread_num),
                         watch=watch, swbreak=reason == "breakpoint-hit", info=info)

    # -- lifetime -----------------------------------------------------------------------------

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
        return self._closed


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
    if "Cannot access memory" in msg or "Unable to read memory" in msg:
        return GdbErrorReply(0x0E, sent=cmd.encode(), received=msg.encode())
    return GdbProtocolError(f"gdb refused: {msg}", sent=cmd.encode(), received=msg.encode())
