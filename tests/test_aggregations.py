"""Maps kept in the guest, on the shared guest: counts by comm and pid against the
guest's own tracefs, histograms of a known workload's read sizes, a full table's drops,
snapshots read while the guest runs, and bad input refused with nothing placed."""

from __future__ import annotations

import time

import pytest

from kprobevm.errors import ProbeRefused
from kprobevm.guest.vm import VM
from kprobevm.kprobes.aggregations import AggregateProbe, Aggregation, Bucket, MapKey
from kprobevm.kprobes.core import Kprobe
from kprobevm.pytest_plugin import ProbeSession
from kprobevm.tracing.maps import format_map

pytestmark = pytest.mark.vm

_TRACEFS = "/sys/kernel/tracing"
READ_EVENT = "p:rd vfs_read count=%dx:u64"


def _dd(n: int, bs: int = 1) -> str:
    return f"dd if=/dev/zero of=/dev/null bs={bs} count={n} 2>/dev/null"


def guest_trace_lines(vm: VM, definition: str, command: str, pattern: str) -> int:
    """Lines of the guest's trace matching grep ``pattern`` that its own tracefs probe
    ``definition`` (``p:GROUP/EVENT ...`` or ``r:...``) made during ``command``, read with
    the event off (each read of the trace file is a vfs_read); the probe removed after."""
    event = definition.split()[0].split(":", 1)[1]
    setup = (f"cd {_TRACEFS} 2>/dev/null || {{ mount -t tracefs nodev {_TRACEFS} &&"
             f" cd {_TRACEFS}; }}; echo > trace; echo '{definition}' >> kprobe_events"
             f" && echo 1 > events/{event}/enable")  # fmt: skip
    vm.run(setup, check=True)
    try:
        vm.run(f"{command}; echo 0 > {_TRACEFS}/events/{event}/enable", check=True)
        out = vm.run(f"grep -c '{pattern}' {_TRACEFS}/trace", check=True).stdout
    finally:
        vm.run(f"echo 0 > {_TRACEFS}/events/{event}/enable; echo '-:{event}' >>"
               f" {_TRACEFS}/kprobe_events; echo > {_TRACEFS}/trace")  # fmt: skip
    return int(out)


def gdbstub_reads(vm: VM, monkeypatch: pytest.MonkeyPatch, at: int) -> list[bool]:
    """From now on, each read through the gdbstub from ``at`` (a map's, not served by
    shared RAM): whether the VM was running then. Other threads' stops (the optimizer's
    looks, slot grace periods) make counting VM stops no proof."""
    reads: list[bool] = []
    real = vm.memory.read

    def read(addr: int, size: int) -> bytes:
        if addr == at:
            reads.append(vm.target.running)
        return real(addr, size)

    monkeypatch.setattr(vm.memory, "read", read)
    return reads


def _guest_count_of_dd(vm: VM, n: int) -> int:
    """vfs_read calls by dd per the guest's own kprobe (tracefs), for ``_dd(n)``."""
    return guest_trace_lines(vm, "p:aggs/rd vfs_read", _dd(n), " dd-[0-9]* ")


def test_count_by_comm_matches_the_guests_own_kprobe(
    vm: VM, kprobes: ProbeSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dd's vfs_read calls counted by comm in the guest equal the guest's own kprobe's
    count of them; its vfs_write calls, counted by pid, are under dd's pid."""
    n = 500
    theirs = _guest_count_of_dd(vm, n)
    assert theirs >= n
    by_comm, w = kprobes.count_by("vfs_read", "comm"), kprobes.count_by("p:x vfs_write", "pid")
    vm.run(_dd(n), check=True)
    reads = gdbstub_reads(vm, monkeypatch, by_comm.layout.base)
    live = by_comm.read()  # through shared RAM: the guest runs on
    assert reads == []
    stopped = by_comm.read(stop=True)
    assert reads == [False]  # one read, with the VM stopped
    by_comm.close()
    final = by_comm.read()
    assert live.count_of("dd") == final.count_of("dd") == theirs == stopped.count_of("dd")
    assert final.dropped == 0 and final.total == by_comm.kp.nhit + by_comm.kp.nmissed
    assert final.total == sum(final.per_cpu)
    assert "@vfs_read[dd]: " + str(theirs) in format_map("vfs_read", final)
    by_cpu = kprobes.count_by("vfs_read", "cpu")
    vm.run(_dd(n), check=True)
    by_cpu.close()
    assert by_cpu.read().count_of(0) >= n and by_cpu.read().counts[0][0] == 0  # one vCPU
    writes = w.read()
    # one pid (dd's) wrote n bytes one at a time, then its "records in/out" lines
    assert any(n < count <= n + 3 for _, count in writes.counts), writes.counts


def test_hist_of_read_sizes(vm: VM, kprobes: ProbeSession) -> None:
    """dd bs=3 makes n reads of count=3: the log2 bucket [2, 4) gains exactly n; bs=5
    under a linear 0..10 step 1 histogram: [5, 6) gains exactly n."""
    n = 300
    hist = kprobes.hist(READ_EVENT, "count")
    before = {(b.lo, b.hi): b.count for b in hist.read().buckets}
    vm.run(_dd(n, bs=3), check=True)
    after = {(b.lo, b.hi): b.count for b in hist.read().buckets}
    assert after[(2, 4)] - before[(2, 4)] == n
    text = format_map("rd", hist.read())
    assert text.startswith("@rd:\n") and "[2, 4)" in text and "|@" in text
    hist.close()
    lin = kprobes.hist(READ_EVENT, "count", linear=(0, 10, 1))
    first = lin.read().buckets[6]
    vm.run(_dd(n, bs=5), check=True)
    second = lin.read().buckets[6]
    assert (first.lo, first.hi) == (5, 6) and second.count - first.count == n
    assert lin.read().buckets[0] == Bucket(None, 0, 0)


def test_a_full_table_drops_and_says_so(vm: VM) -> None:
    """A table of 8 entries takes 6 pids; other pids' hits are dropped, counted in the
    map and in the probe's nmissed, and printed."""
    kp = Kprobe(symbol_name="vfs_read")
    with AggregateProbe(vm, kp, Aggregation(by="pid", entries=8)) as m:
        addr = kp.addr
        assert addr is not None
        text = vm.original_text(addr, 16)
        vm.run("for i in 1 2 3 4 5 6 7 8 9 10 11 12; do cat /dev/null; done", check=True)
    assert vm.read(addr, 16) == text
    snap = m.read()
    assert snap.keys == 6 and snap.dropped > 0
    assert kp.nmissed == snap.dropped and kp.nhit == snap.total
    assert "dropped: a CPU's table was full (6 keys)" in format_map("vfs_read", snap)


def test_snapshots_while_the_guest_runs_only_grow(vm: VM, kprobes: ProbeSession) -> None:
    """Read while a dd loop runs in the background: no counter ever goes back, and the
    reads saw it move."""
    m = kprobes.count_by("vfs_read", "comm")
    vm.run("(dd if=/dev/zero of=/dev/null bs=1 count=200000 2>/dev/null &)", check=True)
    seen: list[int] = []
    last: dict[MapKey, int] = {}
    # by the clock, not a number of reads: a read through shared RAM takes microseconds
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not seen or seen[-1] < 200000):
        now = dict(m.read().counts)
        assert all(now.get(k, 0) >= v for k, v in last.items()), (last, now)
        seen.append(now.get("dd", 0))
        last = now
        time.sleep(0.01)
    vm.run("while pidof dd >/dev/null; do sleep 0.1; done", timeout=120)
    assert len({s for s in seen if 0 < s < 200000}) >= 2, seen  # read mid-run, twice
    assert m.read().count_of("dd") == 200000


def test_bad_input_is_refused_with_nothing_placed(vm: VM) -> None:
    before = vm.list_kprobes()
    with pytest.raises(ProbeRefused, match="no argument 'size'"):
        vm.hist(READ_EVENT, "size")
    with pytest.raises(ProbeRefused, match="not a plain number"):
        vm.hist("p:s do_sys_openat2 name=+0(%si):ustring", "name")
    with pytest.raises(ProbeRefused, match="entry probes only"):
        vm.count_by("r:rr vfs_read", "comm")
    with pytest.raises(ValueError, match="one of comm, pid, cpu, stack"):
        vm.count_by("vfs_read", "tid")
    with pytest.raises(ValueError, match=r"a stack key of 65 frames: 1\.\.64"):
        vm.count_by("vfs_read", "stack", depth=65)
    with pytest.raises(ValueError, match="min < max"):
        vm.hist(READ_EVENT, "count", linear=(10, 0, 1))
    assert vm.list_kprobes() == before


def test_a_map_shares_its_address_with_no_other_probe(vm: VM, kprobes: ProbeSession) -> None:
    """Another probe at a map's address is refused (EBUSY), either way round; the map
    goes on counting as before."""
    m = kprobes.count_by("vfs_read", "comm")
    with pytest.raises(ProbeRefused, match="EBUSY: a probe keeping a map"):
        vm.count_by("vfs_read", "pid")
    with pytest.raises(ProbeRefused, match="EBUSY: a probe keeping a map"):
        kprobes.event("p:t vfs_read")
    vm.run(_dd(100), check=True)
    assert m.read().count_of("dd") == 100
    m.close()
    kprobes.event("p:t2 vfs_write")
    with pytest.raises(ProbeRefused, match="EBUSY: a probe keeping a map"):
        vm.count_by("vfs_write", "comm")
