"""What probes cost where nothing hits them, what registering them costs, and the memory
they hold: kprobevm probes against the same number of gdbstub breakpoints.

QEMU's TCG looks gdbstub breakpoints up as it translates and enters blocks; kprobevm's
probes are int3 bytes in guest text and cost nothing until hit. Rounds are interleaved
and the median taken, because this machine's baseline moves between runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kprobevm.bench.report import IdlePoint, PairedIdle
from kprobevm.bench.workload import run_opens
from kprobevm.errors import KprobeVMError
from kprobevm.gdbstub.client import BreakpointKind
from kprobevm.kprobes.core import Kprobe

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = [
    "host_rss_kib",
    "measure_idle",
    "measure_idle_paired",
    "measure_registration",
    "probeable",
]

SETTLE_OPENS = 500
"""A short untimed run after arming or disarming: QEMU retranslates the changed pages."""


def _nothing(kp: Kprobe, regs: object) -> None:
    return None


def host_rss_kib() -> int:
    """This process's resident set size (VmRSS), KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def probeable(vm: VM, names: Sequence[str], count: int) -> list[str]:
    """The first ``count`` of ``names`` the engine accepts (registered one by one, then
    removed), so that batch registrations later never fail on a refused function."""
    good: list[Kprobe] = []
    with vm.target.stopped():
        for name in names:
            if len(good) == count:
                break
            kp = Kprobe(symbol_name=name, pre_handler=_nothing)
            try:
                vm.register_kprobe(kp)
            except KprobeVMError:
                continue
            good.append(kp)
    vm.unregister_kprobes(good)
    return [kp.symbol_name for kp in good if kp.symbol_name is not None]


def _kprobes(names: Sequence[str]) -> list[Kprobe]:
    return [Kprobe(symbol_name=n, pre_handler=_nothing) for n in names]


def measure_registration(vm: VM, names: Sequence[str], counts: Sequence[int]) -> dict[str, float]:
    """Seconds to register and to unregister N probes with the batch API."""
    out: dict[str, float] = {}
    for n in counts:
        kps = _kprobes(names[:n])
        start = time.perf_counter()
        vm.register_kprobes(kps)
        out[f"register_{n}_s"] = time.perf_counter() - start
        start = time.perf_counter()
        vm.unregister_kprobes(kps)
        out[f"unregister_{n}_s"] = time.perf_counter() - start
    return out


def _kprobevm_rates(vm: VM, names: Sequence[str], counts: Sequence[int],
                    opens: int) -> dict[int, tuple[float, int]]:
    """Grow the armed set 0 -> counts[-1], timing the workload at each count."""
    out: dict[int, tuple[float, int]] = {}
    armed: list[Kprobe] = []
    try:
        for n in counts:
            more = _kprobes(names[len(armed):n])
            if more:
                vm.register_kprobes(more)
                armed += more
            rate = run_opens(vm, opens).ops_per_s
            out[n] = (rate, sum(kp.nhit for kp in armed))
    finally:
        if armed:
            vm.unregister_kprobes(armed)
    return out


def _breakpoint_rates(vm: VM, addrs: Sequence[int], counts: Sequence[int],
                      opens: int) -> dict[int, tuple[float, int]]:
    """The same with gdbstub ``Z0`` breakpoints, through kprobevm's own client; a hit
    would stop the VM, so a stop seen after the run counts as one."""
    out: dict[int, tuple[float, int]] = {}
    placed: list[int] = []
    try:
        for n in counts:
            with vm.target.stopped() as client:
                for addr in addrs[len(placed):n]:
                    client.insert_breakpoint(BreakpointKind.SOFTWARE, addr)
                    placed.append(addr)
            rate = run_opens(vm, opens, timeout=120.0).ops_per_s
            out[n] = (rate, 0)
    finally:
        with vm.target.stopped() as client:
            for addr in placed:
                client.remove_breakpoint(BreakpointKind.SOFTWARE, addr)
    return out


def measure_idle(vm: VM, names: Sequence[str], counts: Sequence[int], *, rounds: int,
                 opens: int) -> list[IdlePoint]:
    """Interleaved rounds (kprobevm first in odd rounds, gdb first in even ones)."""
    addrs = [vm.symbols[n] for n in names]
    samples: dict[tuple[str, int], list[float]] = {}
    hits: dict[tuple[str, int], int] = {}
    for r in range(rounds):
        kinds = ["kprobevm", "gdb_breakpoints"]
        if r % 2:
            kinds.reverse()
        for kind in kinds:
            if kind == "kprobevm":
                rates = _kprobevm_rates(vm, names, counts, opens)
            else:
                rates = _breakpoint_rates(vm, addrs, counts, opens)
            for n, (rate, hit) in rates.items():
                samples.setdefault((kind, n), []).append(rate)
                hits[(kind, n)] = hits.get((kind, n), 0) + hit
    return [IdlePoint(kind, n, tuple(s), hits[(kind, n)]) for (kind, n), s in samples.items()]


def measure_idle_paired(vm: VM, names: Sequence[str], *, rounds: int, opens: int) -> PairedIdle:
    """``len(names)`` probes registered once; each round times the workload disarmed and
    armed (the order alternating), each run after a short settling run."""
    kps = _kprobes(names)
    vm.register_kprobes(kps)
    vm.disarm_all_kprobes()
    ratios: list[float] = []
    try:
        for r in range(rounds):
            rates: dict[bool, float] = {}
            for armed in (False, True) if r % 2 == 0 else (True, False):
                (vm.arm_all_kprobes if armed else vm.disarm_all_kprobes)()
                run_opens(vm, SETTLE_OPENS)
                rates[armed] = run_opens(vm, opens).ops_per_s
            ratios.append(1.0 - rates[True] / rates[False])
    finally:
        vm.unregister_kprobes(kps)
        vm.arm_all_kprobes()  # later registrations are armed again
    return PairedIdle(len(kps), tuple(ratios), sum(kp.nhit for kp in kps))
