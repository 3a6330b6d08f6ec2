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
- gdb lets every vCPU run while it steps one unless ``scheduler-locking`` is ``step``
  (then it sends ``vCont;s`` for the one vCPU, as GdbClient does).
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Sequence
from typing import Any

from kprobevm.errors import GdbError, GdbErrorReply, GdbProtocolError
from kprobevm.gdbstub.mi import BASE_SETTINGS, MiSession, MiStats, stop_reply
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
from kprobevm.gdbstub.transport import GdbAddress, require_stopped
from kprobevm.x86.constants import MASK64

__all__ = ["BASE_SETTINGS", "ENGINE_SETTINGS", "GdbMiClient", "MiStats"]

_CHUNK = 0x400
"""Bytes per raw ``m``/``M`` packet: QEMU drops a packet that fills its 4 KiB buffer."""
_NARROW = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs",
    "fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer",
)  # fmt: skip
"""What ``read_registers(wide=False)`` returns: no x87/xmm (as GdbClient)."""
ENGINE_SETTINGS = (*BASE_SETTINGS, "breakpoint always-inserted on", "code-cache off",
                   "stack-cache off", "can-use-hw-watchpoints 1")
"""For the engine: see the module docstring."""
_WATCH_REASONS = ("watchpoint-trigger", "read-watchpoint-trigger", "access-watchpoint-trigger")
_THREAD_TARGET_ID = re.compile(r"Thread (?:p)?([0-9a-fA-F]+)\.([0-9a-fA-F]+)")


class GdbMiClient(MiSession):
    """A :class:`~kprobevm.gdbstub.transport.GdbTransport` over GDB/MI, as GdbClient is
    one over RSP; :meth:`connect` makes one."""

    _remote_num: dict[int, int]
    """Remote (``P`` packet) register number -> gdb register number."""
    _threads: dict[str, str]
    """gdb thread number -> RSP thread id (``p01.02``)."""
    _phys_mode: bool
    """Whether the stub is in QEMU's PhyMemMode (only inside :meth:`_phys`)."""
    _watch: dict[str, tuple[str, int]]
    """gdb breakpoint number -> (watch kind, address)."""
    _breaks: dict[tuple[int, int], str]
    """(kind, address) -> gdb breakpoint number."""

    settings = ENGINE_SETTINGS

    def _setup(self, address: GdbAddress, settings: Sequence[str]) -> None:
        """Connect, then learn gdb's remote register numbers and the vCPU threads."""
        super()._setup(address, settings)
        # gdb refuses this one until a target is connected
        self.command("-gdb-set scheduler-locking step")
        self._remote_num = self._remote_register_numbers()
        self._refresh_threads()
        self._phys_mode = False
        self._watch = {}
        self._breaks = {}

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

    # -- raw packets -----------------------------------------------------------------------

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
        """(gdb register number, value) pairs in one ``-data-write-register-values``."""
        pairs = " ".join(f"{num} {value:#x}" for num, value in writes)
        self.command(f"-data-write-register-values x {pairs}")

    # -- registers -------------------------------------------------------------------------

    def read_registers(self, thread: str | None = None, *, wide: bool = True) -> dict[str, int]:
        """Registers by gdb name (``wide=False``: general and system registers only)."""
        names = self._names if wide else [n for n in _NARROW if n in self._gdb_num]
        nums = "" if wide else " " + " ".join(str(self._gdb_num[n]) for n in names)
        return self._register_values(self.command(
            f"-data-list-register-values{self._thread_opt(thread)} --skip-unavailable x{nums}"))

    def read_registers_along(
        self, packets: Sequence[bytes], thread: str | None = None, *, wide: bool = False
    ) -> tuple[dict[str, int], list[bytes]]:
        """:meth:`read_registers`, then ``packets`` in that thread (one command each: gdb
        has no pipelining); their replies as they are (``Exx`` included)."""
        if thread is not None:
            self.select_thread("g", thread)
        return self.read_registers(wide=wide), self.pipeline(packets)

    def read_along(self, packets: Sequence[bytes], thread: str | None = None) -> list[bytes]:
        """``packets`` in ``thread`` (one command each)."""
        if thread is not None:
            self.select_thread("g", thread)
        return self.pipeline(packets)

    def read_registers_and_each(
        self, name: str, threads: Sequence[str], thread: str
    ) -> tuple[dict[str, int], dict[str, int]]:
        """``name`` of each of ``threads``, then every register of ``thread`` (selected)."""
        each = {t: self.read_register(name, thread=t) for t in threads if t != thread}
        self.select_thread("g", thread)
        values = self.read_registers(wide=False)
        if thread in threads:
            each[thread] = values[name]
        return values, {t: each[t] for t in threads}

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

    # -- memory ----------------------------------------------------------------------------

    def read_memory(self, addr: int, n: int, thread: str | None = None) -> bytes:
        """``n`` bytes of virtual memory through gdb (``-data-read-memory-bytes``)."""
        return self._read_memory_bytes(addr, n, self._thread_opt(thread))

    def write_memory(self, addr: int, data: bytes, thread: str | None = None) -> None:
        """Write virtual memory through gdb."""
        self._write_memory_bytes(addr, data, self._thread_opt(thread))

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
        """Raw packets' replies in PhyMemMode; gdb's own reads must never run in it, so
        the mode is switched on for them and off again."""
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
        """False: gdb's stub leaves PhyMemMode as soon as the raw packets that need it ran."""
        return self._phys_mode

    # -- threads ---------------------------------------------------------------------------

    def _refresh_threads(self) -> None:
        """Learn gdb's thread numbers and the RSP ids they stand for (``-thread-info``)."""
        res = self.command("-thread-info")
        self._threads = {}
        for t in res.get("threads", []):
            m = _THREAD_TARGET_ID.search(str(t.get("target-id", "")))
            if m:
                self._threads[str(t["id"])] = f"p{int(m[1], 16):02x}.{int(m[2], 16):02x}"

    def _gdb_thread(self, thread: str) -> str:
        """gdb's number for an RSP thread id (asking gdb again once if it is new)."""
        for _ in range(2):
            for num, tid in self._threads.items():
                if tid == thread:
                    return num
            self._refresh_threads()
        raise GdbError(f"gdb knows no thread {thread!r}")

    def _thread_opt(self, thread: str | None) -> str:
        """The ``--thread`` option for ``thread`` (none for the current one)."""
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

    # -- breakpoints -----------------------------------------------------------------------

    def insert_breakpoint(self, kind: BreakpointKind | int, addr: int, length: int = 1) -> None:
        """A gdb breakpoint or watchpoint (``Z2`` becomes an ``awatch``: see the module)."""
        kind = BreakpointKind(kind)
        res = self._insert(kind, addr, length, write_flag=" -a")
        if kind in (BreakpointKind.SOFTWARE, BreakpointKind.HARDWARE):
            self._breaks[(int(kind), addr)] = str(res["bkpt"]["number"])
            return
        number = _watch_number(res)
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

    # -- run control -----------------------------------------------------------------------

    def cont(self, *, before: Sequence[bytes] = (), thread: str | None = None,
             defer: bool = False) -> None:
        """Run ``before`` packets (register writes through gdb), then continue every vCPU.

        ``defer`` (GdbClient: check the replies later) changes nothing here: gdb answers
        each command before the next.
        """
        del thread, defer  # gdb continues every vCPU (scheduler-locking is for steps)
        require_stopped(self.running, "cont")
        check_replies(before, self.pipeline(before))
        self._resume("-exec-continue")

    def step(self, thread: str | None = None, *, wait: bool = True,
             timeout: float | None = None) -> StopReply | None:
        """Single-step one vCPU (``-exec-step-instruction``); its stop when ``wait``."""
        require_stopped(self.running, "step")
        self._resume(f"-exec-step-instruction{self._thread_opt(thread)}")
        return self.wait_stop(timeout if timeout is not None else self.timeout) if wait else None

    def _stop_from_mi(self, payload: dict[str, Any]) -> StopReply:
        """A ``*stopped`` record as a stop reply: RSP thread id, and the watchpoint."""
        thread_num = str(payload.get("thread-id", ""))
        if thread_num and thread_num not in self._threads:
            self._refresh_threads()
        watch = None
        if str(payload.get("reason", "")) in _WATCH_REASONS:
            known = self._watch.get(_watch_number(payload))
            if known is not None:
                watch = WatchHit(known[0], known[1])
        return stop_reply(payload, self._threads.get(thread_num), watch)


def _watch_number(record: dict[str, Any]) -> str:
    """The watchpoint number in a ``-break-watch`` result or a ``*stopped`` record."""
    wpt = record.get("wpt") or record.get("hw-awpt") or record.get("hw-rwpt") or {}
    return str(wpt.get("number", ""))
