"""An attached guest with nothing but its gdbstub (scripts/bench-attach): seconds from
``attach`` to a probe armed, and what ``count do_sys_openat2`` costs the guest's open loop.

The guest is a :class:`~kprobevm.bench.bareqemu.BareQemu` (no SSH, no ``memmap=``, no
vmlinux or kallsyms given): symbols, BTF, the blacklist and slot memory all come from
guest memory. Attach rounds alternate between reading the kernel image through the QEMU
process's memory (same machine) and through the gdbstub alone (as for a QEMU elsewhere),
so both sides of the comparison come from the same run. A loop round measures the loop's
rate with nothing attached, then attaches, arms a count-only probe (as ``kprobevm count``
does) and measures the rate again; the probe's count is read at two of the loop's console
marks and set against the rounds between them (one open a round).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kprobevm.bench.bareqemu import MARK_EVERY, BareQemu, LoopMark
from kprobevm.errors import VMError
from kprobevm.gdbstub.transport import GdbAddress, format_gdb_address
from kprobevm.guest.vm import attach
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.recorder import RecordSpec

__all__ = ["FUNC", "STEPS", "AttachSteps", "LoopRound", "attach_steps", "cli_attach_to_armed",
           "measure_attach", "measure_round", "summary"]  # fmt: skip

FUNC = "do_sys_openat2"
STEPS = ("connected", "image found", "host RAM", "kallsyms+BTF decoded", "symbols",
         "blacklist", "armed")  # fmt: skip
CLI_DEADLINE = 60.0
"""Seconds a ``kprobevm count`` run of :func:`cli_attach_to_armed` may take in all."""


@dataclass(frozen=True)
class AttachSteps:
    """One attach: seconds from the call to each step (:data:`STEPS`), and how the image
    was read (``host RAM`` or ``gdbstub``)."""

    via: str
    steps: tuple[tuple[str, float], ...]

    @property
    def armed(self) -> float:
        """Seconds from ``attach`` to the probe armed."""
        return dict(self.steps)["armed"]


def attach_steps(address: GdbAddress, *, host_ram: bool, function: str = FUNC) -> AttachSteps:
    """Attach, decode, register one probe on ``function``; the times of each step."""
    t0 = time.perf_counter()
    laps: list[tuple[str, float]] = []

    def lap(step: str) -> None:
        laps.append((step, time.perf_counter() - t0))

    with attach(address, name="bench-attach") as vm:
        vm.target  # noqa: B018
        lap("connected")
        vm.kernel_image  # noqa: B018
        lap("image found")
        if not host_ram:
            vm.__dict__["guest_ram"] = None  # as for a QEMU on another machine
        vm.guest_ram  # noqa: B018
        lap("host RAM")
        vm.kernel_in_memory  # noqa: B018
        lap("kallsyms+BTF decoded")
        vm.symbols  # noqa: B018
        lap("symbols")
        vm.kprobe_blacklist  # noqa: B018
        lap("blacklist")
        kp = Kprobe(symbol_name=function, record=RecordSpec(count_only=True))
        vm.register_kprobe(kp)
        lap("armed")
        vm.unregister_kprobe(kp)
        via = "host RAM" if vm.guest_ram is not None else "gdbstub"
    return AttachSteps(via, tuple(laps))


def cli_attach_to_armed(address: GdbAddress, *, function: str = FUNC) -> float:
    """Seconds from starting ``kprobevm count --attach ADDRESS FUNCTION`` (a new Python
    process, its imports included, as a user runs it) to its stderr saying the probe is
    placed; the command then counts for half a second and exits."""
    root = Path(__file__).resolve().parents[2]
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, "-c", "import sys; from kprobevm.cli import main; sys.exit(main())",
               "count", "--attach", format_gdb_address(address), "--duration", "0.5",
               function]  # fmt: skip
    started = time.monotonic()
    child = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=os.environ | {"PYTHONPATH": path},
    )  # fmt: skip
    deadline = threading.Timer(CLI_DEADLINE, child.kill)
    deadline.start()
    armed, said = None, []
    try:
        assert child.stderr is not None
        for line in child.stderr:
            said.append(line)
            if armed is None and line.rstrip().endswith("probe(s) placed"):
                armed = time.monotonic() - started
        code = child.wait()
    finally:
        deadline.cancel()
    if armed is None or code != 0:
        raise VMError(f"kprobevm count --attach exited with {code} (within {CLI_DEADLINE:g} s)"
                      f" without its probe armed: {''.join(said)[-2000:]}")  # fmt: skip
    return armed


def measure_attach(address: GdbAddress, rounds: int) -> list[AttachSteps]:
    """``rounds`` attaches of each way of reading the image, alternating."""
    return [attach_steps(address, host_ram=k % 2 == 0) for k in range(2 * rounds)]


def summary(results: list[AttachSteps]) -> str:
    """Median seconds to each step, per way of reading the image."""
    lines = []
    for via in ("host RAM", "gdbstub"):
        mine = [r for r in results if r.via == via]
        if not mine:
            continue
        cells = [f"{step} {statistics.median(dict(r.steps)[step] for r in mine):.2f}"
                 for step in STEPS]  # fmt: skip
        armed = ", ".join(f"{r.armed:.2f}" for r in mine)
        lines.append(f"{via} ({len(mine)} rounds; armed at {armed} s): median " + ", ".join(cells))
    return "\n".join(lines)


@dataclass(frozen=True)
class LoopRound:
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


def measure_round(qemu: BareQemu, *, seconds: float, channel: str = "watchpoint") -> LoopRound:
    """One round on ``qemu``'s loop: unprobed with nothing attached, then attached with a
    probe counting do_sys_openat2 (``channel``: ``breakpoint`` measures the slow fallback,
    where a probe that only counts still stops the guest at each hit)."""
    assert qemu.gdb is not None, "the loop rounds attach through the gdbstub"
    unprobed, unprobed_cpu = _rates(*qemu.window(seconds))
    started = time.monotonic()
    with attach(qemu.gdb, name="bench-attach") as vm:
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
    return LoopRound(
        unprobed_per_s=unprobed, probed_per_s=probed, unprobed_per_cpu_s=unprobed_cpu,
        probed_per_cpu_s=probed_cpu, attach_to_armed_s=armed, loop_rounds=b.rounds - a.rounds,
        hits=n1 - n0, channel=used, slot_memory=memory,
    )  # fmt: skip
