"""GdbClient: the Remote Serial Protocol over a socket, built for the probe-hit hot path.

Reply matching: every request that gets a reply is queued in ``_outstanding``; the stub
answers in order, so each reply pairs with the oldest one. Stop replies (``T``/``S``/
``W``/``X``) are told apart by shape and never pair with a non-stop request: they are
stop *events*, queued when the target was running, and dropped as stale when we already
know it is stopped (QEMU sends ``T02`` when a client connects to a running VM, possibly
after the client's first request: see FACTS.md). After a timeout the unanswered requests
stay queued as *abandoned*, so a late reply is discarded rather than paired with a newer
request.

Acknowledgements stay on (QEMU 7.2 has no ``QStartNoAckMode``) but cost no round trip:
the ``+`` for a reply rides on our next send (QEMU's system-mode stub never waits for an
ack), and the stub's ``+`` before its reply is consumed when the reply is read.

Not thread-safe: one thread drives one client (the engine selects on :meth:`fileno`).
"""

from __future__ import annotations

import binascii
import functools
import logging
import os
import re
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kprobevm.closing import Closing
from kprobevm.errors import (
    GdbConnectionClosed,
    GdbError,
    GdbProtocolError,
    GdbTimeout,
)
from kprobevm.gdbstub.packet import (
    DEFAULT_MAX_PACKET,
    Ack,
    BadChecksum,
    BreakpointKind,
    Nak,
    Notification,
    Packet,
    PacketReader,
    StopReply,
    check_replies,
    check_reply,
    checksum,
    decode_console_output,
    decode_hex,
    encode_packet,
    hex_checksum,
    is_console_output,
    is_stop_reply,
    join_memory_replies,
    memory_read_packets,
    memory_write_packets,
    parse_stop_reply,
    parse_thread_id,
)
from kprobevm.gdbstub.regs import RegisterLayout

__all__ = ["BreakpointKind", "ClientStats", "GdbAddress", "GdbClient"]

log = logging.getLogger(__name__)

GdbAddress = str | Path | tuple[str, int]
"""A gdbstub address: a unix socket path, or (host, port)."""

DEFAULT_TIMEOUT = 5.0
_RECV_SIZE = 1 << 16
_FAST_RECV_SIZE = 1 << 13
"""Small reads on the hot path: a large recv buffer costs an allocation per call."""
_FAST_READS = 64
"""Reads per reply the fast path makes before it hands over (a stub trickling bytes)."""
_SPIN_READS = 200
"""Non-blocking reads the fast path tries before it sleeps in recv (about 100-200 us).

The VM is stopped while we wait for a reply, so QEMU's vCPU thread leaves a core free;
not sleeping saves the wake-up of our thread on each of the reply's two writes."""
_INTERRUPT = b"\x03"
_NOT_FAST = (b"T", b"S", b"W", b"X", b"O", b"")
"""First bytes of replies the fast path hands to the general one (stops, console)."""
_PLAIN_ONE = re.compile(rb"\+\$([^$#}*]*)#([0-9a-fA-F]{2})\Z")
"""One ack and one plain reply: no escape, no run-length, nothing after it."""
_PLAIN_STOP = re.compile(rb"(\+?)\$([TSWX][0-9a-fA-F]{2}[^$#}*]*)#([0-9a-fA-F]{2})\Z")
"""A stop reply alone (after the '+' for our resume, perhaps): the trap path's packet."""
_HEX_BYTE = tuple(b"%02x" % i for i in range(256))
"""Checksums as QEMU writes them: comparing bytes beats parsing them."""
_FEATURES = b"qSupported:multiprocess+;swbreak+;hwbreak+;vContSupported+;xmlRegisters=i386"


@dataclass
class ClientStats:
    """Counters for the conversation (mutable: the client updates them as it goes)."""

    packets_sent: int = 0
    replies: int = 0
    naks_sent: int = 0
    naks_received: int = 0
    retransmits: int = 0
    bad_checksums: int = 0
    stale_stops: int = 0
    abandoned_replies: int = 0
    console_bytes: int = 0


class _Request:
    """A request on the wire: the framed packet, and whether the stub acked it yet."""

    __slots__ = ("acked", "expects_stop", "framed", "payload", "tries")

    def __init__(self, payload: bytes, framed: bytes, expects_stop: bool) -> None:
        self.payload = payload
        self.framed = framed
        self.expects_stop = expects_stop
        self.acked = False
        self.tries = 1


class GdbClient(Closing):
    """A typed RSP client; :meth:`connect` is the usual way to get one."""

    read_chunk: int
    """Bytes per ``m`` packet: a power of two whose hex reply fits the packet size."""
    write_chunk: int
    """Bytes per ``M`` packet: header and hex data must fit the stub's buffer (QEMU drops
    a packet that fills its 4096-byte line buffer without a reply)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_packet: int = DEFAULT_MAX_PACKET,
        max_retransmits: int = 3,
        lazy_acks: bool = True,
    ) -> None:
        # Blocking socket with kernel-side timeouts (SO_RCVTIMEO/SO_SNDTIMEO): the hot
        # path is then one send and one recv syscall, and still never hangs.
        sock.settimeout(None)
        _set_kernel_timeouts(sock, timeout)
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self.timeout = timeout
        self.max_retransmits = max_retransmits
        self.lazy_acks = lazy_acks
        self._reader = PacketReader(max_packet)
        self._events: deque[Packet | Notification] = deque()
        self._outstanding: deque[_Request] = deque()
        self._unacked: deque[_Request] = deque()
        self._abandoned = 0
        self._deferred = 0  # oldest outstanding requests whose OK is checked on arrival
        self._pending_ack = b""
        self._stops: deque[StopReply] = deque()
        self._closed = False
        self.running = False
        """True between a resume (``c``/``s``) and the stop reply that ends it."""
        self.stats = ClientStats()
        self.console: list[bytes] = []
        """``O`` output packets seen outside :meth:`monitor`."""
        self.packet_size = 0x400
        self.features: dict[str, str] = {}
        self.qemu_features: frozenset[str] = frozenset()
        self._layout: RegisterLayout | None = None
        self._thread: dict[str, str | None] = {"g": None, "c": None}
        self._phys_mode: bool | None = None
        self._reg_cache: tuple[str | None, dict[str, int]] | None = None
        self.last_stop: StopReply | None = None

    # -- connection --------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        address: GdbAddress,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        handshake: bool = True,
        **kwargs: object,
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
        client = cls(sock, timeout=timeout, **kwargs)  # type: ignore[arg-type]
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

    def fileno(self) -> int:
        """The socket's descriptor, to select() on together with a wake-up pipe.

        Call :meth:`poll_stop` first: a stop may already be buffered.
        """
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket (QEMU leaves a stopped VM stopped: :meth:`detach` resumes it)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._pending_ack:
                self._sock.send(self._pending_ack)
        except OSError:
            pass
        self._sock.close()

    @property
    def closed(self) -> bool:
        """True once closed (by us, or because the stub hung up)."""
        return self._closed

    # -- raw I/O -----------------------------------------------------------------------

    def _send(self, data: bytes, sent: bytes | None = None) -> None:
        if self._closed:
            raise GdbConnectionClosed("connection is closed", sent=sent)
        if self._pending_ack:
            data = self._pending_ack + data
            self._pending_ack = b""
        view = memoryview(data)
        deadline = time.monotonic() + self.timeout
        while view:
            try:
                n = self._sock.send(view)
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GdbTimeout("stub stopped reading our packets", sent=sent) from None
                select.select([], [self._sock], [], remaining)
                continue
            except OSError as exc:
                self._hang_up()
                raise GdbConnectionClosed(f"send failed: {exc}", sent=sent) from exc
            view = view[n:]

    def _hang_up(self) -> None:
        self._closed = True
        self._sock.close()

    def _fill(self, deadline: float | None, sent: bytes | None) -> bool:
        """Receive once (waiting until ``deadline``); False when nothing arrived in time."""
        if self._closed:
            raise GdbConnectionClosed("connection is closed", sent=sent)
        if deadline is None:
            ready = self._poll.poll()
        else:
            ms = (deadline - time.monotonic()) * 1000.0
            ready = self._poll.poll(max(0, int(ms + 0.999))) if ms > 0 else self._poll.poll(0)
        if not ready:
            return False
        try:
            data = self._sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as exc:
            self._hang_up()
            raise GdbConnectionClosed(f"receive failed: {exc}", sent=sent) from exc
        if not data:
            self._hang_up()
            raise GdbConnectionClosed("the stub closed the connection", sent=sent)
        self._absorb(data, sent)
        return True

    def _absorb(self, data: bytes, sent: bytes | None) -> None:
        try:
            events = self._reader.feed(data)
        except GdbProtocolError as exc:
            exc.sent = sent
            raise
        for ev in events:
            if isinstance(ev, Packet):
                self._pending_ack += b"+"
                if not self.lazy_acks:
                    self._flush_acks()
                self._events.append(ev)
            elif isinstance(ev, Ack):
                if self._unacked:
                    self._unacked.popleft().acked = True
            elif isinstance(ev, Nak):
                self.stats.naks_received += 1
                self._retransmit(sent)
            elif isinstance(ev, BadChecksum):
                self.stats.bad_checksums += 1
                self.stats.naks_sent += 1
                if self.stats.naks_sent > self.max_retransmits * (self.stats.replies + 1):
                    raise GdbProtocolError("too many packets with bad checksums",
                                           sent=sent, received=ev.raw)
                self._send(b"-", sent)
            else:
                log.debug("notification ignored: %r", ev.payload[:80])

    def _flush_acks(self) -> None:
        if self._pending_ack:
            ack, self._pending_ack = self._pending_ack, b""
            self._send(ack)

    def _retransmit(self, sent: bytes | None) -> None:
        if not self._unacked:
            return  # a NAK for nothing outstanding (QEMU NAKs garbage it saw)
        req = self._unacked.popleft()
        if req.tries > self.max_retransmits:
            raise GdbProtocolError(f"stub rejected a packet {req.tries} times",
                                   sent=req.payload)
        req.tries += 1
        self.stats.retransmits += 1
        self._unacked.append(req)
        self._send(req.framed, req.payload)

    # -- the reply dispatcher ------------------------------------------------------------

    def _next_packet(self, deadline: float | None, sent: bytes | None) -> Packet | None:
        while not self._events:
            if not self._fill(deadline, sent):
                return None
        ev = self._events.popleft()
        return ev if isinstance(ev, Packet) else None

    def _dispatch_unrequested(self, payload: bytes) -> None:
        """A packet no request is waiting for: a stop event, console output, or a desync."""
        if is_stop_reply(payload):
            self._note_stop(parse_stop_reply(payload))
        elif is_console_output(payload):
            text = decode_console_output(payload)
            self.stats.console_bytes += len(text)
            self.console.append(text)
        else:
            raise GdbProtocolError("unexpected packet with no request outstanding",
                                   received=payload)

    def _note_stop(self, stop: StopReply) -> None:
        if not self.running:
            self.stats.stale_stops += 1
            log.debug("stale stop reply dropped: %r", stop.raw)
            return
        self._stopped(stop)
        self._stops.append(stop)

    def _stopped(self, stop: StopReply) -> None:
        self.running = False
        self.last_stop = stop
        # QEMU makes the stopped vCPU both the g and the c thread (gdb_set_stop_cpu).
        self._thread["g"] = self._thread["c"] = stop.thread
        self._reg_cache = None

    def send_packet(self, payload: bytes, *, expects_reply: bool = True) -> None:
        """Frame and send one packet (payload already escaped where binary)."""
        self._send_many([payload], no_reply=None if expects_reply else payload)

    def _send_many(self, payloads: Iterable[bytes], *, no_reply: bytes | None = None) -> None:
        """Send packets in one write; ``no_reply`` names a last packet with no reply (``c``)."""
        framed_all = []
        for payload in payloads:
            framed = encode_packet(payload)
            req = _Request(payload, framed, payload[:1] == b"?")
            self._unacked.append(req)
            if payload is not no_reply:
                self._outstanding.append(req)
            framed_all.append(framed)
        self.stats.packets_sent += len(framed_all)
        self._send(b"".join(framed_all), framed_all[-1] if framed_all else None)

    def recv_reply(self, timeout: float | None = None) -> bytes:
        """The reply to the oldest outstanding request (decoded payload, ``Exx`` included)."""
        if not self._outstanding:
            raise GdbError("recv_reply with no request outstanding")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            req = self._outstanding[0]
            pkt = self._next_packet(deadline, req.payload)
            if pkt is None:
                if not self._events and time.monotonic() >= deadline:
                    self._abandon()
                    raise GdbTimeout(
                        f"no reply within {self.timeout if timeout is None else timeout:g} s",
                        sent=req.payload,
                    )
                continue
            payload = pkt.payload
            if self._deferred and not self._abandoned and not (
                is_stop_reply(payload) or is_console_output(payload)
            ):
                self._take_deferred(payload)
                continue
            if self._abandoned:
                if is_stop_reply(payload) and not req.expects_stop:
                    self._dispatch_unrequested(payload)
                    continue
                if is_console_output(payload):
                    self._dispatch_unrequested(payload)
                    continue
                self._abandoned -= 1
                self._outstanding.popleft()
                self.stats.abandoned_replies += 1
                continue
            if req.expects_stop:
                if not is_stop_reply(payload):
                    self._outstanding.popleft()
                    raise GdbProtocolError("expected a stop reply", sent=req.payload,
                                           received=payload)
            elif is_stop_reply(payload) or is_console_output(payload):
                self._dispatch_unrequested(payload)
                continue
            self._outstanding.popleft()
            self.stats.replies += 1
            return payload

    def _take_deferred(self, payload: bytes) -> None:
        """Check the reply to the oldest deferred request (sent with a resume)."""
        req = self._outstanding.popleft()
        self._deferred -= 1
        self.stats.replies += 1
        check_reply(req.payload, payload)

    def _abandon(self) -> None:
        # Replies still owed are discarded when they arrive, so they never pair with a
        # newer request.
        self._abandoned = len(self._outstanding)
        self._unacked.clear()

    def request(self, payload: bytes, timeout: float | None = None) -> bytes:
        """Send one packet and return its reply; ``Exx`` raises GdbErrorReply."""
        reply = self.roundtrip(payload) if timeout is None else self._slow_roundtrip(
            payload, timeout)
        check_reply(payload, reply)
        return reply

    def roundtrip(self, payload: bytes) -> bytes:
        """One request, one reply (``Exx`` included), in one send and usually one recv."""
        replies = self._fast_exchange([payload])
        return replies[0] if replies is not None else self.recv_reply()

    def _fast_exchange(self, payloads: Sequence[bytes]) -> list[bytes] | None:
        """The hot path: send ``payloads`` in one write, read until every reply has ended.

        When nothing else is in flight and the replies come back plain (``+$...#xx``
        each, no escape, no run-length, no stop or console packet), they are checked
        and returned without the general event machinery. Otherwise the requests are
        left outstanding with whatever arrived fed to the reader, and None tells the
        caller to collect the replies with :meth:`recv_reply`, which keeps every
        guarantee.
        """
        framed = [encode_packet(p) for p in payloads]
        n = len(framed)
        got = self._fast_io(payloads, framed[0] if n == 1 else b"".join(framed))
        if got is None:
            return None
        replies = _plain_replies(got, n)
        if replies is None:
            self._fast_fallback(payloads, framed, got)
            return None
        self._pending_ack = b"+" * n
        self.stats.replies += n
        return replies

    def _hex_roundtrip(self, payload: bytes, size: int) -> bytes | None:
        """One request whose good reply is ``size`` bytes in hex (``m``, ``g``): the bytes.

        The shortest path there is: the reply is found by position in ``+$hex#xx``, and
        unhexlify rejects every byte that would make it anything else (``$``, ``#``,
        ``}``, ``*``, a stop, console output, ``Exx``). None when something else came or
        was in flight: the reply is then :meth:`recv_reply`'s, as in :meth:`_fast_exchange`.
        """
        framed = _framed(payload)
        got = self._fast_io((payload,), framed)
        if got is None:
            return None
        if len(got) == 2 * size + 5 and got[:2] == b"+$" and got[-3] == 0x23:
            body = got[2:-3]
            try:
                data = binascii.unhexlify(body)
            except (binascii.Error, ValueError):
                pass
            else:
                # hex digits only, so the short-cut checksum is exact
                if _HEX_BYTE[hex_checksum(body)] == got[-2:]:
                    self._pending_ack = b"+"
                    self.stats.replies += 1
                    return data
        self._fast_fallback((payload,), (framed,), got)
        return None

    def _fast_io(self, payloads: Sequence[bytes], data: bytes) -> bytes | None:
        """Send ``data`` (``payloads`` framed) after the acks we owe, and read until as
        many packets have ended; what came, less after a stall or a stub trickling bytes.

        None when other requests are in flight or bytes half-read: ``payloads`` then go
        out the general way, for :meth:`recv_reply`.
        """
        if (self._outstanding or self._unacked or self._events or self._reader.buffer
                or self._closed or not self.lazy_acks):
            self._send_many(payloads)
            return None
        n = len(payloads)
        data = self._pending_ack + data
        self._pending_ack = b""
        self.stats.packets_sent += n
        got = b""
        try:
            self._sock.sendall(data)
            # QEMU writes each '+' and each reply separately: read until the n-th ends.
            for _ in range(_FAST_READS * n):
                chunk = _spin_recv(self._sock)
                if not chunk:
                    self._hang_up()
                    raise GdbConnectionClosed("the stub closed the connection",
                                              sent=payloads[0])
                got += chunk
                if len(got) > 5 and got[-3] == 0x23 and (n == 1 or got.count(b"#") >= n):
                    break
        except (BlockingIOError, InterruptedError, TimeoutError):
            pass  # a stall: the general path waits out the deadline
        except OSError as exc:
            self._hang_up()
            raise GdbConnectionClosed(f"socket error: {exc}", sent=payloads[0]) from exc
        return got

    def _fast_fallback(self, payloads: Sequence[bytes], framed: Sequence[bytes],
                       got: bytes) -> None:
        """Hand a fast exchange over to the general path: requests outstanding, bytes read."""
        # Request records are built only now: every step on the fast path is paid with
        # caches that QEMU's thread has just turned over.
        reqs = [_Request(p, f, False) for p, f in zip(payloads, framed, strict=True)]
        self._unacked.extend(reqs)
        self._outstanding.extend(reqs)
        if got:
            self._absorb(got, payloads[0])

    def _slow_roundtrip(self, payload: bytes, timeout: float | None) -> bytes:
        self._send_many([payload])
        return self.recv_reply(timeout)

    def request_ok(self, payload: bytes) -> None:
        """A request whose only good answer is ``OK``."""
        reply = self.request(payload)
        if reply != b"OK":
            raise GdbProtocolError("expected OK", sent=payload, received=reply)

    def pipeline(self, payloads: Sequence[bytes], *, window: int = 32) -> list[bytes]:
        """Send packets back to back and return their replies in order (``Exx`` included).

        At most ``window`` requests are in flight, so neither side's socket buffer fills
        while the other waits (QEMU blocks writing replies nobody reads).
        """
        if len(payloads) <= window // 2:
            fast = self._fast_exchange(payloads)
            if fast is not None:
                return fast
            return [self.recv_reply() for _ in payloads]
        replies: list[bytes] = []
        total = len(payloads)
        sent = 0
        while len(replies) < total:
            in_flight = sent - len(replies)
            if sent < total and in_flight <= window // 2:
                batch = payloads[sent:sent + window - in_flight]
                self._send_many(batch)
                sent += len(batch)
            replies.append(self.recv_reply())
        return replies

    # -- features ----------------------------------------------------------------------

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

    # -- threads -----------------------------------------------------------------------

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
            ids = reply[1:].decode("ascii").split(",")
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
        return reply[2:].decode("ascii")

    def _select_packets(self, op: str, thread: str | None) -> list[bytes]:
        if thread is None or self._thread.get(op) == thread:
            return []
        return [b"H%s%s" % (op.encode(), thread.encode())]

    def select_thread(self, op: str, thread: str) -> None:
        """``Hg``/``Hc``: the vCPU later register/memory (``g``) or resume (``c``) ops use."""
        if op not in ("g", "c"):
            raise ValueError(f"op must be 'g' or 'c', not {op!r}")
        for p in self._select_packets(op, thread):
            self.request_ok(p)
            self._thread[op] = thread
            self._reg_cache = None

    def _with_thread(self, thread: str | None, payloads: list[bytes]) -> list[bytes]:
        """Run ``payloads`` in one round trip, prefixed by an ``Hg`` when needed."""
        pre = self._select_packets("g", thread)
        replies = self.pipeline(pre + payloads)
        if pre:
            check_reply(pre[0], replies[0])
            self._thread["g"] = thread
            self._reg_cache = None
        return replies[len(pre):]

    # -- registers ---------------------------------------------------------------------

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
        self._thread["g"] = threads[-1]
        self._reg_cache = None
        values = {}
        for i, t in enumerate(threads):
            check_reply(packets[2 * i], replies[2 * i])
            data = decode_hex(replies[2 * i + 1], payload)
            values[t] = int.from_bytes(data[: reg.size], "little")
        return values

    def register_write_packets(
        self, values: dict[str, int], thread: str | None = None
    ) -> list[bytes]:
        """``P`` packets for the registers in ``values`` that differ from the last read.

        With ``thread`` (other than the selected one) an ``Hg`` leads, and the client
        takes it as selected: the caller must send these packets before any other.
        """
        layout = self.layout
        select = self._select_packets("g", thread)
        if select:
            self._thread["g"] = thread
            self._reg_cache = None
        cached = self._reg_cache[1] if self._reg_cache is not None and (
            self._reg_cache[0] == self._thread["g"]) else None
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
        replies = self._with_thread(thread, packets)
        for p, r in zip(packets, replies, strict=True):
            check_reply(p, r)
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

    # -- memory ------------------------------------------------------------------------

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
            self._thread["g"] = thread
            self._reg_cache = None
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

    # -- breakpoints -------------------------------------------------------------------

    def insert_breakpoint(self, kind: BreakpointKind | int, addr: int, length: int = 1) -> None:
        """``Z<kind>,addr,length`` (length is the instruction kind for Z0/Z1: 1 on x86)."""
        self.request_ok(b"Z%d,%x,%x" % (int(kind), addr, length))

    def remove_breakpoint(self, kind: BreakpointKind | int, addr: int, length: int = 1) -> None:
        """``z<kind>,addr,length``."""
        self.request_ok(b"z%d,%x,%x" % (int(kind), addr, length))

    # -- execution ---------------------------------------------------------------------

    def cont(
        self, *, before: Sequence[bytes] = (), thread: str | None = None, defer: bool = False
    ) -> None:
        """Resume (``c``, or ``vCont;c:thread``); ``before`` packets go in the same send.

        The replies to ``before`` (say ``P`` writes) are read and checked after the
        resume has been sent, so a probe hit costs no extra round trip for them; with
        ``defer`` they are not even waited for: each is checked when it arrives, ahead of
        the next stop reply (an ``Exx`` then raises from ``wait_stop``/``poll_stop``).
        """
        self._require_stopped("cont")
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
        self.running = True
        self._reg_cache = None

    def step(self, thread: str | None = None, *, wait: bool = True,
             timeout: float | None = None) -> StopReply | None:
        """Single-step one vCPU (``vCont;s:thread``); returns its stop reply when ``wait``."""
        self._require_stopped("step")
        thread = thread or self._thread["c"] or self._thread["g"]
        payload = b"vCont;s:%s" % thread.encode() if thread else b"s"
        self._send_many([payload], no_reply=payload)
        self._resumed()
        return self.wait_stop(timeout if timeout is not None else self.timeout) if wait else None

    def interrupt(self, *, wait: bool = True, timeout: float | None = None) -> StopReply | None:
        """Stop a running target with ``\\x03``; a no-op when it is stopped (QEMU would
        not answer)."""
        if not self.running:
            return None
        self._send(_INTERRUPT, _INTERRUPT)
        if not wait:
            return None
        return self.wait_stop(timeout if timeout is not None else self.timeout)

    def _require_stopped(self, what: str) -> None:
        if self.running:
            raise GdbError(f"{what}: the target is running (wait_stop or interrupt first)")

    def wait_stop(self, timeout: float | None = None) -> StopReply:
        """Block until the target stops (a queued stop first); None waits forever."""
        if self._stops:
            return self._stops.popleft()
        if not self.running:
            raise GdbError("wait_stop: the target is stopped and no stop is queued")
        self._flush_acks()
        return self._wait_stop(timeout)

    def _wait_stop(self, timeout: float | None) -> StopReply:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stops:
            if len(self._outstanding) > self._abandoned + self._deferred:
                raise GdbError("wait_stop: a reply to an earlier request is still unread")
            pkt = self._next_packet(deadline, None)
            if pkt is None:
                if deadline is not None and not self._events and time.monotonic() >= deadline:
                    raise GdbTimeout(f"target did not stop within {timeout:g} s")
                continue
            if self._abandoned:
                self._outstanding.popleft()
                self._abandoned -= 1
                continue
            self._dispatch_packet(pkt.payload)
        return self._stops.popleft()

    def _dispatch_packet(self, payload: bytes) -> None:
        """A packet while the target runs: a deferred reply, a stop, or console output."""
        if self._deferred and not (is_stop_reply(payload) or is_console_output(payload)):
            self._take_deferred(payload)
        else:
            self._dispatch_unrequested(payload)

    def _recv_nowait(self) -> bytes | None:
        """What has arrived, in one syscall; None if nothing has."""
        try:
            data = self._sock.recv(_FAST_RECV_SIZE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self._hang_up()
            raise GdbConnectionClosed(f"receive failed: {exc}") from exc
        if not data:
            self._hang_up()
            raise GdbConnectionClosed("the stub closed the connection")
        return data

    def poll_stop(self) -> StopReply | None:
        """A stop reply if one has arrived, without blocking."""
        if self._stops:
            return self._stops.popleft()
        if not self.running:
            return None
        if not (self._events or self._reader.buffer or self._deferred or self._closed):
            # The trap path's two wake-ups per hit: the '+' for our 'c', then the stop.
            data = self._recv_nowait()
            if data is None:
                return None
            if data == b"+":
                if self._unacked:
                    self._unacked.popleft().acked = True
                return None
            m = _PLAIN_STOP.match(data)
            if m is not None and int(m[3], 16) == checksum(m[2]):
                if m[1] and self._unacked:
                    self._unacked.popleft().acked = True
                self._pending_ack += b"+"
                if not self.lazy_acks:
                    self._flush_acks()
                self._note_stop(parse_stop_reply(m[2]))
                return self._stops.popleft() if self._stops else None
            self._absorb(data, None)
        while self._fill(time.monotonic(), None):
            pass
        while self._events and not self._stops:
            pkt = self._events.popleft()
            if isinstance(pkt, Packet):
                self._dispatch_packet(pkt.payload)
        return self._stops.popleft() if self._stops else None

    # -- monitor and detach ------------------------------------------------------------

    def monitor(self, command: str, timeout: float | None = None) -> str:
        """Run a QEMU monitor command (``qRcmd``); returns its output text."""
        payload = b"qRcmd," + binascii.hexlify(command.encode())
        start = len(self.console)
        self._send_many([payload])
        reply = self.recv_reply(timeout)
        check_reply(payload, reply)
        text = b"".join(self.console[start:])
        del self.console[start:]
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


# -- helpers --------------------------------------------------------------------------


def _spin_recv(sock: socket.socket) -> bytes:
    """recv, polling for a while before blocking (see _SPIN_READS)."""
    recv = sock.recv
    for _ in range(_SPIN_READS):
        try:
            return recv(_FAST_RECV_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
    return recv(_FAST_RECV_SIZE)


def _plain_replies(data: bytes, n: int) -> list[bytes] | None:
    """``n`` plain replies (``+`` acks between them) that make up ``data`` exactly, each
    with a good checksum and no escape, run-length, stop or console packet; else None."""
    end = len(data)
    if n == 1:
        # the usual case, '+$body#xx', in as few steps as possible
        m = _PLAIN_ONE.match(data)
        if m is None or data[2:3] in _NOT_FAST or int(m[2], 16) != checksum(m[1]):
            return None
        return [m[1]]
    replies = []
    pos = 0
    for _ in range(n):
        while pos < end and data[pos] == 0x2B:  # '+'
            pos += 1
        if pos >= end or data[pos] != 0x24:  # '$'
            return None
        hash_at = data.find(b"#", pos + 1)
        if hash_at < 0 or hash_at + 3 > end:
            return None
        body = data[pos + 1 : hash_at]
        if (body[:1] in _NOT_FAST or body.find(b"$") >= 0 or body.find(b"}") >= 0
                or body.find(b"*") >= 0 or data[hash_at + 1 : hash_at + 3]
                != b"%02x" % checksum(body)):
            return None
        replies.append(body)
        pos = hash_at + 3
    return replies if pos == end else None


@functools.lru_cache(maxsize=1024)
def _framed(payload: bytes) -> bytes:
    """``$payload#xx`` for :meth:`GdbClient._hex_roundtrip`, cached: a probe handler
    sends the same few short ``m`` and ``g`` requests over and over."""
    return encode_packet(payload)


def _parse_features(reply: bytes) -> dict[str, str]:
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


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _set_kernel_timeouts(sock: socket.socket, timeout: float) -> None:
    tv = struct.pack("@ll", int(timeout), int((timeout % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
