"""funclatency on the shared guest: sleeps of a known length land in their log2 bucket,
as many calls as the guest's own return probe saw; two units and a recorded return event
on one function at once; a maxactive of one times one of two concurrent sleeps and
counts the other missed; bad input refused with nothing placed."""

from __future__ import annotations

import pytest

from kprobevm.errors import ProbeRefused
from kprobevm.guest.vm import VM
from kprobevm.kprobes.aggregations import Bucket
from kprobevm.pytest_plugin import ProbeSession
from kprobevm.tracing.maps import format_map
from tests.test_aggregations import gdbstub_reads, guest_trace_lines

pytestmark = pytest.mark.vm

SLEEPER = "hrtimer_nanosleep"  # nanosleep and clock_nanosleep both sleep in it
SLEEPS = 12


def _sleeps(n: int, seconds: str = "0.01") -> str:
    return f"i=0; while [ $i -lt {n} ]; do sleep {seconds}; i=$((i+1)); done"


def _guest_returns_of(vm: VM, command: str) -> int:
    """Returns of SLEEPER during ``command`` per the guest's own kretprobe (tracefs)."""
    return guest_trace_lines(vm, f"r:lat/ns {SLEEPER}", command, " ns: ")


def test_ten_millisecond_sleeps_land_in_the_8ms_bucket(
    vm: VM, kprobes: ProbeSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ``sleep 0.01`` is one call of about 10 ms: all in [8M, 16M) ns, as many as the
    guest's own kretprobe counts for the same loop (placed first, and gone before ours:
    the kernel's ftrace would rewrite the entry under our int3); none missed; read while
    the guest runs."""
    theirs = _guest_returns_of(vm, _sleeps(SLEEPS))  # (theirs gone before ours come)
    assert theirs == SLEEPS
    lat = kprobes.funclatency(SLEEPER)
    vm.run(_sleeps(SLEEPS), check=True)
    reads = gdbstub_reads(vm, monkeypatch, lat.layout.base)
    live = lat.read()
    assert reads == []  # read through shared RAM, the guest running
    lat.close()
    snap = lat.read()
    assert snap.total == live.total == theirs == lat.kp.nhit
    assert lat.missed() == 0
    (bucket,) = [b for b in snap.buckets if b.count]
    assert (bucket.lo, bucket.hi, bucket.count) == (8 << 20, 16 << 20, SLEEPS)
    text = format_map(f"nsecs[{SLEEPER}]", snap)
    assert text.splitlines()[1] == f"{'[8M, 16M)':<16}{SLEEPS:>8} |{'@' * 52}|"


def test_microseconds_beside_a_recorded_return_and_a_maxactive_of_one(
    vm: VM, kprobes: ProbeSession
) -> None:
    """Two latency probes (ns and us) and a recorded return event on one function share
    its hijack and return program: each sees the 3 calls, the 10 ms sleeps in [8M, 16M)
    ns and [8K, 16K) us. Then with maxactive 1, two concurrent 50 ms sleeps are one timed
    (about 50 ms: [32K, 64K) us) and one missed."""
    ns, us = kprobes.funclatency(SLEEPER), kprobes.funclatency(SLEEPER, unit="us")
    event = kprobes.event(f"r:slept {SLEEPER} ret=$retval:s64")
    kprobes.run(_sleeps(3), check=True)
    ns.close()
    us.close()
    assert [b for b in ns.read().buckets if b.count] == [Bucket(8 << 20, 16 << 20, 3)]
    assert [b for b in us.read().buckets if b.count] == [Bucket(8 << 10, 16 << 10, 3)]
    assert event.values("ret") == [0, 0, 0]
    one = kprobes.funclatency(SLEEPER, unit="us", maxactive=1)
    assert one.maxactive == 1
    vm.run("sleep 0.05 & sleep 0.05 & wait", check=True)
    one.close()
    assert [b for b in one.read().buckets if b.count] == [Bucket(32 << 10, 64 << 10, 1)]
    assert one.missed() == 1 == one.kp.nmissed


def test_bad_input_is_refused_with_nothing_placed(vm: VM) -> None:
    before = vm.list_kprobes()
    with pytest.raises(ProbeRefused, match="unit"):
        vm.funclatency(SLEEPER, unit="s")
    with pytest.raises(ProbeRefused):
        vm.funclatency("no_such_function_here")
    assert vm.list_kprobes() == before
