"""funclatency: a function's call latencies as a log2 histogram kept in the guest.

bcc's ``funclatency FUNC`` as kprobevm runs it: a recorded return probe on the function
(:mod:`kprobevm.kprobes.retrecord`) whose hijack keeps each call's entry time, and whose
return program folds the call's latency into a per-CPU log2 histogram
(:mod:`kprobevm.x86.funclatency`): no stop and no record per call. The histogram is read
as any aggregation's map (:class:`~kprobevm.kprobes.aggregations.AggregateProbe`), while
the guest runs. Calls that could not be timed (``maxactive`` calls in flight, no free
entry in the return table, a return with no stamp) are the probe's ``nmissed``, as the
kernel counts a kretprobe's.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from kprobevm.errors import KprobeError, ProbeRefused
from kprobevm.kprobes.aggregations import AggregateProbe, Aggregation, MapSnapshot, decode_map
from kprobevm.kprobes.kretprobes import Kretprobe
from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.x86.funclatency import UNITS, LatencyScale, Unit

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = ["FuncLatency", "guest_tsc_khz"]

_COUNTERS = struct.Struct("<QQ")


def guest_tsc_khz(vm: VM) -> int:
    """The guest kernel's ``tsc_khz``: the TSC's rate as the kernel calibrated it."""
    if "tsc_khz" not in vm.symbols:
        raise KprobeError("the guest kernel has no tsc_khz symbol: no TSC rate to scale by")
    return int.from_bytes(vm.read(vm.symbols["tsc_khz"], 4), "little")


class FuncLatency(AggregateProbe):
    """The latencies of ``function``'s calls in ``unit`` (ns, us or ms), a log2 histogram
    in the guest; :meth:`read` snapshots it, :meth:`missed` counts the calls not timed.

    ``close()`` unregisters the return probe, waits until no vCPU can still update the
    map and keeps the last snapshot. Calls still in flight then return without being
    counted.
    """

    def __init__(
        self, vm: VM, function: str | int, *, unit: str = "ns", maxactive: int = 0
    ) -> None:
        """Place the return probe (``maxactive`` 0: the kernel's default bound)."""
        if unit not in UNITS:
            raise ProbeRefused("EINVAL", f"latency unit {unit!r}: one of {', '.join(UNITS)}")
        if maxactive < 0:
            raise ProbeRefused("EINVAL", f"maxactive {maxactive}: 0 (the default) or more")
        khz = guest_tsc_khz(vm)
        if not 0 < khz < 1 << 31:
            raise KprobeError(f"the guest's tsc_khz reads {khz}: not a TSC rate to scale by")
        self.vm = vm
        self.unit: Unit = unit
        self.scale = LatencyScale(self.unit, khz)
        self.aggregation = Aggregation(latency=self.scale)
        named = isinstance(function, str)
        self.rp = Kretprobe(
            symbol_name=function if isinstance(function, str) else None,
            addr=None if named else int(function), maxactive=maxactive,
            record=RecordSpec(count_only=True, aggregate=self.aggregation),
        )  # fmt: skip
        vm.register_kretprobe(self.rp)
        try:
            self.recorder = self._recorder(vm)
            kp = self.rp.recorded
            if kp is None or kp.record_id is None:
                raise KprobeError("a latency probe was registered without a record id",
                                  symbol=self.rp.symbol_name)  # fmt: skip
        except KprobeError:
            vm.unregister_kretprobe(self.rp)  # nothing left behind
            raise
        self.kp = kp
        self.function = function if isinstance(function, str) else vm.symbols.describe(function)
        self.layout = self.recorder.maps[kp.record_id]
        self.final: MapSnapshot | None = None
        self._final_missed = 0

    @property
    def maxactive(self) -> int:
        """Calls timed at once at most (the kernel's default when 0 was given)."""
        return self.rp.maxactive

    def missed(self) -> int:
        """Calls not timed so far: over ``maxactive``, no room in the return table, or no
        entry stamp at the return (read from the guest's counter; final once closed)."""
        if self.final is not None:
            return self._final_missed
        assert self.kp.record_id is not None
        address = self.recorder.layout.counters + 16 * self.kp.record_id
        direct = self.recorder.direct
        raw = direct.read_virt(address, 16) if direct is not None else None
        if raw is None:
            with self.vm.target.stopped():
                raw = self.vm.memory.read(address, 16)
        return int(_COUNTERS.unpack(raw)[1])

    def close(self) -> None:
        """Unregister, wait for returns in flight through the program, read the map and
        the missed count one last time (once)."""
        if self.final is not None:
            return
        self.vm.unregister_kretprobe(self.rp)
        self.vm.settle_records()
        self._final_missed = self.kp.nmissed
        self.final = decode_map(self.layout, *self._read_twice())
