"""What a map kept in the guest costs it per hit, against the guest kernel's own kprobe.

The workload is :mod:`kprobevm.bench.sharedram`'s: a ``dd bs=1`` loop (one ``vfs_read``
per byte) timed by the guest's monotonic clock. Each round times it unprobed, under the
guest's own ``p:rd vfs_read count=%dx:u64`` (tracefs), under ``hist`` of that count and
under ``count --by comm`` of ``vfs_read``, each bracketed by the loop unprobed; a cost
per hit is the time over the mean of its two unprobed loops divided by the hits that
probe saw. Every figure of a round comes from the same guest in the same minute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.bench.sharedram import DD_EVENT, _dd_ns, _guest_kprobe_ns

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM
    from kprobevm.kprobes.aggregations import AggregateProbe

__all__ = ["MapRound", "measure_maps"]


@dataclass(frozen=True)
class MapRound:
    """One round: guest ns per hit of each probe over the unprobed loop."""

    unprobed_ns: int
    """The unprobed loop's mean over the round."""
    guest_kprobe_ns_per_hit: float
    hist_ns_per_hit: float
    count_by_comm_ns_per_hit: float
    hist_hits: int
    count_hits: int
    vm_stops: int
    """VM stops while the two maps' loops ran (placing, removing and reading excluded)."""


def _probed_ns(vm: VM, n: int, place: Callable[[], AggregateProbe]) -> tuple[int, int, int]:
    """The loop under the map ``place()`` puts in: guest ns, the map's hits, VM stops
    while the loop ran (placing and removing excluded)."""
    with place() as placed:
        vm.kprobes.optimizer.settle()  # jumps in first: the optimizer's looks stop the guest
        before = vm.target.stops
        ns = _dd_ns(vm, n)
        stops = vm.target.stops - before
    return ns, placed.read().total, stops


def measure_maps(vm: VM, n: int, *, reverse: bool = False) -> MapRound:
    """One round of the dd loop of ``n`` bytes under each probe, each run bracketed by
    the loop unprobed just before and just after it (the host's load moves the guest's
    clock, and only neighbouring runs see the same load). ``reverse``: the probes in the
    opposite order (alternate rounds so that none always goes first)."""

    def guest() -> tuple[int, int, int]:
        ns, hits = _guest_kprobe_ns(vm, n)
        return ns, hits, 0

    runs: dict[str, Callable[[], tuple[int, int, int]]] = {
        "guest": guest,
        "hist": lambda: _probed_ns(vm, n, lambda: vm.hist(DD_EVENT, "count")),
        "count": lambda: _probed_ns(vm, n, lambda: vm.count_by("vfs_read", "comm")),
    }
    per_hit: dict[str, float] = {}
    hits: dict[str, int] = {}
    stops, bases = 0, [_dd_ns(vm, n)]
    for name in reversed(runs) if reverse else runs:
        ns, hits[name], run_stops = runs[name]()
        bases.append(_dd_ns(vm, n))
        stops += run_stops
        per_hit[name] = (ns - (bases[-2] + bases[-1]) / 2) / max(hits[name], 1)
    return MapRound(
        unprobed_ns=sum(bases) // len(bases),
        guest_kprobe_ns_per_hit=per_hit["guest"],
        hist_ns_per_hit=per_hit["hist"],
        count_by_comm_ns_per_hit=per_hit["count"],
        hist_hits=hits["hist"], count_hits=hits["count"], vm_stops=stops,
    )  # fmt: skip
