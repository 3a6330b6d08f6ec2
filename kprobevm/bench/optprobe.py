"""A probe's per-hit cost to the guest with a jump and with an int3, against the guest
kernel's own kprobe, on the ``dd bs=1`` loop (one ``vfs_read`` per byte).

One round times the loop under the guest's own ``p:rd vfs_read count=%dx:u64``
(tracefs), under the same event recorded by kprobevm with the jump and with the int3
(the optimizer off), and under a count-only probe both ways, each next to an unprobed
run of its own. The differences say where a recorded hit's time goes: int3 against jump
is the trap's cost (the #BP exception, the stub's lookup and its ``iretq``); recorded
against count-only is the record program's.

Each run is timed two ways: by the guest's own clock (``/proc/timer_list``), and by
the CPU time of the QEMU process over the command. The guest's clock runs on while the
host does not schedule the vCPU (this machine is shared: the unprobed loop's guest time
moves 2-3x within a minute); QEMU's CPU time counts only what it ran. (Its threads are
unnamed without ``-name debug-threads=on``: all of them are summed, the vCPU's and the
main loop's, which serves SSH and the gdbstub alike for every contender.)
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kprobevm.bench.guest import guest_probe_hits
from kprobevm.errors import KprobeError, VMError
from kprobevm.kprobes.core import Kprobe
from kprobevm.tracing import ProbeEvent, parse_event
from kprobevm.tracing.session import TraceSession, plan_events

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = [
    "DD_EVENT", "VARIANTS", "WAYS", "OptRound", "Timing", "check_optimized", "measure_round",
    "stop_cost_ns",
]  # fmt: skip

DD_EVENT = "p:rd vfs_read count=%dx:u64"
FUNCTION = "vfs_read"
VARIANTS = ("recorded_jump", "recorded_int3", "count_jump", "count_int3")
"""kprobevm's probes measured in a round, besides the guest's own."""
WAYS = ("guest_kprobe", *VARIANTS)
_NOW = "grep -m1 'now at' /proc/timer_list"
_NS = re.compile(r"now at (\d+) nsecs")


@dataclass(frozen=True)
class Timing:
    """One run of the loop: guest clock ns, and CPU ns of the QEMU process."""

    guest_ns: int
    cpu_ns: int


@dataclass(frozen=True)
class OptRound:
    """One round: each way's cost per hit over an unprobed run right next to it
    (before it in even rounds, after it in odd ones)."""

    guest_ns_per_hit: dict[str, float]
    cpu_ns_per_hit: dict[str, float]
    unprobed: dict[str, Timing]
    hits: dict[str, int]
    vm_stops: dict[str, int]

    def ratio(self, variant: str, *, cpu: bool = True) -> float:
        """A variant against the guest's own kprobe (<= 1: not slower)."""
        per_hit = self.cpu_ns_per_hit if cpu else self.guest_ns_per_hit
        return per_hit[variant] / per_hit["guest_kprobe"]


def qemu_cpu_ns(pid: int) -> int:
    """CPU nanoseconds the QEMU process's threads have run so far (the vCPUs', and the
    main loop's, which serves SSH and the gdbstub: the same for every contender)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except OSError:
            continue  # a thread that ended meanwhile
    return total


def dd_timed(vm: VM, n: int) -> Timing:
    """``n`` one-byte reads (and writes) by dd, timed both ways."""
    pid = getattr(vm.machine, "pid", None)
    if not isinstance(pid, int):
        raise VMError("QEMU's CPU time needs a QEMU this process started")
    cpu = qemu_cpu_ns(pid)
    out = vm.run(f"{_NOW}; dd if=/dev/zero of=/dev/null bs=1 count={n} 2>/dev/null; {_NOW}",
                 check=True, timeout=600).stdout  # fmt: skip
    cpu = qemu_cpu_ns(pid) - cpu
    start, end = (int(m) for m in _NS.findall(out))
    return Timing(end - start, cpu)


def check_optimized(vm: VM, want: bool) -> None:
    """Raise unless the probe on :data:`FUNCTION` is (or is not) jump-optimized (once
    the optimizer is through, when it is wanted)."""
    if want:
        vm.kprobes.optimizer.settle()
    addr = vm.symbols[FUNCTION]
    site = next((s for s in vm.kprobes.table.values() if s.addr in (addr, addr + 5)), None)
    if site is None or site.optimized != want:
        why = vm.kprobes.optimizer.why_not.get(site.addr, "") if site is not None else ""
        state = "not optimized" if want else "optimized"
        raise KprobeError(
            f"the probe on {FUNCTION} is {state} ({why or 'no site'}):"
            " the round would measure the wrong path"
        )


def _guest(vm: VM, n: int) -> tuple[Timing, int, int]:
    timing, hits = guest_probe_hits(vm, "bench/rd", DD_EVENT.split(" ", 1)[1],
                                    lambda: dd_timed(vm, n))  # fmt: skip
    return timing, hits, 0


def _recorded(vm: VM, n: int, jump: bool) -> tuple[Timing, int, int]:
    vm.kprobes.optimizer.enabled = jump
    event = parse_event(DD_EVENT)
    assert isinstance(event, ProbeEvent)
    session = TraceSession(vm, plan_events(vm, [event]), mode="record")
    with session:
        check_optimized(vm, jump)
        stops = vm.target.stops
        timing = dd_timed(vm, n)
        stops = vm.target.stops - stops
    hits = sum(1 for _ in session.drain())
    return timing, hits, stops


def _counted(vm: VM, n: int, jump: bool) -> tuple[Timing, int, int]:
    vm.kprobes.optimizer.enabled = jump
    kp = Kprobe(symbol_name=FUNCTION)
    vm.register_kprobe(kp)
    try:
        check_optimized(vm, jump)
        stops = vm.target.stops
        timing = dd_timed(vm, n)
        stops = vm.target.stops - stops
        hits = kp.nhit
    finally:
        vm.unregister_kprobe(kp)
    return timing, hits, stops


def measure_round(vm: VM, n: int, *, index: int = 0) -> OptRound:
    """One round of ``n`` one-byte reads each way, each next to an unprobed run of its
    own; the ways' order turns with ``index`` so that a drift of the machine's speed
    favours none of them. The optimizer is left on."""
    runs: dict[str, Callable[[], tuple[Timing, int, int]]] = {
        "guest_kprobe": lambda: _guest(vm, n),
        "recorded_jump": lambda: _recorded(vm, n, True),
        "recorded_int3": lambda: _recorded(vm, n, False),
        "count_jump": lambda: _counted(vm, n, True),
        "count_int3": lambda: _counted(vm, n, False),
    }
    turn = index % len(WAYS)
    guest: dict[str, float] = {}
    cpu: dict[str, float] = {}
    unprobed: dict[str, Timing] = {}
    hits: dict[str, int] = {}
    stops: dict[str, int] = {}
    was = vm.kprobes.optimizer.enabled
    try:
        for name in WAYS[turn:] + WAYS[:turn]:
            if index % 2 == 0:
                unprobed[name] = dd_timed(vm, n)
            timing, hits[name], stops[name] = runs[name]()
            if index % 2:
                unprobed[name] = dd_timed(vm, n)
            per = max(hits[name], 1)
            guest[name] = (timing.guest_ns - unprobed[name].guest_ns) / per
            cpu[name] = (timing.cpu_ns - unprobed[name].cpu_ns) / per
    finally:
        vm.kprobes.optimizer.enabled = was
    return OptRound(guest, cpu, unprobed, hits, stops)


def stop_cost_ns(vm: VM, stops: int) -> float:
    """QEMU CPU nanoseconds one stop and resume of the (idle) guest costs: ``stops`` of
    them, less what QEMU runs idle over as long a time. The probes' trap channel is
    taken out first: its thread would serve back-to-back stops in one pause."""
    pid = getattr(vm.machine, "pid", None)
    if not isinstance(pid, int):
        raise VMError("QEMU's CPU time needs a QEMU this process started")
    vm.kprobes.close()
    cpu, t0 = qemu_cpu_ns(pid), time.monotonic()
    time.sleep(1.0)
    idle = (qemu_cpu_ns(pid) - cpu) / (time.monotonic() - t0)
    cpu, t0 = qemu_cpu_ns(pid), time.monotonic()
    for _ in range(stops):
        with vm.target.stopped():
            pass
    used = qemu_cpu_ns(pid) - cpu - idle * (time.monotonic() - t0)
    return used / stops
