"""What shared guest RAM buys: a recorded probe's cost to the guest against the guest
kernel's own kprobe, VM stops per recorded hit, a stopping handler's memory reads, and a
recorded return probe's hit rate against a recorded entry probe's on the same function.

The per-hit cost is the guest's own time: a ``dd bs=1`` loop makes one ``vfs_read`` per
byte, timed by the guest's monotonic clock (``/proc/timer_list``; the guest's busybox
``date`` has no nanoseconds), minus the same loop unprobed, divided by the hits. Under
QEMU's ``-icount`` (:func:`kprobevm.bench.stacks.icount_qemu`) that clock counts the
guest's instructions, so the figure is the instructions a hit adds, whatever the host's
load; on the host's clock a loaded host moves it by more than the figure itself.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.bench.guest import guest_probe_hits
from kprobevm.bench.optprobe import check_optimized
from kprobevm.bench.workload import HOT_FUNCTION, run_opens
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.kretprobes import Kretprobe
from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.tracing import ProbeEvent, parse_event
from kprobevm.tracing.session import TraceSession, plan_events
from kprobevm.x86.ptregs import PtRegs

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = [
    "DD_EVENT",
    "DdRound",
    "ReturnRates",
    "StoppingReads",
    "measure_dd",
    "measure_returns",
    "measure_stopping_reads",
]

DD_EVENT = "p:rd vfs_read count=%dx:u64"
_NOW = "grep -m1 'now at' /proc/timer_list"
_NS = re.compile(r"now at (\d+) nsecs")


def _dd_ns(vm: VM, n: int) -> int:
    """Guest nanoseconds for ``n`` one-byte reads (and writes) by dd."""
    out = vm.run(f"{_NOW}; dd if=/dev/zero of=/dev/null bs=1 count={n} 2>/dev/null; {_NOW}",
                 check=True, timeout=600).stdout  # fmt: skip
    start, end = (int(m) for m in _NS.findall(out))
    return end - start


@dataclass(frozen=True)
class DdRound:
    """One round of the dd loop three ways: guest ns per hit over the unprobed loop."""

    unprobed_ns: int
    guest_kprobe_ns_per_hit: float
    kprobevm_ns_per_hit: float
    kprobevm_hits: int
    vm_stops: int
    ring_stops: int
    kprobevm_wall_s: float = 0.0
    """Host seconds of the probed loop: a guest stopped for the host's decoding does not
    count that time in its own clock, this does."""
    follower: str = ""
    """What followed the ring: ``process`` (with its scheduling), ``thread`` (with why)
    or ``none``."""
    follower_max_gap_s: float = 0.0
    """The follower's longest time between two looks, over the session's life so far."""
    follower_max_fill: int = 0
    """The most bytes a look of the child found in the ring (its mark:
    ``ring_size * HIGH_WATER``)."""
    follower_max_stall_s: float = 0.0
    """The longest the child's looks waited at an unfinished record (a vCPU the host
    did not run inside the record program), over the session's life so far."""
    optimized: bool = False
    """The recorded probe ran with a jump (checked), not an int3."""

    @property
    def ratio(self) -> float:
        """kprobevm's recorded probe against the guest's own kprobe (<= 1: not slower)."""
        return self.kprobevm_ns_per_hit / self.guest_kprobe_ns_per_hit


def _guest_kprobe_ns(vm: VM, n: int) -> tuple[int, int]:
    """The dd loop under the guest's own ``p:rd vfs_read`` (tracefs): ns, hits."""
    return guest_probe_hits(vm, "bench/rd", DD_EVENT.split(" ", 1)[1], lambda: _dd_ns(vm, n))


def _kprobevm_ns(vm: VM, n: int) -> tuple[int, int, int, int, float]:
    """The dd loop under ``kprobevm trace --mode record``'s probe: ns, hits, VM stops and
    ring stops meanwhile, and the host's seconds: steady state. The last round's probe
    settles first (its retired id is judged in a stop of its own), and with the optimizer
    on the probe's jump is in before the clock starts (checked: a probe left with its
    int3 would be measured under the wrong name)."""
    event = parse_event(DD_EVENT)
    assert isinstance(event, ProbeEvent)
    vm.settle_records()
    session = TraceSession(vm, plan_events(vm, [event]), mode="record")
    with session:
        check_optimized(vm, vm.kprobes.optimizer.enabled)
        stats = vm.kprobes.channel.stats
        stops, ring = vm.target.stops, stats.ring_stops
        start = time.monotonic()
        ns = _dd_ns(vm, n)
        wall = time.monotonic() - start
        stops, ring = vm.target.stops - stops, stats.ring_stops - ring
    hits = sum(1 for _ in session.drain())
    return ns, hits, stops, ring, wall


def _follower(vm: VM) -> tuple[str, float, int, float]:
    """The ring follower's kind, longest gap, fullest look and longest wait at an
    unfinished record (``none``: no follower)."""
    follower = getattr(vm.kprobes.channel, "follower", None)
    if follower is None:
        return "none", 0.0, 0, 0.0
    feed = follower.feed
    if feed is None:
        return f"thread ({follower.fallback})", follower.max_gap, 0, 0.0
    return f"process ({feed.scheduling})", follower.max_gap, feed.max_fill, feed.max_stall


def measure_dd(vm: VM, n: int) -> DdRound:
    """One round: unprobed, the guest's kprobe, kprobevm's recorded probe."""
    base = _dd_ns(vm, n)
    guest_ns, guest_hits = _guest_kprobe_ns(vm, n)
    ours_ns, ours_hits, stops, ring, wall = _kprobevm_ns(vm, n)
    kind, gap, fill, stall = _follower(vm)
    return DdRound(
        unprobed_ns=base,
        guest_kprobe_ns_per_hit=(guest_ns - base) / max(guest_hits, 1),
        kprobevm_ns_per_hit=(ours_ns - base) / max(ours_hits, 1),
        kprobevm_hits=ours_hits, vm_stops=stops, ring_stops=ring, kprobevm_wall_s=wall,
        follower=kind, follower_max_gap_s=gap, follower_max_fill=fill,
        follower_max_stall_s=stall, optimized=vm.kprobes.optimizer.enabled,
    )  # fmt: skip


@dataclass(frozen=True)
class StoppingReads:
    """A stopping probe whose handler reads 32 bytes of the kernel stack."""

    hits: int
    hits_per_s: float
    read_us_median: float
    read_us_p90: float
    quiet_read_us_median: float = 0.0
    """The same read of the last hit's stack, repeated on this thread after the run:
    the read path alone, without a stop's cold caches and wake-up."""
    packets_per_hit: float = 0.0
    """Packets sent to the gdbstub per hit (the resume's included)."""
    sends_per_hit: float = 0.0
    """Writes to the gdbstub per hit: a round trip each, but for the resume's."""


def measure_stopping_reads(vm: VM, opens: int) -> StoppingReads:
    """Hits per second on the no-fork open loop, and each handler read's time."""
    times: list[float] = []

    last_sp: list[int] = []

    def handler(kp: Kprobe, regs: PtRegs) -> None:
        assert regs.memory is not None
        sp = regs.sp
        start = time.perf_counter()
        regs.memory.read(sp, 32)
        times.append(time.perf_counter() - start)
        last_sp[:] = [sp]

    kp = Kprobe(symbol_name=HOT_FUNCTION, pre_handler=handler)
    vm.register_kprobe(kp)
    stats = getattr(vm.target.client, "stats", None)
    try:
        sent = (stats.packets_sent, stats.sends) if stats is not None else (0, 0)
        run = run_opens(vm, opens)
        hits = kp.nhit
        if stats is not None:
            sent = (stats.packets_sent - sent[0], stats.sends - sent[1])
    finally:
        vm.unregister_kprobe(kp)
    micros = sorted(t * 1e6 for t in times)
    return StoppingReads(
        hits=hits, hits_per_s=hits / run.seconds, read_us_median=statistics.median(micros),
        read_us_p90=micros[int(0.9 * (len(micros) - 1))],
        quiet_read_us_median=_quiet_read_us(vm, last_sp[0]) if last_sp else 0.0,
        packets_per_hit=sent[0] / max(hits, 1), sends_per_hit=sent[1] / max(hits, 1),
    )  # fmt: skip


def _quiet_read_us(vm: VM, address: int, n: int = 20_000) -> float:
    """Median microseconds of a 32-byte read at ``address`` repeated ``n`` times, the VM
    held stopped (as in a handler); 0.0 when that stack is gone from the mapping (its
    task exited), which would measure the gdbstub instead."""
    memory = vm.memory
    times = []
    with vm.target.stopped():
        if memory.direct is None or memory.direct.read_virt(address, 32) is None:
            return 0.0
        for _ in range(n):
            start = time.perf_counter()
            memory.read(address, 32)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


@dataclass(frozen=True)
class ReturnRates:
    """Hits per second on the open loop (its function's entry or return), each probe
    alone in runs of the same loop (the recorded two in alternating turns)."""

    recorded_entry: float
    recorded_return: float
    stopping_return: float
    recorded_return_missed: int
    """Returns the recorded return probe missed (counted, not handled)."""
    recorded_return_stops: int
    """VM stops during the recorded return probe's run (the ring's watch, or ours)."""

    @property
    def ratio(self) -> float:
        """Recorded return against recorded entry (the goal: at least 0.8)."""
        return self.recorded_return / self.recorded_entry if self.recorded_entry else 0.0


def _steady(vm: VM) -> None:
    """Before a timed run: retired probes judged (a stop each), and jumps in (until they
    are, the optimizer's looks stop a busy guest)."""
    vm.settle_records()
    vm.kprobes.optimizer.settle()


def measure_returns(vm: VM, opens: int, *, turns: int = 4) -> ReturnRates:
    """A recorded entry probe, a recorded return probe and a stopping return probe on
    the open loop's function, each with an empty handler; hits are what reached it. The
    two recorded probes take ``turns`` turns each, alternating, of ``opens / turns``
    opens, so that a load that comes and goes on the host weighs on both alike."""
    part = max(1, opens // turns)
    hits, seconds = {"entry": 0, "return": 0}, {"entry": 0.0, "return": 0.0}
    missed = stops = 0
    for _ in range(turns):
        entry = Kprobe(symbol_name=HOT_FUNCTION, pre_handler=lambda kp, regs: None,
                       record=RecordSpec())  # fmt: skip
        vm.register_kprobe(entry)
        try:
            _steady(vm)
            run = run_opens(vm, part)
            vm.flush_records()
            hits["entry"] += entry.nhit
            seconds["entry"] += run.seconds
        finally:
            vm.unregister_kprobe(entry)
        rp = Kretprobe(symbol_name=HOT_FUNCTION, handler=lambda ri, regs: None,
                       record=RecordSpec())  # fmt: skip
        vm.register_kretprobe(rp)
        try:
            _steady(vm)
            before = vm.target.stops
            run = run_opens(vm, part)
            stops += vm.target.stops - before
            vm.flush_records()
            hits["return"] += rp.nhit
            seconds["return"] += run.seconds
            assert rp.recorded is not None
            missed += rp.recorded.nmissed
        finally:
            vm.unregister_kretprobe(rp)
    stopping = Kretprobe(symbol_name=HOT_FUNCTION, handler=lambda ri, regs: None)
    vm.register_kretprobe(stopping)
    try:
        run = run_opens(vm, part)
        stopping_rate = stopping.nhit / run.seconds
    finally:
        vm.unregister_kretprobe(stopping)
    return ReturnRates(
        hits["entry"] / seconds["entry"], hits["return"] / seconds["return"], stopping_rate,
        missed, stops,
    )  # fmt: skip
