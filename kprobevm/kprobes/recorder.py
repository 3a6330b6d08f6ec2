"""Recorded probes: hits the guest writes to a ring buffer, handled on the host later.

A probe with a :class:`RecordSpec` never stops the guest per hit. Its slot jumps to a
record program (:mod:`kprobevm.x86.record`) that writes the registers, ``current``'s pid
and comm, the TSC and the probe's memory reads into a ring in slot memory, then runs the
displaced instruction. The :class:`Recorder` owns that ring. It drains it when the guest
asks (a watched store once the ring is 3/4 full), on the trap thread's idle tick, and
before probes go. Where guest RAM is shared with the host, a follower thread
(:mod:`kprobevm.kprobes.ringfollow`) copies complete records out through the mapping as
the guest writes them, each one's stamp before the rest (the guest writes the stamp
last), and stores the new tail the same way; the idle tick decodes what it copied, with
the VM running, so steady-state tracing stops the VM not at all. Each :class:`Record`
then reaches the probe's ``pre_handler`` with a :class:`RecordedRegs` snapshot whose
memory answers from the record's reads. This is the kernel's trace-event model (record
now, read later), bought with what a stop costs: the handlers cannot change registers,
and a string is cut at its capture size.

Every hit is accounted for. The guest counts each record it completes and each hit it
misses (ring full, CPU busy); the host adds both to ``guest_hits``, the misses to
``nmissed``. An unregistered probe's id *retires*: a vCPU may still be inside its
program (or in an interrupt taken there), so the id is reused only once every vCPU has
been seen quiescent since (:mod:`kprobevm.trap.grace`) and the ring has been drained
past every record it could have written. A record of a retired probe reaches no handler
and counts in its ``nmissed``. Once settled, ``nhit + nmissed == guest_hits``.
"""

from __future__ import annotations

import functools
import logging
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kprobevm.errors import GuestFaultError, KprobeError, ProbeRefused
from kprobevm.gdbstub.memory import DirectMemory, GuestMemory
from kprobevm.kernel.tasks import kernel_thread_size
from kprobevm.kprobes.slots import Slot, SlotCache
from kprobevm.x86 import aggregate as agg
from kprobevm.x86 import record as rec
from kprobevm.x86 import retrecord
from kprobevm.x86.constants import PAGE_SIZE
from kprobevm.x86.funclatency import LatencyMap
from kprobevm.x86.ptregs import PtRegs

if TYPE_CHECKING:
    from kprobevm.gdbstub.target import Target
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kernel.tasks import TaskLayout
    from kprobevm.kprobes.aggregations import Aggregation
    from kprobevm.kprobes.core import Kprobe, ProbeSite
    from kprobevm.kprobes.retrecord import ReturnRecords
    from kprobevm.kprobes.ringfollow import ChildFeed
    from kprobevm.x86.addrspace import AddressSpace
    from kprobevm.x86.slotmap import SlotArea

log = logging.getLogger(__name__)

__all__ = [
    "CapturedRead",
    "Record",
    "RecordSpec",
    "RecordedMemory",
    "RecordedRegs",
    "Recorder",
    "copy_helpers",
    "decode_record",
    "program_size",
    "ring_pages_fitting",
]

RING_PAGES = 256
"""1 MiB (half the slot area's 2 MiB of addresses): with the ring follower, what the
guest may record while the follower is not scheduled (a loaded machine) before the ring
asks for a stop; a ``dd bs=1`` loop records some 35 MB/s, 900 KiB in 25 ms."""
HIGH_WATER = 7 / 8
"""How full the ring asks the host to drain (a VM stop): the follower keeps it lower.
The watched store stops the VM at once, so the last eighth is left only for what other
vCPUs record until QEMU has stopped them too."""
MIN_RING_PAGES = 4
MAX_RECORD_IDS = 1024  # 16 bytes of counters each: 4 pages
MAX_CPUS = 256
PROGRAM_SIZE = 2048
_U64 = struct.Struct("<Q")
_SIZE_ID = struct.Struct("<IH")  # a record's size and probe id, after its stamp
MAX_BACKLOG = 64 << 20
"""Bytes of records copied out of the ring and not decoded yet, at most."""
_CONTROL_TAIL = 64  # head and tail on separate cache lines
_CONTROL_BUSY = 256


def ring_pages_fitting(free_pages: int, *, keep: int) -> int:
    """The record ring's pages when ``free_pages`` of slot memory are left and ``keep`` of
    them must stay for slots and programs: the largest power of two up to RING_PAGES.
    Raises KprobeError when not even MIN_RING_PAGES fit."""
    room = free_pages - keep - 2 - MAX_RECORD_IDS * 16 // PAGE_SIZE  # control, drain, counters
    if room < MIN_RING_PAGES:
        raise KprobeError(
            f"slot memory has {free_pages} pages left: too few for a record ring of"
            f" {MIN_RING_PAGES} pages with its control, drain and counter pages, keeping {keep}"
            " for slots"
        )
    return 1 << (min(room, RING_PAGES).bit_length() - 1)


@dataclass(frozen=True)
class RecordSpec:
    """How a probe is recorded: its memory reads, or nothing but a count.

    ``count_only`` probes cost the guest one ``lock incq`` and never reach a handler:
    their ``nhit`` is read from the guest.
    """

    captures: tuple[rec.Capture, ...] = ()
    count_only: bool = False
    stack_size: int = 0
    """Bytes of kernel stack each record copies, for a stack trace unwound on the host
    (``Kprobe(stack=True)``): from ``sp`` up to the stack's top, at most this many, and
    as many again from the stack below when the hit is on the IRQ stack. A record takes
    only the bytes copied. 0: none."""
    aggregate: Aggregation | None = None
    """Count-only probes may fold each hit into a map in the guest instead
    (:mod:`kprobevm.kprobes.aggregations`)."""
    at_return: bool = False
    """A return probe's: the guest hijacks the call at the entry and records its return
    (:mod:`kprobevm.kprobes.retrecord`), with at most ``maxactive`` calls in flight."""
    maxactive: int = 0

    @property
    def layout(self) -> rec.RecordLayout:
        """Where each part of this spec's records lies."""
        return rec.RecordLayout(self.captures, self.stack_size)


@dataclass(frozen=True)
class CapturedRead:
    """One memory read the guest made at the hit: bytes read, or a negative errno."""

    address: int
    status: int
    data: bytes
    string: bool


@dataclass(frozen=True)
class Record:
    """One recorded hit, decoded."""

    probe_id: int
    cpu: int
    pid: int
    comm: str
    tsc: int
    regs: dict[str, int]
    reads: tuple[CapturedRead, ...]


def decode_record(raw: bytes, layout: rec.RecordLayout) -> Record:
    """A record's bytes (as the ring holds them) as a :class:`Record`."""
    _, _, probe_id, cpu, tsc, pid, comm = rec.RECORD_HEADER.unpack_from(raw)
    nregs = len(rec.SNAPSHOT_REGS)
    values = struct.unpack_from(f"<{nregs}Q", raw, rec.REGS_OFFSET)
    reads = []
    for cap, at in zip(layout.captures, layout.capture_offsets, strict=True):
        address, status = rec.CAPTURE_HEADER.unpack_from(raw, at)
        start = at + rec.CAPTURE_HEADER.size
        data = raw[start : start + max(0, min(status, cap.size))]
        reads.append(CapturedRead(address, status, data, cap.string))
    if layout.stack_size:
        for address, status, data in rec.stack_slices(raw, layout):
            reads.append(CapturedRead(address, status, data, False))
    return Record(
        probe_id=probe_id, cpu=cpu, pid=pid,
        comm=comm.split(b"\0", 1)[0].decode(errors="replace"), tsc=tsc,
        regs=dict(zip(rec.SNAPSHOT_REGS, values, strict=True)), reads=tuple(reads),
    )  # fmt: skip


class RecordedMemory(GuestMemory):
    """Guest memory as it was at a recorded hit: only what the record's reads hold.

    A read inside a successful capture is answered from it (a string capture answers
    past its NUL with zeros, which is all a string reader looks at); a read the guest
    tried and failed raises :class:`GuestFaultError`, as the live read would have. A read
    the record program never made is a bug in the capture plan and raises KprobeError.
    """

    def __init__(self, memory: GuestMemory, reads: Sequence[CapturedRead]) -> None:
        super().__init__(memory.transport)
        self._reads = reads

    def read(self, addr: int, n: int) -> bytes:
        failed = False
        for r in self._reads:
            if r.status < 0:
                failed = failed or r.address == addr
                continue
            offset = addr - r.address
            if r.string:
                text = r.data.split(b"\0", 1)[0] + b"\0"
                if 0 <= offset < len(text):
                    return text[offset : offset + n].ljust(n, b"\0")
            elif offset >= 0 and offset + n <= len(r.data):
                return r.data[offset : offset + n]
        if failed:
            raise GuestFaultError(addr, "the guest's read faulted at the hit")
        raise KprobeError(f"{n} bytes at {addr:#x} were not recorded at the hit", address=addr)

    def write(self, addr: int, data: bytes) -> None:
        raise KprobeError("a recorded hit is in the past: its memory cannot be written")


class RecordedRegs(PtRegs):
    """A recorded hit's registers, with its record; changes cannot reach the guest."""

    __slots__ = ("record",)
    record: Record

    @classmethod
    def of(cls, record: Record, memory: GuestMemory, *, ip: int | None = None) -> RecordedRegs:
        """The hit's registers; ``ip`` shows it at a probe's own address (an ftrace site's)."""
        values = dict(record.regs) if ip is None else dict(record.regs) | {"ip": ip}
        regs = cls(values, cpu=record.cpu, memory=RecordedMemory(memory, record.reads))
        object.__setattr__(regs, "record", record)
        return regs


@dataclass(eq=False)
class _RecordedProbe:
    """A probe's id in use: its record layout, and what its counters held last time."""

    kp: Kprobe
    layout: rec.RecordLayout
    count_only: bool
    record_id: int
    hits: int = 0
    """The guest's counter of records written (count-only: hits) as last folded into kp."""
    missed: int = 0
    retired_at: float | None = None
    """When its probe was unregistered (None: still registered)."""
    settle_head: int | None = None
    """The ring's head once no vCPU could still write its records: the id is free when
    the host has drained this far."""


class Recorder:
    """The ring buffer, the ids and programs of recorded probes, and the drain (VM stopped)."""

    def __init__(
        self,
        memory: GuestMemory,
        target: Target,
        area: SlotArea,
        programs: SlotCache,
        *,
        helpers: rec.CopyHelpers,
        describe: Callable[[int], str],
        ring_pages: int = RING_PAGES,
        returns: ReturnRecords | None = None,
    ) -> None:
        """Map the ring in ``area`` (VM stopped). ``programs``: cells of PROGRAM_SIZE
        bytes in executable slot pages; ``describe`` names an address in errors;
        ``ring_pages`` a power of two (:func:`ring_pages_fitting`); ``returns``: the
        guest's return table, for recorded return probes."""
        self.memory = memory
        self.target = target
        self.describe = describe
        self.area = area
        control = area.map_page(executable=False, writable=True)
        # The drain byte carries a gdbstub watchpoint, and QEMU's TCG takes every access
        # to a page holding one off its fast path: a load or store through a helper, an
        # atomic (the head's cmpxchg, the busy byte's xchg) with every vCPU stopped. So
        # the byte has a page of its own, which no hit touches until the ring is full;
        # sharing the control page made a recorded hit cost the guest ~2 us more.
        drain = area.map_page(executable=False, writable=True)
        counters = self._contiguous(MAX_RECORD_IDS * 16 // PAGE_SIZE, area)
        ring = self._contiguous(ring_pages, area)
        size = ring_pages * PAGE_SIZE
        self.layout = rec.RingLayout(
            head=control, tail=control + _CONTROL_TAIL, drain=drain,
            busy=control + _CONTROL_BUSY, max_cpus=MAX_CPUS, counters=counters,
            ring=ring, ring_size=size, high_water=int(size * HIGH_WATER),
        )  # fmt: skip
        self.helpers = helpers
        self.programs = programs
        self.probes: dict[int, _RecordedProbe] = {}
        self.retiring: dict[int, _RecordedProbe] = {}
        """Ids of unregistered probes whose hits in flight are not all counted yet."""
        self._free_ids = list(range(MAX_RECORD_IDS))
        self.site_programs: dict[int, Slot] = {}  # site address -> its program cell
        self.maps: dict[int, agg.MapLayout] = {}
        """Probe id -> its aggregate map; kept (for the last read) until the id is freed."""
        self._map_pool: dict[int, list[int]] = {}  # pages -> freed maps of that many
        self._fresh: list[int] = []  # ids added since the last program was written
        self.returns = returns
        self.return_programs: dict[int, Slot] = {}  # site address -> its return program
        self.tail = 0
        """The ring's tail: the host has copied every record before it."""
        self.decoded = 0
        """Every record before this position has been decoded and handed out."""
        self._copy_lock = threading.Lock()  # the tail and the backlog; held for no wait
        self._backlog: list[tuple[int, int, bytes]] = []
        """Records copied out of the ring, not decoded yet: (end position, probe id,
        bytes)."""
        self._backlog_bytes = 0
        self._ring_phys = [area.phys(ring + i * PAGE_SIZE) for i in range(ring_pages)]
        self.feed: ChildFeed | None = None
        """The ring follower's child, while it owns the tail: it copies, drains take from
        its buffer (:mod:`kprobevm.kprobes.ringfollow`)."""
        self.drains = 0
        """Drains with the VM stopped (the guest asked, or there is no shared RAM)."""
        self.running_drains = 0
        """Drains through shared guest RAM with the VM running."""
        self.records = 0
        self.late = 0
        """Records whose id belongs to no probe, live or retiring: lost (never expected)."""

    @staticmethod
    def _contiguous(pages: int, area: SlotArea) -> int:
        return area.map_run(pages, executable=False, writable=True)

    # -- probes and their programs ---------------------------------------------------

    def add(self, kp: Kprobe, spec: RecordSpec) -> int:
        """Give ``kp`` an id (its record's tag and counter index)."""
        if not self._free_ids:
            raise ProbeRefused("ENOSPC", f"more than {MAX_RECORD_IDS} recorded probes",
                               symbol=kp.symbol_name)  # fmt: skip
        probe_id = self._free_ids.pop(0)
        layout = spec.layout
        if spec.stack_size:
            layout = replace(layout, stack_block=self.helpers.thread_size)
        if layout.size > self.layout.ring_size // 8:
            raise ProbeRefused(
                "E2BIG", f"a record of {layout.size} bytes does not fit the ring well",
                symbol=kp.symbol_name,
            )  # fmt: skip
        if spec.at_return:
            if self.returns is None:
                raise ProbeRefused("EOPNOTSUPP", "no return table to record returns with",
                                   symbol=kp.symbol_name)  # fmt: skip
            self.returns.add(probe_id, spec.maxactive)
        if spec.aggregate is not None:
            self.maps[probe_id] = self._new_map(spec.aggregate)
        self.probes[probe_id] = _RecordedProbe(kp, layout, spec.count_only, probe_id)
        self._fresh.append(probe_id)
        self.memory.write(self.layout.counters + 16 * probe_id, bytes(16))
        if spec.count_only:
            kp.count_reader = functools.partial(self.read_count, probe_id)
        return probe_id

    @property
    def direct(self) -> DirectMemory | None:
        """Guest RAM shared with the host (None: every access is a gdbstub one)."""
        return self.memory.direct

    def read_count(self, probe_id: int) -> int:
        """The guest's hit counter of probe ``probe_id`` (through shared RAM, else with the
        VM stopped for the read)."""
        address = self.layout.counters + 16 * probe_id
        direct = self.direct
        if direct is not None and (raw := direct.read_virt(address, 8)) is not None:
            return int(_U64.unpack(raw)[0])
        with self.target.stopped():
            return int(_U64.unpack(self.memory.read(address, 8))[0])

    def remove(self, probe_id: int) -> None:
        """Retire an id whose probe is unregistered (its site no longer enters the
        program for it; VM stopped). Its counters are still read, and its records still
        counted, until :meth:`drain` finds it settled; then the id is free again. A
        count-only probe keeps the hits its counter holds."""
        probe = self.probes.pop(probe_id)
        self._read_counters({probe_id: probe})
        kp = probe.kp
        if kp.count_reader is not None:
            kp.count_reader = None
            kp.nhit += probe.hits  # what the live reader added, kept
        probe.retired_at = self.programs.clock()
        self.retiring[probe_id] = probe
        kp.settling += 1

    def write_program(self, site: ProbeSite, cont: int) -> int:
        """Place the site's program (count or record) in a fresh cell; return its address."""
        fresh, self._fresh = self._fresh, []
        # (a latency probe's map is updated at the return: its entry is the hijack's)
        aggregating = [kp for kp in site.probes if kp.record and kp.record.aggregate
                       and not kp.record.at_return]  # fmt: skip
        if aggregating and len(site.probes) != 1:
            for probe_id in fresh:  # as if never added: the registration fails
                if self.probes[probe_id].kp in site.probes:
                    self._forget(probe_id)
            raise ProbeRefused("EBUSY", "a probe keeping a map cannot share its address",
                               address=site.addr, symbol=aggregating[0].symbol_name)  # fmt: skip
        old = self.site_programs.pop(site.addr, None)
        cell = self.programs.get_insn_slot()
        # a disabled member records nothing, as its handler would not run
        ids = [kp.record_id for kp in site.probes
               if kp.record_id is not None and not kp.disabled]  # fmt: skip
        if aggregating:
            code = self._aggregate_program(site, aggregating[0], cell.address, cont)
        elif all(kp.record is not None and kp.record.count_only and not kp.record.at_return
                 for kp in site.probes):  # fmt: skip
            # a disabled member of the aggregate counts nothing (as its handler would not run)
            counters = tuple(self.layout.counters + 16 * kp.record_id for kp in site.probes
                             if kp.record_id is not None and not kp.disabled)
            code = rec.build_count_program(cell.address, counters=counters, cont=cont).code
        else:
            code = self._site_code(site, cell.address, ids, cont)
        rec.check_program_fits(code, PROGRAM_SIZE, self.describe(site.addr))
        self.memory.write_phys(self.area.phys(cell.address), code)
        self.site_programs[site.addr] = cell
        if old is not None:
            self.programs.free_insn_slot(old)
        return cell.address

    def _site_code(self, site: ProbeSite, at: int, ids: list[int], cont: int) -> bytes:
        """The record program of the site's entry probes, behind the hijack of its
        return probes if it has any (their return program placed in a cell of its own)."""
        layouts = {i: self.probes[i].layout for i in ids}
        returns = (self.returns.probes(ids, layouts, self._latency_maps(ids))
                   if self.returns is not None else ())  # fmt: skip
        entry = [(i, layouts[i]) for i in ids if i not in {p.probe_id for p in returns}]
        old_return = self.return_programs.pop(site.addr, None)
        body_at, code = at, b""
        if returns:
            assert self.returns is not None
            back = self.programs.get_insn_slot()
            program = self.returns.return_program(back.address, returns, ring=self.layout,
                                                  helpers=self.helpers)  # fmt: skip
            rec.check_program_fits(program, PROGRAM_SIZE, self.describe(site.addr))
            self.memory.write_phys(self.area.phys(back.address), program)
            self.return_programs[site.addr] = back
            body_at = at + self.returns.hijack_size(returns, ring=self.layout)
            code = self.returns.hijack(at, returns, ring=self.layout, program=back.address,
                                       cont=body_at if entry else cont)  # fmt: skip
        if old_return is not None:
            self._forget_return_program(old_return, self.return_programs.get(site.addr))
        if returns and not entry:
            return code
        return code + rec.build_record_program(
            body_at, probes=tuple(entry), probe_ip=site.addr, ring=self.layout,
            helpers=self.helpers, cont=cont,
        ).code  # fmt: skip

    def _latency_maps(self, ids: list[int]) -> dict[int, LatencyMap]:
        """The histograms of the latency probes among ``ids``."""
        out = {}
        for i in ids:
            spec = self.probes[i].kp.record
            if spec is not None and spec.aggregate is not None and spec.aggregate.latency:
                out[i] = LatencyMap(self.maps[i], spec.aggregate.latency)
        return out

    def _forget_return_program(self, old: Slot, new: Slot | None) -> None:
        """Calls in flight through ``old`` return through ``new`` (None: through none)."""
        assert self.returns is not None
        self.returns.redirect(old.address, new.address if new is not None else 0)
        self.programs.free_insn_slot(old)

    def _forget(self, probe_id: int) -> None:
        """Undo :meth:`add` of a probe no vCPU has run (its registration failed)."""
        probe = self.probes.pop(probe_id)
        probe.kp.record_id, probe.kp.count_reader = None, None
        if (old_map := self.maps.pop(probe_id, None)) is not None:
            self._map_pool.setdefault(self._map_pages(old_map), []).append(old_map.base)
        if self.returns is not None:
            self.returns.release(probe_id)
        self._free_ids.insert(0, probe_id)

    def _aggregate_program(self, site: ProbeSite, kp: Kprobe, at: int, cont: int) -> bytes:
        """The program of a site whose probe folds its hits into a map."""
        if kp.disabled or kp.record_id is None:
            return rec.build_count_program(at, counters=(), cont=cont).code
        assert kp.record is not None and kp.record.aggregate is not None
        return agg.build_aggregate_program(
            at, probe_id=kp.record_id, layout=self.maps[kp.record_id],
            field=kp.record.aggregate.field, ring=self.layout, helpers=self.helpers, cont=cont,
            walk=kp.record.aggregate.walk, probe_ip=kp.addr or site.addr,
        ).code  # fmt: skip

    @staticmethod
    def _map_pages(layout: agg.MapLayout) -> int:
        return -(-layout.size // PAGE_SIZE)

    def _new_map(self, aggregation: Aggregation) -> agg.MapLayout:
        """A zeroed map in slot memory, one region per vCPU (VM stopped)."""
        ncpus = len(self.target.client.threads())
        layout = aggregation.layout(0, ncpus)
        pages = self._map_pages(layout)
        pool = self._map_pool.get(pages)
        if pool:
            base = pool.pop()
            self.memory.write(base, bytes(pages * PAGE_SIZE))
        else:
            base = self._contiguous(pages, self.area)
        return aggregation.layout(base, ncpus)

    def drop_program(self, site: ProbeSite) -> None:
        cell = self.site_programs.pop(site.addr, None)
        if cell is not None:
            self.programs.free_insn_slot(cell)
        back = self.return_programs.pop(site.addr, None)
        if back is not None:
            self._forget_return_program(back, None)

    # -- the drain -------------------------------------------------------------------

    def drain(
        self, *, running: bool = False, closing: bool = False, limit: int | None = None
    ) -> list[tuple[Kprobe, Record]]:
        """Take every complete record out of the ring and the backlog; update the counters.

        With the VM stopped, or ``running`` (through shared guest RAM only). A record
        still being written stays, with everything after it, for next time. The new tail
        is stored through shared RAM, else it goes with the next resume. A record of a
        retired probe is counted in its ``nmissed``, and retired ids that have settled are
        freed (judged with the VM stopped: it asks which vCPUs are quiescent).
        ``closing``: no vCPU can enter a program any more (the channel is going and has
        waited for every vCPU), so every retired id settles. ``limit``: decode at most
        that many records now (the rest stay in the backlog for the next drain).
        """
        if running and self.direct is None:
            raise KprobeError("draining a running guest's ring needs shared guest RAM")
        head = self.memory.u64(self.layout.head)
        self._read_counters(self.probes | self.retiring)
        self.copy_out(running=running)
        with self._copy_lock:
            backlog = self._backlog
            if limit is not None and len(backlog) > limit:
                backlog, self._backlog = backlog[:limit], backlog[limit:]
                upto = backlog[-1][0]
                self._backlog_bytes -= upto - self.decoded
            else:
                self._backlog, self._backlog_bytes = [], 0
                upto = self.tail
        out: list[tuple[Kprobe, Record]] = []
        if backlog:
            if running:
                self.running_drains += 1
            else:
                self.drains += 1
            for _, probe_id, data in backlog:
                self._deliver(out, probe_id, data)
            self.records += len(out)
        self.decoded = upto
        self._settle(head, closing=closing, running=running)
        return out

    @property
    def backlog_full(self) -> bool:
        """Records wait in the host's backlog up to :data:`MAX_BACKLOG`: none is copied."""
        return self._backlog_bytes >= MAX_BACKLOG

    @property
    def ring_phys(self) -> list[int]:
        """The ring's pages' physical addresses, in order."""
        return self._ring_phys

    def adopt_feed(self, feed: ChildFeed) -> None:
        """Hand the tail to the follower's child (before it starts)."""
        with self._copy_lock:
            feed.begin(self.tail)
            self.feed = feed

    def end_feed(self, *, touch_guest: bool = True) -> None:
        """Take the tail back from the follower's child (ended first), with every record
        it copied; the guest's tail is stored again (the child may have died before).
        ``touch_guest`` False: the guest is gone, the child is only ended."""
        feed, self.feed = self.feed, None
        if feed is None:
            return
        feed.end()
        if not touch_guest:
            feed.close()
            return
        with self._copy_lock:
            tail = self.tail
            pos, records = feed.take(tail, budget=None)
            self._keep(tail, pos, records)
            self._store_tail(pos, running=True)
        feed.close()

    def copy_out(self, *, running: bool = True) -> int:
        """Move the complete records after the tail into the host's backlog and the tail
        past them (the guest may reuse that room at once); how many. The ring follower
        calls this with the VM running, every drain before it decodes. Nothing is copied
        while the backlog holds :data:`MAX_BACKLOG` bytes: the ring fills, and the guest
        asks for a stop (the decoding then catches up). While the follower's child owns
        the tail, the records come from its buffer; with the VM stopped the child looks
        once more first (no lock held while we wait), and one that does not answer is
        ended and the host copies itself, said on stderr."""
        if self.feed is not None and not running and not self.feed.sync():
            log.warning("the ring follower's child did not answer: the host copies the "
                        "ring itself from now on")  # fmt: skip
            self.end_feed()
        ring = self.layout
        with self._copy_lock:
            if self._backlog_bytes >= MAX_BACKLOG:
                return 0
            tail = self.tail
            if self.feed is not None:
                pos, records = self.feed.take(tail, budget=MAX_BACKLOG - self._backlog_bytes)
                return self._keep(tail, pos, records)
            head = self.memory.u64(ring.head)
            if head == tail:
                return 0
            pos, records = self._take(tail, head, running=running)
            if pos == tail:
                return 0
            self._store_tail(pos, running=running)
            return self._keep(tail, pos, records)

    def _store_tail(self, pos: int, *, running: bool) -> None:
        """The ring's new tail to the guest: through shared RAM, else with the resume."""
        direct = self.direct
        if direct is None or not direct.write_data(self.layout.tail, _U64.pack(pos)):
            if running:  # (never here: the running drain is chosen where this works)
                raise KprobeError("the ring's tail cannot be stored with the VM running")
            self.target.queue_write(self.layout.tail, _U64.pack(pos))

    def _keep(self, tail: int, pos: int, records: list[tuple[int, int, bytes]]) -> int:
        """Copied records into the backlog, the tail at ``pos``; how many."""
        self.tail = pos
        self._backlog += records
        self._backlog_bytes += pos - tail
        return len(records)

    def _take(
        self, tail: int, head: int, *, running: bool
    ) -> tuple[int, list[tuple[int, int, bytes]]]:
        """The complete records from ``tail`` (end position, probe id, bytes), and where
        the next copy starts. With the VM stopped the ring is read in one go (nothing writes it
        meanwhile). While vCPUs write it, it is read twice, through the ring's physical
        pages: a record whose stamp (the guest's last store) is complete in the first
        copy was complete before the second began, so its size, id and bytes are taken
        from the second (one copy may load a record's bytes before its stamp)."""
        if running:
            stamps = self._ring_copy(tail, head)
            data = self._ring_copy(tail, head)
        else:
            data = stamps = self._ring_bytes(tail, head)
        mask = self.layout.ring_size - 1
        out: list[tuple[int, int, bytes]] = []
        pos = tail
        while pos < head:
            at = pos - tail
            stamp = _U64.unpack_from(stamps, at)[0]
            if stamp == pos + 1:
                size, probe_id = _SIZE_ID.unpack_from(data, at + 8)
                pos += size
                out.append((pos, probe_id, data[at : at + size]))
            elif stamp == (pos + 1) | rec.PAD_BIT:
                pos = (pos | mask) + 1
            else:
                break
        return pos, out

    def _ring_copy(self, tail: int, head: int) -> bytes:
        """The ring's bytes from ``tail`` to ``head`` through shared RAM, page by page."""
        direct = self.direct
        assert direct is not None
        mask, phys = self.layout.ring_size - 1, self._ring_phys
        parts: list[bytes] = []
        at, n = tail & mask, head - tail
        while n:
            offset = at & (PAGE_SIZE - 1)
            chunk = min(n, PAGE_SIZE - offset)
            part = direct.read_phys(phys[at >> 12] + offset, chunk)
            if part is None:
                raise KprobeError(f"the ring at {at:#x} is not in shared guest RAM")
            parts.append(part)
            at, n = (at + chunk) & mask, n - chunk
        return b"".join(parts)

    def _deliver(self, out: list[tuple[Kprobe, Record]], probe_id: int, data: bytes) -> None:
        probe = self.probes.get(probe_id)
        if probe is not None:
            out.append((probe.kp, decode_record(data, probe.layout)))
        elif (retired := self.retiring.get(probe_id)) is not None:
            if not retired.count_only:  # (its counter holds the hit already)
                retired.kp.nmissed += 1  # its handler will not run: it is gone
        else:
            self.late += 1

    def unjudged(self) -> bool:
        """Whether a retired id still waits to be judged settled (a drain with the VM
        stopped does that)."""
        return any(p.settle_head is None for p in self.retiring.values())

    def _settle(self, head: int, *, closing: bool, running: bool) -> None:
        """Free the retired ids no vCPU can still write records for, once the host has
        read past the last record they could have written (``head`` read in this drain;
        whether vCPUs are quiescent is only asked with the VM stopped)."""
        if not self.retiring:
            return
        waiting = [] if running else [p for p in self.retiring.values() if p.settle_head is None]
        if waiting and not closing:
            self.programs.before_collect()  # which vCPUs are quiescent now
        for probe in waiting:
            assert probe.retired_at is not None
            if closing or self.programs.grace_over(probe.retired_at):
                probe.settle_head = head
                if self.returns is not None and probe.record_id in self.returns.bounds:
                    # no vCPU is inside its hijack any more: calls in flight lose its bit
                    self.returns.forget(probe.record_id)
        for probe_id, probe in list(self.retiring.items()):
            if probe.settle_head is not None and self.decoded >= probe.settle_head:
                # its counters were read in this stop, and cannot move any more
                del self.retiring[probe_id]
                self._free_ids.append(probe_id)
                if self.returns is not None:
                    self.returns.release(probe_id)
                if (old_map := self.maps.pop(probe_id, None)) is not None:
                    self._map_pool.setdefault(self._map_pages(old_map), []).append(old_map.base)
                probe.kp.settling -= 1

    def _ring_bytes(self, tail: int, head: int) -> bytes:
        ring = self.layout
        start = tail & (ring.ring_size - 1)
        n = head - tail
        first = min(n, ring.ring_size - start)
        data = self.memory.read(ring.ring + start, first)
        if first < n:
            data += self.memory.read(ring.ring, n - first)
        return data

    def _read_counters(self, probes: dict[int, _RecordedProbe]) -> None:
        """Add what the guest's counters of ``probes`` gained since the last read to
        their Kprobes' figures."""
        if not probes:
            return
        lo, hi = min(probes), max(probes) + 1
        raw = self.memory.read(self.layout.counters + 16 * lo, 16 * (hi - lo))
        for probe_id, probe in probes.items():
            hits, missed = struct.unpack_from("<QQ", raw, 16 * (probe_id - lo))
            new_hits, new_missed = hits - probe.hits, missed - probe.missed
            probe.hits, probe.missed = hits, missed
            kp = probe.kp
            kp.guest_hits += new_hits + new_missed
            kp.nmissed += new_missed
            if probe.count_only and probe.retired_at is not None:
                kp.nhit += new_hits  # no live reader adds them any more


_SOMEWHERE = 0xFFFFFFFFFE000000  # an address in the slot area's range, for a size only
_SOME_RING = rec.RingLayout(
    head=_SOMEWHERE, tail=_SOMEWHERE + _CONTROL_TAIL, drain=_SOMEWHERE - PAGE_SIZE,
    busy=_SOMEWHERE + _CONTROL_BUSY, max_cpus=MAX_CPUS, counters=_SOMEWHERE + PAGE_SIZE,
    ring=_SOMEWHERE + 8 * PAGE_SIZE, ring_size=RING_PAGES * PAGE_SIZE,
    high_water=int(RING_PAGES * PAGE_SIZE * HIGH_WATER),
)  # fmt: skip
_SOME_HELPERS = rec.CopyHelpers(
    copy_from_kernel=0xFFFFFFFF81000000, copy_from_user=0xFFFFFFFF81000100,
    strncpy_from_kernel=0xFFFFFFFF81000200, strncpy_from_user=0xFFFFFFFF81000300,
    cpu_number=0x1000, current_task=0x2000, task_pid=0x500, task_comm=0x700,
    task_stack=0x20, top_of_stack=0x3000,
)  # fmt: skip


def program_size(specs: Sequence[RecordSpec], *, probe_ip: int) -> int:
    """Bytes of the program of a site recording ``specs`` (one per probe, as
    :meth:`Recorder.write_program` builds it), wherever it goes: the program's shape does
    not depend on addresses (every branch, call and memory operand in it has a 32-bit
    displacement), so a trace session can tell before placing anything whether it fits
    its :data:`PROGRAM_SIZE` cell."""
    at, cont = _SOMEWHERE + 64 * PAGE_SIZE, _SOMEWHERE + 65 * PAGE_SIZE
    if all(spec.count_only for spec in specs):
        counters = tuple(_SOME_RING.counters + 16 * i for i in range(len(specs)))
        return len(rec.build_count_program(at, counters=counters, cont=cont).code)
    probes = tuple((i, spec.layout) for i, spec in enumerate(specs) if not spec.at_return)
    returns = returns_size([(i, s.layout) for i, s in enumerate(specs) if s.at_return])
    if returns[0] and not probes:
        return max(returns)
    return max(returns[0] + len(rec.build_record_program(
        at, probes=probes, probe_ip=probe_ip, ring=_SOME_RING, helpers=_SOME_HELPERS,
        cont=cont,
    ).code), returns[1])  # fmt: skip


def returns_size(probes: Sequence[tuple[int, rec.RecordLayout]]) -> tuple[int, int]:
    """Bytes of the hijack and of the return program of recorded return probes (their
    record ids, layouts) on one function, wherever they go; (0, 0) for none."""
    if not probes:
        return 0, 0
    table = retrecord.ReturnTable(
        table=_SOMEWHERE + 80 * PAGE_SIZE, entries=64, info=_SOMEWHERE + 81 * PAGE_SIZE,
        actives=_SOMEWHERE + 82 * PAGE_SIZE, trampoline=_SOMEWHERE + 83 * PAGE_SIZE,
    )  # fmt: skip
    # the largest shape: bit 1's shift is a byte shorter (the shift-by-one form)
    bits = [b for b in range(len(probes) + 1) if b != 1][: len(probes)]
    ret = tuple(
        retrecord.ReturnProbe(bit, i, 1, layout)
        for bit, (i, layout) in zip(bits, probes, strict=True)
    )
    at = _SOMEWHERE + 64 * PAGE_SIZE
    hijack = retrecord.build_hijack_program(at, probes=ret, returns=table, ring=_SOME_RING,
                                            program=at, cont=at)  # fmt: skip
    back = retrecord.build_return_program(at, probes=ret, returns=table, ring=_SOME_RING,
                                          helpers=_SOME_HELPERS)  # fmt: skip
    return len(hijack.code), len(back.code)


def copy_helpers(
    syms: KernelSymbols, layout: TaskLayout | None, split: AddressSpace
) -> rec.CopyHelpers:
    """The kernel functions and per-CPU offsets the record program uses; ``split`` is the
    guest's paging mode's user/kernel split."""
    if layout is None:
        raise KprobeError("recorded probes need the kernel's BTF (task_struct offsets)")
    try:
        return rec.CopyHelpers(
            copy_from_kernel=syms["copy_from_kernel_nofault"],
            copy_from_user=syms["copy_from_user_nofault"],
            strncpy_from_kernel=syms["strncpy_from_kernel_nofault"],
            strncpy_from_user=syms["strncpy_from_user_nofault"],
            cpu_number=layout.cpu_number,
            current_task=layout.current,
            task_pid=layout.pid,
            task_comm=layout.comm,
            task_size_max=split.task_size_max,
            thread_size=_thread_size(syms),
            task_stack=layout.stack,
            top_of_stack=_top_of_stack(layout),
        )
    except KeyError as exc:
        raise KprobeError(f"recorded probes need the kernel symbol {exc}") from exc


def _top_of_stack(layout: TaskLayout) -> int:
    """:attr:`TaskLayout.top_of_stack`; when the kernel's BTF does not say, stack copies
    from ``current``'s own stack take its whole entry ``pt_regs`` (said on stderr)."""
    if not layout.top_of_stack:
        log.warning("no per-CPU top_of_stack in the kernel's BTF: stack copies take the"
                    " whole pt_regs at the top of current's stack")  # fmt: skip
    return layout.top_of_stack


def _thread_size(syms: KernelSymbols) -> int:
    """The kernel's THREAD_SIZE (:func:`kernel_thread_size`); x86-64's 16 KiB, said on
    stderr, when kallsyms does not bound the init task's stack."""
    size = kernel_thread_size(syms)
    if size is not None:
        return size
    log.warning("kernel stack size unknown (no __start_init_stack or __start_init_task "
                "pair in kallsyms): stack copies assume %d bytes", rec.STACK_BLOCK)  # fmt: skip
    return rec.STACK_BLOCK
