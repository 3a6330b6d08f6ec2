"""A latency probe's call run in unicorn, entry to caller: the hijack stamps the call with
its slot and the TSC, the return program takes the stamp and counts the call's latency
(the TSC set to a known distance at the return) in this CPU's log2 bucket, with no
record; an older stamp left at the same slot loses to the call's own; a free entry whose
stamp another call's return program has still to take is taken last; a return with no
stamp is missed. The caller gets every register as the function left it."""

from __future__ import annotations

import struct

from kprobevm.x86.aggregate import HEADER_SIZE, MapLayout
from kprobevm.x86.funclatency import STAMP, LatencyMap, LatencyScale
from kprobevm.x86.record import RecordLayout
from kprobevm.x86.retrecord import (
    ReturnProbe,
    ReturnTable,
    build_hijack_program,
    build_return_program,
)
from tests._gas import gas_text, needs_gas
from tests._x86_unicorn import Machine, unicorn
from tests.test_x86_retrecord import (
    ACTIVES,
    BIT,
    COUNTERS,
    FUNCTION,
    HELPERS,
    HIJACK,
    INFO,
    MAXACTIVE,
    PROBE_ID,
    RETURN_PROGRAM,
    RING,
    RING_LAYOUT,
    STACK,
    TABLE,
    TRAMPOLINE,
    as_returned,
    call_through,
    return_machine,
)

STAMPS = ACTIVES + 2048
MAP = 0xFFFFFFFFA010A000
CPU = 1
TSC_KHZ = 1_000_000  # 1 GHz: a cycle is a nanosecond
T0, CYCLES = 1 << 40, 1_000_000_000  # the call takes one second: [2**29, 2**30) ns

RETURNS = ReturnTable(table=TABLE, entries=64, info=INFO, actives=ACTIVES,
                      trampoline=TRAMPOLINE, stamps=STAMPS)  # fmt: skip
LAYOUT = MapLayout(base=MAP, ncpus=2, key="none", buckets=66)
PROBE = ReturnProbe(BIT, PROBE_ID, MAXACTIVE, RecordLayout(()),
                    LatencyMap(LAYOUT, LatencyScale("ns", TSC_KHZ)))  # fmt: skip
RDTSC = b"\x0f\x31"


def _machine() -> Machine:
    return return_machine(PROBE, RETURNS, pages=(MAP,), cpu=CPU)


def _call(m: Machine, seed: int, *, cycles: int = CYCLES) -> tuple[dict[str, int], dict[str, int]]:
    """:func:`call_through`, where each ``rdtsc`` reads T0, then T0 + ``cycles`` (edx:eax
    set right after it: unicorn reads the host's TSC)."""
    reads = iter((T0, T0 + cycles))
    last = [0]

    def each(addr: int) -> None:
        if last[0] and m.read(last[0], 2) == RDTSC:
            tsc = next(reads)
            m.set_regs({"rax": tsc & 0xFFFFFFFF, "rdx": tsc >> 32})
        last[0] = addr

    before, after, _ = call_through(m, seed, max_insns=5000, each=each)
    return before, after


def _buckets(m: Machine, cpu: int) -> list[int]:
    raw = m.read(MAP + cpu * LAYOUT.stride + HEADER_SIZE, 8 * LAYOUT.buckets)
    return list(struct.unpack(f"<{LAYOUT.buckets}Q", raw))


def _counters(m: Machine) -> tuple[int, int]:
    hits, missed = struct.unpack("<QQ", m.read(COUNTERS + 16 * PROBE_ID, 16))
    return hits, missed


def test_a_call_is_counted_in_its_latency_bucket() -> None:
    m = _machine()
    before, after = _call(m, 1)
    as_returned(before, after)
    buckets = _buckets(m, CPU)
    # bucket 2 + k holds [2**k, 2**(k+1)); a second is 2**29.9 ns
    assert buckets[2 + 29] == 1 and sum(buckets) == 1
    assert sum(_buckets(m, 0)) == 0
    assert _counters(m) == (1, 0)
    assert m.u64(RING) == 0  # no record
    assert m.u64(STAMPS) == 0 and m.u64(TABLE) == 0  # stamp and entry taken
    assert m.u64(ACTIVES + 8 * BIT) == 0


def test_the_calls_own_stamp_wins_over_an_older_one_at_its_slot() -> None:
    """A stamp left at the slot by a call whose return no latency program saw is older:
    the latest is the call's. Both are taken."""
    m = _machine()
    slot = STACK - 0x100
    m.write(STAMPS + 3 * STAMP, struct.pack("<QQ", slot, T0 - (1 << 36)))
    m.write(TABLE, struct.pack("<QQ", 0xFFFFC90000009000, 0xDEAD))  # ours goes to entry 1
    _call(m, 2, cycles=3000)
    assert _buckets(m, CPU)[2 + 11] == 1  # 3000 ns: [2048, 4096)
    assert m.u64(STAMPS + 3 * STAMP) == 0 and m.u64(STAMPS + STAMP) == 0


def test_a_free_entry_whose_stamp_waits_is_taken_last() -> None:
    """Another call's return between its trampoline (entry 0 freed) and its return program
    (stamp 0 not taken yet): this call takes entry 1 and leaves stamp 0 as it was. With
    every free entry's stamp waiting, it takes the first one."""
    m = _machine()
    waiting = struct.pack("<QQ", STACK - 0x800, T0 - 5000)
    m.write(STAMPS, waiting)
    _call(m, 4, cycles=3000)
    assert _buckets(m, CPU)[2 + 11] == 1 and _counters(m) == (1, 0)
    assert m.read(STAMPS, STAMP) == waiting and m.u64(STAMPS + STAMP) == 0
    m = _machine()
    m.write(STAMPS, b"".join(struct.pack("<QQ", STACK - 0x800 - 16 * i, T0) for i in range(64)))
    _call(m, 5, cycles=3000)
    assert _buckets(m, CPU)[2 + 11] == 1 and _counters(m) == (1, 0)
    assert m.u64(STAMPS) == 0  # taken by this call's return


def test_a_return_without_a_stamp_is_missed() -> None:
    """A call the hijack took before the probe had a stamp (its program rebuilt) returns
    through a latency program with no stamp: missed, and returned right."""
    m = _machine()

    def drop_stamp(uc: object, addr: int, size: int, _data: object) -> None:
        if addr == FUNCTION:
            m.write(STAMPS, bytes(STAMP * 64))

    handle = m.uc.hook_add(unicorn.UC_HOOK_CODE, drop_stamp)
    before, after = _call(m, 3)
    m.uc.hook_del(handle)
    as_returned(before, after)
    assert sum(_buckets(m, CPU)) == 0 and _counters(m) == (0, 1)


@needs_gas
def test_latency_programs_assemble_as_gnu_as_does() -> None:
    programs = (
        build_hijack_program(
            HIJACK, probes=(PROBE,), returns=RETURNS, ring=RING_LAYOUT,
            program=RETURN_PROGRAM, cont=FUNCTION,
        ),
        build_return_program(
            RETURN_PROGRAM, probes=(PROBE, ReturnProbe(1, 9, 4, RecordLayout(()))),
            returns=RETURNS, ring=RING_LAYOUT, helpers=HELPERS,
        ),
    )  # fmt: skip
    for program in programs:
        assert gas_text(program.listing) == program.code
        assert ".byte" not in program.listing
