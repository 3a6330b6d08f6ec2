"""What funclatency costs the guest per call, against the guest kernel's own kprobe and
kretprobe on the same function.

The workload is :mod:`kprobevm.bench.sharedram`'s: a ``dd bs=1`` loop (one ``vfs_read``
per byte) timed by the guest's monotonic clock. Each round times it unprobed, under the
guest's own ``p:rd vfs_read count=%dx:u64`` and ``r:rr vfs_read`` (tracefs, a trace
record per hit), and under ``funclatency vfs_read`` (the guest keeps each call's entry
time and counts its latency in a map at the return, no record), each bracketed by the
loop unprobed; a cost per hit is the time over the mean of its two unprobed loops
divided by the hits that probe saw. Every figure of a round comes from the same guest in
the same minute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.bench.guest import guest_probe_hits
from kprobevm.bench.sharedram import _dd_ns, _guest_kprobe_ns

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM
    from kprobevm.kprobes.aggregations import MapSnapshot

__all__ = ["FUNCTION", "LatencyRound", "measure_funclatency"]

FUNCTION = "vfs_read"


@dataclass(frozen=True)
class LatencyRound:
    """One round: guest ns per hit of each probe over the unprobed loop, and what
    funclatency counted."""

    unprobed_ns: int
    """The unprobed loop's mean over the round."""
    guest_kprobe_ns_per_hit: float
    guest_kretprobe_ns_per_hit: float
    funclatency_ns_per_hit: float
    calls: int
    """Calls funclatency timed."""
    missed: int
    vm_stops: int
    """VM stops while funclatency's loop ran (placing, removing and reading excluded)."""
    buckets: tuple[tuple[int | None, int | None, int], ...]
    """funclatency's histogram (ns): (lo, hi, calls) of the buckets with calls."""


def _guest_kretprobe_ns(vm: VM, n: int) -> tuple[int, int]:
    """The dd loop under the guest's own ``r:rr vfs_read`` (tracefs): ns, hits."""
    return guest_probe_hits(vm, "bench/rr", FUNCTION, lambda: _dd_ns(vm, n), kind="r")


def measure_funclatency(vm: VM, n: int, *, reverse: bool = False) -> LatencyRound:
    """One round of the dd loop of ``n`` bytes under each probe, each run bracketed by
    the loop unprobed just before and just after it. ``reverse``: the probes in the
    opposite order (alternate rounds so that none always goes first)."""
    kept: list[tuple[MapSnapshot, int, int]] = []  # funclatency's map, missed, VM stops

    def ours() -> tuple[int, int]:
        with vm.funclatency(FUNCTION) as lat:
            vm.kprobes.optimizer.settle()  # jumps in first: the optimizer's looks stop the guest
            before = vm.target.stops
            ns = _dd_ns(vm, n)
            stops = vm.target.stops - before
        kept.append((lat.read(), lat.missed(), stops))
        return ns, lat.read().total

    runs: dict[str, Callable[[], tuple[int, int]]] = {
        "guest_kprobe": lambda: _guest_kprobe_ns(vm, n),
        "guest_kretprobe": lambda: _guest_kretprobe_ns(vm, n),
        "funclatency": ours,
    }
    per_hit: dict[str, float] = {}
    hits: dict[str, int] = {}
    bases = [_dd_ns(vm, n)]
    for name in reversed(runs) if reverse else runs:
        ns, hits[name] = runs[name]()
        bases.append(_dd_ns(vm, n))
        per_hit[name] = (ns - (bases[-2] + bases[-1]) / 2) / max(hits[name], 1)
    ((snap, missed, stops),) = kept
    return LatencyRound(
        unprobed_ns=sum(bases) // len(bases),
        guest_kprobe_ns_per_hit=per_hit["guest_kprobe"],
        guest_kretprobe_ns_per_hit=per_hit["guest_kretprobe"],
        funclatency_ns_per_hit=per_hit["funclatency"],
        calls=hits["funclatency"], missed=missed, vm_stops=stops,
        buckets=tuple((b.lo, b.hi, b.count) for b in snap.buckets if b.count),
    )  # fmt: skip
