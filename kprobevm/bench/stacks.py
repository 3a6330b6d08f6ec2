"""What a recorded stack trace costs the guest: the ``dd bs=1`` loop on ``vfs_read``
recorded without a stack and with one (``trace --stacktrace``'s stack copy), each per
hit over the same loop unprobed, timed by the guest's own clock as
:mod:`kprobevm.bench.sharedram` does.

On a loaded host the guest's clock runs on while its vCPU thread waits for a core, so
one dd run can take twice as long as the next for no reason of the guest's. The guest
therefore runs under QEMU's ``-icount`` (:func:`icount_qemu`): its clock counts the
instructions it executes (1 ns each with ``shift=0``), so a dd run takes the same guest
time whatever the host does (measured: 43.50 ms for 30,000 reads, four runs within
0.03%), and a hit's cost is the instructions it adds. A VM stop the host asks for costs
the guest nothing on that clock, but one the guest's drain store brings moves it on by
0.1-0.25 ms (QEMU's clock, not guest work: ``sleep=off`` makes it 1.5-2.9 ms), so the
stops of the runs counted are told beside the figures. Each way still runs ``reps``
times, interleaved, and its fastest run counts (on a wall clock: the run the host
disturbed least). The guest's own kprobe with ``options/stacktrace`` is measured the
same way, for scale. Every stack the host unwinds is checked to end at the system call
entry, so no figure comes from a walk that stopped early.
"""

from __future__ import annotations

import os
import shlex
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kprobevm.bench.sharedram import DD_EVENT, _dd_ns
from kprobevm.errors import VMError
from kprobevm.tracing import ProbeEvent, parse_event
from kprobevm.tracing.session import TraceSession, plan_events

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = ["WAYS", "StackFigures", "icount_qemu", "measure_stacks"]

_TRACEFS = "/sys/kernel/tracing"
_SYSCALL_ENTRY = "entry_SYSCALL_64_after_hwframe+"
WAYS = ("unprobed", "recorded", "recorded_stack", "guest_stacktrace")


@dataclass
class StackFigures:
    """Guest ns of each dd run, by way; hits and VM stops of the probed ways."""

    reads: int
    stack_size: int
    runs: dict[str, list[int]] = field(default_factory=lambda: {w: [] for w in WAYS})
    hits: dict[str, list[int]] = field(default_factory=lambda: {w: [] for w in WAYS})
    stops: dict[str, list[int]] = field(default_factory=lambda: {w: [] for w in WAYS})

    def per_hit(self, way: str) -> float:
        """Guest ns per hit over the unprobed loop, fastest run against fastest run."""
        hits = statistics.median(self.hits[way])
        return (min(self.runs[way]) - min(self.runs["unprobed"])) / max(hits, 1)

    def fastest_stops(self, way: str) -> int:
        """VM stops during the run :meth:`per_hit` counts: under ``-icount`` each moves
        the guest's clock on while the vCPU stands stopped, so they say how much of
        that figure is not the guest's work."""
        runs = self.runs[way]
        return self.stops[way][runs.index(min(runs))] if self.stops[way] else 0

    @property
    def ratio(self) -> float:
        """A recorded hit with its stack against one without (the goal: at most 2)."""
        return self.per_hit("recorded_stack") / self.per_hit("recorded")


def icount_qemu(qemu: str, directory: Path, shift: int = 0) -> Path:
    """A QEMU wrapper in ``directory`` that runs ``qemu`` with ``-icount shift=SHIFT``:
    the guest's clock then advances 2**SHIFT ns per instruction it executes."""
    wrapper = directory / "qemu-icount"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(qemu)} "$@" -icount shift={shift},sleep=on\n')
    os.chmod(wrapper, 0o755)
    return wrapper


def _session(vm: VM, *, stacktrace: bool, stack_size: int) -> TraceSession:
    event = parse_event(DD_EVENT)
    assert isinstance(event, ProbeEvent)
    return TraceSession(
        vm, plan_events(vm, [event]), mode="record", stacktrace=stacktrace, stack_size=stack_size
    )


def _checked_hits(session: TraceSession, stacktrace: bool) -> int:
    hits = 0
    for hit in session.drain():
        hits += 1
        if stacktrace and not (hit.stack and hit.stack[-1].startswith(_SYSCALL_ENTRY)):
            raise VMError(f"a recorded stack ended early: {hit.stack} ({hit.stack_cut})")
    return hits


def measure_stacks(vm: VM, reads: int, stack_size: int, reps: int) -> StackFigures:
    """Each way ``reps`` times (``reads`` one-byte reads a run), in turn, order rotated."""
    fig = StackFigures(reads, stack_size)
    for rep in range(reps):
        order = WAYS[rep % len(WAYS) :] + WAYS[: rep % len(WAYS)]
        for way in order:
            _measure(vm, way, fig)
    return fig


def _measure(vm: VM, way: str, fig: StackFigures) -> None:
    n = fig.reads
    if way == "unprobed":
        fig.runs[way].append(_dd_ns(vm, n))
        return
    if way == "guest_stacktrace":
        ns, hits = _under_guest_stacktrace(vm, lambda: _dd_ns(vm, n))
        fig.runs[way].append(ns)
        fig.hits[way].append(hits)
        return
    stacktrace = way == "recorded_stack"
    with _session(vm, stacktrace=stacktrace, stack_size=fig.stack_size) as session:
        vm.kprobes.optimizer.settle()  # jumps in first: the optimizer's looks stop the guest
        stops = vm.target.stops
        fig.runs[way].append(_dd_ns(vm, n))
        fig.stops[way].append(vm.target.stops - stops)
    fig.hits[way].append(_checked_hits(session, stacktrace))


def _under_guest_stacktrace(vm: VM, body: Callable[[], int]) -> tuple[int, int]:
    """``body`` under the guest's own ``p:bench/rd`` kprobe with ``options/stacktrace``:
    its result, and the probe's hits from ``kprobe_profile``."""
    probe = DD_EVENT.split(" ", 1)[1]
    vm.run(
        f"echo 'p:bench/rd {probe}' >> {_TRACEFS}/kprobe_events;"
        f" echo 1 > {_TRACEFS}/options/stacktrace; echo 1 > {_TRACEFS}/events/bench/rd/enable",
        check=True,
    )
    try:
        ns = body()
        profile = vm.run(f"cat {_TRACEFS}/kprobe_profile", check=True).stdout
    finally:
        vm.run(
            f"echo 0 > {_TRACEFS}/events/bench/rd/enable; echo 0 > {_TRACEFS}/options/stacktrace;"
            f" echo '-:bench/rd' >> {_TRACEFS}/kprobe_events; echo > {_TRACEFS}/trace"
        )
    hits = next((int(cols[1]) for line in profile.splitlines()
                 if (cols := line.split()) and cols[0] in ("bench/rd", "rd")), 0)  # fmt: skip
    if not hits:
        raise VMError(f"the guest's kprobe_profile has no bench/rd hits:\n{profile}")
    return ns, hits
