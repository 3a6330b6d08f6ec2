"""The guest workload every contender is measured on: opens in a loop, in one SSH command.

Each ``cat`` opens the same file many times, so neither SSH nor fork dominates, and the
hot kernel function ``do_sys_openat2`` runs once per open (plus a few per process).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = [
    "DENSE_FUNCTION",
    "HOT_FUNCTION",
    "UNHIT_PREFIXES",
    "Run",
    "open_loop",
    "run_opens",
    "unhit_functions",
]

HOT_FUNCTION = "do_sys_openat2"
DENSE_FUNCTION = "kmem_cache_alloc"
"""A hot function hit about 4 times per open: less of the guest's own work per hit, so
the rates say more about the trap path (every contender is measured on it too)."""
PER_PROCESS = 500
"""Opens per ``cat`` process."""
UNHIT_PREFIXES = ("acpi_", "pci_", "usb_", "snd_", "drm_", "nfs_", "xfs_", "ata_", "scsi_")
"""Subsystems an open loop never enters (the probes placed there are checked for 0 hits)."""


@dataclass(frozen=True)
class Run:
    """One timed workload run: how many opens it made, in how many seconds (host clock)."""

    ops: int
    seconds: float

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


def open_loop(opens: int) -> tuple[str, int]:
    """The shell command for about ``opens`` opens of /proc/version, and the exact count."""
    per = max(1, min(PER_PROCESS, opens))
    rounds = max(1, opens // per)
    command = (
        f"f=$(for i in $(seq {per}); do echo /proc/version; done);"
        f" for r in $(seq {rounds}); do cat $f >/dev/null; done"
    )
    return command, per * rounds


def run_opens(vm: VM, opens: int, *, timeout: float = 600.0) -> Run:
    """Run the open loop in the guest and time it on the host."""
    command, count = open_loop(opens)
    start = time.perf_counter()
    vm.run(command, timeout=timeout, check=True)
    return Run(count, time.perf_counter() - start)


def unhit_functions(
    vm: VM, avoid: frozenset[str] = frozenset({HOT_FUNCTION, DENSE_FUNCTION})
) -> list[str]:
    """Core-kernel functions of subsystems the workload does not touch, by address."""
    return [
        sym.name
        for sym in vm.symbols.functions()
        if sym.name not in avoid and sym.name.startswith(UNHIT_PREFIXES)
    ]
