"""The client's run control against each QEMU gdbstub behaviour, played by the fake stub.

QEMU 8.1 and later pause a running VM in silence on any byte but ``\\x03``: a client that
sends its owed ``+`` while the target runs waits for a stop that never comes. Each test
runs once per behaviour; every one also checks that only ``\\x03`` reached the running
target.
"""

from __future__ import annotations

import threading
import time

import pytest

from kprobevm.errors import GdbError, GdbProtocolError
from kprobevm.gdbstub.behaviour import (
    QEMU_7_2,
    QEMU_8_1,
    QEMU_10_2,
    STUB_BEHAVIOURS,
    StubBehaviour,
    stub_behaviour,
)
from kprobevm.gdbstub.client import GdbClient
from tests.fakestub import FakeStub, QemuLike, frame

behaviours = pytest.mark.parametrize("behaviour", STUB_BEHAVIOURS, ids=lambda b: b.name)


def connect(behaviour: StubBehaviour) -> tuple[GdbClient, FakeStub, QemuLike]:
    target = QemuLike(behaviour)
    target.stop_on_connect = behaviour.stop_reply_on_connect
    stub = FakeStub(target)
    client = GdbClient(stub.client_sock, timeout=1.0)
    client.handshake()
    return client, stub, target


def only_interrupts_while_running(stub: FakeStub) -> None:
    time.sleep(0.02)  # the stub thread reads what we sent last
    assert set(stub.while_running) <= {3}, bytes(stub.while_running)


@behaviours
def test_handshake_needs_no_connect_time_stop(behaviour: StubBehaviour) -> None:
    c, _stub, _t = connect(behaviour)
    assert not c.running
    assert c.current_thread() == "p01.01"  # replies still pair with their requests
    assert c.stats.stale_stops == int(behaviour.stop_reply_on_connect)


@behaviours
def test_writes_ahead_of_a_resume_then_a_watchpoint_stop(behaviour: StubBehaviour) -> None:
    """The replies to ``P`` packets sent with ``c`` arrive while the target runs: their
    acks must wait, or QEMU 8.1+ pauses and the watchpoint's stop never comes."""
    c, stub, t = connect(behaviour)
    regs = c.read_registers()
    for _ in range(3):
        c.cont(before=c.register_write_packets({**regs, "rbx": 9}), defer=True)
        time.sleep(0.02)  # the P replies arrive and are read while running
        assert c.poll_stop() is None
        hit = threading.Timer(0.05, lambda: stub._deliver(t.stop(b"T05watch:1234;thread:p01.01;")))
        hit.start()  # the watchpoint hits while the client waits
        stop = c.wait_stop(1.0)
        hit.join()
        assert stop.watch is not None and stop.watch.address == 0x1234
        assert t.regs[1] == 9 and not c.running
    only_interrupts_while_running(stub)


@behaviours
def test_interrupt_after_checked_writes(behaviour: StubBehaviour) -> None:
    c, stub, _t = connect(behaviour)
    regs = c.read_registers()
    c.cont(before=c.register_write_packets({**regs, "rbx": 7}))
    stop = c.interrupt(timeout=1.0)
    assert stop is not None and stop.signal == 2
    only_interrupts_while_running(stub)
    assert c.read_registers()["rbx"] == 7  # the owed acks went out with this request


@behaviours
def test_interrupt_crossing_a_stop(behaviour: StubBehaviour) -> None:
    """The target stops by itself as our ``\\x03`` is on its way: one stop, and the
    ``\\x03`` that reaches a stopped QEMU is dropped without a reply."""
    c, stub, t = connect(behaviour)
    c.cont()
    time.sleep(0.02)
    stub._deliver(t.stop(b"T05watch:2000;thread:p01.02;"))
    stop = c.interrupt(timeout=1.0)  # sent before the stop reply was read
    assert stop is not None and stop.watch is not None
    time.sleep(0.05)
    assert c.poll_stop() is None
    assert c.current_thread() == "p01.01"  # no extra reply shifted the pairing
    assert stub.interrupts == 1


@behaviours
def test_nothing_but_an_interrupt_reaches_a_running_target(behaviour: StubBehaviour) -> None:
    c, stub, _t = connect(behaviour)
    c.read_registers()  # leaves a '+' owed
    c.cont()
    with pytest.raises(GdbError, match="running target"):
        c.send_packet(b"g")
    c.close()  # the owed acks are dropped, not sent to the running target
    time.sleep(0.02)
    assert bytes(stub.while_running) == b""


@behaviours
def test_bad_checksum_while_running_is_not_naked(behaviour: StubBehaviour) -> None:
    c, stub, t = connect(behaviour)
    c.cont()
    stub.send_raw(b"$OK#00")  # a corrupt late reply: a NAK would stop the target
    time.sleep(0.02)
    assert c.poll_stop() is None
    stub._deliver(t.stop())
    assert c.wait_stop(1.0).signal == 5
    assert c.stats.bad_checksums == 1 and c.stats.naks_sent == 0
    only_interrupts_while_running(stub)


@behaviours
def test_nak_of_a_packet_sent_ahead_of_a_resume_is_an_error(behaviour: StubBehaviour) -> None:
    c, stub, t = connect(behaviour)
    t.hooks[b"P"] = lambda p: b"-"  # as if its checksum had been bad
    regs = c.read_registers()
    with pytest.raises(GdbProtocolError, match="ahead of a resume"):
        c.cont(before=c.register_write_packets({**regs, "rbx": 1}))
    only_interrupts_while_running(stub)


def test_the_old_client_would_hang_on_qemu_8_1() -> None:
    """The fake stub plays the hang: a '+' to a running QEMU 8.1+ pauses it silently."""
    t = QemuLike(QEMU_8_1)
    stub = FakeStub(t)
    c = GdbClient(stub.client_sock, timeout=0.3)
    c.handshake()
    c.cont()
    stub.client_sock.sendall(b"+")  # what the old client sent ahead of its \x03
    time.sleep(0.02)
    assert not t.running and not c.poll_stop()  # paused, and nothing said
    stub.send_raw(frame(b"T05thread:p01.01;"))  # (a real QEMU would not: let us go on)
    assert c.wait_stop(1.0).signal == 5


@pytest.mark.parametrize(("version", "expected"), [
    ((7, 2, 22), QEMU_7_2), ((6, 2, 0), QEMU_7_2), ((8, 0, 5), QEMU_7_2),
    ((8, 1, 0), QEMU_8_1), ((10, 0, 2), QEMU_8_1), ((10, 1, 0), QEMU_8_1),
    ((10, 2, 0), QEMU_10_2), ((11, 0, 0), QEMU_10_2),
])
def test_stub_behaviour_by_version(version: tuple[int, int, int],
                                   expected: StubBehaviour) -> None:
    assert stub_behaviour(version) is expected
    assert "translation cache" in expected.describe()
