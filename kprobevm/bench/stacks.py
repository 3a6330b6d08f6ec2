"""What a recorded stack trace costs the guest: the ``dd bs=1`` loop on ``vfs_read``
recorded without a stack and with one (``trace --stacktrace``'s stack copy), each per
hit over the same loop unprobed, as :mod:`kprobevm.bench.sharedram` measures.

The guest's own kprobe with ``options/stacktrace`` is measured beside them for scale.
Every stack the host unwinds is checked to end in the system call entry, so a figure
never comes from a walk that stopped early.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.bench.guest import under_guest_kprobe
from kprobevm.bench.sharedram import DD_EVENT, _dd_ns
from kprobevm.errors import VMError
from kprobevm.tracing import ProbeEvent, parse_event
from kprobevm.tracing.session import TraceSession, plan_events

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = ["StackRound", "measure_stack_round"]

_TRACEFS = "/sys/kernel/tracing"
_SYSCALL_ENTRY = "entry_SYSCALL_64_after_hwframe+"


@dataclass(frozen=True)
class StackRound:
    """One round: guest ns per hit over the unprobed dd loop, each way."""

    unprobed_ns: int
    recorded_ns_per_hit: float
    stack_ns_per_hit: float
    guest_stacktrace_ns_per_hit: float
    recorded_hits: int
    stack_hits: int
    recorded_stops: int
    stack_stops: int
    stack_size: int

    @property
    def ratio(self) -> float:
        """A recorded hit with its stack against one without (the goal: at most 2)."""
        return self.stack_ns_per_hit / self.recorded_ns_per_hit


def _recorded(vm: VM, n: int, *, stacktrace: bool, stack_size: int) -> tuple[int, int, int]:
    """The dd loop under ``trace --mode record`` (``--stacktrace``): ns, hits, VM stops."""
    event = parse_event(DD_EVENT)
    assert isinstance(event, ProbeEvent)
    session = TraceSession(
        vm, plan_events(vm, [event]), mode="record", stacktrace=stacktrace, stack_size=stack_size
    )
    with session:
        stops = vm.target.stops
        ns = _dd_ns(vm, n)
        stops = vm.target.stops - stops
    hits = 0
    for hit in session.drain():
        hits += 1
        if stacktrace and not (hit.stack and hit.stack[-1].startswith(_SYSCALL_ENTRY)):
            raise VMError(f"a recorded stack ended early: {hit.stack}")
    return ns, hits, stops


def _guest_stacktrace_ns(vm: VM, n: int) -> tuple[int, int]:
    """The dd loop under the guest's own kprobe with ``options/stacktrace``: ns, hits."""
    vm.run(f"echo 1 > {_TRACEFS}/options/stacktrace")
    try:
        run = under_guest_kprobe(vm, "bench/rd", DD_EVENT.split(" ", 1)[1], lambda: _dd_ns(vm, n))
    finally:
        vm.run(f"echo 0 > {_TRACEFS}/options/stacktrace; echo > {_TRACEFS}/trace")
    if isinstance(run, str) or run.profile is None:
        raise VMError(f"the guest's own kprobe was not placed: {run}")
    return run.result, int(run.profile[0])


def measure_stack_round(vm: VM, n: int, stack_size: int) -> StackRound:
    """Unprobed, recorded, recorded with the stack, the guest's kprobe with its stack."""
    base = _dd_ns(vm, n)
    rec_ns, rec_hits, rec_stops = _recorded(vm, n, stacktrace=False, stack_size=stack_size)
    stk_ns, stk_hits, stk_stops = _recorded(vm, n, stacktrace=True, stack_size=stack_size)
    guest_ns, guest_hits = _guest_stacktrace_ns(vm, n)
    return StackRound(
        unprobed_ns=base,
        recorded_ns_per_hit=(rec_ns - base) / max(rec_hits, 1),
        stack_ns_per_hit=(stk_ns - base) / max(stk_hits, 1),
        guest_stacktrace_ns_per_hit=(guest_ns - base) / max(guest_hits, 1),
        recorded_hits=rec_hits, stack_hits=stk_hits, recorded_stops=rec_stops,
        stack_stops=stk_stops, stack_size=stack_size,
    )  # fmt: skip
