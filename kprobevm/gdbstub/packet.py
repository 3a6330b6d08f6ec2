"""GDB Remote Serial Protocol codec: framing, checksums, escapes, RLE, stop replies, and the
requests and reply checks both gdb clients share (no I/O).

Everything here works on ``bytes`` and never touches a socket, so the codec is tested apart
from the process. Malformed input ends in :class:`~kprobevm.errors.GdbProtocolError`.
"""

from __future__ import annotations

import binascii
import functools
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from kprobevm.errors import GdbErrorReply, GdbProtocolError

__all__ = [
    "ACK",
    "DEFAULT_MAX_PACKET",
    "MAX_THREAD_ID",
    "NAK",
    "STOP_CACHE_MAX",
    "Ack",
    "BadChecksum",
    "BreakpointKind",
    "Event",
    "Nak",
    "Notification",
    "Packet",
    "PacketReader",
    "StopReply",
    "WatchHit",
    "check_replies",
    "check_reply",
    "checksum",
    "decode_console_output",
    "decode_hex",
    "decode_payload",
    "encode_packet",
    "escape",
    "hex_checksum",
    "is_console_output",
    "is_stop_reply",
    "join_memory_replies",
    "memory_read_packets",
    "memory_write_packets",
    "parse_error_reply",
    "parse_memory_request",
    "parse_short_stop_reply",
    "parse_stop_reply",
    "parse_thread_id",
    "run_length_decode",
    "unescape",
]

DEFAULT_MAX_PACKET = 1 << 20
"""Largest packet (payload, before RLE expansion) a reader accepts before it gives up."""

_ESCAPE_NEEDED = re.compile(rb"[#$}*]")
_ESCAPED = re.compile(rb"\}(.)", re.DOTALL)
_START = re.compile(rb"[$%+\-]")
_STOP_REPLY = re.compile(rb"[TSWX][0-9a-fA-F]{2}")
_ERROR_REPLY = re.compile(rb"E([0-9a-fA-F]{2})\Z")
_HEX = re.compile(rb"[0-9a-fA-F]*\Z")
_MEMORY_REQUEST = re.compile(rb"[mM]([0-9a-fA-F]+),([0-9a-fA-F]+)")


def checksum(payload: bytes) -> int:
    """The RSP checksum: the sum of the payload's bytes modulo 256."""
    # adler32's low half is 1 + the byte sum (mod 65521): exact while the sum stays below
    # 65521 (256 bytes of any value), and many times faster than sum().
    if len(payload) <= 256:
        return ((zlib.adler32(payload) & 0xFFFF) - 1) & 0xFF
    return _chunked_sum(payload, 256)


def hex_checksum(text: bytes) -> int:
    """:func:`checksum` of text made only of hex digits: bytes up to ``f`` (0x66) let
    adler32 sum 642 of them at a time, not 256, so a ``g`` reply takes two C calls."""
    n = len(text)
    if n <= 642:  # 642 * 0x66 < 65521
        return ((zlib.adler32(text) & 0xFFFF) - 1) & 0xFF
    if n <= 2 * 642:  # a g reply: spelt out, as a loop costs more than the sums
        return ((zlib.adler32(text[:642]) & 0xFFFF) + (zlib.adler32(text[642:]) & 0xFFFF)
                - 2) & 0xFF
    return _chunked_sum(text, 642)


def _chunked_sum(payload: bytes, span: int) -> int:
    total = 0
    for i in range(0, len(payload), span):
        total += (zlib.adler32(payload[i:i + span]) & 0xFFFF) - 1
    return total & 0xFF


def escape(data: bytes) -> bytes:
    """Escape ``#``, ``$``, ``}`` and ``*`` as ``}`` followed by the byte XOR 0x20."""
    if _ESCAPE_NEEDED.search(data) is None:
        return data
    return _ESCAPE_NEEDED.sub(lambda m: b"}" + bytes((m[0][0] ^ 0x20,)), data)


def unescape(data: bytes) -> bytes:
    """Undo :func:`escape`; a trailing lone ``}`` is a protocol error."""
    if b"}" not in data:
        return data
    if data.endswith(b"}") and (len(data) - len(data.rstrip(b"}"))) % 2 == 1:
        raise GdbProtocolError("escape character '}' at end of packet", received=data)
    return _ESCAPED.sub(lambda m: bytes((m[1][0] ^ 0x20,)), data)


def run_length_decode(data: bytes, *, limit: int = DEFAULT_MAX_PACKET * 64) -> bytes:
    """Expand ``X*n`` runs: the byte before ``*`` repeats ``ord(n) - 29`` more times."""
    if b"*" not in data:
        return data
    return decode_payload(data, limit=limit)


def decode_payload(raw: bytes, *, limit: int = DEFAULT_MAX_PACKET * 64) -> bytes:
    """Decode a packet body as received: ``}`` escapes and ``*`` runs in one pass.

    The stub applies RLE to the escaped text, so a run repeats the last *decoded* byte
    (gdb's ``read_frame`` does the same). ``limit`` bounds the expanded size.
    """
    if b"*" not in raw:
        return unescape(raw)
    out = bytearray()
    i = 0
    n = len(raw)
    while i < n:
        star = raw.find(b"*", i)
        end = n if star < 0 else star
        out += unescape(raw[i:end])
        if star < 0:
            break
        if not out or star + 1 >= n:
            raise GdbProtocolError("run-length '*' without a byte to repeat or a count",
                                   received=raw)
        count = raw[star + 1] - 29  # printable counts: ' ' (32) repeats 3 more times
        if count < 0:
            raise GdbProtocolError(f"bad run-length count {raw[star + 1]!r}", received=raw)
        out += bytes((out[-1],)) * count
        if len(out) > limit:
            raise GdbProtocolError(f"run-length expansion beyond {limit} bytes",
                                   received=raw[:200])
        i = star + 2
    return bytes(out)


def encode_packet(payload: bytes) -> bytes:
    """Frame an (already escaped) payload as ``$payload#xx``."""
    return b"$%s#%02x" % (payload, checksum(payload))


def decode_hex(text: bytes | str, sent: bytes | None = None) -> bytes:
    """Hex text to bytes (either case); malformed hex is a protocol error that names the
    request ``sent``, when the text is its reply."""
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError) as exc:
        raw = text.encode() if isinstance(text, str) else text
        raise GdbProtocolError("malformed hex in reply", sent=sent, received=raw) from exc


def parse_error_reply(payload: bytes) -> int | None:
    """The number of an ``Exx`` reply, or None when the payload is not one."""
    m = _ERROR_REPLY.match(payload)
    return int(m[1], 16) if m else None


def parse_memory_request(payload: bytes) -> tuple[int, int]:
    """(address, length) of an ``m``/``M`` request payload."""
    m = _MEMORY_REQUEST.match(payload)
    if m is None:
        raise GdbProtocolError("not a memory request", sent=payload)
    return int(m[1], 16), int(m[2], 16)


MAX_THREAD_ID = 40
"""Longest thread id accepted (``p`` and two 16-digit numbers fit): stop replies and their
thread ids are cached, so a stub must not make them arbitrarily large."""


def parse_thread_id(text: str | bytes) -> tuple[int | None, int]:
    """``p01.02`` -> (1, 2); ``02`` -> (None, 2); ``-1`` means all, ``0`` any."""
    s = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    if len(s) > MAX_THREAD_ID:
        raise GdbProtocolError(f"thread id longer than {MAX_THREAD_ID} characters",
                               received=s[:200].encode())
    try:
        if s.startswith("p"):
            pid, dot, tid = s[1:].partition(".")
            return _thread_number(pid), (_thread_number(tid) if dot else -1)
        return None, _thread_number(s)
    except ValueError as exc:
        raise GdbProtocolError(f"bad thread id {s!r}", received=s.encode()) from exc


def _thread_number(s: str) -> int:
    return -1 if s == "-1" else int(s, 16)


def is_stop_reply(payload: bytes) -> bool:
    """True for ``T``/``S``/``W``/``X`` stop replies (``Text=`` of qOffsets is not one)."""
    return _STOP_REPLY.match(payload) is not None


def is_console_output(payload: bytes) -> bool:
    """True for an ``O`` packet carrying hex console text (``OK`` is not one)."""
    return (
        len(payload) > 1
        and payload[0] == 0x4F
        and len(payload) % 2 == 1
        and _HEX.match(payload, 1) is not None
    )


def decode_console_output(payload: bytes) -> bytes:
    """The text of an ``O`` console-output packet."""
    if not is_console_output(payload):
        raise GdbProtocolError("not an 'O' console-output packet", received=payload)
    return binascii.unhexlify(payload[1:])


# -- requests and their replies -------------------------------------------------------


class BreakpointKind(IntEnum):
    """The ``Z``/``z`` packet types."""

    SOFTWARE = 0
    HARDWARE = 1
    WRITE_WATCH = 2
    READ_WATCH = 3
    ACCESS_WATCH = 4


def check_reply(sent: bytes, reply: bytes) -> None:
    """Raise when ``reply`` refuses ``sent``: an ``Exx``, or the empty reply of a stub
    that does not know the packet (a ``q``/``v`` query may rightly answer empty)."""
    code = parse_error_reply(reply)
    if code is not None:
        raise GdbErrorReply(code, sent=sent, received=reply)
    if reply == b"" and sent[:1] not in (b"q", b"v"):
        raise GdbProtocolError("the stub does not support this packet", sent=sent,
                               received=reply)


def check_replies(sent: Sequence[bytes], replies: Sequence[bytes]) -> None:
    """:func:`check_reply` for each request and its reply, in order."""
    for p, r in zip(sent, replies, strict=True):
        check_reply(p, r)


def memory_read_packets(addr: int, n: int, chunk: int) -> list[bytes]:
    """``m`` packets covering [addr, addr+n), split at multiples of ``chunk`` (a power of
    two), so that no packet crosses a page when ``chunk`` divides the page size."""
    out = []
    end = addr + n
    while addr < end:
        step = min(end, (addr | (chunk - 1)) + 1) - addr
        out.append(b"m%x,%x" % (addr, step))
        addr += step
    return out


def memory_write_packets(addr: int, data: bytes, chunk: int) -> list[bytes]:
    """``M`` packets writing ``data`` at ``addr``, split as :func:`memory_read_packets`."""
    packets = []
    end = addr + len(data)
    pos = 0
    while addr < end:
        step = min(end, (addr | (chunk - 1)) + 1) - addr
        packets.append(b"M%x,%x:%s" % (addr, step, binascii.hexlify(data[pos:pos + step])))
        addr += step
        pos += step
    return packets


def join_memory_replies(packets: Sequence[bytes], replies: Sequence[bytes]) -> bytes:
    """The bytes that ``m`` replies carry, each checked and as long as its request asked."""
    out = bytearray()
    for p, r in zip(packets, replies, strict=True):
        check_reply(p, r)
        data = decode_hex(r, p)
        want = int(p[p.index(b",") + 1:], 16)
        if len(data) != want:
            raise GdbProtocolError(f"short memory reply: {len(data)} of {want} bytes",
                                   sent=p, received=r)
        out += data
    return bytes(out)


# -- stop replies ---------------------------------------------------------------------


@dataclass(frozen=True)
class WatchHit:
    """The watchpoint that stopped the target: ``watch``, ``rwatch`` or ``awatch``."""

    kind: str
    address: int


@dataclass(frozen=True)
class StopReply:
    """Why the target stopped (``T``/``S``), or that it exited (``W``/``X``)."""

    kind: str
    """``T``, ``S``, ``W`` (exited, ``exit_status``) or ``X`` (killed by ``signal``)."""
    signal: int | None = None
    exit_status: int | None = None
    thread: str | None = None
    core: int | None = None
    watch: WatchHit | None = None
    swbreak: bool = False
    hwbreak: bool = False
    process: int | None = None
    info: tuple[tuple[str, str], ...] = ()
    """Other ``key:value`` pairs, in order (register numbers included)."""
    raw: bytes = b""

    @property
    def exited(self) -> bool:
        """True when the target (process) is gone: ``W`` or ``X``."""
        return self.kind in ("W", "X")

    def get(self, key: str) -> str | None:
        """The value of another ``key:value`` pair, or None."""
        for k, v in self.info:
            if k == key:
                return v
        return None


_WATCH_KINDS = ("watch", "rwatch", "awatch")


STOP_CACHE_MAX = 256
"""Stop replies up to this long are cached (a probe's stops are a few dozen bytes); longer
ones are parsed each time, so the cache holds at most 1024 of these."""


def parse_stop_reply(payload: bytes) -> StopReply:
    """Parse a ``T``/``S``/``W``/``X`` payload; anything malformed is a protocol error.

    Short ones are cached (:data:`STOP_CACHE_MAX`): a probe's stops repeat byte for
    byte, and a StopReply is immutable.
    """
    if len(payload) <= STOP_CACHE_MAX:
        return parse_short_stop_reply(payload)
    return _parse_stop_reply(payload)


def _parse_stop_reply(payload: bytes) -> StopReply:
    if not is_stop_reply(payload):
        raise GdbProtocolError("not a stop reply", received=payload)
    kind = chr(payload[0])
    number = int(payload[1:3], 16)
    try:
        rest = payload[3:].decode("ascii")
    except UnicodeDecodeError as exc:
        raise GdbProtocolError("non-ASCII stop reply", received=payload) from exc
    if kind == "S":
        if rest:
            raise GdbProtocolError("trailing text after S stop reply", received=payload)
        return StopReply(kind, signal=number, raw=payload)
    if kind in ("W", "X"):
        process = None
        if rest:
            key, _, value = rest.partition(":")
            if not rest.startswith(";") or not key.endswith("process"):
                raise GdbProtocolError("bad W/X stop reply", received=payload)
            process = _hex_field(value, payload)
        if kind == "W":
            return StopReply(kind, exit_status=number, process=process, raw=payload)
        return StopReply(kind, signal=number, process=process, raw=payload)
    thread: str | None = None
    core: int | None = None
    watch: WatchHit | None = None
    swbreak = hwbreak = False
    info: list[tuple[str, str]] = []
    for field in rest.split(";"):
        if not field:
            continue
        key, colon, value = field.partition(":")
        if not colon:
            raise GdbProtocolError(f"stop-reply field without ':' ({field!r})",
                                   received=payload)
        if key == "thread":
            parse_thread_id(value)  # validate
            thread = value
        elif key == "core":
            core = _hex_field(value, payload)
        elif key in _WATCH_KINDS:
            watch = WatchHit(key, _hex_field(value, payload))
        elif key == "swbreak":
            swbreak = True
        elif key == "hwbreak":
            hwbreak = True
        else:
            info.append((key, value))
    return StopReply(
        kind,
        signal=number,
        thread=thread,
        core=core,
        watch=watch,
        swbreak=swbreak,
        hwbreak=hwbreak,
        info=tuple(info),
        raw=payload,
    )


parse_short_stop_reply = functools.lru_cache(maxsize=1024)(_parse_stop_reply)
""":func:`parse_stop_reply`'s cache, for a caller that knows the payload is at most
:data:`STOP_CACHE_MAX` bytes long (the trap path saves a call)."""


def _hex_field(value: str, payload: bytes) -> int:
    try:
        return int(value, 16)
    except ValueError as exc:
        raise GdbProtocolError(f"bad hex field {value!r}", received=payload) from exc


# -- incremental reader ---------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """``+``: the peer received our packet."""


@dataclass(frozen=True)
class Nak:
    """``-``: the peer wants our last packet again."""


ACK = Ack()
NAK = Nak()


@dataclass(frozen=True)
class Packet:
    """A well-formed ``$...#xx`` packet; ``payload`` is decoded (escapes, RLE)."""

    payload: bytes
    raw: bytes


@dataclass(frozen=True)
class Notification:
    """A ``%name:data#xx`` asynchronous notification (non-stop mode)."""

    payload: bytes
    raw: bytes


@dataclass(frozen=True)
class BadChecksum:
    """A framed packet whose checksum did not match (the client NAKs it)."""

    raw: bytes
    expected: int
    got: int | None


Event = Ack | Nak | Packet | Notification | BadChecksum


class PacketReader:
    """Incremental RSP decoder: feed bytes, get events; the buffer never exceeds the bound.

    Bytes outside a packet that are not ``+``/``-`` are skipped (counted in ``garbage``).
    A ``$`` inside an unfinished packet restarts framing there (the earlier start was a
    truncated packet, counted in ``truncated``). A packet longer than ``max_packet``
    raises GdbProtocolError and the reader drops it.
    """

    __slots__ = ("_scanned", "buffer", "garbage", "max_packet", "truncated")

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        self.max_packet = max_packet
        self.buffer = bytearray()
        """Bytes held for an unfinished packet (read it, don't change it): a truth test
        on it is the cheapest 'nothing half-read' check for the client's hot path."""
        self.garbage = 0
        self.truncated = 0
        """Packets cut short by a ``$`` before their ``#`` (dropped, counted here)."""
        self._scanned = 0
        """How far the unfinished packet at the buffer's start is known to hold no ``#``
        and no later ``$``: a packet trickling in is not searched from its start again
        on every feed (that would be quadratic in its length)."""

    @property
    def pending(self) -> int:
        """Bytes held for an unfinished packet."""
        return len(self.buffer)

    def reset(self) -> None:
        """Forget any partial packet."""
        self.buffer.clear()
        self._scanned = 0

    def feed(self, data: bytes) -> list[Event]:
        """Add received bytes; return the complete events they finish, in order."""
        buf = self.buffer
        buf += data
        events: list[Event] = []
        pos = 0
        n = len(buf)
        scanned, self._scanned = self._scanned, 0
        try:
            while pos < n:
                c = buf[pos]
                if c == 0x2B:  # '+'
                    events.append(ACK)
                    pos += 1
                    continue
                if c == 0x2D:  # '-'
                    events.append(NAK)
                    pos += 1
                    continue
                if c != 0x24 and c != 0x25:  # not '$' / '%'
                    m = _START.search(buf, pos)
                    skip = (m.start() if m else n) - pos
                    self.garbage += skip
                    pos += skip
                    continue
                search = scanned if pos == 0 and scanned > 1 else pos + 1
                hash_at = buf.find(b"#", search)
                if hash_at < 0:
                    restart = buf.find(b"$", search)
                    if restart > 0:
                        self.truncated += 1
                        self.garbage += restart - pos
                        pos = restart
                        continue
                    if n - pos > self.max_packet + 3:
                        raise GdbProtocolError(
                            f"packet longer than {self.max_packet} bytes",
                            received=bytes(buf[pos:pos + 200]),
                        )
                    self._scanned = n - pos
                    break
                restart = buf.find(b"$", search, hash_at)
                if restart > 0:  # truncated packet: start over at the newer '$'
                    self.truncated += 1
                    self.garbage += restart - pos
                    pos = restart
                    continue
                if hash_at - pos - 1 > self.max_packet:
                    raise GdbProtocolError(
                        f"packet longer than {self.max_packet} bytes",
                        received=bytes(buf[pos:pos + 200]),
                    )
                if hash_at + 3 > n:
                    self._scanned = hash_at - pos
                    break
                body = bytes(buf[pos + 1:hash_at])
                raw = bytes(buf[pos:hash_at + 3])
                pos = hash_at + 3
                expected = checksum(body)
                try:
                    got: int | None = int(raw[-2:], 16)
                except ValueError:
                    got = None
                if got != expected:
                    events.append(BadChecksum(raw, expected, got))
                    continue
                payload = decode_payload(body, limit=self.max_packet * 64)
                if c == 0x24:
                    events.append(Packet(payload, raw))
                else:
                    events.append(Notification(payload, raw))
        except GdbProtocolError:
            buf.clear()
            self._scanned = 0
            raise
        del buf[:pos]
        return events
