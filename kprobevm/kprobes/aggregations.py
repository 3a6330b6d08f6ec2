"""Aggregations computed in the guest: per-CPU counts by key and histograms, read by the host.

A probe registered with an :class:`Aggregation` in its :class:`RecordSpec` folds each hit
into a map in slot memory (:mod:`kprobevm.x86.aggregate`): no stop and no record per
hit. :class:`AggregateProbe` places such a probe and reads its map. A read is a
snapshot: with guest RAM shared it is read while the guest runs, the ``used`` words of
every hash entry first and then the whole map again, so each key counted is whole (a key
is written before its ``used`` word) and each counter is one aligned 8-byte word that
only its CPU writes (never torn); without shared RAM the VM is stopped for the read. The
per-CPU parts are summed on the host, as bpftrace sums its per-CPU maps.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from kprobevm.closing import Closing
from kprobevm.errors import KprobeError, ProbeRefused
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.x86 import aggregate as agg
from kprobevm.x86.aggregate import AggregateField, Key, MapLayout
from kprobevm.x86.funclatency import LatencyScale
from kprobevm.x86.orc_walk import CUT_REASONS, MAX_DEPTH, OrcWalkTables

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM
    from kprobevm.kprobes.recorder import Recorder

__all__ = [
    "DEFAULT_ENTRIES",
    "AggregateProbe",
    "Aggregation",
    "Bucket",
    "MapKey",
    "MapSnapshot",
    "StackKey",
    "decode_map",
]

DEFAULT_ENTRIES = 1024
"""Hash entries per CPU of a map keyed by pid or comm (3/4 of them take keys)."""
STACK_ENTRIES = 256
"""Hash entries per CPU of a map keyed by stack (an entry holds ``depth`` frames)."""
DEFAULT_DEPTH = 16
"""Frames of a stack key unless told (the kernel's hist trigger keeps as many)."""
MAX_LINEAR_BUCKETS = 1000
_ENTRY = struct.Struct("<QQQQ")
_HEADER = struct.Struct("<QQQ")


@dataclass(frozen=True)
class Aggregation:
    """What a probe folds its hits into: a count (by ``by``), or a histogram of ``field``
    (log2, or ``linear`` = (min, max, step) as bpftrace's ``lhist``), or a return probe's
    log2 histogram of its calls' ``latency`` (:mod:`kprobevm.kprobes.funclatency`)."""

    by: Key = "none"
    field: AggregateField | None = None
    linear: tuple[int, int, int] | None = None
    entries: int = DEFAULT_ENTRIES
    latency: LatencyScale | None = None
    depth: int = 0
    """Frames of a ``stack`` key (1..64)."""
    walk: OrcWalkTables | None = None
    """The guest's ORC tables, which a ``stack`` key's walk reads."""

    def __post_init__(self) -> None:
        stack = self.by == "stack"
        if stack != (self.walk is not None) or stack != (self.depth > 0):
            raise ValueError("a count by stack, and only it, has a depth and ORC tables")
        if not 0 <= self.depth <= MAX_DEPTH:
            raise ValueError(f"a stack key of {self.depth} frames: 1..{MAX_DEPTH}")
        if self.latency is not None and (self.field, self.linear, self.by) != (None, None, "none"):
            raise ValueError("a latency histogram has no field, linear buckets or key")
        if self.field is not None and self.by != "none":
            raise ValueError("a histogram has no key here: give by='none'")
        hashed = self.by in ("pid", "comm", "stack")
        if hashed and (self.entries < 8 or self.entries & (self.entries - 1)):
            raise ValueError(f"a table of {self.entries} entries: needs a power of two >= 8")
        if self.linear is not None:
            if any(not -(1 << 63) <= v < 1 << 64 for v in self.linear):
                raise ValueError(f"linear histogram {self.linear}: a bound is over 64 bits")
            if self.field is None:
                raise ValueError("a linear histogram needs a field")
            lo, hi, step = self.linear
            if step <= 0 or hi <= lo:
                raise ValueError(f"linear histogram {lo},{hi},{step}: needs min < max, step > 0")
            if math.ceil((hi - lo) / step) > MAX_LINEAR_BUCKETS:
                raise ValueError(f"linear histogram {lo},{hi},{step}: over "
                                 f"{MAX_LINEAR_BUCKETS} buckets")  # fmt: skip

    @property
    def kind(self) -> Literal["count", "hist", "lhist"]:
        """count, hist (log2) or lhist (linear)."""
        if self.field is None and self.latency is None:
            return "count"
        return "hist" if self.linear is None else "lhist"

    @property
    def buckets(self) -> int:
        """u64 values per CPU when there is no hash table."""
        if self.linear is not None:
            lo, hi, step = self.linear
            return 2 + math.ceil((hi - lo) / step)
        return agg.LOG2_BUCKETS if self.field is not None or self.latency else 1

    def layout(self, base: int, ncpus: int) -> MapLayout:
        """The map's layout at ``base`` for ``ncpus`` CPUs."""
        hashed = self.by in ("pid", "comm", "stack")
        return MapLayout(base=base, ncpus=ncpus, key=self.by, buckets=self.buckets,
                         entries=self.entries if hashed else 0, linear=self.linear,
                         depth=self.depth)  # fmt: skip


@dataclass(frozen=True)
class StackKey:
    """A kernel stack as the guest's walk keyed it: return addresses, innermost first
    (the probe's address + 1 first), and ``cut``, why the walk ended early (0: it
    reached the stack's end; :data:`~kprobevm.x86.orc_walk.CUT_REASONS`)."""

    frames: tuple[int, ...]
    cut: int = 0

    @property
    def reason(self) -> str:
        """Why the walk ended early ("" when it did not)."""
        return CUT_REASONS.get(self.cut, f"reason {self.cut}")

    def __str__(self) -> str:
        return " ".join(f"{f:#x}" for f in self.frames) + (f" [{self.reason}]" if self.cut else "")


MapKey = str | int | StackKey | None


@dataclass(frozen=True)
class Bucket:
    """One histogram bucket: values in [lo, hi) (None: unbounded on that side)."""

    lo: int | None
    hi: int | None
    count: int


@dataclass(frozen=True)
class MapSnapshot:
    """A map as read at one moment, summed over CPUs.

    ``counts``: (key, hits) of a count, ascending by hits as bpftrace prints them
    (key ``None`` for a count with no key, a :class:`StackKey` for a count by stack);
    ``buckets``: a histogram's, in value order.
    ``dropped``: hits with a new key after a CPU's table was full; ``faults``: hits whose
    field could not be read; ``keys``/``capacity``: keys held, and the most a table
    takes, per CPU (max over CPUs).
    """

    kind: Literal["count", "hist", "lhist"]
    by: Key
    counts: tuple[tuple[MapKey, int], ...] = ()
    buckets: tuple[Bucket, ...] = ()
    dropped: int = 0
    faults: int = 0
    keys: int = 0
    capacity: int = 0
    per_cpu: tuple[int, ...] = field(default=())
    """Hits counted in each CPU's region."""

    @property
    def total(self) -> int:
        """Hits counted in the map."""
        return sum(n for _, n in self.counts) + sum(b.count for b in self.buckets)

    def count_of(self, key: MapKey) -> int:
        """Hits counted for ``key`` (0: none)."""
        return sum(n for k, n in self.counts if k == key)


def _log2_bounds(i: int) -> tuple[int | None, int | None]:
    if i == 0:
        return None, 0
    if i == 1:
        return 0, 1
    return 1 << (i - 2), 1 << (i - 1)


def _linear_bounds(i: int, n: int, linear: tuple[int, int, int]) -> tuple[int | None, int | None]:
    lo, hi, step = linear
    if i == 0:
        return None, lo
    if i == n - 1:
        return hi, None
    return lo + (i - 1) * step, min(lo + i * step, hi)


def _stack_entries(
    layout: MapLayout, first: bytes, second: bytes, at: int, counts: dict[MapKey, int]
) -> int:
    """One CPU's stack entries (its region at ``at``) added to ``counts``; its hits."""
    words = layout.key_words
    entry = struct.Struct(f"<{words + 2}Q")
    here = 0
    for e in range(layout.entries):
        off = at + layout.body + layout.entry_size * e
        if not entry.unpack_from(first, off)[words]:
            continue  # not used when the first read was made
        values = entry.unpack_from(second, off)
        head, n = values[0], values[words + 1]
        depth = min(head & 0xFF, layout.depth)
        key = StackKey(tuple(values[1 : 1 + depth]), (head >> 8) & 0xFF)
        counts[key] = counts.get(key, 0) + n
        here += n
    return here


def decode_map(layout: MapLayout, first: bytes, second: bytes) -> MapSnapshot:
    """A snapshot from two reads of the map: ``first`` supplies the ``used`` words, and
    ``second`` (read after it) everything else."""
    kind: Literal["count", "hist", "lhist"]
    if layout.buckets == 1 and layout.linear is None:
        kind = "count"
    else:
        kind = "hist" if layout.linear is None else "lhist"
    dropped = faults = keys = 0
    per_cpu: list[int] = []
    counts: dict[MapKey, int] = {}
    values = [0] * layout.buckets
    for cpu in range(layout.ncpus):
        at = cpu * layout.stride
        cpu_dropped, cpu_keys, cpu_faults = _HEADER.unpack_from(second, at)
        dropped, faults, keys = dropped + cpu_dropped, faults + cpu_faults, max(keys, cpu_keys)
        body = at + agg.HEADER_SIZE
        here = 0
        if layout.key == "stack":
            here = _stack_entries(layout, first, second, at, counts)
        elif layout.hashed:
            for e in range(layout.entries):
                off = body + agg.ENTRY_SIZE * e
                if not _ENTRY.unpack_from(first, off)[2]:
                    continue  # not used when the first read was made
                key0, key1, _, n = _ENTRY.unpack_from(second, off)
                key: str | int
                if layout.key == "pid":
                    key = key0
                else:
                    raw = struct.pack("<QQ", key0, key1)
                    key = raw.split(b"\0", 1)[0].decode(errors="replace")
                counts[key] = counts.get(key, 0) + n
                here += n
        else:
            cpu_values = struct.unpack_from(f"<{layout.buckets}Q", second, body)
            here = sum(cpu_values)
            if layout.key == "cpu":
                if cpu_values[0]:
                    counts[cpu] = cpu_values[0]
            elif kind == "count":
                counts[None] = counts.get(None, 0) + cpu_values[0]
            values = [a + b for a, b in zip(values, cpu_values, strict=True)]
        per_cpu.append(here)
    buckets: tuple[Bucket, ...] = ()
    if kind != "count":
        bounds = [_log2_bounds(i) if layout.linear is None
                  else _linear_bounds(i, layout.buckets, layout.linear)
                  for i in range(layout.buckets)]  # fmt: skip
        buckets = tuple(Bucket(lo, hi, n) for (lo, hi), n in zip(bounds, values, strict=True))
    rows = tuple(sorted(counts.items(), key=lambda kv: (kv[1], str(kv[0]))))
    return MapSnapshot(kind=kind, by=layout.key, counts=rows if kind == "count" else (),
                       buckets=buckets, dropped=dropped, faults=faults, keys=keys,
                       capacity=layout.max_keys if layout.hashed else 0,
                       per_cpu=tuple(per_cpu))  # fmt: skip


class AggregateProbe(Closing):
    """A probe whose hits the guest folds into a map; :meth:`read` snapshots it.

    ``close()`` unregisters the probe, waits until no vCPU can still update the map,
    and keeps the last snapshot in :attr:`final`.
    """

    def __init__(self, vm: VM, kp: Kprobe, aggregation: Aggregation) -> None:
        """Register ``kp`` (no handlers of its own) to fold its hits into a map."""
        if kp.pre_handler is not None or kp.post_handler is not None or kp.record is not None:
            raise ProbeRefused("EINVAL", "an aggregating probe has no handlers or record of "
                               "its own", symbol=kp.symbol_name)  # fmt: skip
        self.vm = vm
        self.kp = kp
        self.aggregation = aggregation
        kp.record = RecordSpec(count_only=True, aggregate=aggregation)
        vm.register_kprobe(kp)
        if kp.record_id is None:
            raise KprobeError("an aggregating probe was registered without a record id",
                              symbol=kp.symbol_name)  # fmt: skip
        self.recorder: Recorder = self._recorder(vm)
        self.layout = self.recorder.maps[kp.record_id]
        self.final: MapSnapshot | None = None

    @staticmethod
    def _recorder(vm: VM) -> Recorder:
        recorder = getattr(vm.kprobes.channel, "recorder", None)
        if recorder is None:
            raise KprobeError(f"the {vm.trap_channel} channel keeps no maps in the guest")
        return recorder  # type: ignore[no-any-return]

    def _read_twice(self, *, stop: bool = False) -> tuple[bytes, bytes]:
        base, size = self.layout.base, self.layout.size
        direct = self.recorder.direct
        if direct is not None and not stop:
            first = direct.read_virt(base, size)
            second = direct.read_virt(base, size) if first is not None else None
            if first is not None and second is not None:
                return first, second
        with self.vm.target.stopped():
            data = self.vm.memory.read(base, size)
        return data, data

    def read(self, *, stop: bool = False) -> MapSnapshot:
        """The map now (the last one once closed). With guest RAM shared it is read while
        the guest runs, each CPU's region a moment after the one before; ``stop`` holds
        the VM stopped for the read instead: every CPU's counts at one instant."""
        if self.final is not None:
            return self.final
        return decode_map(self.layout, *self._read_twice(stop=stop))

    def close(self) -> None:
        """Unregister, wait for hits in flight, read the map one last time (once)."""
        if self.final is not None:
            return
        self.vm.unregister_kprobe(self.kp)
        self.vm.settle_records()
        self.final = decode_map(self.layout, *self._read_twice())
