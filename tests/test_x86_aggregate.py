"""The aggregate program run in unicorn: counts by key, a full table's drops, log2 and
linear buckets, a field read through the copy helper, a busy CPU; every register as the
probe found it. The map is decoded by the host's own reader."""

from __future__ import annotations

import struct

import pytest

from kprobevm.errors import KprobeError
from kprobevm.kprobes.aggregations import Aggregation, Bucket, decode_map
from kprobevm.x86 import aggregate as agg
from kprobevm.x86.aggregate import AggregateField, MapLayout
from tests._gas import gas_text, needs_gas
from tests._x86_unicorn import GPRS, Machine, assert_left_intact, unicorn
from tests.test_x86_record import (
    CONT,
    CONTROL,
    COUNTERS,
    CPU,
    GDT,
    HELPER_ADDRS,
    HELPERS,
    KDATA,
    PERCPU,
    PROBE_ID,
    PROGRAM,
    RING_LAYOUT,
    STACK,
    TASK,
    USER,
    _copy,
)

MAP = 0xFFFFFFFFA0110000
NCPUS = 4


def _machine(aggregation: Aggregation) -> tuple[Machine, MapLayout, int]:
    m = Machine()
    layout = aggregation.layout(MAP, NCPUS)
    code = agg.build_aggregate_program(
        PROGRAM, probe_id=PROBE_ID, layout=layout, field=aggregation.field, ring=RING_LAYOUT,
        helpers=HELPER_ADDRS, cont=CONT,
    ).code  # fmt: skip
    m.map(PROGRAM, 0x2000, b"\xcc")
    m.write(PROGRAM, code)
    for va, size in (
        (CONTROL, 0x1000),
        (COUNTERS, 0x1000),
        (MAP, layout.size),
        (PERCPU, 0x1000),
        (TASK, 0x1000),
        (KDATA, 0x1000),
        (USER, 0x1000),
        (STACK - 0x3000, 0x4000),
    ):
        m.map(va, size)  # fmt: skip
    m.map(HELPERS, 0x1000, b"\xcc")
    m.map(CONT, 0x1000, b"\xf4")
    m.write(PERCPU + 0x40, struct.pack("<I", CPU))
    m.write(PERCPU + 0x48, struct.pack("<Q", TASK))
    m.start_paging(GDT)
    m.uc.msr_write(0xC0000101, PERCPU)
    return m, layout, len(code)


def _task(m: Machine, pid: int, comm: bytes) -> None:
    m.write(TASK + 0x10, struct.pack("<i", pid))
    m.write(TASK + 0x20, comm.ljust(16, b"\0"))


def _hit(m: Machine, length: int, **regs: int) -> None:
    """One hit with these registers (the rest fixed); the program must leave them all."""
    before = {r: 0x1111 * (i + 1) for i, r in enumerate(GPRS) if r != "rsp"}
    before.update(regs, rsp=STACK - 0x100, eflags=0x246)  # IF set
    m.set_regs(before)
    seen_if: list[int] = []

    def helper(addr: int) -> bool:
        if not HELPERS <= addr < HELPERS + 0x40:
            return False
        r = m.regs()
        result = _copy(m, r["rdi"], r["rsi"], r["rdx"], string=False)
        m.set_regs({"rax": result & (2**64 - 1), "rsp": r["rsp"] + 8, "rip": m.u64(r["rsp"])})
        return True

    def interrupts(_uc: object, _addr: int, _size: int, _data: object) -> None:
        seen_if.append(m.regs()["eflags"] & 0x200)

    end = PROGRAM + length
    handle = m.uc.hook_add(unicorn.UC_HOOK_CODE, interrupts, begin=PROGRAM, end=end - 1)
    try:
        m.run(PROGRAM, inside=(PROGRAM, end), max_insns=20000, outside=helper)
    finally:
        m.uc.hook_del(handle)
    assert_left_intact(m, before, CONT)
    assert 0 in seen_if[3:-2]  # interrupts are off while the map is updated


def _snapshot(m: Machine, layout: MapLayout) -> tuple[object, tuple[int, int]]:
    raw = m.read(MAP, layout.size)
    hits, missed = struct.unpack("<QQ", m.read(COUNTERS + 16 * PROBE_ID, 16))
    return decode_map(layout, raw, raw), (hits, missed)


def test_count_by_comm_and_pid_and_cpu() -> None:
    m, layout, n = _machine(Aggregation(by="comm"))
    for pid, comm in ((10, b"dd"), (11, b"dd"), (12, b"sshd"), (13, b"a-long-name-15c")):
        _task(m, pid, comm)
        _hit(m, n)
    snap, counters = _snapshot(m, layout)
    assert counters == (4, 0)
    assert snap.counts == (("a-long-name-15c", 1), ("sshd", 1), ("dd", 2))  # type: ignore[attr-defined]
    assert snap.per_cpu == (0, 0, 0, 4) and snap.dropped == 0  # type: ignore[attr-defined]

    m, layout, n = _machine(Aggregation(by="pid"))
    for pid in (7, 7, 0, 7):
        _task(m, pid, b"x")
        _hit(m, n)
    snap, _ = _snapshot(m, layout)
    assert snap.counts == ((0, 1), (7, 3))  # type: ignore[attr-defined]

    m, layout, n = _machine(Aggregation(by="cpu"))
    _hit(m, n)
    _hit(m, n)
    snap, _ = _snapshot(m, layout)
    assert snap.counts == ((CPU, 2),)  # type: ignore[attr-defined]


def test_a_full_table_drops_new_keys_and_counts_old_ones() -> None:
    m, layout, n = _machine(Aggregation(by="pid", entries=8))
    for pid in range(100, 100 + layout.max_keys):
        _task(m, pid, b"x")
        _hit(m, n)
    for pid in (999, 100, 998):
        _task(m, pid, b"x")
        _hit(m, n)
    snap, counters = _snapshot(m, layout)
    assert snap.dropped == 2 and snap.keys == layout.max_keys == 6  # type: ignore[attr-defined]
    assert dict(snap.counts)[100] == 2 and 999 not in dict(snap.counts)  # type: ignore[attr-defined]
    assert counters == (layout.max_keys + 1, 2)


def test_log2_histogram_of_a_register() -> None:
    m, layout, n = _machine(Aggregation(field=AggregateField("dx", size=4, signed=True)))
    for value in (0, 1, 2, 3, 4, 1023, 1024, (1 << 32) - 5, 0xABCD_0000_0000_0001):
        _hit(m, n, rdx=value)  # as s32: the top half goes, -5 is negative
    snap, counters = _snapshot(m, layout)
    got = {(b.lo, b.hi): b.count for b in snap.buckets if b.count}  # type: ignore[attr-defined]
    assert got == {(None, 0): 1, (0, 1): 1, (1, 2): 2, (2, 4): 2, (4, 8): 1, (512, 1024): 1,
                   (1024, 2048): 1}  # fmt: skip
    assert counters == (9, 0)


def test_linear_histogram_of_a_read_field() -> None:
    field = AggregateField("di", size=2, deref=True, offset=8)
    m, layout, n = _machine(Aggregation(field=field, linear=(0, 100, 10)))
    for value in (0, 9, 10, 55, 99, 100, 5000):
        m.write(KDATA + 8, struct.pack("<H", value))
        _hit(m, n, rdi=KDATA)
    _hit(m, n, rdi=0xDEAD0000)  # the read faults: counted as a fault, missed
    snap, counters = _snapshot(m, layout)
    buckets = snap.buckets  # type: ignore[attr-defined]
    assert buckets[0] == Bucket(None, 0, 0) and buckets[-1] == Bucket(100, None, 2)
    assert buckets[1] == Bucket(0, 10, 2) and buckets[2] == Bucket(10, 20, 1)
    assert buckets[6] == Bucket(50, 60, 1) and buckets[10] == Bucket(90, 100, 1)
    assert snap.faults == 1 and counters == (7, 1)  # type: ignore[attr-defined]


def test_a_busy_cpu_or_one_past_the_map_is_missed() -> None:
    m, layout, n = _machine(Aggregation(by="comm"))
    _task(m, 1, b"x")
    m.write(CONTROL + 256 + CPU, b"\1")
    _hit(m, n)
    assert m.read(CONTROL + 256 + CPU, 1) == b"\1"  # the outer program's, left alone
    m.write(CONTROL + 256 + CPU, b"\0")
    m.write(PERCPU + 0x40, struct.pack("<I", NCPUS))
    _hit(m, n)
    snap, counters = _snapshot(m, layout)
    assert counters == (0, 2) and snap.total == 0  # type: ignore[attr-defined]


def test_a_field_goes_with_a_histogram_only() -> None:
    with pytest.raises(KprobeError, match="field"):
        agg.build_aggregate_program(
            PROGRAM, probe_id=1, layout=Aggregation(by="cpu").layout(MAP, 1),
            field=AggregateField("dx"), ring=RING_LAYOUT, helpers=HELPER_ADDRS, cont=CONT,
        )  # fmt: skip
    with pytest.raises(ValueError, match="min < max"):
        Aggregation(field=AggregateField("dx"), linear=(10, 0, 1))


@needs_gas
@pytest.mark.parametrize(
    "aggregation",
    [Aggregation(by="comm"), Aggregation(by="pid"), Aggregation(by="cpu"),
     Aggregation(field=AggregateField("dx", size=4, signed=True)),
     Aggregation(field=AggregateField("di", size=2, deref=True, offset=8, user=True),
                 linear=(-5, 100, 7))],
    ids=["comm", "pid", "cpu", "log2", "linear"],
)  # fmt: skip
def test_listing_assembles_to_the_program(aggregation: Aggregation) -> None:
    built = agg.build_aggregate_program(
        PROGRAM, probe_id=PROBE_ID, layout=aggregation.layout(MAP, NCPUS),
        field=aggregation.field, ring=RING_LAYOUT, helpers=HELPER_ADDRS, cont=CONT,
    )  # fmt: skip
    assert gas_text(built.listing) == built.code


def test_an_unsigned_field_under_a_negative_min() -> None:
    """Buckets of 7 from -5: an unsigned value is never below min (3 lands in [2, 9))."""
    field = AggregateField("dx", size=8)
    m, layout, n = _machine(Aggregation(field=field, linear=(-5, 100, 7)))
    for value in (0, 3, 99, 100, 1 << 63):
        _hit(m, n, rdx=value)
    snap, _ = _snapshot(m, layout)
    got = {(b.lo, b.hi): b.count for b in snap.buckets if b.count}  # type: ignore[attr-defined]
    assert got == {(-5, 2): 1, (2, 9): 1, (93, 100): 1, (100, None): 2}
    with pytest.raises(ValueError, match="power of two"):
        Aggregation(by="pid", entries=12)


def test_a_mixed_read_takes_the_user_copy_below_task_size() -> None:
    """As the kernel's own fetch since 5.8: a kernel-space read of a user address reads
    user memory (the user copy), a kernel address the kernel's copy."""
    field = AggregateField("di", size=1, deref=True, mixed=True)
    m, layout, n = _machine(Aggregation(field=field, linear=(0, 256, 1)))
    m.write(USER, b"\x07")
    m.write(KDATA, b"\x09")
    calls: list[int] = []
    m.uc.hook_add(unicorn.UC_HOOK_CODE, lambda _u, a, _s, _d: calls.append(a),
                  begin=HELPERS, end=HELPERS + 0x3F)  # fmt: skip
    _hit(m, n, rdi=USER)
    _hit(m, n, rdi=KDATA)
    snap, _ = _snapshot(m, layout)
    assert snap.buckets[8].count == 1 and snap.buckets[10].count == 1  # type: ignore[attr-defined]
    assert calls == [HELPER_ADDRS.copy_from_user, HELPER_ADDRS.copy_from_kernel]
