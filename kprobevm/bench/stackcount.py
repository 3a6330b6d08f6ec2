"""What ``count --by stack`` costs the guest per hit: the ``dd bs=1`` loop on ``vfs_read``
counted by stack in the guest (the guest's own ORC walk and a hash of the frames), over
the same loop unprobed, beside the guest kernel's own kprobe on ``vfs_read`` (tracefs,
no trigger: what a hit costs the kernel's kprobes at all) and the kernel's own count by
stack (the same kprobe with a ``hist:keys=stacktrace`` trigger); ``count --by cpu``
too, the same probe and program with no walk and a key of one word.

Timed as :mod:`kprobevm.bench.stacks` times recorded stacks: under QEMU's ``-icount``
(:func:`~kprobevm.bench.stacks.icount_qemu`) the guest's clock counts the instructions it
executes, so a run's guest time does not move with the host's load, and a hit's cost is
the instructions it adds. Each way runs ``reps`` times, interleaved, the order turned
each time; its fastest run counts. Every stack counted must be whole (no cut), and the
loop's must end at the system call entry, so no figure comes from a walk that stopped
early.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kprobevm.bench.guest import guest_probe_hits
from kprobevm.bench.sharedram import _dd_ns
from kprobevm.errors import VMError
from kprobevm.kprobes.aggregations import StackKey

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = ["WAYS", "StackCountFigures", "measure_stack_counts"]

WAYS = ("unprobed", "guest_kprobe", "guest_hist_stack", "count_by_cpu", "count_by_stack")
_TRACEFS = "/sys/kernel/tracing"
_HITS = re.compile(r"Hits: (\d+)")


@dataclass
class StackCountFigures:
    """Guest ns of each dd run by way, and the hits each probed way counted."""

    reads: int
    depth: int
    runs: dict[str, list[int]] = field(default_factory=lambda: {w: [] for w in WAYS})
    hits: dict[str, list[int]] = field(default_factory=lambda: {w: [] for w in WAYS})

    def per_hit(self, way: str) -> float:
        """Guest ns per hit over the unprobed loop, fastest run against fastest run."""
        hits = statistics.median(self.hits[way])
        return (min(self.runs[way]) - min(self.runs["unprobed"])) / max(hits, 1)

    def ratio(self, way: str) -> float:
        """``count_by_stack``'s cost per hit against ``way``'s."""
        return self.per_hit("count_by_stack") / self.per_hit(way)


def measure_stack_counts(vm: VM, reads: int, reps: int, depth: int) -> StackCountFigures:
    """Each way ``reps`` times (``reads`` one-byte reads a run), in turn, order rotated."""
    fig = StackCountFigures(reads, depth)
    for rep in range(reps):
        order = WAYS[rep % len(WAYS) :] + WAYS[: rep % len(WAYS)]
        for way in order:
            ns, hits = _run(vm, way, fig)
            fig.runs[way].append(ns)
            fig.hits[way].append(hits)
    return fig


def _run(vm: VM, way: str, fig: StackCountFigures) -> tuple[int, int]:
    n = fig.reads
    if way == "unprobed":
        return _dd_ns(vm, n), 0
    if way == "guest_kprobe":
        return guest_probe_hits(vm, "bench/rd", "vfs_read", lambda: _dd_ns(vm, n))
    if way == "guest_hist_stack":
        return _under_guest_hist(vm, lambda: _dd_ns(vm, n))
    if way == "count_by_cpu":  # the same probe and map with no walk: what the walk adds
        with vm.count_by("vfs_read", "cpu") as by_cpu:
            ns = _dd_ns(vm, n)
        return ns, by_cpu.read().total
    with vm.count_by("vfs_read", "stack", depth=fig.depth) as m:
        ns = _dd_ns(vm, n)
    snap = m.read()
    for key, _ in snap.counts:
        assert isinstance(key, StackKey)
        if key.cut:
            raise VMError(f"a stack was cut ({key.reason}): {key}")
    top = snap.counts[-1][0]
    assert isinstance(top, StackKey)
    if not vm.symbols.describe(top.frames[-1]).startswith("entry_SYSCALL_64"):
        raise VMError(f"the loop's stack does not end at the system call entry: {top}")
    return ns, snap.total


def _under_guest_hist(vm: VM, body: Callable[[], int]) -> tuple[int, int]:
    """``body`` under the guest's own kprobe on vfs_read with a hist trigger keyed by its
    stack: the body's result, and the hits the histogram counted."""
    trigger = f"{_TRACEFS}/events/bench/st/trigger"
    vm.run(f"echo 'p:bench/st vfs_read' >> {_TRACEFS}/kprobe_events &&"
           f" echo 'hist:keys=stacktrace' > {trigger}", check=True)  # fmt: skip
    try:
        ns = body()
        vm.run(f"echo 'hist:keys=stacktrace:pause' >> {trigger}", check=True)
        text = vm.run(f"cat {_TRACEFS}/events/bench/st/hist", check=True).stdout
    finally:
        vm.run(f"echo '!hist:keys=stacktrace' >> {trigger};"
               f" echo '-:bench/st' >> {_TRACEFS}/kprobe_events")  # fmt: skip
    found = _HITS.search(text)
    if found is None:
        raise VMError(f"the guest's hist has no Hits line:\n{text}")
    return ns, int(found[1])
