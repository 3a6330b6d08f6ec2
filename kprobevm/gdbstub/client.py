"""GdbClient: typed operations on a QEMU gdbstub, built for the probe-hit hot path.

Registers (decoded with the layout from ``target.xml``), virtual and physical memory,
vCPU threads, breakpoints and watchpoints, resume and single-step: each in as few round
trips as the packets allow. The conversation underneath is
:class:`~kprobevm.gdbstub.connection.RspConnection` (requests, replies, stop replies) on
:class:`~kprobevm.gdbstub.link.RspLink` (the socket and its acknowledgements).

Not thread-safe: one thread drives one client (the engine selects on :meth:`fileno`).
"""

from __future__ import annotations

import binascii
import os
import socket
from collections.abc import Sequence
from typing import Unpack

from kprobevm.errors import GdbProtocolError
from kprobevm.gdbstub.connection import RspConnection
from kprobevm.gdbstub.link import DEFAULT_TIMEOUT, ClientStats, LinkOptions, PacketOptions
from kprobevm.gdbstub.packet import (
    BreakpointKind,
    StopReply,
    check_replies,
    check_reply,
    decode_hex,
    join_memory_replies,
    memory_read_packets,
    memory_write_packets,
    parse_thread_id,
)
from kprobevm.gdbstub.regs import RegisterLayout
from kprobevm.gdbstub.transport import GdbAddress, require_stopped

__all__ = ["BreakpointKind", "ClientStats", "GdbAddress", "GdbClient"]

_FEATURES = b"qSupported:multiprocess+;swbreak+;hwbreak+;vContSupported+;xmlRegisters=i386"


class GdbClient(RspConnection):
    """A typed RSP client; :meth:`connect` is the usual way to get one."""

    read_chunk: int
    """Bytes per ``m`` packet: a power of two whose hex reply fits the packet size."""
    write_chunk: int
    """Bytes per ``M`` packet: header and hex data must fit the stub's buffer (QEMU drops
    a packet that fills its 4096-byte line buffer without a reply)."""

    def __init__(self, sock: socket.socket, **options: Unpack[LinkOptions]) -> None:
        super().__init__(sock, **options)
        self.packet_size = 0x400
        self.features: dict[str, str] = {}
        self.qemu_features: frozenset[str] = frozenset()
        self._layout: RegisterLayout | None = None
        self._phys_mode: bool | None = None
        self._reg_cache: tuple[str | None, dict[str, int]] | None = None
        """The selected thread's registers as last read or written. A resume drops them
        (whatever stop ends it), and so does a thread switch."""

    # -- connection ------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        address: GdbAddress,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        handshake: bool = True,
        **options: Unpack[PacketOptions],
    ) -> GdbClient:
        """Connect to a gdbstub at a unix socket path or (host, port) and negotiate.

        Connecting stops a running VM (QEMU does so on connect).
        """
        if isinstance(address, tuple):
            sock = socket.create_connection(address, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(os.fspath(address))
            except OSError:
                sock.close()
                raise
        client = cls(sock, timeout=timeout, **options)
        if handshake:
            try:
                client.handshake()
            except BaseException:
                client.close()
                raise
        return client

    def handshake(self) -> None:
        """``qSupported``, QEMU's extras, and a known physical-memory mode."""
        reply = self.request(_FEATURES)
        self.features = _parse_features(reply)
        size = self.features.get("PacketSize")
        if size:
            try:
                self.packet_size = int(size, 16)
            except ValueError as exc:
                raise GdbProtocolError("bad PacketSize", sent=_FEATURES, received=reply) from exc
        # Connecting stopped the VM; a stop reply that arrives from now on while we
        # believe it stopped is the connect-time T02, not an event.
        self.running = False
        self._stops.clear()
        qemu = self.request(b"qqemu.Supported")
        self.qemu_features = frozenset(qemu.decode("ascii", "replace").split(";")) - {""}
        if "PhyMemMode" in self.qemu_features:
            # QEMU keeps the mode across connections: a previous client may have left it on.
            self.set_phys_mode(False, force=True)
        if self.features.get("qXfer:features:read") == "+":
            _ = self.layout  # learn the registers now, not on the first probe hit

    # -- features --------------------------------------------------------------------------

    def read_xfer(self, obj: str, annex: str) -> bytes:
        """Read a whole ``qXfer:<obj>:read:<annex>`` object (``m`` chunks until ``l``)."""
        out = bytearray()
        chunk = max(0x100, self.packet_size - 5)
        while True:
            payload = b"qXfer:%s:read:%s:%x,%x" % (obj.encode(), annex.encode(), len(out), chunk)
            reply = self.request(payload)
            if not reply or reply[:1] not in b"ml":
                raise GdbProtocolError("bad qXfer reply", sent=payload, received=reply)
            out += reply[1:]
            if reply[:1] == b"l":
                return bytes(out)
            if len(reply) == 1:
                raise GdbProtocolError("empty qXfer 'm' chunk", sent=payload, received=reply)
            if len(out) > self._reader.max_packet * 16:
                raise GdbProtocolError("qXfer object too large", sent=payload)

    @property
    def layout(self) -> RegisterLayout:
        """The register layout, read from ``target.xml`` on first use."""
        if self._layout is None:
            self._layout = RegisterLayout.from_target_xml(
                self.read_xfer("features", "target.xml"),
                lambda annex: self.read_xfer("features", annex),
            )
        return self._layout

    # -- threads ---------------------------------------------------------------------------

    def threads(self) -> list[str]:
        """Thread ids (vCPUs, ``p01.01`` ...) via qfThreadInfo/qsThreadInfo."""
        out: list[str] = []
        reply = self.request(b"qfThreadInfo")
        for _ in range(4096):
            if reply == b"l":
                return out
            if not reply.startswith(b"m"):
                raise GdbProtocolError("bad thread list reply", sent=b"qfThreadInfo",
                                       received=reply)
            ids = _ascii(reply[1:], b"qfThreadInfo", reply).split(",")
            for tid in ids:
                parse_thread_id(tid)
            out += ids
            reply = self.request(b"qsThreadInfo")
        raise GdbProtocolError("thread list does not end")

    def current_thread(self) -> str:
        """The thread ``qC`` reports."""
        reply = self.request(b"qC")
        if not reply.startswith(b"QC"):
            raise GdbProtocolError("bad qC reply", sent=b"qC", received=reply)
        return _ascii(reply[2:], b"qC", reply)

    def _select_packets(self, op: str, thread: str | None) -> list[bytes]:
        """The ``Hg``/``Hc`` that makes ``thread`` the one for ``op`` (none if it is)."""
        if thread is None or self._thread.get(op) == thread:
            return []
        return [b"H%s%s" % (op.encode(), thread.encode())]

    def select_thread(self, op: str, thread: str) -> None:
        """``Hg``/``Hc``: the vCPU later register/memory (``g``) or resume (``c``) ops use."""
        if op not in ("g", "c"):
            raise ValueError(f"op must be 'g' or 'c', not {op!r}")
        for p in self._select_packets(op, thread):
            self.request_ok(p)
            self._selected(op, thread)

    def _selected(self, op: str, thread: str | None) -> None:
        """Note that the stub now runs ``op`` packets on ``thread``: the registers we
        remember were another thread's."""
        self._thread[op] = thread
        self._reg_cache = None

    def _with_thread(self, thread: str | None, payloads: list[bytes]) -> list[bytes]:
        """Run ``payloads`` in one round trip, prefixed by an ``Hg`` when needed."""
        pre = self._select_packets("g", thread)
        replies = self.pipeline(pre + payloads)
        if pre:
            check_reply(pre[0], replies[0])
            self._selected("g", thread)
        return replies[len(pre):]

    # -- registers -------------------------------------------------------------------------

    def read_registers(self, thread: str | None = None, *, wide: bool = True) -> dict[str, int]:
        """All registers of ``thread`` (or the current g thread) with one ``g``.

        ``wide=False`` skips x87/xmm registers (see :meth:`RegisterLayout.decode`).
        """
        if thread is None or self._thread["g"] == thread:
            layout = self.layout
            data = self._hex_roundtrip(b"g", layout.g_size)
            if data is not None:
                return self._remember_registers(layout.decode_bytes(data, wide=wide))
            reply = self.recv_reply()
        else:
            (reply,) = self._with_thread(thread, [b"g"])
        return self._registers_from(reply, wide)

    def read_registers_along(
        self, packets: Sequence[bytes], thread: str | None = None, *, wide: bool = False
    ) -> tuple[dict[str, int], list[bytes]]:
        """:meth:`read_registers` and ``packets`` (virtual-memory reads, say) in one
        round trip; their replies come back as they are (``Exx`` included)."""
        mode = self.mode_packets(False)
        replies = self._with_thread(thread, [*mode, b"g", *packets])
        for p, r in zip(mode, replies, strict=False):
            check_reply(p, r)
        values = self._registers_from(replies[len(mode)], wide)
        return values, replies[len(mode) + 1 :]

    def _registers_from(self, reply: bytes, wide: bool) -> dict[str, int]:
        """Decode a ``g`` reply and remember it: register writes skip unchanged values."""
        if reply[:1] == b"E":
            check_reply(b"g", reply)
        return self._remember_registers(self.layout.decode(reply, wide=wide))

    def _remember_registers(self, values: dict[str, int]) -> dict[str, int]:
        """Keep ``values`` as the selected thread's registers, for register writes."""
        self._reg_cache = (self._thread["g"], values)
        return values

    def read_register(self, name: str, thread: str | None = None) -> int:
        """One register by name with ``p``."""
        reg = self.layout[name]
        payload = b"p%x" % reg.regnum
        (reply,) = self._with_thread(thread, [payload])
        check_reply(payload, reply)
        data = decode_hex(reply, payload)
        return int.from_bytes(data[:reg.size], "little")

    def read_register_each(self, name: str, threads: Sequence[str]) -> dict[str, int]:
        """One register of every thread in ``threads``, in one round trip (``Hg`` + ``p``)."""
        if not threads:
            return {}
        reg = self.layout[name]
        payload = b"p%x" % reg.regnum
        packets: list[bytes] = []
        for t in threads:
            packets += [b"Hg" + t.encode(), payload]
        replies = self.pipeline(packets)
        self._selected("g", threads[-1])
        values = {}
        for i, t in enumerate(threads):
            check_reply(packets[2 * i], replies[2 * i])
            data = decode_hex(replies[2 * i + 1], payload)
            values[t] = int.from_bytes(data[: reg.size], "little")
        return values

    def read_registers_and_each(
        self, name: str, threads: Sequence[str], thread: str
    ) -> tuple[dict[str, int], dict[str, int]]:
        """Every register of ``thread`` (no x87/xmm) and register ``name`` of each of
        ``threads`` (``thread`` among them or not), in one round trip; ``thread`` is
        selected last, so the memory packets that follow read as it sees memory.

        A stop under SMP needs both: each vCPU's RIP, and the registers of the one
        reported. ``Hg`` + ``p`` per other thread, then ``Hg`` + ``g``.
        """
        reg = self.layout[name]
        payload = b"p%x" % reg.regnum
        others = [t for t in threads if t != thread]
        packets: list[bytes] = []
        for t in others:
            packets += [b"Hg" + t.encode(), payload]
        packets += [b"Hg" + thread.encode(), b"g"]
        replies = self.pipeline(packets)
        self._selected("g", thread)
        each = {}
        for i, t in enumerate(others):
            check_reply(packets[2 * i], replies[2 * i])
            data = decode_hex(replies[2 * i + 1], payload)
            each[t] = int.from_bytes(data[: reg.size], "little")
        check_reply(packets[-2], replies[-2])
        values = self._registers_from(replies[-1], False)
        if thread in threads:
            each[thread] = values[name]
        return values, {t: each[t] for t in threads}

    def read_along(self, packets: Sequence[bytes], thread: str | None = None) -> list[bytes]:
        """``packets`` (virtual-memory reads, say) in one round trip, as ``thread`` sees
        memory; their replies as they are (``Exx`` included)."""
        mode = self.mode_packets(False)
        replies = self._with_thread(thread, [*mode, *packets])
        for p, r in zip(mode, replies, strict=False):
            check_reply(p, r)
        return replies[len(mode):]

    def register_write_packets(
        self, values: dict[str, int], thread: str | None = None
    ) -> list[bytes]:
        """``P`` packets for the registers in ``values`` that differ from the last read.

        With ``thread``, an ``Hg`` leads, always: the packets may go out later (with a
        resume), after other requests selected other threads, so they carry their own
        selection. The client notes a selection when an ``H`` packet is sent, not when
        it is queued.
        """
        layout = self.layout
        target = thread if thread is not None else self._thread["g"]
        cache = self._reg_cache
        cached = cache[1] if cache is not None and cache[0] == target else None
        select = [b"Hg" + thread.encode()] if thread is not None else []
        return select + [
            layout.p_packet(name, value)
            for name, value in values.items()
            if cached is None or cached.get(name) != value
        ]

    def write_registers(self, values: dict[str, int], thread: str | None = None) -> int:
        """Write registers; returns how many were sent (unchanged ones are skipped).

        Uses pipelined ``P`` packets, one round trip in all. ``G`` would rewrite every
        register, and QEMU turns a write of cr0/cr3/cr4 into a TLB flush.
        """
        if thread is not None and self._thread["g"] != thread:
            self._reg_cache = None
        packets = self.register_write_packets(values)
        if not packets:
            return 0
        check_replies(packets, self._with_thread(thread, packets))
        if self._reg_cache is not None:
            self._reg_cache[1].update(values)
        return len(packets)

    def write_register(self, name: str, value: int, thread: str | None = None) -> None:
        """Write one register with ``P``."""
        packet = self.layout.p_packet(name, value)
        (reply,) = self._with_thread(thread, [packet])
        check_reply(packet, reply)
        if self._reg_cache is not None:
            self._reg_cache[1][name] = value

    # -- memory ----------------------------------------------------------------------------

    @property
    def packet_size(self) -> int:
        """The stub's ``PacketSize``; setting it sizes :attr:`read_chunk`/:attr:`write_chunk`."""
        return self._packet_size

    @packet_size.setter
    def packet_size(self, size: int) -> None:
        # Plain attributes, not properties: read_memory checks read_chunk on every call.
        self._packet_size = size
        self.read_chunk = _pow2_floor(min(0x800, (size - 8) // 2))
        self.write_chunk = _pow2_floor((size - 40) // 2)

    def memory_write_packets(self, addr: int, data: bytes) -> list[bytes]:
        """``M`` packets covering ``data`` at ``addr``, split at multiples of the chunk."""
        return memory_write_packets(addr, data, self.write_chunk)

    def _memory_op(self, phys: bool, thread: str | None, packets: list[bytes]) -> list[bytes]:
        """Run memory packets in one pipeline, after the mode switch and ``Hg`` they need."""
        mode = [] if self._phys_mode == phys else [b"Qqemu.PhyMemMode:%d" % int(phys)]
        select = [] if phys else self._select_packets("g", thread)
        pre = mode + select
        replies = self.pipeline(pre + packets)
        for p, r in zip(pre, replies, strict=False):
            if r != b"OK":
                raise GdbProtocolError("expected OK", sent=p, received=r)
        if mode:
            self._phys_mode = phys
        if select:
            self._selected("g", thread)
        return replies[len(pre):]

    def read_memory(self, addr: int, n: int, thread: str | None = None) -> bytes:
        """``n`` bytes of virtual memory at ``addr`` as ``thread`` sees it (pipelined ``m``).

        Leaves phys mode in the same round trip when needed.
        """
        if n <= 0:
            return b""
        chunk = self.read_chunk
        if (n <= chunk and (addr & (chunk - 1)) + n <= chunk and self._phys_mode is False
                and (thread is None or self._thread["g"] == thread)):
            # One packet, nothing to switch: the probe handler's common case.
            payload = b"m%x,%x" % (addr, n)
            data = self._hex_roundtrip(payload, n)
            if data is not None:
                return data
            return join_memory_replies([payload], [self.recv_reply()])
        packets = memory_read_packets(addr, n, chunk)
        return join_memory_replies(packets, self._memory_op(False, thread, packets))

    def write_memory(self, addr: int, data: bytes, thread: str | None = None) -> None:
        """Write ``data`` at virtual ``addr`` with pipelined ``M`` packets."""
        packets = memory_write_packets(addr, data, self.write_chunk)
        if packets:
            check_replies(packets, self._memory_op(False, thread, packets))

    def read_phys(self, addr: int, n: int) -> bytes:
        """Read guest-physical memory, entering phys mode in the same round trip."""
        if n <= 0:
            return b""
        packets = memory_read_packets(addr, n, self.read_chunk)
        return join_memory_replies(packets, self._memory_op(True, None, packets))

    def write_phys(self, addr: int, data: bytes) -> None:
        """Write guest-physical memory."""
        packets = memory_write_packets(addr, data, self.write_chunk)
        if packets:
            check_replies(packets, self._memory_op(True, None, packets))

    def set_phys_mode(self, on: bool, *, force: bool = False) -> None:
        """``Qqemu.PhyMemMode``: make ``m``/``M`` address guest-physical memory.

        :meth:`read_phys`/:meth:`read_memory` switch by themselves; this is for raw use.
        """
        if self._phys_mode == on and not force:
            return
        self.request_ok(b"Qqemu.PhyMemMode:%d" % int(on))
        self._phys_mode = on

    def mode_packets(self, phys: bool) -> list[bytes]:
        """The ``PhyMemMode`` switch (if any) for packets queued to go out next.

        The client takes the mode as switched: the caller must send them before any other.
        """
        if self._phys_mode == phys:
            return []
        self._phys_mode = phys
        return [b"Qqemu.PhyMemMode:%d" % int(phys)]

    @property
    def phys_mode(self) -> bool | None:
        """The current ``PhyMemMode`` (None before the handshake set it)."""
        return self._phys_mode

    # -- breakpoints -----------------------------------------------------------------------

    def insert_breakpoint(self, kind: BreakpointKind | int, addr: int, length: int = 1) -> None:
        """``Z<kind>,addr,length`` (length is the instruction kind for Z0/Z1: 1 on x86)."""
        self.request_ok(b"Z%d,%x,%x" % (int(kind), addr, length))

    def remove_breakpoint(self, kind: BreakpointKind | int, addr: int, length: int = 1) -> None:
        """``z<kind>,addr,length``."""
        self.request_ok(b"z%d,%x,%x" % (int(kind), addr, length))

    # -- execution -------------------------------------------------------------------------

    def cont(
        self, *, before: Sequence[bytes] = (), thread: str | None = None, defer: bool = False
    ) -> None:
        """Resume (``c``, or ``vCont;c:thread``); ``before`` packets go in the same send.

        The replies to ``before`` (say ``P`` writes) are read and checked after the
        resume has been sent, so a probe hit costs no extra round trip for them; with
        ``defer`` they are not even waited for: each is checked when it arrives, ahead of
        the next stop reply (an ``Exx`` then raises from ``wait_stop``/``poll_stop``).
        """
        require_stopped(self.running, "cont")
        resume = b"c" if thread is None else b"vCont;c:%s" % thread.encode()
        self._send_many([*before, resume], no_reply=resume)
        self._resumed()
        if defer:
            self._deferred += len(before)
            return
        for payload in before:
            reply = self.recv_reply()
            check_reply(payload, reply)

    def _resumed(self) -> None:
        """The target runs: the registers we remember will not be true at its stop."""
        self.running = True
        self._reg_cache = None

    def step(self, thread: str | None = None, *, wait: bool = True,
             timeout: float | None = None) -> StopReply | None:
        """Single-step one vCPU (``vCont;s:thread``); returns its stop reply when ``wait``."""
        require_stopped(self.running, "step")
        thread = thread or self._thread["c"] or self._thread["g"]
        payload = b"vCont;s:%s" % thread.encode() if thread else b"s"
        self._send_many([payload], no_reply=payload)
        self._resumed()
        return self.wait_stop(timeout if timeout is not None else self.timeout) if wait else None

    # -- monitor and detach ----------------------------------------------------------------

    def monitor(self, command: str, timeout: float | None = None) -> str:
        """Run a QEMU monitor command (``qRcmd``); returns its output text."""
        payload = b"qRcmd," + binascii.hexlify(command.encode())
        start = len(self.console)
        self._send_many([payload])
        reply = self.recv_reply(timeout)
        check_reply(payload, reply)
        text = self.take_console(start)
        if reply != b"OK":
            text += decode_hex(reply, payload)  # stubs may answer with hex output directly
        return text.decode("utf-8", "replace")

    def detach(self) -> None:
        """``D``: let the VM run on without us, then close."""
        try:
            payload = b"D;1" if "multiprocess" in self.features else b"D"
            self.request_ok(payload)
        finally:
            self.close()


# -- helpers -------------------------------------------------------------------------------


def _parse_features(reply: bytes) -> dict[str, str]:
    """A ``qSupported`` reply as {feature: value}; ``name+`` gives "+", ``name-`` nothing."""
    out: dict[str, str] = {}
    for item in reply.decode("ascii", "replace").split(";"):
        if not item:
            continue
        if "=" in item:
            k, _, v = item.partition("=")
            out[k] = v
        elif item[-1] in "+-?":
            if item[-1] == "+":
                out[item[:-1]] = "+"
        else:
            out[item] = ""
    return out


def _ascii(text: bytes, sent: bytes, reply: bytes) -> str:
    """``text`` (part of the reply to ``sent``) as ASCII; anything else is a protocol error."""
    try:
        return text.decode("ascii")
    except UnicodeDecodeError as exc:
        raise GdbProtocolError("non-ASCII reply", sent=sent, received=reply) from exc


def _pow2_floor(n: int) -> int:
    """The largest power of two not above ``n`` (1 at least)."""
    return 1 << (max(n, 1).bit_length() - 1)
