"""GdbClient against a scripted fake stub (error paths), and against a paused QEMU (vm)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Unpack

import pytest

from kprobevm.errors import (
    GdbConnectionClosed,
    GdbError,
    GdbErrorReply,
    GdbProtocolError,
    GdbTimeout,
)
from kprobevm.gdbstub.behaviour import stub_behaviour
from kprobevm.gdbstub.client import BreakpointKind, GdbClient
from kprobevm.gdbstub.link import PacketOptions
from kprobevm.gdbstub.packet import checksum
from kprobevm.guest.qemu_builds import fetch_qemu, qemu_version, resolve_qemu
from tests.fakestub import RAM_BASE, FakeStub, QemuLike, frame


def make(target: QemuLike | None = None, *, timeout: float = 1.0,
         **options: Unpack[PacketOptions]) -> tuple[GdbClient, FakeStub, QemuLike]:
    target = target or QemuLike()
    stub = FakeStub(target)
    client = GdbClient(stub.client_sock, timeout=timeout, **options)
    client.handshake()
    return client, stub, target


def test_handshake_and_layout_from_chunked_xml_with_include() -> None:
    c, stub, _ = make()
    assert c.packet_size == 0x1000 and "multiprocess" in c.features
    assert "PhyMemMode" in c.qemu_features and c.phys_mode is False
    lay = c.layout
    assert lay.names == ("rax", "rbx", "rip", "eflags", "cs", "cr3", "st0", "xmm0")
    assert lay["cr3"].offset == 8 + 8 + 8 + 4 + 4 and lay["cr3"].regnum == 5
    assert sum(1 for p in stub.received if p.startswith(b"qXfer")) > 3  # m...l chunks


def test_registers_read_and_write_only_changed() -> None:
    c, stub, t = make()
    regs = c.read_registers()
    assert regs["rip"] == 0xFFF0 and regs["cs"] == 0xF000 and regs["cr3"] == 0x5000
    before = len(stub.received)
    assert c.write_registers({**regs, "rax": 0xDEAD}) == 1
    assert stub.received[before:] == [b"P0=adde000000000000"]
    assert t.regs[0] == 0xDEAD
    assert c.read_register("rax") == 0xDEAD
    c.write_register("eflags", 0x246)
    assert t.regs[3] == 0x246


def test_memory_chunks_are_pipelined_and_aligned() -> None:
    c, stub, t = make()
    t.ram[0x100:0x100 + 5] = b"hello"
    data = c.read_memory(RAM_BASE + 0x100, 5000)
    assert data[:5] == b"hello" and len(data) == 5000
    reads = [p for p in stub.received if p.startswith(b"m")]
    assert reads[0] == b"m1100,300"  # first chunk stops at a chunk boundary
    assert all(int(p.split(b",")[1], 16) <= c.read_chunk for p in reads)
    c.write_memory(RAM_BASE + 10, bytes(range(256)) * 10)
    assert bytes(t.ram[10:10 + 2560]) == bytes(range(256)) * 10


def test_error_reply_carries_sent_and_received() -> None:
    c, _, _ = make()
    with pytest.raises(GdbErrorReply) as exc:
        c.read_memory(0x90000000, 8)
    assert exc.value.code == 0x14 and exc.value.sent == b"m90000000,8"
    assert exc.value.received == b"E14"
    # The connection is still in step afterwards.
    assert c.read_registers()["rip"] == 0xFFF0


def test_phys_mode_switches_only_when_needed_in_the_same_pipeline() -> None:
    c, stub, t = make()
    before = len(stub.received)
    c.read_phys(RAM_BASE, 8)
    c.read_phys(RAM_BASE, 8)
    c.read_memory(RAM_BASE, 8)
    assert stub.received[before:] == [b"Qqemu.PhyMemMode:1", b"m1000,8", b"m1000,8",
                                      b"Qqemu.PhyMemMode:0", b"m1000,8"]
    assert t.phys is False


def test_connect_time_stop_is_not_paired_with_a_request() -> None:
    t = QemuLike()
    t.stop_on_connect = True
    c, _, _ = make(t)
    assert c.stats.stale_stops == 1 and c.poll_stop() is None
    assert c.threads() == ["p01.01", "p01.02"]


def test_late_connect_stop_after_first_reply_is_dropped() -> None:
    t = QemuLike()
    t.hooks[b"qqemu.Supported"] = lambda p: [frame(b"sstepbits;sstep;PhyMemMode"),
                                             frame(b"T02thread:01;")]
    c, _, _ = make(t)
    assert c.current_thread() == "p01.01"
    assert c.stats.stale_stops == 1


def test_cont_poll_interrupt_and_stop_events() -> None:
    c, stub, t = make()
    regs = c.read_registers()
    c.cont(before=c.register_write_packets({**regs, "rbx": 7}))
    assert t.regs[1] == 7 and c.running
    assert c.poll_stop() is None
    stop = c.interrupt()
    assert stop is not None and stop.signal == 2 and stop.thread == "p01.01"
    assert not c.running and stub.interrupts == 1
    assert c.interrupt() is None and stub.interrupts == 1  # stopped: no \x03 sent
    with pytest.raises(GdbError):
        c.wait_stop(0.1)


def test_stop_arriving_during_a_reply_wait_is_queued() -> None:
    c, stub, _t = make()
    c.cont()
    stub.send_raw(frame(b"T05watch:1234;thread:p01.02;"))
    time.sleep(0.05)
    stop = c.wait_stop(1.0)
    assert stop.watch is not None and stop.watch.address == 0x1234
    # QEMU makes the stopped vCPU current, so no Hg is needed for it.
    before = len(stub.received)
    c.read_registers(thread="p01.02")
    assert stub.received[before:] == [b"g"]
    c.read_registers(thread="p01.01")
    assert stub.received[before + 1:] == [b"Hgp01.01", b"g"]


def test_step_uses_vcont() -> None:
    c, stub, _ = make()
    stop = c.step("p01.02")
    assert stop is not None and stop.thread == "p01.02"
    assert stub.received[-1] == b"vCont;s:p01.02"


def test_breakpoints_and_monitor() -> None:
    c, _, t = make()
    c.insert_breakpoint(BreakpointKind.WRITE_WATCH, 0x1234, 1)
    assert (2, 0x1234) in t.breakpoints
    c.remove_breakpoint(BreakpointKind.WRITE_WATCH, 0x1234, 1)
    assert not t.breakpoints
    assert c.monitor("info registers") == "you said: info registers\n"
    assert c.console == []


def test_nak_makes_the_client_retransmit() -> None:
    t = QemuLike()
    stub = FakeStub(t, ack=False)
    seen: list[bytes] = []

    def flaky(p: bytes) -> bytes:
        seen.append(p)
        return b"-" if len(seen) == 1 else b"+" + frame(b"QCp01.01")

    c = GdbClient(stub.client_sock, timeout=1.0)
    t.hooks[b"qC"] = flaky
    assert c.current_thread() == "p01.01"
    assert seen == [b"qC", b"qC"] and c.stats.retransmits == 1


def test_bad_checksum_is_naked_and_retransmission_accepted() -> None:
    t = QemuLike()
    sent = []

    def bad_then_good(p: bytes) -> bytes:
        sent.append(p)
        return b"$QCp01.01#00"

    t.hooks[b"qC"] = bad_then_good
    c, stub, _ = make(t)
    c.send_packet(b"qC")
    time.sleep(0.05)
    stub.send_raw(frame(b"QCp01.01"))  # the stub's retransmission
    assert c.recv_reply() == b"QCp01.01"
    assert c.stats.bad_checksums == 1 and c.stats.naks_sent == 1
    for _ in range(100):  # the stub thread sees the NAK a moment later
        if b"-" in stub.raw_received:
            break
        time.sleep(0.01)
    assert b"-" in stub.raw_received


def test_hex_fast_path_hands_every_odd_reply_to_the_general_path() -> None:
    t = QemuLike()
    c, stub, _ = make(t)
    data = b"\xab\xcd\xef\xff\xfe\xfd\xfc\x00"
    t.ram[:8] = data
    # a bad checksum is NAKed, and the retransmission is the answer
    t.hooks[b"m1000,8"] = lambda p: [b"$ffffffffffffffff#00", frame(data.hex().encode())]
    assert c.read_memory(RAM_BASE, 8) == data
    assert c.stats.bad_checksums == 1 and c.stats.naks_sent == 1
    # upper-case hex and checksum (1F); a reply trickled a byte per send
    upper = data.hex().upper().encode()
    t.hooks[b"m1000,8"] = lambda p: b"$%s#%02X" % (upper, checksum(upper))
    assert c.read_memory(RAM_BASE, 8) == data
    wide = frame(bytes(t.ram[:64]).hex().encode())
    t.hooks[b"m1000,40"] = lambda p: [wide[i:i + 1] for i in range(len(wide))]
    assert c.read_memory(RAM_BASE, 64) == bytes(t.ram[:64])
    # 'xx' for a register the stub cannot read: left out
    t.hooks[b"g"] = lambda p: frame(b"xx" * 8 + t.g_hex()[16:])
    regs = c.read_registers()
    assert "rax" not in regs and regs["rip"] == 0xFFF0
    # a stale stop ahead of the reply is dropped, the reply still pairs
    t.hooks[b"g"] = lambda p: [frame(b"T02thread:01;"), frame(t.g_hex())]
    assert c.read_registers(wide=False)["rip"] == 0xFFF0
    assert c.stats.stale_stops == 1
    del t.hooks[b"g"]
    assert c.read_registers(wide=False)["rip"] == 0xFFF0
    assert stub.received.count(b"m1000,8") == 2  # each read sent its request once


def test_stall_times_out_and_late_reply_is_discarded() -> None:
    t = QemuLike()
    late: list[bytes] = []
    t.hooks[b"qC"] = lambda p: late.append(p)
    c, stub, _ = make(t, timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(GdbTimeout) as exc:
        c.current_thread()
    assert time.monotonic() - t0 < 1.0 and exc.value.sent == b"qC"
    stub.send_raw(frame(b"QCp01.07"))  # the stalled reply arrives late
    assert c.threads() == ["p01.01", "p01.02"]  # not paired with the late QC
    assert c.stats.abandoned_replies == 1


def test_closed_connection() -> None:
    t = QemuLike()
    t.hooks[b"qC"] = lambda p: None
    c, stub, _ = make(t)
    c.send_packet(b"qC")
    stub.close()
    with pytest.raises(GdbConnectionClosed):
        c.recv_reply()
    assert c.closed


def test_garbage_and_huge_packets() -> None:
    t = QemuLike()
    t.hooks[b"qC"] = lambda p: b"\x00garbage\xff" + frame(b"QCp01.01")
    t.hooks[b"qfThreadInfo"] = lambda p: b"$" + b"a" * 5000
    c, _, _ = make(t, max_packet=4096)
    assert c.current_thread() == "p01.01"
    with pytest.raises(GdbProtocolError):
        c.threads()


def test_unexpected_reply_shape_is_a_protocol_error() -> None:
    t = QemuLike()
    t.hooks[b"g"] = lambda p: frame(b"zz")
    c, _, _ = make(t)
    regs = c.read_registers()  # unparseable hex: registers left out, not garbage values
    assert regs == {}
    t.hooks[b"qC"] = lambda p: frame(b"nope")
    with pytest.raises(GdbProtocolError):
        c.current_thread()


# -- real QEMU (BIOS only, paused) -------------------------------------------------------

QEMUS = ["system", "bookworm-backports"]
"""The host's QEMU (as boot() resolves it) and QEMU 10.0 fetched from bookworm-backports."""


@pytest.fixture(scope="module", params=QEMUS)
def qemu_binary(request: pytest.FixtureRequest) -> str:
    """A QEMU to run; a newer one is fetched into the cache (a failed fetch errors)."""
    if request.param == "system":
        found = shutil.which(resolve_qemu())
        if found is None:
            pytest.skip(f"{resolve_qemu()} not installed")
        return found
    return str(fetch_qemu(request.param).binary)


@pytest.fixture(scope="module")
def qemu_sock(qemu_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A paused BIOS-only QEMU with two vCPUs, shared by a module's tests."""
    with paused_qemu(qemu_binary, tmp_path_factory.mktemp("gdb")) as sock:
        yield sock


@contextlib.contextmanager
def paused_qemu(binary: str, directory: Path, *, paused: bool = True) -> Iterator[Path]:
    """Start QEMU paused at the reset vector (or running its BIOS); its gdbstub's path."""
    sock = directory / "g.sock"
    proc = subprocess.Popen(
        [binary, "-nodefaults", "-display", "none", *(["-S"] if paused else []), "-smp", "2",
         "-m", "64M", "-gdb", f"unix:{sock},server,nowait"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        yield sock
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.vm
def test_qemu_registers_memory_breakpoints(qemu_sock: Path) -> None:
    with GdbClient.connect(qemu_sock) as c:
        assert c.packet_size == 0x1000 and "PhyMemMode" in c.qemu_features
        assert c.threads() == ["p01.01", "p01.02"]
        regs = c.read_registers()
        assert regs["rip"] == 0xFFF0 and regs["cs"] == 0xF000
        assert c.layout["fs_base"].offset == 164 and c.layout["cr3"].offset == 204
        assert c.layout.g_size == 608
        assert c.read_register("rip") == 0xFFF0
        pattern = bytes(range(256)) * 16 + b"tail"
        c.write_memory(0x20000, pattern)
        assert c.read_memory(0x20000, len(pattern)) == pattern
        assert c.read_phys(0x20000, 16) == pattern[:16]
        assert c.read_memory(0x20000, 4) == pattern[:4]
        t0 = time.perf_counter()
        assert len(c.read_memory(0, 1 << 20)) == 1 << 20
        assert time.perf_counter() - t0 < 10.0  # a hang guard: scripts/bench-gdbstub times it
        with pytest.raises(GdbErrorReply) as exc:
            c.read_memory(0x10000000, 8)  # beyond 64M of RAM
        assert exc.value.code == 0x14
        c.insert_breakpoint(BreakpointKind.SOFTWARE, 0xFFFF0)
        c.remove_breakpoint(BreakpointKind.SOFTWARE, 0xFFFF0)
        out = c.monitor("info registers")
        assert "EIP=" in out or "RIP=" in out
        c.write_register("rax", 0x1234_5678)
        assert c.read_registers()["rax"] == 0x1234_5678
        c.write_register("rax", 0)
        c.cont()
        time.sleep(0.05)
        stop = c.interrupt()
        assert stop is not None and stop.signal == 2 and not c.running
        ap = c.read_registers(thread="p01.02")
        bsp = c.read_registers(thread="p01.01")
        assert ap != bsp  # two vCPUs, two register files
        assert c.read_register("rip", thread="p01.02") == ap["rip"]


@pytest.mark.vm
def test_qemu_reconnect_and_connect_time_stop(qemu_sock: Path) -> None:
    with GdbClient.connect(qemu_sock) as c:
        c.set_phys_mode(True)
        c.cont()  # leave the VM running and phys mode on
    with GdbClient.connect(qemu_sock) as c:
        # The connect stopped the VM and the handshake reset phys mode.
        assert c.phys_mode is False and not c.running
        assert c.poll_stop() is None
        assert c.read_memory(0x20000, 2) == c.read_phys(0x20000, 2)
        assert c.current_thread().startswith("p01.")


@pytest.mark.vm
def test_qemu_stops_as_its_behaviour_record_says(qemu_binary: str, tmp_path: Path) -> None:
    """The facts the client is built on, checked on the real QEMU: a stop reply when the
    first client connects to a running VM or not, and after a stray byte or not."""
    expected = stub_behaviour(qemu_version(qemu_binary))
    with paused_qemu(qemu_binary, tmp_path, paused=False) as sock, \
            GdbClient.connect(sock) as c:
        c.read_registers()
        deadline = time.monotonic() + 1.0
        while not c.stats.stale_stops and time.monotonic() < deadline:
            c.poll_stop()  # a late connect-time stop is read (and dropped) here
            c.read_registers()
        assert bool(c.stats.stale_stops) == expected.stop_reply_on_connect
        c.cont()
        time.sleep(0.05)
        c.running = False  # let the raw '+' out, as a careless client would
        c._sock.sendall(b"+")
        c.running = True
        try:
            c.wait_stop(1.0)
            replied = True
        except GdbTimeout:
            replied = False
        assert replied == expected.stray_byte_stop_reply
        if not replied:
            c.running = False  # it is paused all the same: nothing says so
            assert c.current_thread().startswith("p01.")


def test_a_reported_vcpus_registers_ride_with_every_rip() -> None:
    """An SMP stop's one round trip: each other vCPU's RIP (``Hg`` + ``p``), then the
    reported vCPU's ``g``, selected last; its registers are remembered (unchanged
    writes are skipped) and memory packets after it need no ``Hg``."""
    c, stub, t = make()
    before, sends = len(stub.received), c.stats.sends
    values, rips = c.read_registers_and_each("rip", ["p01.01", "p01.02"], "p01.02")
    assert stub.received[before:] == [b"Hgp01.01", b"p2", b"Hgp01.02", b"g"]
    assert c.stats.sends == sends + 1
    assert t.selected["g"] == "p01.02"
    assert values["rip"] == 0xFFF0 and values["cr3"] == 0x5000
    assert rips == {"p01.01": 0xFFF0, "p01.02": 0xFFF0}
    assert c.register_write_packets(dict(values), "p01.02") == [b"Hgp01.02"]
    before = len(stub.received)
    replies = c.read_along([b"m%x,4" % RAM_BASE], "p01.02")
    assert stub.received[before:] == [b"m%x,4" % RAM_BASE] and len(replies[0]) == 8
    c.read_along([b"m%x,4" % RAM_BASE], "p01.01")
    assert stub.received[before + 1:] == [b"Hgp01.01", b"m%x,4" % RAM_BASE]
    # the reported vCPU need not be among the threads whose RIP is asked for
    _, rips = c.read_registers_and_each("rip", ["p01.01"], "p01.02")
    assert list(rips) == ["p01.01"]


def test_ok_replies_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``OK`` (an ``Hg``'s reply) is no console output: a batch with one, or one
    alone, is read on the fast path like any plain reply."""
    c, _stub, _ = make()
    fell_back: list[object] = []
    monkeypatch.setattr(c, "_fast_fallback", lambda *args: fell_back.append(args))
    c.read_registers_and_each("rip", ["p01.01", "p01.02"], "p01.02")
    c.select_thread("g", "p01.01")
    assert c.pipeline([b"Hgp01.02", b"Hgp01.01"]) == [b"OK", b"OK"]
    assert not fell_back


def test_queued_register_writes_carry_their_own_thread_selection() -> None:
    """Writes queued for the reported vCPU go out with the next resume, possibly after
    requests that selected other vCPUs: they lead with their own Hg, and the client
    takes a thread as selected only when an H packet is actually sent."""
    c, _stub, t = make()
    c.read_registers("p01.02")  # p01.02 is selected and its registers known
    queued = c.register_write_packets({"rip": 0x1234}, "p01.02")
    assert queued[0] == b"Hgp01.02"
    c.read_registers("p01.01")  # another request selects another vCPU meanwhile
    assert t.selected["g"] == "p01.01"
    c.pipeline(queued)
    assert t.selected["g"] == "p01.02"
    c.read_registers("p01.01")  # the client knows the stub moved: it selects again
    assert t.selected["g"] == "p01.01"
