"""RspLink: the byte layer of an RSP conversation over one socket.

Frames go out; the stub's ``+``/``-`` are honoured (a ``-`` retransmits the oldest
unacknowledged packet); received packets are acked and queued as events for the layer
above (:class:`~kprobevm.gdbstub.connection.RspConnection`), which pairs them with
requests.

Acknowledgements stay on (QEMU 7.2 has no ``QStartNoAckMode``) but cost no round trip:
the ``+`` for a reply rides on our next packet (QEMU's system-mode stub never waits for
an ack and never retransmits), and the stub's ``+`` before its reply is consumed when the
reply is read.

While the target runs, a stub takes any byte as an interrupt: QEMU stops the VM, and
from 8.1 on it sends a stop reply only when that byte was ``\x03`` (a ``+`` pauses the
guest in silence and the client waits forever). So nothing but ``\x03`` goes out while
:attr:`RspLink.running`: acks owed for replies that arrive then (those to packets sent
ahead of a resume) wait for the next packet, which only goes out once the target stops,
and a NAK is never sent then (QEMU would not resend anyway).

Not thread-safe: one thread drives one connection (the engine selects on :meth:`fileno`).
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import TypedDict

from kprobevm.closing import Closing
from kprobevm.errors import GdbConnectionClosed, GdbError, GdbProtocolError, GdbTimeout
from kprobevm.gdbstub.packet import (
    DEFAULT_MAX_PACKET,
    Ack,
    BadChecksum,
    Nak,
    Notification,
    Packet,
    PacketReader,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "FAST_RECV_SIZE",
    "INTERRUPT",
    "MAX_OWED_ACKS",
    "ClientStats",
    "LinkOptions",
    "PacketOptions",
    "Request",
    "RspLink",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
INTERRUPT = b"\x03"
"""The one byte a client may send to a running target."""
_RECV_SIZE = 1 << 16
MAX_OWED_ACKS = 64
"""Acks kept owed at most: while the target runs none go out, and a stub sending packet
after packet must not grow them; QEMU never waits for an ack nor resends for want of one."""
FAST_RECV_SIZE = 1 << 13
"""Small reads on the hot path: a large recv buffer costs an allocation per call."""


@dataclass
class ClientStats:
    """Counters for the conversation (mutable: the client updates them as it goes)."""

    packets_sent: int = 0
    sends: int = 0
    """Writes that carried packets: a round trip each, but for a resume's."""
    replies: int = 0
    naks_sent: int = 0
    naks_received: int = 0
    retransmits: int = 0
    bad_checksums: int = 0
    stale_stops: int = 0
    abandoned_replies: int = 0
    console_bytes: int = 0
    console_dropped: int = 0
    """Console bytes not kept: more than the connection's limit waited unread."""
    resyncs: int = 0
    """Probes sent to get back in step after a timeout."""
    acks_not_owed: int = 0
    """Packets received while the acks owed were at their cap (:data:`MAX_OWED_ACKS`)."""


class PacketOptions(TypedDict, total=False):
    """How a link treats packets (keyword arguments of :class:`RspLink`)."""

    max_packet: int
    max_retransmits: int
    lazy_acks: bool


class LinkOptions(PacketOptions, total=False):
    """The keyword arguments of :class:`RspLink`: its timeout and :class:`PacketOptions`."""

    timeout: float


class Request:
    """A request on the wire: its payload, the framed packet, and how often it was sent."""

    __slots__ = ("expects_stop", "framed", "payload", "tries")

    def __init__(self, payload: bytes, framed: bytes, expects_stop: bool) -> None:
        self.payload = payload
        self.framed = framed
        self.expects_stop = expects_stop
        """A ``?``: its reply is a stop reply, not a stop event."""
        self.tries = 1


class RspLink(Closing):
    """One socket to a gdbstub: framed packets out, acks and received packets in."""

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
        """Packets received and acked, not yet taken by the layer above."""
        self._unacked: deque[Request] = deque()
        self._pending_ack = b""
        """The ``+`` we owe for received packets: sent ahead of our next packet."""
        self._closed = False
        self.running = False
        """True between a resume (``c``/``s``) and the stop reply that ends it: only
        ``\x03`` may be sent then."""
        self.stats = ClientStats()

    def fileno(self) -> int:
        """The socket's descriptor, to select() on together with a wake-up pipe.

        Call ``poll_stop`` first: a stop may already be buffered.
        """
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket (QEMU leaves a stopped VM stopped: ``detach`` resumes it)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._pending_ack and not self.running:
                self._sock.send(self._pending_ack)
        except OSError:
            pass
        self._sock.close()

    @property
    def closed(self) -> bool:
        """True once closed (by us, or because the stub hung up)."""
        return self._closed

    def _send(self, data: bytes, sent: bytes | None = None) -> None:
        """Write ``data`` after the acks we owe; ``sent`` names the packet for errors.

        A running target gets ``\x03`` alone, and nothing else (see the module's notes).
        """
        if self._closed:
            raise GdbConnectionClosed("connection is closed", sent=sent)
        if self.running:
            if data != INTERRUPT:
                raise GdbError("refusing to send to a running target: any byte would "
                               "stop it, and only \\x03 earns a stop reply", sent=sent)
        elif self._pending_ack:
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
        """The socket failed or the stub closed it: nothing more can be said."""
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

    def _recv_nowait(self) -> bytes | None:
        """What has arrived, in one syscall; None if nothing has."""
        try:
            data = self._sock.recv(FAST_RECV_SIZE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self._hang_up()
            raise GdbConnectionClosed(f"receive failed: {exc}") from exc
        if not data:
            self._hang_up()
            raise GdbConnectionClosed("the stub closed the connection")
        return data

    def _absorb(self, data: bytes, sent: bytes | None) -> None:
        """Decode received bytes: ack and queue packets, honour ``+``/``-``, NAK garbage."""
        try:
            events = self._reader.feed(data)
        except GdbProtocolError as exc:
            exc.sent = sent
            raise
        for ev in events:
            if isinstance(ev, Packet):
                if len(self._pending_ack) < MAX_OWED_ACKS:
                    self._pending_ack += b"+"
                else:
                    self.stats.acks_not_owed += 1
                if not self.lazy_acks:
                    self._flush_acks()
                self._events.append(ev)
            elif isinstance(ev, Ack):
                if self._unacked:
                    self._unacked.popleft()
            elif isinstance(ev, Nak):
                self.stats.naks_received += 1
                self._retransmit(sent)
            elif isinstance(ev, BadChecksum):
                self.stats.bad_checksums += 1
                if self.running:
                    log.debug("packet with a bad checksum while running dropped: %r",
                              ev.raw[:80])
                    continue
                self.stats.naks_sent += 1
                if self.stats.naks_sent > self.max_retransmits * (self.stats.replies + 1):
                    raise GdbProtocolError("too many packets with bad checksums",
                                           sent=sent, received=ev.raw)
                self._send(b"-", sent)
            else:
                log.debug("notification ignored: %r", ev.payload[:80])

    def _flush_acks(self) -> None:
        """Send the acks we owe now, not with our next packet (never to a running target)."""
        if self._pending_ack and not self.running:
            ack, self._pending_ack = self._pending_ack, b""
            self._send(ack)

    def _retransmit(self, sent: bytes | None) -> None:
        """Answer a ``-``: the oldest unacknowledged packet again, a few times at most."""
        if not self._unacked:
            return  # a NAK for nothing outstanding (QEMU NAKs garbage it saw)
        req = self._unacked.popleft()
        if self.running:
            # Sent ahead of the resume that now runs: resending it would stop the target.
            raise GdbProtocolError("stub rejected a packet sent ahead of a resume",
                                   sent=req.payload)
        if req.tries > self.max_retransmits:
            raise GdbProtocolError(f"stub rejected a packet {req.tries} times",
                                   sent=req.payload)
        req.tries += 1
        self.stats.retransmits += 1
        self._unacked.append(req)
        self._send(req.framed, req.payload)


def _set_kernel_timeouts(sock: socket.socket, timeout: float) -> None:
    """SO_RCVTIMEO/SO_SNDTIMEO: a blocking call on the socket gives up after ``timeout``."""
    tv = struct.pack("@ll", int(timeout), int((timeout % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
