"""The in-guest reference: the guest kernel's own kprobes through tracefs ``kprobe_events``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from kprobevm.bench.report import HitRate
from kprobevm.bench.workload import HOT_FUNCTION, run_opens
from kprobevm.errors import VMError

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = ["GuestKprobeRun", "measure_guest_kprobe", "under_guest_kprobe"]

_TRACEFS = "/sys/kernel/tracing"
_EVENT = "bench/openat"

T = TypeVar("T")


@dataclass(frozen=True)
class GuestKprobeRun(Generic[T]):
    """What ran under the guest's own kprobe: the body's result and the event's
    ``kprobe_profile`` columns (hits, missed; None when the event is not listed)."""

    result: T
    profile: tuple[str, ...] | None


def under_guest_kprobe(
    vm: VM, event: str, probe: str, body: Callable[[], T], *, kind: str = "p"
) -> GuestKprobeRun[T] | str:
    """Place ``p:GROUP/EVENT PROBE...`` (``kind`` ``r``: a return probe) through the
    guest's tracefs (mounted if need be), enable it, run ``body``, read its
    ``kprobe_profile`` row, then disable and remove it whatever happened; the reason
    instead when tracefs would not take it."""
    setup = vm.run(
        f"cd {_TRACEFS} 2>/dev/null || {{ mount -t tracefs nodev {_TRACEFS} && cd {_TRACEFS}; }}"
        f" && echo '{kind}:{event} {probe}' >> kprobe_events"
        f" && echo 1 > events/{event}/enable"
    )
    if setup.returncode != 0:
        return f"tracefs setup failed: {setup.stderr.strip()}"
    try:
        result = body()
        profile = vm.run(f"cat {_TRACEFS}/kprobe_profile", check=True).stdout
    finally:
        vm.run(f"echo 0 > {_TRACEFS}/events/{event}/enable;"
               f" echo '-:{event}' >> {_TRACEFS}/kprobe_events")
    names = (event, event.split("/")[1])
    row = next((tuple(cols[1:]) for line in profile.splitlines()
                if (cols := line.split()) and cols[0] in names), None)  # fmt: skip
    return GuestKprobeRun(result, row)


def guest_probe_hits(
    vm: VM, event: str, probe: str, body: Callable[[], T], *, kind: str = "p"
) -> tuple[T, int]:
    """:func:`under_guest_kprobe` where the guest's probe is required: ``body``'s result
    and the probe's hits; the trace buffer emptied after. Raises :class:`VMError` when
    tracefs would not take the probe or its profile row is missing."""
    what = "kretprobe" if kind == "r" else "kprobe"
    run = under_guest_kprobe(vm, event, probe, body, kind=kind)
    if isinstance(run, str):
        raise VMError(f"the guest's own {what} was not placed: {run}")
    if run.profile is None:
        raise VMError(f"the guest's own {what} is not in kprobe_profile")
    vm.run(f"echo > {_TRACEFS}/trace")
    return run.result, int(run.profile[0])


def measure_guest_kprobe(vm: VM, opens: int) -> HitRate:
    """``p:bench/openat do_sys_openat2`` from the guest's tracefs over the workload."""
    name, description = "guest_kprobe", "guest kernel's own kprobe (tracefs)"
    run = under_guest_kprobe(vm, _EVENT, HOT_FUNCTION, lambda: run_opens(vm, opens))
    if isinstance(run, str):
        return HitRate(name, description, reason=run)
    if run.profile is None:
        return HitRate(name, description, reason=f"{_EVENT} not in kprobe_profile")
    hits, *missed = run.profile
    return HitRate(name, description, int(hits), run.result,
                   extra={"nmissed": float(missed[0])} if missed else {})  # fmt: skip
