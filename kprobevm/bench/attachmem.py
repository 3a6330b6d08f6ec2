"""An attached guest with nothing but its gdbstub: from attach to probes armed, and what
``count do_sys_openat2`` costs the guest's open loop (:mod:`kprobevm.bench.bareqemu`).

Each round measures the loop's rate with nothing attached, then attaches, arms a
count-only probe (as ``kprobevm count`` does) and measures the rate again; the probe's
count is read at two of the loop's console marks and set against the rounds between
them (one open a round), so "every open seen" is checked in the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from kprobevm.bench.bareqemu import MARK_EVERY, BareQemu, LoopMark
from kprobevm.guest.vm import attach
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.recorder import RecordSpec

__all__ = ["FUNC", "AttachRound", "measure_round"]

FUNC = "do_sys_openat2"


@dataclass(frozen=True)
class AttachRound:
    """One round: the loop's rate unprobed and probed, per wall second and per second of
    QEMU's CPU time, and the probe's count against the loop's own over the same marks."""

    unprobed_per_s: float
    probed_per_s: float
    unprobed_per_cpu_s: float
    probed_per_cpu_s: float
    attach_to_armed_s: float
    loop_rounds: int
    hits: int
    channel: str
    slot_memory: str

    @property
    def ratio(self) -> float:
        """Probed wall-clock rate over unprobed (1.0: the probe costs the loop nothing)."""
        return self.probed_per_s / self.unprobed_per_s

    @property
    def cpu_ratio(self) -> float:
        """The same per second of QEMU's CPU time: what the probe costs the guest's work,
        with the other processes of a loaded host left out (a VM stop, which costs the
        guest wall time and no QEMU CPU, is not in it: see :attr:`ratio`)."""
        return self.probed_per_cpu_s / self.unprobed_per_cpu_s


def _rates(a: LoopMark, b: LoopMark) -> tuple[float, float]:
    rounds = b.rounds - a.rounds
    return rounds / (b.at - a.at), rounds / max(b.cpu - a.cpu, 1e-3)


def measure_round(qemu: BareQemu, kallsyms: Path, *, seconds: float,
                  channel: str = "watchpoint") -> AttachRound:  # fmt: skip
    """One round on ``qemu``'s loop: unprobed with nothing attached, then attached with a
    probe counting do_sys_openat2 (``channel``: ``breakpoint`` measures the slow fallback,
    where a probe that only counts still stops the guest at each hit)."""
    unprobed, unprobed_cpu = _rates(*qemu.window(seconds))
    started = time.monotonic()
    vm = attach(qemu.gdb, vmlinux=qemu.vmlinux, kallsyms=kallsyms, name="bench-attach")
    with vm:
        if channel == "watchpoint":
            kp = Kprobe(symbol_name=FUNC, record=RecordSpec(count_only=True))
        else:
            vm.use_trap_channel("breakpoint")
            kp = Kprobe(symbol_name=FUNC, pre_handler=lambda kp, regs: None)
        vm.register_kprobe(kp)
        armed = time.monotonic() - started
        a = qemu.next_mark(qemu.mark().rounds)
        n0 = kp.nhit
        time.sleep(seconds)
        b = qemu.next_mark(qemu.mark().rounds + MARK_EVERY - 1)
        n1 = kp.nhit
        vm.unregister_kprobe(kp)
        used, memory = vm.trap_channel, vm.slot_memory or ""
    probed, probed_cpu = _rates(a, b)
    return AttachRound(
        unprobed_per_s=unprobed, probed_per_s=probed, unprobed_per_cpu_s=unprobed_cpu,
        probed_per_cpu_s=probed_cpu, attach_to_armed_s=armed, loop_rounds=b.rounds - a.rounds,
        hits=n1 - n0, channel=used, slot_memory=memory,
    )  # fmt: skip
