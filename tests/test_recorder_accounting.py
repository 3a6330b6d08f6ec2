"""The recorder's accounting over a ring the test writes as the guest would, no QEMU:
a record reaches its handler or counts in ``nmissed``, never neither. An unregistered
probe's id retires until no vCPU can still write for it and the host has read past its
last record; records written meanwhile (a vCPU was inside the program at the unregister,
or behind another vCPU's unfinished record) count as missed, and the id is not reused
before then."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import cast

from kprobevm.gdbstub.memory import GuestMemory
from kprobevm.gdbstub.target import Target
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.recorder import PROGRAM_SIZE, Record, Recorder, RecordSpec
from kprobevm.kprobes.slots import SlotCache
from kprobevm.x86 import record as rec
from kprobevm.x86.constants import PAGE_SIZE
from kprobevm.x86.slotmap import SlotArea

BASE = 0xFFFFFFFFFE000000


class _Ram:
    """Sparse guest memory (virtual and physical alike) for a GuestMemory."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}

    def _page(self, addr: int) -> bytearray:
        return self.pages.setdefault(addr & ~(PAGE_SIZE - 1), bytearray(PAGE_SIZE))

    def read_memory(self, addr: int, n: int) -> bytes:
        out = bytearray()
        while n:
            page, at = self._page(addr), addr % PAGE_SIZE
            part = min(n, PAGE_SIZE - at)
            out += page[at : at + part]
            addr, n = addr + part, n - part
        return bytes(out)

    def write_memory(self, addr: int, data: bytes) -> None:
        while data:
            page, at = self._page(addr), addr % PAGE_SIZE
            part = min(len(data), PAGE_SIZE - at)
            page[at : at + part] = data[:part]
            addr, data = addr + part, data[part:]

    read_phys = read_memory
    write_phys = write_memory


class _Area:
    """Slot pages handed out one after another (virtual = physical)."""

    def __init__(self) -> None:
        self.next = BASE

    def map_page(self, *, executable: bool = True, writable: bool = False) -> int:
        return self.map_run(1)

    def map_run(self, pages: int, *, executable: bool = True, writable: bool = False) -> int:
        first, self.next = self.next, self.next + pages * PAGE_SIZE
        return first

    def unmap_page(self, address: int) -> None:
        pass

    def phys(self, vaddr: int) -> int:
        return vaddr


@dataclass
class _Target:
    """Queued writes land at once (the test is the guest, and it is always stopped)."""

    ram: _Ram

    def queue_write(self, address: int, data: bytes) -> None:
        self.ram.write_memory(address, data)


@dataclass
class _Grace:
    """The quiescence answer the recorder gets: over for what was retired before ``since``."""

    since: float = 0.0
    clock: float = 100.0
    observed: int = 0

    def over(self, retired_at: float) -> bool:
        return retired_at < self.since


@dataclass
class Guest:
    """A recorder over fake memory, and the guest side of its ring."""

    ram: _Ram
    recorder: Recorder
    grace: _Grace
    handled: list[tuple[Kprobe, Record]] = field(default_factory=list)

    @classmethod
    def make(cls) -> Guest:
        ram, area, grace = _Ram(), _Area(), _Grace()
        programs = SlotCache(area, slot_size=PROGRAM_SIZE, clock=lambda: grace.clock)
        programs.grace_over = grace.over

        def observe() -> None:
            grace.observed += 1

        programs.before_collect = observe
        recorder = Recorder(
            GuestMemory(ram), cast("Target", _Target(ram)), cast("SlotArea", area), programs,
            helpers=rec.CopyHelpers(0, 0, 0, 0, 0, 0, 0, 0), describe=hex,
        )  # fmt: skip
        return cls(ram, recorder, grace)

    def reserve(self, probe_id: int) -> int:
        """Reserve a record (``lock cmpxchg`` on the head); its position."""
        layout = self.recorder.layout
        head: int = struct.unpack("<Q", self.ram.read_memory(layout.head, 8))[0]
        size = rec.RecordLayout(()).size
        self.ram.write_memory(layout.head, struct.pack("<Q", head + size))
        return head

    def complete(self, probe_id: int, pos: int) -> None:
        """Write and stamp the record at ``pos``, then count it, as the program does."""
        layout = self.recorder.layout
        size = rec.RecordLayout(()).size
        raw = rec.RECORD_HEADER.pack(pos + 1, size, probe_id, 0, 0, 1, b"sh")
        self.ram.write_memory(layout.ring + pos % layout.ring_size, raw.ljust(size, b"\0"))
        self.count(probe_id, hits=1)

    def count(self, probe_id: int, *, hits: int = 0, missed: int = 0) -> None:
        at = self.recorder.layout.counters + 16 * probe_id
        old = struct.unpack("<QQ", self.ram.read_memory(at, 16))
        self.ram.write_memory(at, struct.pack("<QQ", old[0] + hits, old[1] + missed))

    def hit(self, probe_id: int) -> None:
        self.complete(probe_id, self.reserve(probe_id))

    def drain(self, *, closing: bool = False) -> None:
        """The host's drain, handlers run as ``run_recorded`` does for a live probe."""
        for kp, record in self.recorder.drain(closing=closing):
            kp.nhit += 1
            self.handled.append((kp, record))


def _probe(guest: Guest, name: str, *, count_only: bool = False) -> Kprobe:
    kp = Kprobe(symbol_name=name, record=RecordSpec(count_only=count_only))
    kp.record_id = guest.recorder.add(kp, RecordSpec(count_only=count_only))
    return kp


def _unregister(guest: Guest, kp: Kprobe) -> None:
    assert kp.record_id is not None
    guest.recorder.remove(kp.record_id)
    kp.record_id = None


def test_every_hit_reaches_its_handler_or_counts_as_missed() -> None:
    guest = Guest.make()
    opens, reads = _probe(guest, "opens"), _probe(guest, "reads")
    opens_id, reads_id = opens.record_id, reads.record_id
    assert opens_id is not None and reads_id is not None
    guest.hit(opens_id)
    pending = guest.reserve(reads_id)  # another vCPU, stopped inside its program
    guest.hit(opens_id)  # complete, but behind the unfinished record
    guest.count(opens_id, missed=1)  # and one the ring had no room for
    guest.drain()
    assert [kp for kp, _ in guest.handled] == [opens]
    _unregister(guest, opens)  # its second record is still in the ring
    guest.hit(opens_id)  # a vCPU that was inside the program finishes after
    guest.complete(reads_id, pending)
    guest.drain()
    assert [kp for kp, _ in guest.handled] == [opens, reads]
    assert opens_id in guest.recorder.retiring and guest.recorder.late == 0
    assert (opens.nhit, opens.nmissed, opens.guest_hits) == (1, 3, 4)
    # the id stays out of use while a vCPU may still write for it
    others = [_probe(guest, f"p{i}") for i in range(3)]
    assert opens_id not in [kp.record_id for kp in others]
    assert opens.settling == 1 and reads.settling == 0
    guest.grace.since = guest.grace.clock + 1  # every vCPU seen quiescent since
    guest.drain()
    assert opens_id not in guest.recorder.retiring and opens.settling == 0
    assert opens.nhit + opens.nmissed == opens.guest_hits == 4
    assert reads.nhit + reads.nmissed == reads.guest_hits == 1


def test_a_retired_id_settles_only_once_the_host_read_past_its_records() -> None:
    guest = Guest.make()
    kp, other = _probe(guest, "kp"), _probe(guest, "other")
    kp_id, other_id = kp.record_id, other.record_id
    assert kp_id is not None and other_id is not None
    stuck = guest.reserve(other_id)
    guest.hit(kp_id)
    _unregister(guest, kp)
    guest.grace.since = guest.grace.clock + 1
    guest.drain()  # quiescent, but its record sits behind the unfinished one
    assert kp_id in guest.recorder.retiring
    guest.complete(other_id, stuck)
    guest.drain()
    assert kp_id not in guest.recorder.retiring
    assert (kp.nhit, kp.nmissed, kp.guest_hits) == (0, 1, 1)


def test_a_count_only_probe_keeps_the_counts_that_land_after_it_goes() -> None:
    guest = Guest.make()
    kp = _probe(guest, "counted", count_only=True)
    kp_id = kp.record_id
    assert kp_id is not None
    kp.count_reader = lambda: guest.recorder.read_count(kp_id)  # what add() wires up
    guest.count(kp_id, hits=5)
    _unregister(guest, kp)
    assert kp.nhit == 5 and kp.count_reader is None
    guest.count(kp_id, hits=1)  # a vCPU between pushfq and its lock inc at the unregister
    guest.drain()
    assert (kp.nhit, kp.nmissed, kp.guest_hits) == (6, 0, 6)


def test_closing_settles_every_retired_id() -> None:
    guest = Guest.make()
    kp = _probe(guest, "kp")
    assert kp.record_id is not None
    kp_id = kp.record_id
    _unregister(guest, kp)
    guest.hit(kp_id)
    guest.drain()
    assert kp_id in guest.recorder.retiring and guest.grace.observed
    guest.drain(closing=True)
    assert not guest.recorder.retiring
    assert (kp.nhit, kp.nmissed, kp.guest_hits) == (0, 1, 1)


def test_a_disabled_member_is_left_out_of_the_record_program() -> None:
    """A disabled probe of a recorded aggregate writes no records (as a count program
    leaves its counter out), so none of its hits can be dropped unseen."""
    guest = Guest.make()
    on, off = _probe(guest, "on"), _probe(guest, "off")
    off.disabled = True

    @dataclass
    class Site:
        addr: int
        probes: list[Kprobe]

    site = Site(0xFFFFFFFF81000000, [on, off])
    both = guest.recorder.write_program(site, 0xFFFFFFFF81000005)  # type: ignore[arg-type]
    code = guest.ram.read_memory(both, PROGRAM_SIZE)
    off.disabled = False
    again = guest.recorder.write_program(site, 0xFFFFFFFF81000005)  # type: ignore[arg-type]
    assert len(guest.ram.read_memory(again, PROGRAM_SIZE).rstrip(b"\0")) > len(
        code.rstrip(b"\0")
    )
