"""A scripted fake gdbstub on a socketpair, for the client's unit tests (no QEMU).

``FakeStub(handler)`` runs a thread that decodes our packets with the real codec, acks
them, and sends whatever ``handler(payload)`` returns: framed replies, raw garbage, or
nothing (a stall). ``QemuLike`` answers like QEMU 7.2 on a tiny target: enough for the
handshake, ``g``/``p``/``P``, ``m``/``M`` over a small RAM, ``Z``/``z``, ``c`` and ``\\x03``.
"""

from __future__ import annotations

import binascii
import contextlib
import socket
import threading
from collections.abc import Callable

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
    """One end of a socketpair served by a thread; ``client_sock`` is the other end."""

    def __init__(self, handler: Callable[[bytes], Reply], *, ack: bool = True) -> None:
        self.client_sock, self._sock = socket.socketpair()
        self.handler = handler
        self.ack = ack
        self.received: list[bytes] = []
        self.interrupts = 0
        self.raw_received = bytearray()
        self._reader = PacketReader()
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
            if b"\x03" in data:
                self.interrupts += data.count(b"\x03")
                self._deliver(self.handler(b"\x03"))
                data = data.replace(b"\x03", b"")
            for ev in self._reader.feed(data):
                if isinstance(ev, Packet):
                    self.received.append(ev.payload)
                    if self.ack:
                        self.send_raw(b"+")
                    self._deliver(self.handler(ev.payload))

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


class QemuLike:
    """A handler that answers like QEMU 7.2 for a target with a little RAM."""

    def __init__(self) -> None:
        self.ram = bytearray(RAM_SIZE)
        self.regs = [0x1111, 0x2222, 0xFFF0, 0x2, 0xF000, 0x5000, 0, 0]
        self.running = False
        self.phys = False
        self.breakpoints: set[tuple[int, int]] = set()
        self.hooks: dict[bytes, Callable[[bytes], Reply]] = {}
        self.stop_on_connect = False
        self.selected: dict[str, str] = {}
        """The thread each ``H`` packet selected, by operation (``g``, ``c``)."""

    def g_hex(self) -> bytes:
        return b"".join(binascii.hexlify(v.to_bytes(s, "little"))
                        for v, s in zip(self.regs, REG_SIZES, strict=True))

    def __call__(self, p: bytes) -> Reply:
        for prefix, hook in self.hooks.items():
            if p.startswith(prefix):
                return hook(p)
        if p == b"\x03":
            if not self.running:
                return None
            self.running = False
            return frame(b"T02thread:p01.01;")
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
            return frame(b"T05thread:p01.01;")
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
            self.running = True
            return None
        if p.startswith(b"vCont;s"):
            return frame(b"T05thread:%s;" % p.split(b":")[1])
        if p.startswith(b"qRcmd,"):
            text = binascii.unhexlify(p[6:])
            return [frame(b"O" + binascii.hexlify(b"you said: ")),
                    frame(b"O" + binascii.hexlify(text + b"\n")), frame(b"OK")]
        if p.startswith(b"D"):
            return frame(b"OK")
        return frame(b"")
