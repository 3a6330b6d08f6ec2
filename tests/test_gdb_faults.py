"""Bad input at the transport: every call returns or raises a KprobeVMError in time, the
client's buffers stay bounded, and after a fault it can recover from, the next request
still pairs with its own reply. The stub is :class:`~tests.faultstub.FaultyStub`."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from kprobevm.errors import (
    GdbConnectionClosed,
    GdbError,
    GdbProtocolError,
    GdbTimeout,
    KprobeVMError,
    UnknownRegister,
    VMLost,
)
from kprobevm.gdbstub import packet as codec
from kprobevm.gdbstub.client import GdbClient
from kprobevm.gdbstub.connection import CONSOLE_LIMIT
from kprobevm.gdbstub.link import MAX_OWED_ACKS
from kprobevm.gdbstub.packet import PacketReader
from kprobevm.gdbstub.regs import RegisterLayout
from kprobevm.gdbstub.target import Target
from tests import gdbfuzz
from tests.fakestub import CORE_XML, RAM_BASE, QemuLike, frame
from tests.faultstub import (
    MALFORMED,
    STREAM_FAULTS,
    Fault,
    FaultPlan,
    FaultyStub,
    apply_fault,
    buffer_bounds,
    buffer_sizes,
)

T = TypeVar("T")
TIMEOUT = 0.1
"""The client's timeout here: faults that stall cost this much."""
DEADLINE = 2.0
"""A call that has not returned after this long hangs."""
GOOD_THREADS = ["p01.01", "p01.02"]


def within(fn: Callable[[], T], seconds: float = DEADLINE) -> T | KprobeVMError:
    """``fn()``'s result, or the KprobeVMError it raised; fails the test when it hangs or
    raises anything else (the watchdog is a thread: the call runs in another)."""
    results: list[T] = []
    raised: list[BaseException] = []

    def run() -> None:
        try:
            results.append(fn())
        except BaseException as exc:
            raised.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        pytest.fail(f"hang: no return within {seconds} s")
    if raised:
        if not isinstance(raised[0], KprobeVMError):
            raise AssertionError(f"foreign exception {type(raised[0]).__name__}") from raised[0]
        return raised[0]
    return results[0]


def bounded(c: GdbClient) -> None:
    limits = buffer_bounds(c._reader.max_packet)
    for name, size in buffer_sizes(c).items():
        assert size <= limits[name], (name, size)


def resumed(c: GdbClient, t: QemuLike) -> None:
    """Resume, and wait until the stub has seen it (a stop sent before would be stale,
    and our next packet's bytes would reach a running target)."""
    c.cont()
    for _ in range(200):
        if t.running:
            return
        time.sleep(0.005)
    raise AssertionError("the stub never saw the resume")


def connect(plan: FaultPlan | None = None, *, target: QemuLike | None = None,
            **options: object) -> tuple[GdbClient, FaultyStub, QemuLike]:
    t = target or QemuLike()
    stub = FaultyStub(t, plan, late=TIMEOUT * 1.5, **options)  # type: ignore[arg-type]
    c = GdbClient(stub.client_sock, timeout=TIMEOUT)
    c.handshake()
    return c, stub, t


# -- the codec --------------------------------------------------------------------------------


def test_a_packet_trickling_in_is_not_searched_again_from_its_start() -> None:
    """A 200 kB reply fed a byte at a time: linear, not quadratic (minutes before)."""
    body = b"ab" * 100_000
    data = frame(body)
    reader = PacketReader(1 << 20)
    t0 = time.perf_counter()
    events = []
    for i in range(len(data)):
        events += reader.feed(data[i:i + 1])
    assert time.perf_counter() - t0 < 3.0
    assert [ev.payload for ev in events] == [body]  # type: ignore[union-attr]


def test_a_packet_cut_short_by_another_is_counted() -> None:
    reader = PacketReader()
    events = reader.feed(b"$QCp01" + frame(b"OK"))
    assert [ev.payload for ev in events] == [b"OK"]  # type: ignore[union-attr]
    assert reader.truncated == 1
    events = reader.feed(b"$QC")
    events += reader.feed(b"p0")
    events += reader.feed(b"$OK#9a")
    assert reader.truncated == 2 and len(events) == 1


def test_long_stop_replies_are_not_cached() -> None:
    """The stop-reply cache holds 1024 entries: each must stay small."""
    long = b"T05thread:p01.01;" + b"06:%s;" % (b"0" * 400)
    before = codec.parse_short_stop_reply.cache_info().currsize
    assert codec.parse_stop_reply(long).get("06") == "0" * 400
    assert codec.parse_short_stop_reply.cache_info().currsize == before
    assert codec.parse_stop_reply(b"T05thread:p01.01;").thread == "p01.01"


def test_a_thread_id_past_its_length_is_a_protocol_error() -> None:
    with pytest.raises(GdbProtocolError):
        codec.parse_thread_id("p" + "1" * 1000)
    with pytest.raises(GdbProtocolError):
        codec.parse_stop_reply(b"T05thread:p" + b"1" * 100 + b";")


@pytest.mark.parametrize("xml", [
    CORE_XML.replace('bitsize="64"', 'bitsize="-8"', 1),
    CORE_XML.replace('bitsize="64"', 'bitsize="99999999999999999999"', 1),
    CORE_XML.replace('regnum="0"', 'regnum="-1"', 1),
    '<?xml version="1.0" encoding="foo"?>' + CORE_XML.split("?>", 1)[1],
], ids=["negative-bits", "huge-bits", "negative-regnum", "unknown-encoding"])
def test_odd_target_descriptions_are_protocol_errors(xml: str) -> None:
    """These raised struct.error and LookupError before."""
    with pytest.raises(GdbProtocolError):
        RegisterLayout.from_target_xml(xml.encode())


def test_a_register_the_description_lacks_is_an_error_of_the_tree() -> None:
    """A bare KeyError escaped read_register when a stub's description had no rip."""
    layout = RegisterLayout.from_target_xml(CORE_XML.replace('name="rip"', 'name="pc"'))
    with pytest.raises(UnknownRegister) as exc:
        layout["rip"]
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, KprobeVMError)
    assert "rip" in str(exc.value)


# -- faults on one reply ----------------------------------------------------------------------


@pytest.mark.parametrize("fault", [*MALFORMED, Fault.GARBAGE, Fault.CONSOLE_FLOOD,
                                   Fault.UNASKED_STOP, Fault.DUP_STOP, Fault.LOST_ACK,
                                   Fault.LATE, Fault.DROP],
                         ids=lambda f: f.value)
def test_a_fault_on_one_reply_leaves_the_next_request_in_step(fault: Fault) -> None:
    """The faulty reply's request returns or fails; the one after it gets its own reply."""
    c, stub, _ = connect({b"qC": fault}, seed=1)
    c.console.clear()
    result = within(c.current_thread)
    assert isinstance(result, (str, KprobeVMError)), result
    if fault is Fault.LATE:
        assert isinstance(result, GdbTimeout)
        time.sleep(TIMEOUT)  # the late reply is on its way
    assert within(c.threads) == GOOD_THREADS, stub.faults
    assert within(lambda: c.read_memory(RAM_BASE, 4)) == bytes(4)
    bounded(c)


def test_a_stub_that_naks_every_copy_fails_the_request_only() -> None:
    """A NAK storm: the request is resent a few times, then fails; the next pairs."""
    t = QemuLike()
    t.hooks[b"qC"] = lambda p: b"-"
    stub = FaultyStub(t, ack=False)  # a stub that NAKs does not ack
    c = GdbClient(stub.client_sock, timeout=TIMEOUT)
    exc = within(c.current_thread)
    assert isinstance(exc, GdbProtocolError) and exc.sent == b"qC"
    assert c.stats.retransmits == c.max_retransmits
    del t.hooks[b"qC"]
    assert within(c.current_thread) == "p01.01"
    assert within(c.threads) == GOOD_THREADS


def test_a_bad_checksum_not_resent_fails_its_request_only() -> None:
    """QEMU never resends: the NAKed reply is taken as lost at the deadline (before, the
    next reply was discarded as the late one, and every request after it timed out)."""
    c, _stub, _ = connect({b"qC": Fault.BAD_CHECKSUM}, seed=2)
    exc = within(c.current_thread)
    assert isinstance(exc, GdbProtocolError) and exc.sent == b"qC"
    assert c.stats.naks_sent == 1
    assert within(c.threads) == GOOD_THREADS


def test_a_reply_cut_short_by_the_next_packet_fails_its_request_only() -> None:
    t = QemuLike()
    t.hooks[b"qC"] = lambda p: b"$QCp01.01" + frame(b"T02thread:01;")
    c, _stub, _ = connect(target=t)
    exc = within(c.current_thread)
    assert isinstance(exc, GdbProtocolError) and exc.sent == b"qC"
    assert within(c.threads) == GOOD_THREADS


def test_an_oversized_reply_fails_its_request_only() -> None:
    """The reader throws the packet away: its request is over, the next pairs right."""
    t = QemuLike()
    t.hooks[b"qC"] = lambda p: b"$QC" + b"1" * 5000  # and no end
    stub = FaultyStub(t)
    c = GdbClient(stub.client_sock, timeout=TIMEOUT, max_packet=4096)
    c.handshake()
    assert isinstance(within(c.current_thread), GdbProtocolError)
    # the fast path's stall was not carried over to the next wait (it timed out at once)
    assert within(lambda: c.monitor("info")) == "you said: info\n"
    assert within(c.threads) == GOOD_THREADS


def test_non_ascii_thread_lists_are_protocol_errors() -> None:
    """UnicodeDecodeError escaped from threads() and current_thread() before."""
    t = QemuLike()
    t.hooks[b"qfThreadInfo"] = lambda p: frame(b"mp01.\xc101")
    t.hooks[b"qC"] = lambda p: frame(b"QCp\xc1")
    c, _, _ = connect(target=t)
    assert isinstance(within(c.threads), GdbProtocolError)
    assert isinstance(within(c.current_thread), GdbProtocolError)


def test_a_lost_ack_does_not_keep_requests_unacknowledged() -> None:
    """A reply acknowledges its request: unacked requests would otherwise pile up, and
    the fast path (which wants none) stay shut for good."""
    c, _stub, _ = connect({b"g": [Fault.LOST_ACK] * 3})
    for _ in range(3):
        within(c.read_registers)
    assert not c._unacked
    assert c.read_registers()["rip"] == 0xFFF0


def test_a_duplicated_reply_is_detected_by_shape_or_passes_as_the_next() -> None:
    """RSP has no request ids: a duplicate pairs with the next request. The client must
    still return or raise in time, and keep its buffers bounded."""
    c, _stub, _ = connect({b"qC": Fault.DUPLICATE})
    assert within(c.current_thread) == "p01.01"
    assert isinstance(within(c.threads), (list, KprobeVMError))
    bounded(c)


def test_reordered_replies_return_or_raise_in_time() -> None:
    c, _stub, _ = connect({b"qC": Fault.REORDER})
    for call in (c.current_thread, c.threads, c.current_thread, c.threads):
        result = within(call)
        assert isinstance(result, (str, list, KprobeVMError))
    bounded(c)


@pytest.mark.parametrize("fault", [Fault.HANG_UP, Fault.TRUNCATE], ids=lambda f: f.value)
def test_a_hang_up_ends_every_later_call_at_once(fault: Fault) -> None:
    c, _stub, _ = connect({b"m": fault}, seed=3)
    first = within(lambda: c.read_memory(RAM_BASE, 8))
    assert isinstance(first, (GdbConnectionClosed, GdbTimeout, GdbProtocolError)), first
    t0 = time.monotonic()
    for call in (c.read_registers, c.threads, lambda: c.read_memory(RAM_BASE, 8), c.cont):
        assert isinstance(within(call), GdbError)
    assert time.monotonic() - t0 < TIMEOUT * 8


# -- floods ---------------------------------------------------------------------------------


def _flood(stub: FaultyStub, packet: bytes, stop: threading.Event) -> None:
    burst = packet * 64
    while not stop.is_set():
        stub.send_nowait(burst)
        time.sleep(0.0005)


_FLOODER = """
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
burst = bytes.fromhex(sys.argv[2]) * (65536 // len(sys.argv[2]) + 1)
while True:
    sock.sendall(burst)
"""


@pytest.mark.parametrize("packet", [frame(b"T02thread:01;"), frame(b"O4142"), b"-", b"\x00"],
                         ids=["stale-stops", "console", "naks", "garbage"])
def test_a_flood_of_packets_that_answer_nothing_still_times_out(packet: bytes) -> None:
    """recv_reply checked its deadline only when nothing arrived: a stub sending faster
    than the client reads (here another process) kept it waiting as long as it sent."""
    t = QemuLike()
    t.hooks[b"qC"] = lambda p: None  # the reply never comes
    c, stub, _ = connect(target=t)
    fd = stub._sock.fileno()
    flooder = subprocess.Popen([sys.executable, "-c", _FLOODER, str(fd), packet.hex()],
                               pass_fds=[fd], stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.1)  # the flood is on
        t0 = time.monotonic()
        assert isinstance(within(c.current_thread), GdbError)
        assert time.monotonic() - t0 < TIMEOUT + 1.0
        c.console.clear()
        bounded(c)
    finally:
        flooder.kill()
        flooder.wait()


def test_console_flood_while_waiting_for_a_stop_is_bounded_and_counted() -> None:
    """O packets while the target runs: kept up to CONSOLE_LIMIT bytes, the rest counted;
    wait_stop and poll_stop still end in time."""
    c, stub, t = connect()
    resumed(c, t)
    stop = threading.Event()
    flooder = threading.Thread(target=_flood, args=(stub, frame(b"O" + b"41" * 2000), stop),
                               daemon=True)
    flooder.start()
    try:
        assert isinstance(within(lambda: c.wait_stop(0.5)), GdbTimeout)
        t0 = time.monotonic()
        assert within(c.poll_stop) is None
        assert time.monotonic() - t0 < 1.0
    finally:
        stop.set()
        flooder.join()
    assert c.console_held <= CONSOLE_LIMIT and c.stats.console_dropped > 0
    assert c.stats.console_bytes == c.console_held + c.stats.console_dropped
    assert len(c._pending_ack) <= MAX_OWED_ACKS  # no ack goes out while it runs
    # sent from a thread: the socket is full of console output until wait_stop reads it
    threading.Timer(0.05, stub._deliver, args=(t.stop(),)).start()
    stop_reply = within(lambda: c.wait_stop(1.0))
    assert not isinstance(stop_reply, KprobeVMError) and stop_reply.signal == 5
    assert c.take_console() and c.console_held == 0 and c.console == []
    assert within(c.threads) == GOOD_THREADS


def test_monitor_output_is_taken_from_the_kept_console() -> None:
    c, _, _ = connect()
    assert c.monitor("info") == "you said: info\n"
    assert c.console_held == 0


# -- stops ----------------------------------------------------------------------------------


def test_duplicated_stop_replies_stop_the_target_once() -> None:
    c, stub, t = connect()
    resumed(c, t)
    stub.plan[b"\x03"] = Fault.DUP_STOP
    stub._deliver(t.stop())
    assert within(lambda: c.wait_stop(1.0)).signal == 5  # type: ignore[union-attr]
    time.sleep(0.02)
    assert within(c.poll_stop) is None
    assert within(c.current_thread) == "p01.01"
    assert c.stats.stale_stops == 1


def test_a_stop_that_never_comes_times_out_every_time() -> None:
    """The VM paused without a word: waits and interrupts time out, none hangs (QEMU
    drops a \x03 that reaches a stopped VM, so nothing more can be learnt)."""
    c, stub, t = connect()
    resumed(c, t)
    assert isinstance(within(lambda: c.wait_stop(TIMEOUT)), GdbTimeout)
    stub.plan[b"\x03"] = Fault.DROP_STOP  # the answer to \x03 is lost
    assert isinstance(within(lambda: c.interrupt(timeout=TIMEOUT)), GdbTimeout)
    assert c.running  # nothing said it stopped
    assert isinstance(within(lambda: c.interrupt(timeout=TIMEOUT)), GdbTimeout)
    assert within(c.poll_stop) is None
    assert isinstance(within(c.threads), GdbError)  # nothing but \x03 goes out


def test_a_late_reply_before_a_resume_does_not_pass_for_anything_else() -> None:
    """The probe sent before the resume takes the late reply; the stop is the stop."""
    t = QemuLike()
    t.hooks[b"qC"] = lambda p: None
    c, stub, _ = connect(target=t)
    assert isinstance(within(c.current_thread), GdbTimeout)
    del t.hooks[b"qC"]
    stub.send_raw(frame(b"QCp01.01"))  # late
    c.cont()
    time.sleep(0.02)
    stub.send_raw(frame(b"T05thread:p01.01;"))
    stop = within(lambda: c.wait_stop(1.0))
    assert not isinstance(stop, KprobeVMError) and stop.signal == 5
    assert within(c.threads) == GOOD_THREADS
    assert c.stats.abandoned_replies == 1 and c.stats.resyncs == 1


@pytest.mark.parametrize("dropped", [1, 3])
def test_replies_that_never_come_do_not_shift_the_pairing(dropped: int) -> None:
    """Each request after a dropped reply used to get the reply of the one after it:
    the first was discarded as the late one, and every request timed out from then on."""
    c, stub, _ = connect({b"qC": [Fault.DROP] * dropped})
    for _ in range(dropped):
        assert isinstance(within(c.current_thread), GdbTimeout)
    assert within(c.threads) == GOOD_THREADS
    assert within(c.current_thread) == "p01.01"
    assert c.stats.resyncs == dropped  # one before each request after a timeout
    assert b"vMustReplyEmpty" in stub.received  # qC was owed: the other probe


def test_a_stop_while_a_deferred_reply_is_abandoned_is_still_the_stop() -> None:
    """wait_stop took whatever came while a reply was abandoned for that reply: the stop
    itself was thrown away, and the wait ran out."""
    t = QemuLike()
    t.hooks[b"P1="] = lambda p: b"$*#2a"  # undecodable: a run with nothing to repeat
    t.hooks[b"P0="] = lambda p: None  # never answered
    c, stub, _ = connect(target=t)
    c.cont(before=[b"P1=0700000000000000", b"P0=0100000000000000"], defer=True)
    for _ in range(200):
        if t.running:
            break
        time.sleep(0.005)
    assert isinstance(within(lambda: c.wait_stop(1.0)), GdbProtocolError)
    stub._deliver(t.stop())
    stop = within(lambda: c.wait_stop(1.0))
    assert not isinstance(stop, KprobeVMError) and stop.signal == 5
    assert within(c.threads) == GOOD_THREADS


def test_a_malformed_stale_stop_is_dropped_unread() -> None:
    t = QemuLike()
    t.hooks[b"qC"] = lambda p: [frame(b"T05thread:\xff;nonsense"), frame(b"QCp01.01")]
    c, _, _ = connect(target=t)
    assert within(c.current_thread) == "p01.01"
    assert c.stats.stale_stops == 1


# -- seeded random faults -----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_random_faults_never_hang_crash_or_grow(seed: int) -> None:
    """A FaultyStub drawing faults from a seed: whatever happens, in time and in the tree."""
    rng = random.Random(seed)
    t = QemuLike()
    stub = FaultyStub(t, seed=seed, rate=0.3, late=TIMEOUT * 1.5, huge=1 << 14)
    c = GdbClient(stub.client_sock, timeout=TIMEOUT, max_packet=1 << 14)
    calls: list[Callable[[], object]] = [
        c.handshake, c.read_registers, c.threads, c.current_thread,
        lambda: c.read_memory(RAM_BASE, 3000), lambda: c.write_memory(RAM_BASE, b"x" * 500),
        lambda: c.monitor("info"),
    ]
    for _ in range(12):
        within(rng.choice(calls))
        bounded(c)
    c.close()
    stub.close()


def test_the_faulty_stub_answers_requests_its_handler_cannot_parse() -> None:
    """A request built from damaged replies (an include named ``a:b``) must not kill
    the stub's thread: it gets an error reply, as from QEMU."""
    c, stub, _ = connect()
    assert isinstance(within(lambda: c.read_xfer("features", "a.xml:0")), KprobeVMError)
    assert stub.handler_errors == 1
    assert within(c.threads) == GOOD_THREADS


def test_every_stream_fault_applies_to_a_reply_without_one() -> None:
    """apply_fault copes with units that hold no packet (an ack alone)."""
    rng = random.Random(0)
    for fault in STREAM_FAULTS:
        assert isinstance(apply_fault(fault, [b"+"], rng), list)


# -- the trap thread ------------------------------------------------------------------------


def _target(stub_plan: FaultPlan | None = None) -> tuple[Target, GdbClient, FaultyStub, QemuLike]:
    c, stub, t = connect(stub_plan)
    target = Target(c, name="faults")
    target.stop_timeout = 0.5
    return target, c, stub, t


def test_trap_thread_sees_a_hang_up_and_stopped_raises_in_time() -> None:
    target, _c, stub, _t = _target()
    target.start()
    stub.close()
    time.sleep(0.05)

    def borrow() -> None:
        with target.stopped():
            pass

    # a stub that hangs up is a lost VM: the trap thread ends with it, each borrower
    # gets it at once, and nothing is resumed after
    assert isinstance(within(borrow), VMLost)
    assert isinstance(target.error, VMLost) and target.error is target.lost
    assert isinstance(target.lost.__cause__, GdbConnectionClosed)
    assert isinstance(within(borrow, 0.5), VMLost)
    assert within(target.close) is None


def test_trap_thread_dying_of_a_handler_bug_does_not_hang_stopped() -> None:
    """A handler raising ValueError while a borrower waited killed the trap thread with
    no error recorded, and the borrower waited for it for ever."""
    target, _c, stub, t = _target()
    in_handler = threading.Event()
    borrower_waits = threading.Event()

    def handler(stop: object) -> None:
        in_handler.set()
        borrower_waits.wait(2.0)
        time.sleep(0.05)  # the borrower is inside stopped(), waiting for the pause
        raise ValueError("a bug in the handler")

    target.on_stop = handler
    target.start()
    for _ in range(200):
        if t.running:
            break
        time.sleep(0.005)
    stub._deliver(t.stop())
    assert in_handler.wait(2.0)

    def borrow() -> None:
        borrower_waits.set()
        with target.stopped():
            pass

    exc = within(borrow)
    assert isinstance(exc, VMLost) and isinstance(target.error, ValueError)
    target.close()


def test_trap_thread_survives_floods_and_duplicate_stops() -> None:
    """Console output, stale and duplicated stops while the trap thread runs: each real
    stop is handled once, and the VM can still be borrowed."""
    target, c, stub, t = _target()
    seen: list[object] = []
    target.on_stop = seen.append
    target.start()
    for _ in range(200):
        if t.running:
            break
        time.sleep(0.005)
    stub.send_raw(frame(b"O" + b"41" * 100) * 200)
    stub.plan[b"\x03"] = Fault.DUP_STOP
    stub._deliver(t.stop(b"T05watch:1234;thread:p01.01;"))
    for _ in range(100):
        if seen:
            break
        time.sleep(0.01)

    def borrow() -> list[str]:
        with target.stopped() as client:
            return client.threads()

    assert within(borrow) == GOOD_THREADS
    # The duplicate may pass for the stop of the run resumed after the first: RSP cannot
    # tell. The watchpoint's stop was handled, and nothing broke.
    assert any(s.watch is not None for s in seen)  # type: ignore[attr-defined]
    assert target.error is None
    target.close()
    bounded(c)


def test_trap_thread_exit_stop_is_vm_lost() -> None:
    target, _c, stub, _t = _target()
    target.start()
    stub.send_raw(frame(b"W00"))
    time.sleep(0.1)
    assert isinstance(target.error, VMLost)

    def borrow() -> None:
        with target.stopped():
            pass

    exc = within(borrow)
    assert isinstance(exc, VMLost) and exc.qemu_exited and "W00" in str(exc)
    assert within(target.close) is None


def test_a_hang_up_inside_stopped_is_vm_lost_and_nothing_is_resumed_after() -> None:
    """The stub hangs up while a caller holds the VM stopped (no trap thread): the
    caller's GdbConnectionClosed became VMLost, and stopped()'s own resume on the way
    out no longer replaced it with a second GdbConnectionClosed."""
    explained: list[tuple[str, bool]] = []

    def explain(why: str, exited: bool) -> VMLost:
        explained.append((why, exited))
        return VMLost(f"faults: {why}", exitcode=0, serial_log="Kernel panic - not syncing")

    c, stub, t = connect()
    target = Target(c, name="faults", explain_loss=explain)
    target.stop_timeout = 0.5
    resumed(c, t)

    def read_after_hang_up() -> None:
        with target.stopped() as client:
            stub.close()
            client.threads()

    exc = within(read_after_hang_up)
    assert isinstance(exc, VMLost) and exc.exitcode == 0 and "Kernel panic" in str(exc)
    assert isinstance(exc.__cause__, GdbConnectionClosed)
    assert b"qfThreadInfo" in (exc.__cause__.sent or b"")  # the body's, not the resume's
    assert explained == [("the gdbstub closed the connection", False)]  # said once
    for call in (target.resume, target.start, read_after_hang_up):
        assert isinstance(within(call, 0.5), VMLost)
    assert len(explained) == 1
    assert within(target.close) is None


def test_a_vm_lost_in_a_handler_is_not_a_handler_error() -> None:
    """A handler's read that finds the guest gone ends the trap thread with VMLost; it
    is not kept as the handler's own exception."""
    from kprobevm.kprobes.core import Kprobe, KprobeManager, ProbeSite

    def handler(kp: Kprobe, regs: object) -> None:
        raise VMLost("faults: gone under the handler")

    kp = Kprobe(addr=0x1000, pre_handler=handler)
    site = ProbeSite(addr=0x1000, insn=None, slot=None, probes=[kp])  # type: ignore[arg-type]
    manager = KprobeManager.__new__(KprobeManager)
    manager.handler_errors = 0
    with pytest.raises(VMLost):
        manager.run_pre_handlers(site, None)  # type: ignore[arg-type]
    assert kp.nerrors == 0 and manager.handler_errors == 0


def test_a_hang_up_under_a_borrower_ends_the_trap_thread_with_vm_lost() -> None:
    """The stub hangs up during a borrower's request: the trap thread, let go, went
    back to select() on the socket the hang-up had closed and died of EBADF (logged as
    an error, kept as a raw OSError) while the borrower was still explaining the loss."""
    def explain(why: str, exited: bool) -> VMLost:
        time.sleep(0.3)  # as the facade waits for QEMU's exit status
        return VMLost(f"faults: {why}", exitcode=0)

    c, stub, _t = connect()
    target = Target(c, name="faults", explain_loss=explain)
    target.start()

    def borrow() -> None:
        with target.stopped() as client:
            stub.close()
            client.threads()

    assert isinstance(within(borrow), VMLost)
    thread = target._thread
    assert thread is not None
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert isinstance(target.error, VMLost) and target.error is target.lost
    assert within(target.close) is None


def test_two_threads_borrowing_the_vm_at_once_take_turns() -> None:
    """Two borrowers of a VM the trap thread runs: both saw the pause and used the
    client at once, and one took the other's reply (seen as a short memory reply when a
    guest rebooted under a busy session)."""
    target, _c, _stub, t = _target()
    t.ram[:8] = b"A" * 8
    t.ram[0x100:0x110] = b"B" * 16
    target.start()
    failures: list[str] = []

    def borrow(addr: int, n: int, byte: bytes) -> None:
        for _ in range(100):
            try:
                with target.stopped() as client:
                    data = client.read_memory(addr, n)
                    time.sleep(0.001)
                    data += client.read_memory(addr, n)
            except KprobeVMError as exc:
                failures.append(repr(exc))
                return
            if data != byte * (2 * n):
                failures.append(f"{byte!r} borrower read {data!r}")
                return

    threads = [threading.Thread(target=borrow, args=(RAM_BASE, 8, b"A")),
               threading.Thread(target=borrow, args=(RAM_BASE + 0x100, 16, b"B"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE * 5)
        assert not thread.is_alive(), "hang"
    assert not failures, failures[:3]
    assert within(target.close) is None


def test_a_silent_interrupt_ends_stopped_at_its_timeout() -> None:
    """QEMU 8.1+ pausing without a word: stopped() raises after stop_timeout."""
    target, c, stub, t = _target()
    resumed(c, t)
    stub.plan[b"\x03"] = Fault.DROP_STOP

    def borrow() -> None:
        with target.stopped():
            pass

    t0 = time.monotonic()
    assert isinstance(within(borrow), GdbTimeout)
    assert time.monotonic() - t0 < target.stop_timeout + 0.5
    target.close()


# -- the fuzzer -------------------------------------------------------------------------------


def test_fuzz_sample_finds_no_hang_crash_or_growth() -> None:
    """The core of scripts/fuzz-gdbstub on a small sample, as CI runs it."""
    report = gdbfuzz.run("ci", 2000)
    assert report.inputs == 2000
    assert report.kinds["client"] > 300 and report.kinds["reader"] > 500
    assert not report.failures, "\n".join(
        f"{f.replay()} {f.what}: {f.detail}\n{gdbfuzz.describe(f.seed, f.index)}"
        for f in report.failures[:3])


def test_fuzz_inputs_replay_the_same() -> None:
    assert gdbfuzz.describe("s", 7) == gdbfuzz.describe("s", 7)
    kinds = [gdbfuzz.kind_of("s", i) for i in range(50)]
    assert kinds == [gdbfuzz.kind_of("s", i) for i in range(50)]


def test_fuzz_watchdog_reports_a_hang() -> None:
    """The fuzzer's own watchdog: an operation that blocks is a hang, not a stuck run."""
    a, b = socket.socketpair()
    out = gdbfuzz._Outcome()
    try:
        with gdbfuzz.watchdog(0.2):
            out.call("blocked", lambda: a.recv(1))
    finally:
        a.close()
        b.close()
    assert out.what == "hang"
