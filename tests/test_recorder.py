"""Recorded probes on the shared guest: the guest writes each hit to the ring, the host
reads it later; the lines match a stopping trace's, the ring wraps and drains without
losing a hit, re-entry is counted as missed, and the guest stays healthy."""

from __future__ import annotations

import time

import pytest

from kprobevm.errors import ProbeRefused
from kprobevm.guest.vm import VM
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.recorder import RecordedRegs, RecordSpec
from kprobevm.tracing import EventHit, ProbeEvent, parse_event
from kprobevm.tracing.session import TraceSession, args_of, plan_events
from kprobevm.x86.constants import PAGE_SIZE
from kprobevm.x86.ptregs import PtRegs
from kprobevm.x86.record import Capture

pytestmark = pytest.mark.vm

# Every fetch kind the record program reads ahead, on a call whose values do not depend
# on the process: the file name, its flags word, the return address, the banner.
RICH = (
    "p:rich do_sys_openat2 dfd=%di:s32 name=+0(%si):ustring kname=+0(%si):string"
    " flags=+0(%dx):x64 low=+0(%dx):b4@0/64 bytes=+0(%dx):u8[4] a1=$arg1:s32"
    " ret=$stack0:symbol ip=%ip:symbol banner=@linux_banner:string comm=$comm"
    " nested=+0(+0(%dx)):u8 imm=\\42 sym=@jiffies_64:u8"
)


def _event(text: str) -> ProbeEvent:
    event = parse_event(text)
    assert isinstance(event, ProbeEvent)
    return event


def _traced(
    vm: VM, command: str, text: str, **options: object
) -> tuple[TraceSession, list[EventHit]]:
    session = TraceSession(vm, plan_events(vm, [_event(text)]), **options)  # type: ignore[arg-type]
    with session:
        vm.run(command, check=True)
    assert not session.handler_errors(), session.handler_errors()
    return session, list(session.drain())


def _cat_line(hits: list[EventHit]) -> dict[str, object]:
    cat = [h for h in hits if h.comm == "cat" and args_of(h)["name"] == b"/etc/passwd"]
    assert len(cat) == 1, [h.line() for h in hits]
    return dict(args_of(cat[0]))


def test_recorded_lines_match_a_stopping_trace(vm: VM) -> None:
    """The same event, recorded and stopping: every argument of cat's open is equal
    (``sym`` reads jiffies_64, which moves: only its presence is compared)."""
    recorded, rhits = _traced(vm, "cat /etc/passwd >/dev/null", RICH, mode="record")
    stopped, shits = _traced(vm, "cat /etc/passwd >/dev/null", RICH, mode="stop")
    assert recorded.recorded and not stopped.recorded
    r, s = _cat_line(rhits), _cat_line(shits)
    assert r.pop("sym") is not None and s.pop("sym") is not None
    assert r == s
    # a kernel-space read of a user pointer reads user memory (the mixed_reads rule)
    assert r["kname"] == b"/etc/passwd"
    assert r["banner"] == vm.read(vm.symbols["linux_banner"], len(r["banner"]))  # type: ignore[arg-type]
    assert r["comm"] == b"cat" and r["imm"] == 42
    line = next(h for h in rhits if h.comm == "cat" and args_of(h)["name"] == b"/etc/passwd")
    assert line.line().lstrip().startswith("cat-") and line.pid > 0
    # guest TSC time: increasing in ring order on one vCPU
    stamps = [h.timestamp_ns for h in rhits]
    assert stamps == sorted(stamps) and stamps[0] > 0


def test_ring_wraps_and_drains_without_a_loss(vm: VM) -> None:
    """Big records (2 KiB strings) fill the 256 KiB ring many times over: every open
    arrives once, in order, none missed."""
    n = 1500
    session, hits = _traced(
        vm, f"i=0; while [ $i -lt {n} ]; do : </etc/passwd; i=$((i+1)); done",
        "p:big do_sys_openat2 name=+0(%si):ustring again=+0(%si):ustring",
        mode="record", string_size=2048,
    )  # fmt: skip
    mine = [h for h in hits if args_of(h)["name"] == b"/etc/passwd"]
    assert len(mine) == n
    assert all(args_of(h)["again"] == b"/etc/passwd" for h in mine)
    assert session.missed() == 0
    recorder = vm.kprobes.channel.recorder  # type: ignore[attr-defined]
    assert recorder is not None and recorder.records >= n
    layout = recorder.layout
    assert recorder.tail > 4 * layout.ring_size  # wrapped at least four times
    # the watched drain byte shares its page with nothing a hit touches (TCG slows every
    # access to a watched page)
    touched = {layout.head, layout.tail, layout.busy, layout.counters, layout.ring}
    assert layout.drain // PAGE_SIZE not in {a // PAGE_SIZE for a in touched}


def test_count_only_is_counted_by_the_guest(vm: VM) -> None:
    n = 300
    session = TraceSession(vm, plan_events(vm, [_event("p do_sys_openat2")]), count_only=True)
    with session:
        vm.run(f"i=0; while [ $i -lt {n} ]; do : </etc/passwd; i=$((i+1)); done", check=True)
    assert session.recorded
    [(_, count)] = session.counts()
    assert n <= count < n + 100  # the SSH session opens a few files of its own
    assert session.hits.empty()


def test_reentry_is_missed_not_recursed(vm: VM) -> None:
    """A recorded probe on the copy helper the other probe's program calls: the nested
    hit finds its CPU busy and counts as missed; nothing recurses."""
    helper = Kprobe(symbol_name="strncpy_from_user_nofault", record=RecordSpec())
    opens = Kprobe(
        symbol_name="do_sys_openat2",
        record=RecordSpec(captures=(Capture(offset=0, size=64, reg="si", string=True, user=True),)),
    )  # fmt: skip
    vm.register_kprobe(helper)
    vm.register_kprobe(opens)
    try:
        vm.run("for i in 1 2 3 4 5; do cat /etc/passwd >/dev/null; done", check=True)
    finally:
        vm.unregister_kprobe(opens)
        vm.unregister_kprobe(helper)
    assert opens.nhit >= 5 and opens.nmissed == 0
    assert helper.nmissed >= opens.nhit


def test_handler_gets_a_snapshot_it_cannot_change(vm: VM) -> None:
    seen: list[tuple[int, int, str]] = []

    def pre(kp: Kprobe, regs: PtRegs) -> None:
        assert isinstance(regs, RecordedRegs)
        seen.append((regs.ip, regs.cpu, regs.record.comm))
        if regs.record.comm == "cat":
            regs.ax = 1  # too late to matter: refused

    kp = Kprobe(symbol_name="do_sys_openat2", pre_handler=pre, record=RecordSpec())
    vm.register_kprobe(kp)
    try:
        vm.run("cat /etc/passwd >/dev/null", check=True)
        vm.kprobes.flush_records()
        assert any(comm == "cat" for _, _, comm in seen)
    finally:
        vm.unregister_kprobe(kp)
    assert {ip for ip, _, _ in seen} == {vm.symbols["do_sys_openat2"]}
    assert kp.nerrors >= 1 and "changed registers" in kp.errors[0]
    assert kp.nhit == len(seen)


def test_recorded_and_stopping_probes_do_not_share_an_address(vm: VM) -> None:
    recorded = Kprobe(symbol_name="do_sys_openat2", record=RecordSpec())
    vm.register_kprobe(recorded)
    try:
        stopping = Kprobe(symbol_name="do_sys_openat2", pre_handler=lambda kp, regs: None)
        with pytest.raises(ProbeRefused, match="cannot share an address") as info:
            vm.register_kprobe(stopping)
        assert info.value.code == "EBUSY" and not stopping.registered
        counted = Kprobe(symbol_name="do_sys_openat2")  # no handler: it joins, counted
        vm.register_kprobe(counted)
        assert counted.counted
        vm.unregister_kprobe(counted)
    finally:
        vm.unregister_kprobe(recorded)
    with pytest.raises(ValueError, match="no post_handler"):
        Kprobe(symbol_name="x", record=RecordSpec(), post_handler=lambda kp, regs: None)


def test_a_recorded_return_prints_as_a_stopping_one(vm: VM) -> None:
    """``r:`` events record too: cat's failing open prints the same line either way."""
    text = "r:ret do_sys_openat2 rv=$retval:s32 ip=%ip sp=%sp:b3@0/64 s0=+0(%sp):x64"
    command = "cat /etc/passwd /nonexistent >/dev/null 2>&1; true"
    lines = {}
    for mode in ("record", "stop"):
        session, hits = _traced(vm, command, text, mode=mode)
        assert session.recorded == (mode == "record")
        cat = [h for h in hits if h.comm == "cat" and args_of(h)["rv"] == -2]
        assert len(cat) == 1, [h.line() for h in hits]
        lines[mode] = (cat[0].where, cat[0].function, dict(args_of(cat[0])))
    assert lines["record"] == lines["stop"]
    assert not vm.list_kprobes()


def test_hits_arrive_without_a_flush(vm: VM) -> None:
    """The trap thread drains the ring on its idle tick: a quiet guest's hits reach the
    handler within a fraction of a second, with nobody asking."""
    seen: list[str] = []
    kp = Kprobe(
        symbol_name="do_sys_openat2",
        pre_handler=lambda kp, regs: seen.append(regs.record.comm),  # type: ignore[attr-defined]
        record=RecordSpec(),
    )  # fmt: skip
    vm.register_kprobe(kp)
    try:
        vm.run("cat /etc/passwd >/dev/null", check=True)
        deadline = time.monotonic() + 5.0
        while "cat" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "cat" in seen
    finally:
        vm.unregister_kprobe(kp)
    # no recorded probe left: the idle stops end once its retired id has settled
    deadline = time.monotonic() + 5.0
    while vm.target.on_idle is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vm.target.on_idle is None
    assert kp.nhit + kp.nmissed == kp.guest_hits


def test_hits_arrive_while_stops_keep_coming(vm: VM) -> None:
    """The idle drain is due every 0.1 s even when a stopping probe's hits leave no quiet
    moment: it then runs in a hit's stop. Recorded hits keep arriving, and an unregistered
    recorded probe's id settles, with nobody asking."""
    stopping = Kprobe(symbol_name="vfs_read", pre_handler=lambda kp, regs: None)
    seen: list[int] = []
    recorded = Kprobe(symbol_name="do_sys_openat2", pre_handler=lambda kp, regs: seen.append(1),
                      record=RecordSpec())  # fmt: skip
    stop_file = "/tmp/stops.stop"
    vm.register_kprobes([stopping, recorded])
    try:
        vm.run(f"rm -f {stop_file}; (timeout 60 sh -c 'while [ ! -e {stop_file} ];"
               f" do head -c1 /etc/passwd >/dev/null; done' >/dev/null 2>&1 &)", check=True)
        recorder = vm.kprobes.channel.recorder  # type: ignore[attr-defined]
        time.sleep(0.5)
        drains, stops = recorder.drains + recorder.running_drains, stopping.nhit
        time.sleep(2.0)
        assert stopping.nhit - stops > 100  # the guest stopped all the time
        # about 20 (the ring never filled)
        assert recorder.drains + recorder.running_drains - drains >= 5 and seen
        vm.unregister_kprobe(recorded)
        deadline = time.monotonic() + 30.0
        while vm.kprobes.channel.records_settling() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not vm.kprobes.channel.records_settling()
        assert recorded.nhit + recorded.nmissed == recorded.guest_hits > 0
    finally:
        vm.run(f"touch {stop_file}")
        vm.unregister_kprobe(stopping)


def test_steady_state_recording_stops_the_vm_only_when_the_ring_asks(vm: VM) -> None:
    """With guest RAM shared, the trap thread drains the ring through the mapping with
    the VM running: a stop is only ever the ring's half-full watch (the fallback)."""
    seen: list[int] = []
    # earlier tests' unregistered probes settle first: judging them takes a stop of its own
    vm.settle_records()
    kp = Kprobe(symbol_name="vfs_read", pre_handler=lambda kp, regs: seen.append(regs.dx),
                record=RecordSpec())  # fmt: skip
    vm.register_kprobe(kp)
    try:
        vm.kprobes.optimizer.settle()  # jumps in first: the optimizer's looks stop the guest
        channel = vm.kprobes.channel
        recorder = channel.recorder  # type: ignore[attr-defined]
        assert channel.drains_running  # type: ignore[attr-defined]
        with vm.target.stopped():  # the trap thread counts both: read them while it waits
            stops, asked = vm.target.stops, channel.stats.ring_stops
        vm.run("i=0; while [ $i -lt 3000 ]; do read x </etc/passwd; i=$((i+1)); done",
               check=True, timeout=120)  # fmt: skip
        with vm.target.stopped():
            stops, asked = vm.target.stops - stops, channel.stats.ring_stops - asked
        # the host keeps up or the ring asks: no other stop but this read's own (3000
        # reads of a byte each)
        assert stops - 1 == asked
        assert recorder.running_drains > 0
        vm.flush_records()  # the trap thread may be mid-drain: this one waits its turn
        assert kp.nhit >= 3000 and len(seen) == kp.nhit
    finally:
        vm.unregister_kprobe(kp)
