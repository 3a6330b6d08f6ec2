"""The guest kernel's preemption model, read from the running kernel itself.

It decides how long freed slot memory must wait (:mod:`kprobevm.trap.grace`): a kernel
that preempts kernel code can leave a task switched out with its RIP, or a return
address, inside a slot for as long as it likes. The facts come from the kernel's own
memory: the build flags in ``linux_banner`` (``uname -v``: ``PREEMPT_RT``, ``PREEMPT``,
``PREEMPT_DYNAMIC``) and, on a ``PREEMPT_DYNAMIC`` kernel, the mode in force now
(``preempt_dynamic_mode``, set by ``preempt=`` at boot and changeable at run time).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.errors import KprobeVMError

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.kernel.kallsyms import KernelSymbols

__all__ = ["DynamicMode", "PreemptionModel", "preemption_model"]

BANNER_MAX = 512
"""Bytes of ``linux_banner`` read: the version line is about 200."""


class DynamicMode(enum.IntEnum):
    """``preempt_dynamic_mode``'s values (the kernel's anonymous enum in sched/core.c)."""

    UNDEFINED = -1
    NONE = 0
    VOLUNTARY = 1
    FULL = 2
    LAZY = 3


@dataclass(frozen=True)
class PreemptionModel:
    """How the running kernel preempts: ``name`` as ``/sys/kernel/debug/sched/preempt``
    would say it (``none``, ``voluntary``, ``full``, ``lazy``, ``rt``), whether kernel
    code can be preempted, and where that was read."""

    name: str
    preemptible: bool
    dynamic: bool
    """The mode can change at run time (``PREEMPT_DYNAMIC``): read it again before use."""
    source: str

    def __str__(self) -> str:
        kind = "preemptible" if self.preemptible else "not preemptible"
        return f"{self.name} ({kind}; from {self.source})"


_FLAGS = re.compile(rb"#\S*\s+((?:(?:SMP|PREEMPT\w*)\s+)*)")


def banner_flags(banner: bytes) -> frozenset[str]:
    """The build flags after ``#N`` in a ``Linux version ...`` line (``SMP``,
    ``PREEMPT``, ``PREEMPT_DYNAMIC``, ``PREEMPT_RT``)."""
    match = _FLAGS.search(banner.split(b"\0", 1)[0])
    if match is None:
        return frozenset()
    return frozenset(f.decode() for f in match.group(1).split())


def preemption_model(memory: GuestMemory, symbols: KernelSymbols) -> PreemptionModel:
    """The running kernel's preemption model (VM stopped, or a read through shared RAM).

    A kernel whose flags cannot be read is taken as preemptible: the cautious answer
    costs time, the other one could crash the guest."""
    try:
        banner = memory.read(symbols["linux_banner"], BANNER_MAX)
    except KprobeVMError as exc:
        return PreemptionModel("unknown", True, False, f"linux_banner unreadable: {exc}")
    flags = banner_flags(banner)
    if "PREEMPT_RT" in flags:
        return PreemptionModel("rt", True, "PREEMPT_DYNAMIC" in flags, "linux_banner")
    if "PREEMPT_DYNAMIC" in flags:
        try:
            raw = memory.s32(symbols["preempt_dynamic_mode"])
        except KprobeVMError as exc:
            return PreemptionModel("unknown", True, True,
                                   f"PREEMPT_DYNAMIC, preempt_dynamic_mode unreadable: {exc}")
        try:
            mode = DynamicMode(raw)
        except ValueError:
            return PreemptionModel(f"mode {raw}", True, True, "preempt_dynamic_mode")
        preemptible = mode not in (DynamicMode.NONE, DynamicMode.VOLUNTARY)
        return PreemptionModel(mode.name.lower(), preemptible, True, "preempt_dynamic_mode")
    if "PREEMPT" in flags:
        return PreemptionModel("full", True, False, "linux_banner")
    if flags:  # SMP alone: built PREEMPT_NONE or PREEMPT_VOLUNTARY
        return PreemptionModel("none or voluntary", False, False, "linux_banner")
    return PreemptionModel("unknown", True, False, "linux_banner without build flags")
