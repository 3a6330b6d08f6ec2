"""Faults on what a fake gdbstub sends, for the transport's robustness tests and fuzzer.

:func:`apply_fault` turns the bytes a stub would send for one request (its ``+`` and
framed replies) into a faulty version: malformed packets, garbage, a NAK storm, a
console flood, a stop nobody asked for, duplicates, or nothing at all. :class:`FaultyStub`
is a :class:`~tests.fakestub.FakeStub` that applies faults, scripted per request or
drawn from a seed, and also plays what needs time or the socket: late replies,
reordered replies, truncation and hang-ups. Everything random comes from one
``random.Random``, so a seed replays the same faults.
"""

from __future__ import annotations

import binascii
import contextlib
import random
import socket
import threading
from collections.abc import Callable, Sequence
from enum import Enum

from kprobevm.gdbstub.client import GdbClient
from kprobevm.gdbstub.connection import CONSOLE_LIMIT
from kprobevm.gdbstub.link import MAX_OWED_ACKS
from tests.fakestub import FakeStub, Reply, frame

__all__ = [
    "MALFORMED",
    "STREAM_FAULTS",
    "Fault",
    "FaultyStub",
    "apply_fault",
    "buffer_bounds",
    "buffer_sizes",
    "malform",
    "split_units",
]


class Fault(Enum):
    """One thing that goes wrong with the stub's answer to one request."""

    BAD_CHECKSUM = "bad-checksum"
    BAD_HEX = "bad-hex"
    """A reply whose body is no longer hex (a memory or register read's)."""
    NO_HASH = "no-hash"
    """The ``#xx`` trailer is gone: the packet never ends until a later ``$``."""
    STRAY_DOLLAR = "stray-dollar"
    """A ``$`` inside the packet body: framing restarts there."""
    HUGE = "huge"
    """A packet longer than the client accepts."""
    RLE_ABUSE = "rle-abuse"
    """Run-length markers with no byte to repeat, negative counts, or long expansions."""
    ESCAPE_ABUSE = "escape-abuse"
    """``}`` escapes of odd bytes, and one left dangling at the end."""
    GARBAGE = "garbage"
    """Binary garbage before the reply."""
    NON_ASCII = "non-ascii"
    """The reply's body with bytes above 0x7f in it, checksum right."""
    TRUNCATE = "truncate"
    """Part of the reply, then the stub hangs up."""
    HANG_UP = "hang-up"
    """The stub hangs up instead of replying."""
    DROP = "drop"
    """The reply never comes (the connection stays up)."""
    LATE = "late"
    """The reply comes after the client's timeout."""
    REORDER = "reorder"
    """This reply goes out after the next one."""
    DUPLICATE = "duplicate"
    """The reply twice."""
    DUP_STOP = "dup-stop"
    """A stop reply twice (the second one is stale)."""
    UNASKED_STOP = "unasked-stop"
    """A stop reply no request or resume asked for, before the reply."""
    DROP_STOP = "drop-stop"
    """A stop reply that never comes."""
    NAK_STORM = "nak-storm"
    """A run of ``-`` before the reply."""
    CONSOLE_FLOOD = "console-flood"
    """Many ``O`` console packets before the reply."""
    LOST_ACK = "lost-ack"
    """The reply without the ``+`` that should come before it."""


MALFORMED = (
    Fault.BAD_CHECKSUM, Fault.BAD_HEX, Fault.NO_HASH, Fault.STRAY_DOLLAR, Fault.HUGE,
    Fault.RLE_ABUSE, Fault.ESCAPE_ABUSE, Fault.NON_ASCII,
)
"""Faults that damage one packet's bytes."""
STREAM_FAULTS = (
    *MALFORMED, Fault.GARBAGE, Fault.TRUNCATE, Fault.DROP, Fault.DUPLICATE, Fault.DUP_STOP,
    Fault.UNASKED_STOP, Fault.DROP_STOP, Fault.NAK_STORM, Fault.CONSOLE_FLOOD, Fault.LOST_ACK,
)
"""Faults :func:`apply_fault` plays on bytes alone (no clock, no socket)."""

STOP = frame(b"T05thread:p01.01;")


def split_units(data: bytes) -> list[bytes]:
    """Split a stream of ``+``/``-`` and ``$...#xx`` frames into its units (a packet with
    no end is one unit to the end)."""
    units = []
    pos = 0
    while pos < len(data):
        if data[pos] != 0x24:  # '$'
            units.append(data[pos:pos + 1])
            pos += 1
            continue
        end = data.find(b"#", pos)
        end = len(data) if end < 0 else end + 3
        units.append(data[pos:end])
        pos = end
    return units


def _is_stop(unit: bytes) -> bool:
    return unit[:1] == b"$" and unit[1:2] in (b"T", b"S", b"W", b"X")


def malform(fault: Fault, packet: bytes, rng: random.Random, *, huge: int = 1 << 16) -> bytes:
    """A damaged copy of the framed ``packet`` (``$body#xx``); ``huge`` is the size of a
    :attr:`Fault.HUGE` packet."""
    body = packet[1:-3] if packet[:1] == b"$" and packet[-3:-2] == b"#" else packet
    if fault is Fault.BAD_CHECKSUM:
        good = int(packet[-2:], 16) if packet[-3:-2] == b"#" else 0
        bad = rng.choice([b"%02x" % ((good + rng.randrange(1, 256)) & 0xFF), b"zz", b"\xff\x00",
                          b" 1", b"-1", b"+f"])
        return b"$" + body + b"#" + bad
    if fault is Fault.BAD_HEX:
        b = bytearray(body or b"00")
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.choice(b"gxzG :;,.-")
        return frame(bytes(b))
    if fault is Fault.NO_HASH:
        return b"$" + body
    if fault is Fault.STRAY_DOLLAR:
        cut = rng.randint(0, len(body))
        return b"$" + body[:cut] + b"$" + body[cut:] + packet[-3:]
    if fault is Fault.HUGE:
        filler = bytes(rng.choice(b"0123456789abcdef") for _ in range(64)) * (huge // 64 + 2)
        return frame(body + filler) if rng.random() < 0.5 else b"$" + body + filler
    if fault is Fault.RLE_ABUSE:
        choice = rng.randrange(4)
        if choice == 0:
            return frame(b"*" + body)  # nothing to repeat
        if choice == 1:
            return frame(body + b"*\x10")  # count below zero
        if choice == 2:
            return frame(body + b"*")  # no count
        return frame((body[:1] or b"0") + b"*~" * rng.randint(1, 4000))  # long runs
    if fault is Fault.ESCAPE_ABUSE:
        b = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            b.insert(rng.randint(0, len(b)), 0x7D)
        if rng.random() < 0.5:
            b += b"}"
        return frame(bytes(b))
    if fault is Fault.NON_ASCII:
        b = bytearray(body or b"m")
        for _ in range(rng.randint(1, 4)):
            b.insert(rng.randint(0, len(b)), rng.randrange(0x80, 0x100))
        return frame(bytes(b).replace(b"#", b"").replace(b"$", b"").replace(b"}", b"")
                     .replace(b"*", b""))
    raise ValueError(f"{fault} is not a malformation")


def garbage(rng: random.Random, n: int = 64) -> bytes:
    """Binary garbage with no ``$``/``%``/``+``/``-`` in it (those would mean something)."""
    return bytes(rng.choice(_GARBAGE_BYTES) for _ in range(rng.randint(1, n)))


_GARBAGE_BYTES = bytes(b for b in range(256) if b not in b"$%+-")


def console_packets(rng: random.Random, n: int) -> bytes:
    """``n`` ``O`` console-output packets."""
    text = binascii.hexlify(bytes(rng.randrange(32, 127) for _ in range(rng.randint(1, 200))))
    return frame(b"O" + text) * n


def apply_fault(fault: Fault, units: Sequence[bytes], rng: random.Random, *,
                huge: int = 1 << 16, flood: int = 2000) -> list[bytes]:
    """What the stub sends instead of ``units`` (see :func:`split_units`) under ``fault``,
    for the faults that need no clock or socket (:data:`STREAM_FAULTS`)."""
    out = list(units)
    packets = [i for i, u in enumerate(out) if u[:1] == b"$"]
    stops = [i for i in packets if _is_stop(out[i])]
    if fault in MALFORMED:
        if packets:
            i = rng.choice(packets)
            out[i] = malform(fault, out[i], rng, huge=huge)
        else:
            out.append(malform(fault, STOP, rng, huge=huge))
    elif fault is Fault.GARBAGE:
        out.insert(rng.randint(0, len(out)), garbage(rng))
    elif fault is Fault.TRUNCATE:
        data = b"".join(out)
        out = [data[:rng.randint(0, max(len(data) - 1, 0))]]
    elif fault is Fault.DROP:
        if packets:
            del out[rng.choice(packets)]
    elif fault is Fault.DUPLICATE:
        if packets:
            i = rng.choice(packets)
            out.insert(i + 1, out[i])
    elif fault is Fault.DUP_STOP:
        out.insert(stops[0] + 1 if stops else len(out), out[stops[0]] if stops else STOP)
        if not stops:
            out.append(STOP)
    elif fault is Fault.UNASKED_STOP:
        out.insert(rng.randint(0, len(out)), STOP)
    elif fault is Fault.DROP_STOP:
        for i in reversed(stops):
            del out[i]
    elif fault is Fault.NAK_STORM:
        out.insert(rng.randint(0, len(out)), b"-" * rng.randint(1, 50))
    elif fault is Fault.CONSOLE_FLOOD:
        out.insert(rng.randint(0, len(out)), console_packets(rng, rng.randint(1, flood)))
    elif fault is Fault.LOST_ACK:
        out = [u for u in out if u != b"+"]
    else:
        raise ValueError(f"{fault} needs a clock or a socket: FaultyStub plays it")
    return out


def buffer_sizes(c: GdbClient) -> dict[str, int]:
    """The client's containers that what the stub sends could grow."""
    return {
        "reader_pending": c._reader.pending,
        "events": len(c._events),
        "stops": len(c._stops),
        "console_bytes": c.console_held,
        "outstanding": len(c._outstanding),
        "unacked": len(c._unacked),
        "pending_ack": len(c._pending_ack),
    }


def buffer_bounds(max_packet: int) -> dict[str, int]:
    """What each of :func:`buffer_sizes` may hold between calls, for a client whose
    packet limit is ``max_packet``: a partial packet and a read's worth of events; a stop
    per resume; the console limit; requests of a few pipelines; the capped acks."""
    return {
        "reader_pending": max_packet + 3 + (1 << 16),
        "events": 1 << 15,
        "stops": 4,
        "console_bytes": CONSOLE_LIMIT,
        "outstanding": 256,
        "unacked": 256,
        "pending_ack": MAX_OWED_ACKS,
    }


FaultPlan = dict[bytes, Fault | list[Fault]]
"""Faults by request prefix: a single fault applies once, a list one per matching request."""


class FaultyStub(FakeStub):
    """A FakeStub whose replies go wrong: as ``plan`` says for requests that start with a
    given prefix, and at random (``rate`` of the replies, faults from ``kinds``) when
    ``seed`` is given. ``late`` is how long a :attr:`Fault.LATE` reply waits.

    Deliveries that answer no packet (a stop, the answer to ``\\x03``) come under the
    key ``b"\\x03"``. ``faults`` records what was played, ``(request, fault)`` in order,
    for a failing test to print.
    """

    def __init__(
        self,
        handler: Callable[[bytes], Reply],
        plan: FaultPlan | None = None,
        *,
        seed: int | str | None = None,
        rate: float = 0.0,
        kinds: Sequence[Fault] = tuple(Fault),
        late: float = 0.3,
        huge: int = 1 << 16,
        ack: bool = True,
    ) -> None:
        self.plan: FaultPlan = dict(plan or {})
        self.rng = random.Random(seed)
        self.rate = rate if seed is not None else 0.0
        self.kinds = tuple(kinds)
        self.late = late
        self.huge = huge
        self.faults: list[tuple[bytes, Fault]] = []
        self.handler_errors = 0
        """Requests the handler could not parse (answered ``E01``)."""
        self._current = b""
        self._held: list[bytes] = []
        self._timers: list[threading.Timer] = []
        super().__init__(handler, ack=False)
        self.ack_replies = ack

    def _packet(self, line: bytes, digits: bytes) -> None:
        self._current = line
        try:
            super()._packet(line, digits)
        except (ValueError, IndexError, KeyError):
            # A request the client built from damaged replies (a target description's
            # odd include, say) that the handler cannot parse: QEMU answers such with
            # an error, and the stub thread must live on.
            self.handler_errors += 1
            self._deliver(frame(b"E01"))

    def send_nowait(self, data: bytes) -> None:
        """Put what fits of ``data`` on the wire without blocking (a flood nobody reads
        must not block its sender)."""
        with contextlib.suppress(OSError):
            self._sock.send(data, socket.MSG_DONTWAIT)

    def _fault_for(self, request: bytes) -> Fault | None:
        for prefix, planned in self.plan.items():
            if request.startswith(prefix):
                if isinstance(planned, list):
                    fault = planned.pop(0) if planned else None
                    if not planned:
                        del self.plan[prefix]
                else:
                    fault = planned
                    del self.plan[prefix]
                return fault
        if self.rate and self.rng.random() < self.rate:
            return self.rng.choice(self.kinds)
        return None

    def _deliver(self, reply: Reply) -> None:
        request = self._current
        self._current = b""
        chunks = [] if reply is None else [reply] if isinstance(reply, bytes) else list(reply)
        units = []
        if request and self.ack_replies:
            units.append(b"+")
        for chunk in chunks:
            units += split_units(chunk)
        if not units:
            return
        fault = self._fault_for(request or b"\x03")
        if fault is not None:
            self.faults.append((request, fault))
        out = self._play(fault, units)
        if self._held and out:
            out += self._held
            self._held = []
        if out:
            self.send_raw(b"".join(out))

    def _play(self, fault: Fault | None, units: list[bytes]) -> list[bytes]:
        """What goes out now for ``units`` under ``fault``."""
        if fault is None:
            return units
        if fault is Fault.HANG_UP:
            self.close()
            return []
        if fault is Fault.TRUNCATE:
            data = b"".join(units)
            self.send_raw(data[:self.rng.randint(0, max(len(data) - 1, 0))])
            self.close()
            return []
        if fault is Fault.LATE:
            acks = [u for u in units if u == b"+"][:1]
            rest = b"".join(units[len(acks):])
            timer = threading.Timer(self.late, self.send_raw, args=(rest,))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()
            return acks
        if fault is Fault.REORDER:
            self._held += units
            return []
        return apply_fault(fault, units, self.rng, huge=self.huge)

    def close(self) -> None:
        """Hang up (late replies still in the air are cancelled)."""
        for timer in self._timers:
            timer.cancel()
        super().close()
