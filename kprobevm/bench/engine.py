"""kprobevm's contenders: empty handler, a handler that reads arguments and a string, a
return probe, the same two handlers on recorded probes (the guest records each hit, the
handler runs from the record), and the engine over a real gdb (``VM.transport = "gdbmi"``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.bench.report import HitRate
from kprobevm.bench.workload import HOT_FUNCTION, Run, run_opens
from kprobevm.errors import GuestFaultError, KprobeVMError
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.x86.ptregs import PtRegs
from kprobevm.x86.record import Capture

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = [
    "TrapSample",
    "measure_args",
    "measure_empty",
    "measure_kretprobe",
    "measure_recorded",
    "per_hit_breakdown",
]

#: What the args handler reads from a recorded hit: the file name (user memory).
FILE_NAME = RecordSpec(captures=(Capture(offset=0, size=256, reg="si", string=True, user=True),))


@dataclass(frozen=True)
class TrapSample:
    """The engine's trap counters over one run (nanoseconds summed over ``hits``)."""

    hits: int
    regs_ns: int
    handler_ns: int
    writeback_ns: int


def _trap_counters(vm: VM) -> TrapSample:
    s = vm.kprobes.channel.stats
    return TrapSample(s.hits, s.regs_ns, s.handler_ns, s.writeback_ns)


def _probe_run(vm: VM, name: str, description: str, opens: int,
               handler: Callable[[Kprobe, PtRegs], object],
               function: str = HOT_FUNCTION,
               record: RecordSpec | None = None) -> tuple[HitRate, TrapSample]:
    kp = Kprobe(symbol_name=function, pre_handler=handler, record=record)
    try:
        vm.register_kprobe(kp)
    except KprobeVMError as exc:
        return HitRate(name, description, reason=f"register failed: {exc}"), TrapSample(0, 0, 0, 0)
    try:
        before = _trap_counters(vm)
        run = run_opens(vm, opens)
        if record is not None:  # the clock runs until the last recorded hit is handled
            start = time.perf_counter()
            vm.kprobes.flush_records()
            run = Run(run.ops, run.seconds + time.perf_counter() - start)
        after = _trap_counters(vm)
        hits = kp.nhit
    finally:
        vm.unregister_kprobe(kp)
    delta = TrapSample(after.hits - before.hits, after.regs_ns - before.regs_ns,
                       after.handler_ns - before.handler_ns,
                       after.writeback_ns - before.writeback_ns)
    extra = {"trap_channel_hits": float(delta.hits)}
    return HitRate(name, description, hits, run, extra=extra), delta


def measure_empty(vm: VM, opens: int, *, name: str = "kprobevm",
                  description: str = "kprobevm, empty handler",
                  function: str = HOT_FUNCTION) -> tuple[HitRate, TrapSample]:
    """A kprobe with a handler that does nothing: the engine's own cost per hit."""
    return _probe_run(vm, name, description, opens, lambda kp, regs: None, function)


def measure_recorded(vm: VM, opens: int, *, args: bool = False) -> HitRate:
    """A recorded probe: an empty handler, or (``args``) the args handler, fed from records."""
    if args:
        name, description = "kprobevm_recorded_args", "kprobevm recorded, 2 args + file name"
        handler, spec = _args_handler()[0], FILE_NAME
    else:
        name, description = "kprobevm_recorded", "kprobevm recorded, empty handler"
        handler, spec = (lambda kp, regs: None), RecordSpec()
    return _probe_run(vm, name, description, opens, handler, record=spec)[0]


def _args_handler() -> tuple[Callable[[Kprobe, PtRegs], None], list[int]]:
    """Reads dfd, the open_how pointer and the file name; counts the reads that fault."""
    faults = [0]

    def handler(kp: Kprobe, regs: PtRegs) -> None:
        _dfd, _how = regs.di, regs.dx
        assert regs.memory is not None
        try:
            regs.memory.cstring(regs.si, 256)
        except GuestFaultError:
            faults[0] += 1  # the user page is not mapped (yet): the kernel would fault it in

    return handler, faults


def measure_args(vm: VM, opens: int) -> tuple[HitRate, TrapSample]:
    """A handler that reads dfd, the open_how pointer, and the file name from user memory."""
    handler, faults = _args_handler()
    hr, sample = _probe_run(vm, "kprobevm_args", "kprobevm, reads 2 args + file name",
                            opens, handler)
    extra = {**hr.extra, "user_string_faults": float(faults[0])}
    return HitRate(hr.name, hr.description, hr.hits, hr.run, hr.reason, extra), sample


def measure_kretprobe(vm: VM, opens: int) -> HitRate:
    """A return probe with an empty handler (kprobevm's Kretprobe)."""
    name, description = "kprobevm_kretprobe", "kprobevm, return probe"
    try:
        from kprobevm.kprobes.kretprobes import Kretprobe
    except ImportError as exc:
        return HitRate(name, description, reason=f"kprobevm.kprobes.kretprobes missing ({exc})")
    rp = Kretprobe(symbol_name=HOT_FUNCTION, handler=lambda ri, regs: None, maxactive=16)
    try:
        vm.register_kretprobe(rp)
    except (KprobeVMError, AttributeError) as exc:
        return HitRate(name, description, reason=f"register failed: {exc}")
    try:
        run = run_opens(vm, opens)
        hits, missed = rp.nhit, rp.nmissed
    finally:
        vm.unregister_kretprobe(rp)
    return HitRate(name, description, hits, run, extra={"nmissed": float(missed)})


def per_hit_breakdown(sample: TrapSample, probed: Run, baseline: Run) -> dict[str, float]:
    """Where one hit's time goes, in microseconds.

    The host's parts come from the engine's counters; the whole cost of a hit is the
    run's extra time over the unprobed rate, per hit; what remains is the stop, the
    trap thread's wake-up and the resume (QEMU and the socket).
    """
    if sample.hits == 0:
        return {}
    n = sample.hits
    host = {"regs": sample.regs_ns / n / 1e3, "handler": sample.handler_ns / n / 1e3,
            "writeback": sample.writeback_ns / n / 1e3}
    unprobed_s = probed.ops / baseline.ops_per_s if baseline.ops_per_s else 0.0
    total = max(probed.seconds - unprobed_s, 0.0) / n * 1e6
    return {**host, "stop_resume_derived": max(total - sum(host.values()), 0.0),
            "total_derived": total}
