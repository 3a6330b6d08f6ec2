"""The core of ``scripts/fuzz-gdbstub``: seeded bad input for the gdbstub transport.

Each input is drawn from ``random.Random(f"{seed}:{index}")``, so ``(seed, index)``
replays it. Kinds of input:

- ``reader``: a byte stream (good frames, acks, garbage, damaged frames, random byte
  flips) fed to :class:`~kprobevm.gdbstub.packet.PacketReader` in random chunks; good
  frames alone must decode to what was framed;
- ``stop``: stop replies, built then mutated, for ``parse_stop_reply``;
- ``codec``: random or damaged text for the other decoders (hex, thread ids, console
  output, replies, ``qSupported`` features, target descriptions and ``g`` replies);
- ``client``: a short conversation over a socketpair. The stub's side is what a
  QEMU-like stub answers to each operation (recorded once per process), with faults
  mixed in; each operation's bytes are written before it runs, so no stub thread is
  needed and a conversation takes about a millisecond. Late replies are replies held
  back from one operation and written before the next;
- ``live``: a :class:`~tests.faultstub.FaultyStub` (threads, timers, hang-ups) with
  random faults, driving the client through a handshake and a few operations.

An input fails by hanging (an operation past its budget; SIGALRM ends it), crashing
(an exception outside :class:`~kprobevm.errors.KprobeVMError`), outgrowing a bound
(buffer sizes checked after every operation), or decoding good frames wrong.
"""

from __future__ import annotations

import binascii
import contextlib
import functools
import random
import resource
import signal
import socket
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from kprobevm.errors import GdbProtocolError, KprobeVMError
from kprobevm.gdbstub import client as client_module
from kprobevm.gdbstub import packet as codec
from kprobevm.gdbstub.client import BreakpointKind, GdbClient
from kprobevm.gdbstub.packet import Packet, PacketReader, escape
from kprobevm.gdbstub.regs import RegisterLayout
from tests.fakestub import CORE_XML, RAM_BASE, TARGET_XML, FakeStub, QemuLike
from tests.faultstub import (
    MALFORMED,
    STREAM_FAULTS,
    Fault,
    FaultyStub,
    apply_fault,
    buffer_bounds,
    buffer_sizes,
    garbage,
    malform,
    split_units,
)

__all__ = [
    "BOUNDS", "OPS", "Conversation", "Failure", "FuzzReport", "Hang", "clean_streams",
    "describe", "kind_of", "make_conversation", "run", "run_one", "watchdog",
]

TIMEOUT = 0.001
"""The client's timeout in ``client`` inputs: a stall costs this much."""
LIVE_TIMEOUT = 0.05
"""The client's timeout in ``live`` inputs (a stub thread answers)."""
MAX_PACKET = 1 << 14
"""The client's and reader's packet limit here: huge packets stay cheap to make."""
OP_BUDGET = 1.0
"""Seconds an operation may take before it counts as a hang."""
ALARM = 3.0
"""Seconds after which SIGALRM ends an operation that hangs."""
KINDS = (("reader", 380), ("stop", 180), ("codec", 200), ("client", 237), ("live", 3))
"""Input kinds and their weights."""

BOUNDS = buffer_bounds(MAX_PACKET)
"""What each client buffer may hold after an operation (sizes from :func:`buffer_sizes`)."""


class Hang(BaseException):
    """Raised by SIGALRM in an operation that ran past :data:`ALARM` (a BaseException,
    so that no ``except Exception`` on the way takes it for a crash)."""


@dataclass
class Failure:
    """One failing input: what went wrong and how to replay it."""

    seed: str
    index: int
    kind: str
    what: str
    """``hang``, ``crash``, ``bound`` or ``mismatch``."""
    detail: str

    def replay(self) -> str:
        return f"{self.seed}:{self.index}"


@dataclass
class FuzzReport:
    """What a run saw; :meth:`as_dict` for ``--json``."""

    seed: str
    inputs: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    """Errors of the KprobeVMError tree raised, by class (expected: bad input)."""
    failures: list[Failure] = field(default_factory=list)
    peaks: dict[str, int] = field(default_factory=dict)
    ops: int = 0
    max_op_seconds: float = 0.0
    seconds: float = 0.0
    peak_rss_kib: int = 0

    def count(self, what: str) -> int:
        return sum(1 for f in self.failures if f.what == what)

    def note_peak(self, sizes: dict[str, int]) -> None:
        for k, v in sizes.items():
            if v > self.peaks.get(k, -1):
                self.peaks[k] = v

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "inputs": self.inputs, "kinds": dict(self.kinds),
            "hangs": self.count("hang"), "crashes": self.count("crash"),
            "bounds": self.count("bound"), "mismatches": self.count("mismatch"),
            "failures": [f.__dict__ | {"replay": f.replay()} for f in self.failures[:50]],
            "errors": dict(self.errors.most_common()), "peaks": self.peaks,
            "client_ops": self.ops, "max_op_seconds": round(self.max_op_seconds, 4),
            "seconds": round(self.seconds, 2), "peak_rss_kib": self.peak_rss_kib,
            "bounds_checked": BOUNDS,
        }


# -- the watchdog ---------------------------------------------------------------------------


def _alarm(signum: int, frame_: FrameType | None) -> None:
    raise Hang(f"no return within {ALARM:g} s")


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the body after ``seconds`` (main thread only). An alarm
    already set (pytest-timeout's) is put back afterwards."""
    old = signal.signal(signal.SIGALRM, _alarm)
    t0 = time.monotonic()
    before, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if before:
            signal.setitimer(signal.ITIMER_REAL, max(before - (time.monotonic() - t0), 1e-3))


class _Outcome:
    """The verdict on one input, filled in as it runs."""

    __slots__ = ("detail", "errors", "max_op", "ops", "sizes", "what")

    def __init__(self) -> None:
        self.what: str | None = None
        self.detail = ""
        self.errors: list[str] = []
        self.sizes: dict[str, int] = {}
        self.ops = 0
        self.max_op = 0.0

    def fail(self, what: str, detail: str) -> None:
        if self.what is None:
            self.what, self.detail = what, detail

    def call(self, name: str, fn: Callable[[], object], budget: float = OP_BUDGET) -> bool:
        """Run ``fn``: note a KprobeVMError, fail on anything else or on a hang. True when
        it returned."""
        t0 = time.monotonic()
        try:
            fn()
            return True
        except Hang:
            self.fail("hang", f"{name}: no return within {ALARM:g} s")
        except KprobeVMError as exc:
            self.errors.append(type(exc).__name__)
        except Exception:
            self.fail("crash", f"{name}: {traceback.format_exc(limit=-6)}")
        finally:
            spent = time.monotonic() - t0
            self.ops += 1
            self.max_op = max(self.max_op, spent)
            if spent > budget and self.what is None:
                self.fail("hang", f"{name}: took {spent:.3f} s (budget {budget:g} s)")
        return False


# -- codec inputs ---------------------------------------------------------------------------

_PAYLOAD_BYTES = bytes(range(256))


def _payload(rng: random.Random, n: int) -> bytes:
    pick = rng.random()
    if pick < 0.4:
        return binascii.hexlify(rng.randbytes(n // 2))
    if pick < 0.7:
        return bytes(rng.choice(b"0123456789abcdefOKET;:,.p") for _ in range(n))
    return rng.randbytes(n)


def rle_encode(data: bytes, rng: random.Random) -> bytes:
    """Run-length encode escaped ``data`` as a stub may (runs of 4 or more, counts that
    are neither ``#`` nor ``$``), taking some runs and leaving others."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        j = i + 1
        while j < n and data[j] == data[i] and j - i < 98:
            j += 1
        run = j - i
        if run >= 4 and data[i] not in b"}*#$" and (i == 0 or data[i - 1] != 0x7D) \
                and rng.random() < 0.8:
            repeat = run - 1
            while chr(repeat + 29) in "#$":
                repeat -= 1
            out += data[i:i + 1] + b"*" + bytes((repeat + 29,))
            i += repeat + 1
            continue
        out += data[i:i + 1]
        i += 1
    return bytes(out)


def _frame(rng: random.Random, payload: bytes) -> bytes:
    body = escape(payload)
    if rng.random() < 0.3:
        body = rle_encode(body, rng)
    return b"$%s#%02x" % (body, codec.checksum(body))


def _mutate(data: bytes, rng: random.Random, flips: int) -> bytes:
    b = bytearray(data)
    for _ in range(flips):
        op = rng.randrange(4)
        at = rng.randint(0, len(b))
        if op == 0 and b:
            b[min(at, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[at:at] = rng.choice([b"$", b"#", b"}", b"*", b"-", b"+", b"%", b"\x03", b"\xff"])
        elif op == 2 and b:
            del b[at:at + rng.randint(1, 8)]
        else:
            b[at:at] = rng.randbytes(rng.randint(1, 16))
    return bytes(b)


def fuzz_reader(rng: random.Random, out: _Outcome) -> None:
    """A stream of frames and noise fed to a PacketReader in random chunks."""
    max_packet = 4096
    parts: list[bytes] = []
    framed: list[bytes] = []
    clean = True
    for _ in range(rng.randint(1, 12)):
        r = rng.random()
        if r < 0.5:
            payload = _payload(rng, rng.choice([0, 1, 2, 8, 40, 300, 2000]))
            parts.append(_frame(rng, payload))
            framed.append(payload)
        elif r < 0.6:
            parts.append(rng.choice([b"+", b"-", b"+++", b"-" * rng.randint(1, 200)]))
        elif r < 0.65:
            parts.append(b"%Stop:" + b"T05thread:01;" + b"#" + b"%02x" % codec.checksum(
                b"Stop:T05thread:01;"))
        elif r < 0.75:
            clean = False
            parts.append(garbage(rng, 200))
        else:
            clean = False
            packet = _frame(rng, _payload(rng, rng.choice([1, 8, 100])))
            parts.append(malform(rng.choice(MALFORMED), packet, rng, huge=max_packet))
    stream = b"".join(parts)
    if rng.random() < 0.3:
        clean = False
        stream = _mutate(stream, rng, rng.randint(1, 8))
    reader = PacketReader(max_packet)
    got: list[bytes] = []
    pos = 0
    peak = 0
    while pos < len(stream):
        step = rng.choice([1, 2, 7, 64, 1000, 1 << 16])
        chunk = stream[pos:pos + step]
        pos += step
        try:
            events = reader.feed(chunk)
        except GdbProtocolError as exc:
            out.errors.append(type(exc).__name__)
            clean = False
            events = []
        except Exception:
            out.fail("crash", f"PacketReader.feed: {traceback.format_exc(limit=-6)}")
            return
        peak = max(peak, reader.pending)
        if reader.pending > max_packet + 3 + len(chunk):
            out.fail("bound", f"reader holds {reader.pending} bytes (max_packet {max_packet})")
            return
        got += [ev.payload for ev in events if isinstance(ev, Packet)]
    out.sizes = {"reader_pending": peak}
    if clean and got != framed:
        out.fail("mismatch", f"framed {framed!r}\ndecoded {got!r}")


def _stop_text(rng: random.Random) -> bytes:
    kind = rng.choice("TTTTSWX")
    text = f"{kind}{rng.randrange(256):02x}"
    if kind == "T":
        for _ in range(rng.randint(0, 5)):
            key = rng.choice(["thread", "core", "watch", "rwatch", "awatch", "swbreak",
                              "hwbreak", "06", "10", "library", "exec"])
            value = rng.choice(["p01.01", "1", "ffffffff81000000", "", "-1", "p1.-1",
                                "zz", "p" + "1" * rng.randint(1, 300)])
            text += f"{key}:{value};"
    elif kind in "WX" and rng.random() < 0.5:
        text += f";process:{rng.randrange(1 << 16):x}"
    return text.encode()


def fuzz_stop(rng: random.Random, out: _Outcome) -> None:
    """A stop reply, built then maybe mutated, for parse_stop_reply."""
    payload = _stop_text(rng)
    if rng.random() < 0.6:
        payload = _mutate(payload, rng, rng.randint(1, 4))
    if rng.random() < 0.02:
        payload += b";" + b"a:b;" * rng.randint(1000, 50000)
    try:
        stop = codec.parse_stop_reply(payload)
    except KprobeVMError as exc:
        out.errors.append(type(exc).__name__)
        return
    except Exception:
        out.fail("crash", f"parse_stop_reply({payload[:200]!r}): "
                          f"{traceback.format_exc(limit=-6)}")
        return
    if stop.raw != payload:
        out.fail("mismatch", f"parse_stop_reply({payload[:200]!r}).raw differs")


_LAYOUT = RegisterLayout.from_target_xml(
    TARGET_XML, lambda annex: CORE_XML)


_NASTY_NUMBERS = ("-8", "0", "99999999999999999999", "0x40", "1e3", "", " 64 ", "0b1000",
                  "-1", "65536", "4097", "1" * 5000, "\u0661")


def _nasty_xml(rng: random.Random) -> bytes:
    """A target description with odd numbers, encodings or includes in it."""
    xml = CORE_XML if rng.random() < 0.7 else TARGET_XML
    value = rng.choice(_NASTY_NUMBERS)
    if rng.random() < 0.5:
        xml = xml.replace('bitsize="64"', f'bitsize="{value}"', 1)
    else:
        xml = xml.replace('regnum="0"', f'regnum="{value}"', 1)
    if rng.random() < 0.3:
        xml = xml.replace('href="core.xml"', f'href="{rng.choice(["", "x" * 300, "a:b", "é"])}"')
    head = rng.choice(["", '<?xml version="1.0"?>', '<?xml version="2.0"?>'] + [
        f'<?xml version="1.0" encoding="{e}"?>' for e in ("foo", "utf-16", "latin-1", "")])
    return (head + xml.split("?>", 1)[-1]).encode("utf-8", "replace")


def _codec_case(rng: random.Random) -> tuple[str, Callable[[], object]]:
    text = _mutate(_payload(rng, rng.choice([0, 1, 2, 8, 40])), rng, rng.randint(0, 3))
    which = rng.randrange(11)
    if which == 0:
        return "decode_hex", lambda: codec.decode_hex(text, b"m0,4")
    if which == 1:
        return "parse_thread_id", lambda: codec.parse_thread_id(
            rng.choice([text, b"p" + text, b"p01." + text]))
    if which == 2:
        return "decode_console_output", lambda: codec.decode_console_output(b"O" + text)
    if which == 3:
        return "check_reply", lambda: codec.check_reply(rng.choice([b"g", b"qC", b"M0,1:00"]),
                                                        text)
    if which == 4:
        return "join_memory_replies", lambda: codec.join_memory_replies([b"m1000,4"], [text])
    if which == 5:
        return "decode_payload", lambda: codec.decode_payload(
            _mutate(b"a*}}*\x20}]" + text, rng, 2), limit=4096)
    if which == 6:
        return "_parse_features", lambda: client_module._parse_features(
            b"PacketSize=1000;" + text + b";qXfer:features:read+")
    if which == 7:
        xml = (_nasty_xml(rng) if rng.random() < 0.5 else
               _mutate(rng.choice([TARGET_XML, CORE_XML]).encode(), rng, rng.randint(1, 6)))
        return "from_target_xml", lambda: RegisterLayout.from_target_xml(
            xml, lambda annex: _mutate(CORE_XML.encode(), rng, rng.randint(0, 6)))
    if which == 8:
        g = _LAYOUT.encode({}, bytes(_LAYOUT.g_size))
        g = _mutate(g, rng, rng.randint(0, 4))
        return "RegisterLayout.decode", lambda: _LAYOUT.decode(g, wide=rng.random() < 0.5)
    if which == 9:
        return "parse_error_reply", lambda: codec.parse_error_reply(b"E" + text)
    return "run_length_decode", lambda: codec.run_length_decode(
        _mutate(b"0*" + text, rng, 2), limit=4096)


def fuzz_codec(rng: random.Random, out: _Outcome) -> None:
    """One of the other decoders on random or damaged text."""
    name, fn = _codec_case(rng)
    out.call(name, fn)


# -- client inputs: a preloaded conversation --------------------------------------------------


def _cont_wait(c: GdbClient) -> None:
    c.cont()
    c.wait_stop(TIMEOUT)


def _cont_poll(c: GdbClient) -> None:
    c.cont()
    for _ in range(3):
        if c.poll_stop() is not None:
            return
    c.interrupt(timeout=TIMEOUT)


def _cont_interrupt(c: GdbClient) -> None:
    c.cont()
    c.interrupt(timeout=TIMEOUT)


def _cont_defer(c: GdbClient) -> None:
    c.cont(before=[b"P1=0700000000000000"], defer=True)
    c.wait_stop(TIMEOUT)


OPS: dict[str, Callable[[GdbClient], object]] = {
    "handshake": GdbClient.handshake,
    "g": lambda c: c.read_registers(),
    "g2": lambda c: c.read_registers(thread="p01.02", wide=False),
    "p": lambda c: c.read_register("rip"),
    "m8": lambda c: c.read_memory(RAM_BASE, 8),
    "m5000": lambda c: c.read_memory(RAM_BASE + 0x100, 5000),
    "M": lambda c: c.write_memory(RAM_BASE, bytes(range(200))),
    "phys": lambda c: c.read_phys(RAM_BASE, 16),
    "threads": GdbClient.threads,
    "qC": GdbClient.current_thread,
    "monitor": lambda c: c.monitor("info registers"),
    "Z": lambda c: c.insert_breakpoint(BreakpointKind.WRITE_WATCH, 0x1234, 8),
    "cont-wait": _cont_wait,
    "cont-poll": _cont_poll,
    "cont-interrupt": _cont_interrupt,
    "cont-defer": _cont_defer,
    "step": lambda c: c.step("p01.01", timeout=TIMEOUT),
}
"""The client operations a conversation is made of (after the handshake)."""

_streams: dict[str, bytes] | None = None


def clean_streams() -> dict[str, bytes]:
    """What a QEMU-like stub sends for each of :data:`OPS`, recorded once through a
    FakeStub thread (each operation from the state a clean handshake leaves)."""
    global _streams
    if _streams is not None:
        return _streams
    sent: list[bytes] = []
    lock = threading.Lock()

    class Recorder(FakeStub):
        def send_raw(self, data: bytes) -> None:
            with lock:
                sent.append(data)
            super().send_raw(data)

    streams = {}
    for name, op in OPS.items():
        t = QemuLike()
        stub = Recorder(t)
        c = GdbClient(stub.client_sock, timeout=1.0)
        if name != "handshake":
            c.handshake()
            time.sleep(0.005)
        with lock:
            sent.clear()
        if name.startswith("cont") and name != "cont-interrupt":
            threading.Timer(0.02, lambda s=stub, q=t: s._deliver(q.stop())).start()
        if name.startswith("cont"):
            _record_cont(name, c)
        else:
            op(c)
        time.sleep(0.01)
        with lock:
            streams[name] = b"".join(sent)
        c.close()
        stub.close()
    _streams = streams
    return streams


def _record_cont(name: str, c: GdbClient) -> None:
    if name == "cont-interrupt":
        c.cont()
        c.interrupt(timeout=1.0)
    elif name == "cont-defer":
        c.cont(before=[b"P1=0700000000000000"], defer=True)
        c.wait_stop(1.0)
    else:
        c.cont()
        c.wait_stop(1.0)


@dataclass
class Conversation:
    """A ``client`` input: operations, the bytes written before each, and when to hang up."""

    ops: list[str]
    data: list[bytes]
    faults: list[str]
    hang_up_after: int | None
    """Index of the operation after whose bytes the stub shuts its side (None: never)."""


def make_conversation(rng: random.Random) -> Conversation:
    streams = clean_streams()
    names = ["handshake", *rng.choices(list(OPS)[1:], k=rng.randint(1, 4))]
    data: list[bytes] = []
    faults: list[str] = []
    carry = b""
    for name in names:
        units = split_units(streams[name])
        chosen = "-"
        r = rng.random()
        if r < 0.45:
            fault = rng.choice((*STREAM_FAULTS, Fault.LATE, Fault.REORDER, Fault.REORDER))
            chosen = fault.value
            if fault is Fault.LATE:  # held back: written before the next operation
                this, carry_next = b"", b"".join(units)
            elif fault is Fault.REORDER:
                packets = [i for i, u in enumerate(units) if u[:1] == b"$"]
                if len(packets) >= 2:
                    i, j = rng.sample(packets, 2)
                    units[i], units[j] = units[j], units[i]
                this, carry_next = b"".join(units), b""
            else:
                this = b"".join(apply_fault(fault, units, rng, huge=MAX_PACKET, flood=300))
                carry_next = b""
        elif r < 0.52:
            chosen = "bytes"
            this, carry_next = _mutate(b"".join(units), rng, rng.randint(1, 6)), b""
        else:
            this, carry_next = b"".join(units), b""
        data.append(carry + this)
        carry = carry_next
        faults.append(chosen)
    hang = rng.randrange(len(names)) if rng.random() < 0.15 else (
        len(names) - 1 if rng.random() < 0.7 else None)
    return Conversation(names, data, faults, hang)


def _push(sock: socket.socket, pending: bytearray) -> None:
    """Write what fits of ``pending`` without blocking."""
    while pending:
        try:
            n = sock.send(pending, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pending.clear()
            return
        del pending[:n]


def _drain(sock: socket.socket) -> None:
    """Read and drop what the client sent (the stub's receive buffer must not fill)."""
    while True:
        try:
            if not sock.recv(1 << 16, socket.MSG_DONTWAIT):
                return
        except (BlockingIOError, InterruptedError, OSError):
            return


def fuzz_client(rng: random.Random, out: _Outcome, conv: Conversation | None = None) -> None:
    """Run a conversation; check buffers after every operation."""
    conv = conv or make_conversation(rng)
    ours, stub = socket.socketpair()
    c = GdbClient(ours, timeout=TIMEOUT, max_packet=MAX_PACKET)
    pending = bytearray()
    try:
        for i, name in enumerate(conv.ops):
            pending += conv.data[i]
            _push(stub, pending)
            if conv.hang_up_after == i and not pending:
                stub.shutdown(socket.SHUT_WR)
            out.call(name, functools.partial(OPS[name], c))
            _push(stub, pending)
            _drain(stub)
            sizes = buffer_sizes(c)
            for k, v in sizes.items():
                out.sizes[k] = max(out.sizes.get(k, 0), v)
                if v > BOUNDS[k]:
                    out.fail("bound", f"after {name}: {k} = {v} > {BOUNDS[k]}")
            if out.what is not None:
                return
    finally:
        with contextlib.suppress(Exception):
            c.close()
        stub.close()


# -- live inputs: a FaultyStub with threads -------------------------------------------------


def fuzz_live(rng: random.Random, out: _Outcome) -> None:
    """Handshake and a few operations against a FaultyStub playing random faults."""
    t = QemuLike()
    stub = FaultyStub(t, seed=rng.randrange(1 << 30), rate=rng.choice([0.05, 0.2, 0.5]),
                      late=LIVE_TIMEOUT * 1.5, huge=MAX_PACKET)
    c = GdbClient(stub.client_sock, timeout=LIVE_TIMEOUT, max_packet=MAX_PACKET)
    names = ["handshake", *rng.choices(
        [n for n in OPS if not n.startswith("cont")], k=rng.randint(1, 4))]
    try:
        for name in names:
            out.call(name, functools.partial(OPS[name], c), budget=OP_BUDGET + 10 * LIVE_TIMEOUT)
            if out.what is not None:
                out.detail += f"\n  faults played: {stub.faults}"
                return
    finally:
        with contextlib.suppress(Exception):
            c.close()
        stub.close()


# -- running --------------------------------------------------------------------------------

_RUNNERS: dict[str, Callable[[random.Random, _Outcome], None]] = {
    "reader": fuzz_reader, "stop": fuzz_stop, "codec": fuzz_codec, "client": fuzz_client,
    "live": fuzz_live,
}
_NAMES = [k for k, _ in KINDS]
_WEIGHTS = [w for _, w in KINDS]


def _rng(seed: str, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}")


def kind_of(seed: str, index: int) -> str:
    return _rng(seed, index).choices(_NAMES, _WEIGHTS)[0]


def run_one(seed: str, index: int) -> tuple[str, _Outcome]:
    """Run input ``index`` of ``seed``: (its kind, its outcome)."""
    rng = _rng(seed, index)
    kind = rng.choices(_NAMES, _WEIGHTS)[0]
    out = _Outcome()
    budget = ALARM * 6 if kind in ("client", "live") else ALARM
    try:
        with watchdog(budget):
            if kind in ("client", "live"):
                _RUNNERS[kind](rng, out)
            else:
                out.call(kind, lambda: _RUNNERS[kind](rng, out))
    except Hang:
        out.fail("hang", f"{kind} input: no end within {budget:g} s")
    return kind, out


def describe(seed: str, index: int) -> str:
    """The input, spelt out for a replay."""
    rng = _rng(seed, index)
    kind = rng.choices(_NAMES, _WEIGHTS)[0]
    if kind != "client":
        return f"{kind} input {seed}:{index}"
    conv = make_conversation(rng)
    lines = [f"client input {seed}:{index}: hang-up after op {conv.hang_up_after}"]
    for name, fault, data in zip(conv.ops, conv.faults, conv.data, strict=True):
        lines.append(f"  {name:<14} fault {fault:<13} stub sends {data[:300]!r}"
                     + (f" ... ({len(data)} bytes)" if len(data) > 300 else ""))
    return "\n".join(lines)


def run(seed: str, inputs: int, *, start: int = 0,
        progress: Callable[[FuzzReport], None] | None = None, every: int = 10000,
        stop_after: int = 20) -> FuzzReport:
    """Run ``inputs`` inputs of ``seed`` from ``start``; stops early after ``stop_after``
    failures."""
    clean_streams()
    report = FuzzReport(seed)
    t0 = time.monotonic()
    for index in range(start, start + inputs):
        kind, out = run_one(seed, index)
        report.inputs += 1
        report.kinds[kind] += 1
        report.errors.update(out.errors)
        report.note_peak({f"{kind}.{k}": v for k, v in out.sizes.items()})
        if kind in ("client", "live"):
            report.ops += out.ops
            report.max_op_seconds = max(report.max_op_seconds, out.max_op)
        if out.what is not None:
            report.failures.append(Failure(seed, index, kind, out.what, out.detail))
            if len(report.failures) >= stop_after:
                break
        if progress is not None and report.inputs % every == 0:
            report.seconds = time.monotonic() - t0
            progress(report)
    report.seconds = time.monotonic() - t0
    report.peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return report
