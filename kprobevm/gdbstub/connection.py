"""RspConnection: requests paired with their replies, and stop replies told apart.

Reply matching: every request that gets a reply is queued in ``_outstanding``; the stub
answers in order, so each reply pairs with the oldest one. Stop replies (``T``/``S``/
``W``/``X``) are told apart by shape and never pair with a non-stop request: they are
stop *events*, queued when the target was running, and dropped as stale when we already
know it is stopped (QEMU sends ``T02`` when a client connects to a running VM, possibly
after the client's first request). After a timeout the unanswered requests stay queued
as *abandoned*, so a late reply is discarded rather than paired with a newer request;
the next request is preceded by a probe (``qC``) whose reply marks the end of what was
owed, so a reply that never comes (a stub may drop one) does not shift the pairing.
A packet the codec had to throw away (oversized, undecodable, cut short by a new ``$``,
NAKed past the limit, or with a bad checksum and not resent by the deadline: QEMU never
resends) is taken as the oldest request's reply, and that request fails with the error,
so the next one still pairs with its own reply.

Nothing the stub sends grows a buffer without bound: console output is kept up to
:data:`CONSOLE_LIMIT` bytes (more is counted in ``stats.console_dropped``), the acks we
owe are capped, a stop is queued only when the target was running (one per resume),
and every wait ends at its deadline however fast packets that answer nothing arrive.

The fast path: when nothing else is in flight, a request goes out in one write and its
reply is read straight off the socket; only a reply that is not plain (escapes,
run-length, a stop or console packet in between, a stall) goes the general way.
"""

from __future__ import annotations

import binascii
import functools
import logging
import re
import socket
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Unpack

from kprobevm.errors import (
    GdbConnectionClosed,
    GdbError,
    GdbErrorReply,
    GdbProtocolError,
    GdbTimeout,
)
from kprobevm.gdbstub.link import FAST_RECV_SIZE, INTERRUPT, LinkOptions, Request, RspLink
from kprobevm.gdbstub.packet import (
    STOP_CACHE_MAX,
    Packet,
    StopReply,
    check_reply,
    checksum,
    decode_console_output,
    encode_packet,
    hex_checksum,
    is_console_output,
    is_stop_reply,
    parse_short_stop_reply,
    parse_stop_reply,
)

__all__ = ["CONSOLE_LIMIT", "RspConnection"]

log = logging.getLogger(__name__)

_FAST_READS = 64
"""Reads per reply the fast path makes before it hands over (a stub trickling bytes)."""
_SPIN_READS = 200
"""Non-blocking reads the fast path tries before it sleeps in recv (about 100-200 us).

The VM is stopped while we wait for a reply, so QEMU's vCPU thread leaves a core free;
not sleeping saves the wake-up of our thread on each of the reply's two writes."""
_NOT_FAST = (b"T", b"S", b"W", b"X", b"O", b"")
"""First bytes of replies the fast path hands to the general one (stops, console), but
for ``OK``: an ``Hg``'s reply is no console output."""
_PLAIN_ONE = re.compile(rb"\+\$([^$#}*]*)#([0-9a-fA-F]{2})\Z")
"""One ack and one plain reply: no escape, no run-length, nothing after it."""
_PLAIN_STOP = re.compile(rb"(\+?)\$([TSWX][0-9a-fA-F]{2}[^$#}*]*)#([0-9a-fA-F]{2})\Z")
"""A stop reply alone (after the '+' for our resume, perhaps): the trap path's packet."""
_HEX_BYTE = tuple(b"%02x" % i for i in range(256))
"""Checksums as QEMU writes them: comparing bytes beats parsing them."""
_SYNC_PROBES = ((b"qC", b"QC"), (b"vMustReplyEmpty", b""))
"""Requests to get back in step after a timeout, with the start of their replies: ``qC``
(QEMU answers ``QC<thread>``, which nothing else we send gets), or, when a ``qC`` is
among the replies owed, ``vMustReplyEmpty`` (every stub answers it empty)."""
CONSOLE_LIMIT = 1 << 20
"""Bytes of ``O`` console output kept until read (:meth:`RspConnection.take_console`);
output beyond it is counted in ``stats.console_dropped`` and not kept."""
_POLL_READS = 16
"""Reads one :meth:`RspConnection.poll_stop` makes at most: a stub that never stops
sending must not keep it from returning."""


class RspConnection(RspLink):
    """An RSP conversation: requests and their replies, stop events, and stop polling."""

    def __init__(self, sock: socket.socket, **options: Unpack[LinkOptions]) -> None:
        super().__init__(sock, **options)
        self._outstanding: deque[Request] = deque()
        self._abandoned = 0
        self._deferred = 0  # oldest outstanding requests whose OK is checked on arrival
        self._stops: deque[StopReply] = deque()
        self.last_stop: StopReply | None = None
        self.console: list[bytes] = []
        """``O`` output packets seen outside a request that collects them (read them with
        :meth:`take_console`; at most :data:`CONSOLE_LIMIT` bytes are kept)."""
        self.console_held = 0
        """Bytes in :attr:`console`."""
        self._stalled_at = 0.0
        """When the fast path's wait for a reply timed out (0: it did not)."""
        self._bad_seen = 0
        """``stats.bad_checksums`` when a reply last paired: more since means the awaited
        reply may be one we NAKed."""
        self._thread: dict[str, str | None] = {"g": None, "c": None}
        """The vCPU the stub uses for register/memory (``g``) and resume (``c``) packets."""

    @property
    def stop_buffered(self) -> bool:
        """True when stop replies or unsorted packets wait in our buffers: select() on
        :meth:`fileno` would not wake for them, so :meth:`poll_stop` first."""
        return bool(self._stops or self._events)

    # -- sending requests and pairing replies ----------------------------------------------

    def send_packet(self, payload: bytes, *, expects_reply: bool = True) -> None:
        """Frame and send one packet (payload already escaped where binary)."""
        self._send_many([payload], no_reply=None if expects_reply else payload)

    def _send_many(self, payloads: Iterable[bytes], *, no_reply: bytes | None = None) -> None:
        """Send packets in one write; ``no_reply`` names a last packet with no reply (``c``)."""
        if self._abandoned and not self.running:
            self._resync()
        framed_all = []
        for payload in payloads:
            self._note_selection(payload)
            framed = encode_packet(payload)
            req = Request(payload, framed, payload[:1] == b"?")
            self._unacked.append(req)
            if payload is not no_reply:
                self._outstanding.append(req)
            framed_all.append(framed)
        self.stats.packets_sent += len(framed_all)
        self.stats.sends += 1
        self._send(b"".join(framed_all), framed_all[-1] if framed_all else None)

    def _resync(self) -> None:
        """Before the first request after a timeout: the replies still owed may come late,
        or never (a stub may drop one). A probe whose reply none of them can look like
        marks where they end; all that comes before its reply is theirs, and dropped."""
        owed = [r.payload for r in list(self._outstanding)[:self._abandoned]]
        probe, shape = _SYNC_PROBES[0] if _SYNC_PROBES[0][0] not in owed else _SYNC_PROBES[1]
        req = Request(probe, encode_packet(probe), False)
        self._unacked.append(req)
        self._outstanding.append(req)  # abandoned with the rest, should this fail
        self._abandoned = len(self._outstanding)
        self.stats.packets_sent += 1
        self.stats.sends += 1
        self.stats.resyncs += 1
        self._send(req.framed, probe)
        deadline = time.monotonic() + self.timeout
        first = True
        while True:
            if not first and not self._events and time.monotonic() >= deadline:
                raise GdbTimeout(f"no reply within {self.timeout:g} s to a probe sent to "
                                 "get back in step after a timeout", sent=probe)
            first = False
            pkt = self._next_packet(deadline, probe)
            if pkt is None:
                continue
            payload = pkt.payload
            if payload == shape or (shape and payload.startswith(shape)):
                break
            if is_stop_reply(payload) or is_console_output(payload):
                self._dispatch_unrequested(payload)
            else:
                self.stats.abandoned_replies += 1
        for _ in range(self._abandoned):  # the probe, and those answered late or never
            self._outstanding.popleft()
        self._abandoned = 0
        self._unacked.clear()
        self._bad_seen = self.stats.bad_checksums

    def _note_selection(self, payload: bytes) -> None:
        """An ``Hg``/``Hc`` selects its thread when the stub gets it, whoever queued it."""
        if payload[:1] == b"H":
            self._thread[payload[1:2].decode()] = payload[2:].decode()

    def _next_packet(self, deadline: float | None, sent: bytes | None) -> Packet | None:
        """The next received packet, waiting until ``deadline``; None if none came (or a
        notification did)."""
        while not self._events:
            if not self._fill(deadline, sent):
                return None
            if deadline is not None and not self._events and time.monotonic() >= deadline:
                return None  # bytes that make no packet (noise, NAKs) still end at the deadline
        ev = self._events.popleft()
        return ev if isinstance(ev, Packet) else None

    def recv_reply(self, timeout: float | None = None) -> bytes:
        """The reply to the oldest outstanding request (decoded payload, ``Exx`` included)."""
        if not self._outstanding:
            raise GdbError("recv_reply with no request outstanding")
        waited = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + waited
        if self._stalled_at:
            if timeout is None:
                deadline = self._stalled_at
            self._stalled_at = 0.0
        try:
            return self._await_reply(deadline, waited)
        except (GdbProtocolError, GdbErrorReply):
            # The caller gives up on this request: a reply of its still to come must not
            # pair with the next one.
            self._abandon()
            raise

    def _await_reply(self, deadline: float, waited: float) -> bytes:
        first = True
        resent = self.stats.retransmits
        while True:
            req = self._outstanding[0]
            # Packets that answer nothing (stale stops, console output, late replies)
            # may keep coming: what is buffered is read, then the deadline holds.
            if not first and not self._events and time.monotonic() >= deadline:
                if self.stats.retransmits != resent:  # (a few times at most)
                    resent = self.stats.retransmits
                    deadline = time.monotonic() + waited  # a resent packet's own timeout
                    continue
                if self.stats.bad_checksums != self._bad_seen and not self._abandoned:
                    self._bad_seen = self.stats.bad_checksums
                    self._reply_lost()  # we NAKed it and it was not resent
                    raise GdbProtocolError("reply with a bad checksum, not resent in "
                                           "time", sent=req.payload)
                self._abandon()
                raise GdbTimeout(
                    f"no reply within {waited:g} s",
                    sent=req.payload,
                )
            first = False
            pkt = self._next_packet(deadline, req.payload)
            if pkt is None:
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
            if self._unacked:
                self._acked_by_reply(req)
            self._bad_seen = self.stats.bad_checksums
            return payload

    def _acked_by_reply(self, req: Request) -> None:
        """A reply to ``req`` says the stub got it and all sent before it, ``+`` or not:
        a lost ack must not keep requests unacknowledged (and the fast path shut) forever."""
        unacked = self._unacked
        if req in unacked:
            while unacked.popleft() is not req:
                pass

    def _absorb(self, data: bytes, sent: bytes | None) -> None:
        """:meth:`RspLink._absorb`; when the codec throws a packet away, the oldest
        request's reply is taken to be lost with it (see the module's notes)."""
        reader = self._reader
        truncated = reader.truncated
        try:
            super()._absorb(data, sent)
        except GdbProtocolError:
            self._reply_lost()
            self._abandon()  # the error ends the wait of whoever reads replies
            raise
        if reader.truncated != truncated and self._outstanding and not self.running \
                and self._reply_lost():
            self._abandon()
            raise GdbProtocolError("a reply was cut short by the start of another packet",
                                   sent=sent)

    def _reply_lost(self) -> bool:
        """The oldest outstanding request will get no reply: drop it, so the next reply
        pairs with the next request. True when someone was still waiting for it (it was
        not abandoned)."""
        if not self._outstanding:
            return False
        req = self._outstanding.popleft()
        waited = not self._abandoned
        if self._abandoned:
            self._abandoned -= 1
        elif self._deferred:
            self._deferred -= 1
        if self._unacked:
            self._acked_by_reply(req)
        return waited

    def _take_deferred(self, payload: bytes) -> None:
        """Check the reply to the oldest deferred request (sent with a resume)."""
        req = self._outstanding.popleft()
        self._deferred -= 1
        self.stats.replies += 1
        if self._unacked:
            self._acked_by_reply(req)
        check_reply(req.payload, payload)

    def _abandon(self) -> None:
        """After a timeout: replies still owed are discarded when they arrive, so they
        never pair with a newer request."""
        self._abandoned = len(self._outstanding)
        self._deferred = 0  # abandoned now, deferred ones included
        self._unacked.clear()

    def _dispatch_unrequested(self, payload: bytes) -> None:
        """A packet no request is waiting for: a stop event, console output, or a desync."""
        if is_stop_reply(payload):
            if not self.running:  # stale whatever it says: not even parsed
                self.stats.stale_stops += 1
                return
            self._note_stop(parse_stop_reply(payload))
        elif is_console_output(payload):
            text = decode_console_output(payload)
            self.stats.console_bytes += len(text)
            if not self.console:
                self.console_held = 0  # the list was emptied by hand
            if self.console_held + len(text) > CONSOLE_LIMIT:
                self.stats.console_dropped += len(text)
                return
            self.console.append(text)
            self.console_held += len(text)
        else:
            raise GdbProtocolError("unexpected packet with no request outstanding",
                                   received=payload)

    def take_console(self, start: int = 0) -> bytes:
        """The console output kept from packet ``start`` on, removed from :attr:`console`."""
        text = b"".join(self.console[start:])
        del self.console[start:]
        self.console_held = sum(map(len, self.console)) if start else 0
        return text

    def _note_stop(self, stop: StopReply) -> None:
        """Queue a stop event, or drop it as stale when the target is known stopped."""
        if not self.running:
            self.stats.stale_stops += 1
            log.debug("stale stop reply dropped: %r", stop.raw)
            return
        self.running = False
        self.last_stop = stop
        # QEMU makes the stopped vCPU both the g and the c thread (gdb_set_stop_cpu).
        self._thread["g"] = self._thread["c"] = stop.thread
        self._stops.append(stop)

    # -- requests --------------------------------------------------------------------------

    def request(self, payload: bytes, timeout: float | None = None) -> bytes:
        """Send one packet and return its reply; ``Exx`` raises GdbErrorReply."""
        if timeout is None:
            reply = self.roundtrip(payload)
        else:
            self._send_many([payload])
            reply = self.recv_reply(timeout)
        check_reply(payload, reply)
        return reply

    def request_ok(self, payload: bytes) -> None:
        """A request whose only good answer is ``OK``."""
        reply = self.request(payload)
        if reply != b"OK":
            raise GdbProtocolError("expected OK", sent=payload, received=reply)

    def roundtrip(self, payload: bytes) -> bytes:
        """One request, one reply (``Exx`` included), in one send and usually one recv."""
        replies = self._fast_exchange([payload])
        return replies[0] if replies is not None else self.recv_reply()

    def pipeline(self, payloads: Sequence[bytes], *, window: int = 32) -> list[bytes]:
        """Send packets back to back and return their replies in order (``Exx`` included).

        At most ``window`` requests are in flight, so neither side's socket buffer fills
        while the other waits (QEMU blocks writing replies nobody reads).
        """
        for payload in payloads:
            self._note_selection(payload)
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

    # -- the fast path ---------------------------------------------------------------------

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
                or self._closed or self.running or not self.lazy_acks):
            self._send_many(payloads)
            return None
        n = len(payloads)
        data = self._pending_ack + data
        self._pending_ack = b""
        self.stats.packets_sent += n
        self.stats.sends += 1
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
                if chunk[-1] == 0x2D:  # a NAK: resend now, not after a stall
                    break
        except (BlockingIOError, InterruptedError, TimeoutError):
            # A stall: the blocking recv waited out the timeout (SO_RCVTIMEO) already,
            # so the general path reads what is there and gives no second one.
            self._stalled_at = time.monotonic()
        except OSError as exc:
            self._hang_up()
            raise GdbConnectionClosed(f"socket error: {exc}", sent=payloads[0]) from exc
        return got

    def _fast_fallback(self, payloads: Sequence[bytes], framed: Sequence[bytes],
                       got: bytes) -> None:
        """Hand a fast exchange over to the general path: requests outstanding, bytes read."""
        # Request records are built only now: every step on the fast path is paid with
        # caches that QEMU's thread has just turned over.
        reqs = [Request(p, f, False) for p, f in zip(payloads, framed, strict=True)]
        self._unacked.extend(reqs)
        self._outstanding.extend(reqs)
        if got:
            try:
                self._absorb(got, payloads[0])
            except GdbError:
                self._stalled_at = 0.0  # no recv_reply follows to use it
                raise

    # -- stops -----------------------------------------------------------------------------

    def interrupt(self, *, wait: bool = True, timeout: float | None = None) -> StopReply | None:
        """Stop a running target with ``\\x03``; a no-op when it is stopped (QEMU would
        not answer)."""
        if not self.running:
            return None
        self._send(INTERRUPT, INTERRUPT)
        if not wait:
            return None
        return self.wait_stop(timeout if timeout is not None else self.timeout)

    def wait_stop(self, timeout: float | None = None) -> StopReply:
        """Block until the target stops (a queued stop first); None waits forever."""
        if self._stops:
            return self._stops.popleft()
        if not self.running:
            raise GdbError("wait_stop: the target is stopped and no stop is queued")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stops:
            if len(self._outstanding) > self._abandoned + self._deferred:
                raise GdbError("wait_stop: a reply to an earlier request is still unread")
            pkt = self._next_packet(deadline, None)
            if pkt is not None:
                payload = pkt.payload
                if self._abandoned and not (
                    (is_stop_reply(payload) and not self._outstanding[0].expects_stop)
                    or is_console_output(payload)
                ):
                    self._outstanding.popleft()  # a late reply: the stop is still to come
                    self._abandoned -= 1
                    self.stats.abandoned_replies += 1
                else:
                    self._dispatch_packet(payload)
                if self._stops:
                    break
            if deadline is not None and not self._events and time.monotonic() >= deadline:
                raise GdbTimeout(f"target did not stop within {timeout:g} s")
        return self._stops.popleft()

    def _dispatch_packet(self, payload: bytes) -> None:
        """A packet while the target runs: a deferred reply, a stop, or console output."""
        if self._deferred and not (is_stop_reply(payload) or is_console_output(payload)):
            self._take_deferred(payload)
        else:
            self._dispatch_unrequested(payload)

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
                    self._unacked.popleft()
                return None
            m = _PLAIN_STOP.match(data)
            if m is not None and int(m[3], 16) == checksum(m[2]):
                if m[1] and self._unacked:
                    self._unacked.popleft()
                self._pending_ack += b"+"
                if not self.lazy_acks:
                    self._flush_acks()
                body = m[2]
                self._note_stop(parse_short_stop_reply(body) if len(body) <= STOP_CACHE_MAX
                                else parse_stop_reply(body))
                return self._stops.popleft() if self._stops else None
            self._absorb(data, None)
        for _ in range(_POLL_READS):
            if not self._fill(time.monotonic(), None):
                break
        while self._events and not self._stops:
            pkt = self._events.popleft()
            if isinstance(pkt, Packet):
                self._dispatch_packet(pkt.payload)
        return self._stops.popleft() if self._stops else None


def _spin_recv(sock: socket.socket) -> bytes:
    """recv, polling for a while before blocking (see _SPIN_READS)."""
    recv = sock.recv
    for _ in range(_SPIN_READS):
        try:
            return recv(FAST_RECV_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
    return recv(FAST_RECV_SIZE)


def _plain_replies(data: bytes, n: int) -> list[bytes] | None:
    """``n`` plain replies (``+`` acks between them) that make up ``data`` exactly, each
    with a good checksum and no escape, run-length, stop or console packet; else None."""
    end = len(data)
    if n == 1:
        # the usual case, '+$body#xx', in as few steps as possible
        m = _PLAIN_ONE.match(data)
        if (m is None or (data[2:3] in _NOT_FAST and m[1] != b"OK")
                or int(m[2], 16) != checksum(m[1])):
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
        if ((body[:1] in _NOT_FAST and body != b"OK") or body.find(b"$") >= 0
                or body.find(b"}") >= 0 or body.find(b"*") >= 0
                or data[hash_at + 1 : hash_at + 3] != b"%02x" % checksum(body)):
            return None
        replies.append(body)
        pos = hash_at + 3
    return replies if pos == end else None


@functools.lru_cache(maxsize=1024)
def _framed(payload: bytes) -> bytes:
    """``$payload#xx`` for :meth:`RspConnection._hex_roundtrip`, cached: a probe handler
    sends the same few short ``m`` and ``g`` requests over and over."""
    return encode_packet(payload)
