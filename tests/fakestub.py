"""A scripted fake gdbstub on a socketpair, for the client's unit tests (no QEMU).

``FakeStub(handler)`` runs a thread that decodes our packets with the real codec, acks
them, and sends whatever ``handler(payload)`` returns: framed replies, raw garbage, or
nothing (a stall). ``QemuLike`` answers like QEMU 7.2 on a tiny target: enough for the
handshake, ``g``/``p``/``P``, ``m``/``M`` over a small RAM, ``Z``/``z``, ``c`` and ``\\x03``,
and, given a :class:`~kprobevm.gdbstub.behaviour.StubBehaviour`, stops the way that QEMU does.
"""

from __future__ import annotations

import binascii
import contextlib
import select
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from kprobevm.gdbstub.behaviour import QEMU_7_2, StubBehaviour
from kprobevm.gdbstub.packet import Packet, PacketReader, encode_packet

TARGET_XML = (
    '<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
    '<target><architecture>i386:x86-64</architecture>'
    '<xi:include href="core.xml"/></target>'
)
CORE_XML = """<?xml version="1.0"?>
<feature name="org.gnu.gdb.i386.core">
  <reg name="rax" bitsize="64" regnum="0"/>
  <reg name="rbx" bitsize="64"/>
  <!-- <reg name="decoy" bitsize="64"/> a comment must not count -->
  <reg name="rip" bitsize="64"/>
  <reg name="eflags" bitsize="32"/>
  <reg name="cs" bitsize="32"/>
  <reg name="cr3" bitsize="64"/>
  <reg name="st0" bitsize="80"/>
  <reg name="xmm0" bitsize="128"/>
</feature>
"""
REG_SIZES = [8, 8, 8, 4, 4, 8, 10, 16]
RAM_BASE = 0x1000
RAM_SIZE = 0x10000

Reply = bytes | list[bytes] | None


def frame(payload: bytes) -> bytes:
    """``$payload#xx``."""
    return encode_packet(payload)


class FakeStub:
    """One end of a socketpair served by a thread; ``client_sock`` is the other end.

    Bytes are read one at a time as QEMU's ``gdb_read_byte`` does: while the handler says
    its target runs (a ``running`` attribute), every byte is an interrupt and goes to
    ``handler.interrupt_by``; otherwise bytes make packets, and ``\\x03`` between packets
    goes to the handler (a handler that keeps no run state) or is ignored (QEMU's).
    """

    def __init__(self, handler: Callable[[bytes], Reply], *, ack: bool = True) -> None:
        self.client_sock, self._sock = socket.socketpair()
        self.handler = handler
        self.ack = ack
        self.received: list[bytes] = []
        self.interrupts = 0
        self.raw_received = bytearray()
        self.while_running = bytearray()
        """Bytes that reached the stub while its target ran (only ``\\x03`` belongs)."""
        self._line: bytearray | None = None
        self._sum: bytearray | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                data = self._sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.raw_received += data
            for ch in data:
                self._read_byte(ch)

    def _read_byte(self, ch: int) -> None:
        runs = getattr(self.handler, "running", None)
        if runs:
            self.while_running.append(ch)
            self.interrupts += ch == 3
            self._deliver(self.handler.interrupt_by(ch))  # type: ignore[attr-defined]
            return
        if self._line is None:
            if ch == 0x24:  # '$'
                self._line, self._sum = bytearray(), None
            elif ch == 3:
                self.interrupts += 1
                if runs is None:
                    self._deliver(self.handler(b"\x03"))
            return
        if self._sum is None:
            if ch == 0x23:  # '#'
                self._sum = bytearray()
            else:
                self._line.append(ch)
            return
        self._sum.append(ch)
        if len(self._sum) == 2:
            line, digits = bytes(self._line), bytes(self._sum)
            self._line = self._sum = None
            self._packet(line, digits)

    def _packet(self, line: bytes, digits: bytes) -> None:
        if int(digits, 16) != sum(line) & 0xFF:
            self.send_raw(b"-")
            return
        events = PacketReader().feed(b"$" + line + b"#" + digits)
        payload = next(ev.payload for ev in events if isinstance(ev, Packet))
        self.received.append(payload)
        if self.ack:
            self.send_raw(b"+")
        self._deliver(self.handler(payload))

    def _deliver(self, reply: Reply) -> None:
        if reply is None:
            return
        for chunk in [reply] if isinstance(reply, bytes) else reply:
            self.send_raw(chunk)

    def send_raw(self, data: bytes) -> None:
        """Put bytes on the wire as they are."""
        with contextlib.suppress(OSError):
            self._sock.sendall(data)

    def close(self) -> None:
        """Hang up."""
        self._stop = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


def serve_on_unix_socket(handler: Callable[[bytes], Reply], path: Path) -> FakeStub:
    """A FakeStub reached at a unix socket ``path``, for code that connects by address:
    one connection, relayed to the stub's socketpair until either side hangs up."""
    stub = FakeStub(handler)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def relay() -> None:
        conn, _ = server.accept()
        server.close()
        peer = {conn: stub.client_sock, stub.client_sock: conn}
        with conn:
            while True:
                ready, _, _ = select.select(list(peer), [], [])
                for side in ready:
                    data = side.recv(65536)
                    if not data:
                        peer[side].shutdown(socket.SHUT_WR)
                        return
                    peer[side].sendall(data)

    threading.Thread(target=relay, daemon=True).start()
    return stub


class QemuLike:
    """A handler that answers like QEMU (7.2 unless told) for a target with a little RAM."""

    def __init__(self, behaviour: StubBehaviour = QEMU_7_2) -> None:
        self.behaviour = behaviour
        self.ram = bytearray(RAM_SIZE)
        self.regs = [0x1111, 0x2222, 0xFFF0, 0x2, 0xF000, 0x5000, 0, 0]
        self.running = False
        self.allow_stop_reply = False
        """QEMU 8.1 on: a resume, ``?`` or ``\\x03`` allows one stop reply."""
        self.phys = False
        self.breakpoints: set[tuple[int, int]] = set()
        self.hooks: dict[bytes, Callable[[bytes], Reply]] = {}
        self.stop_on_connect = False
        """Send QEMU 7.2's connect-time ``T02`` ahead of the first reply."""
        self.selected: dict[str, str] = {}
        """The thread each ``H`` packet selected, by operation (``g``, ``c``)."""

    def g_hex(self) -> bytes:
        return b"".join(binascii.hexlify(v.to_bytes(s, "little"))
                        for v, s in zip(self.regs, REG_SIZES, strict=True))

    def stop(self, reply: bytes = b"T05thread:p01.01;") -> Reply:
        """The target stops by itself (a watchpoint): the stop reply, if QEMU sends one."""
        self.running = False
        if self.behaviour.stop_reply_needs_request and not self.allow_stop_reply:
            return None
        self.allow_stop_reply = False
        return frame(reply)

    def interrupt_by(self, ch: int) -> Reply:
        """A byte while running: QEMU stops the VM whatever the byte, and says so only
        for ``\\x03`` from 8.1 on."""
        if ch == 3 or self.behaviour.stray_byte_stop_reply:
            self.allow_stop_reply = True
        else:
            self.allow_stop_reply = False
        return self.stop(b"T02thread:p01.01;")

    def __call__(self, p: bytes) -> Reply:
        for prefix, hook in self.hooks.items():
            if p.startswith(prefix):
                return hook(p)
        if p == b"\x03":
            return None  # QEMU drops a \x03 that reaches a stopped target
        if p.startswith(b"qSupported"):
            out = [frame(b"PacketSize=1000;qXfer:features:read+;vContSupported+;multiprocess+")]
            if self.stop_on_connect:  # the connect-time stop, sent before the reply
                out.insert(0, frame(b"T02thread:01;"))
            return out
        if p == b"qqemu.Supported":
            return frame(b"sstepbits;sstep;PhyMemMode")
        if p.startswith(b"Qqemu.PhyMemMode:"):
            self.phys = p.endswith(b"1")
            return frame(b"OK")
        if p.startswith(b"qXfer:features:read:"):
            annex, _, rng = p[len(b"qXfer:features:read:"):].partition(b":")
            text = (TARGET_XML if annex == b"target.xml" else CORE_XML).encode()
            off, length = (int(x, 16) for x in rng.split(b","))
            length = min(length, 40)  # force several chunks
            part = text[off:off + length]
            return frame((b"l" if off + length >= len(text) else b"m") + part)
        if p == b"qfThreadInfo":
            return frame(b"mp01.01,p01.02")
        if p == b"qsThreadInfo":
            return frame(b"l")
        if p == b"qC":
            return frame(b"QCp01.01")
        if p == b"?":
            return frame(b"T05thread:p01.01;")  # the request is the permission
        if p.startswith(b"H"):
            self.selected[p[1:2].decode()] = p[2:].decode()
            return frame(b"OK")
        if p == b"g":
            return frame(self.g_hex())
        if p.startswith(b"p"):
            n = int(p[1:], 16)
            return frame(binascii.hexlify(self.regs[n].to_bytes(REG_SIZES[n], "little")))
        if p.startswith(b"P"):
            num, _, v = p[1:].partition(b"=")
            self.regs[int(num, 16)] = int.from_bytes(binascii.unhexlify(v), "little")
            return frame(b"OK")
        if p.startswith(b"m"):
            addr, n = (int(x, 16) for x in p[1:].split(b","))
            if n > 0x800:
                return frame(b"E22")
            if addr < RAM_BASE or addr + n > RAM_BASE + RAM_SIZE:
                return frame(b"E14")
            return frame(binascii.hexlify(self.ram[addr - RAM_BASE:addr - RAM_BASE + n]))
        if p.startswith(b"M"):
            head, _, data = p[1:].partition(b":")
            addr, n = (int(x, 16) for x in head.split(b","))
            if addr < RAM_BASE or addr + n > RAM_BASE + RAM_SIZE:
                return frame(b"E14")
            self.ram[addr - RAM_BASE:addr - RAM_BASE + n] = binascii.unhexlify(data)
            return frame(b"OK")
        if p[:1] in (b"Z", b"z"):
            kind, where, _ = p[1:].split(b",")
            key = (int(kind.decode()), int(where, 16))
            if p[:1] == b"Z":
                self.breakpoints.add(key)
            else:
                self.breakpoints.discard(key)
            return frame(b"OK")
        if p == b"c" or p.startswith(b"vCont;c"):
            self.running = self.allow_stop_reply = True
            return None
        if p.startswith(b"vCont;s"):
            self.allow_stop_reply = True
            return self.stop(b"T05thread:%s;" % p.split(b":")[1])
        if p.startswith(b"qRcmd,"):
            text = binascii.unhexlify(p[6:])
            return [frame(b"O" + binascii.hexlify(b"you said: ")),
                    frame(b"O" + binascii.hexlify(text + b"\n")), frame(b"OK")]
        if p.startswith(b"D"):
            return frame(b"OK")
        return frame(b"")
