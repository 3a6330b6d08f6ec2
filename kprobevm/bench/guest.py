"""The in-guest reference: the guest kernel's own kprobes through tracefs ``kprobe_events``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kprobevm.bench.report import HitRate
from kprobevm.bench.workload import HOT_FUNCTION, run_opens

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = ["measure_guest_kprobe"]

_TRACEFS = "/sys/kernel/tracing"
_EVENT = "bench/openat"


def measure_guest_kprobe(vm: VM, opens: int) -> HitRate:
    """Place ``p:bench/openat do_sys_openat2``, enable it, run the workload, read
    ``kprobe_profile``, then disable and remove it."""
    name, description = "guest_kprobe", "guest kernel's own kprobe (tracefs)"
    setup = vm.run(
        f"cd {_TRACEFS} 2>/dev/null || {{ mount -t tracefs nodev {_TRACEFS} && cd {_TRACEFS}; }}"
        f" && echo 'p:{_EVENT} {HOT_FUNCTION}' >> kprobe_events"
        f" && echo 1 > events/{_EVENT}/enable"
    )
    if setup.returncode != 0:
        return HitRate(name, description, reason=f"tracefs setup failed: {setup.stderr.strip()}")
    try:
        run = run_opens(vm, opens)
        profile = vm.run(f"cat {_TRACEFS}/kprobe_profile", check=True).stdout
    finally:
        vm.run(f"echo 0 > {_TRACEFS}/events/{_EVENT}/enable;"
               f" echo '-:{_EVENT}' >> {_TRACEFS}/kprobe_events")
    for line in profile.splitlines():
        cols = line.split()
        if cols and cols[0] in (_EVENT, _EVENT.split("/")[1]):
            return HitRate(name, description, int(cols[1]), run,
                           extra={"nmissed": float(cols[2])} if len(cols) > 2 else {})
    return HitRate(name, description, reason=f"{_EVENT} not in kprobe_profile")
