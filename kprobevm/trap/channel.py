"""The trap path: how a guest int3 reaches the host, and how the guest goes on after it.

Fast channel (:class:`WatchpointChannel`, see docs/design.md): the host points IDT
vector 3 at a stub in a slot page. The stub finds the probe's slot in a hash table and
``iretq``s into it; the slot's first instruction stores to a mailbox that carries a
gdbstub write watchpoint, so the VM stops with every register as at the probe. QEMU
flushes its whole TCG cache at a *breakpoint* stop, not at a watchpoint stop
(FACTS.md), which is why the trap arrives this way. A hot site's store has a mailbox
byte and watchpoint of its own, so on one vCPU its hit costs one stop and one ``c``:
registers are read only when a handler asks (other sites cost a ``p`` of RIP too), and
written back, with the ``c``, only when a handler changed them. The slot then runs the
displaced instruction and jumps back. Without a host (killed), the watched stores are
plain stores and every probe still runs its instruction: the guest never sees an
unknown int3.

Fallback (:class:`BreakpointChannel`): a gdbstub breakpoint on the guest's own #BP
vector, for guests where no slot memory can be mapped; see its docstring.
"""

from __future__ import annotations

import functools
import logging
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.errors import KprobeError, KprobeVMError, ProbeTextChanged
from kprobevm.gdbstub.packet import parse_thread_id
from kprobevm.kprobes.core import ProbeSite
from kprobevm.kprobes.recorder import PROGRAM_SIZE, Recorder
from kprobevm.kprobes.slots import Slot, SlotCache
from kprobevm.x86 import asm, ooline
from kprobevm.x86 import insn as x86insn
from kprobevm.x86.idt import BP_VECTOR, GATE_SIZE, decode_idt_gate, encode_idt_gate, gate_address
from kprobevm.x86.ptregs import PtRegs
from kprobevm.x86.slotmap import ExecutablePages, SlotArea
from kprobevm.x86.stub import build_int3_stub, stub_hash

if TYPE_CHECKING:
    from kprobevm.gdbstub.client import GdbClient
    from kprobevm.gdbstub.packet import StopReply
    from kprobevm.guest.vm import VM
    from kprobevm.kprobes.core import Kprobe, KprobeManager

__all__ = ["TrapChannel", "WatchpointChannel", "install_channel"]

log = logging.getLogger(__name__)

INT3 = bytes([asm.INT3])
SLOT_SIZE = 128  # two halves: the entry code and its continuation copy
TABLE_SLOTS = 4096  # open-addressing table: 64 KiB, good for 2,048 probes at half load
TABLE_PAGES = TABLE_SLOTS * 16 // 4096
EMPTY, TOMBSTONE = 0, 1
WATCH_WRITE = 2  # gdbstub Z2
# The mailbox page: byte 0 takes the pre and post stores of most sites, byte 1 the
# kretprobe trampoline's; the others belong to hot sites, each with its own watchpoint,
# so that their stop names them. Hot ones only: QEMU looks through every watchpoint at
# each TLB fill, and 1,000 watchpoints cost an idle guest about 30% (100 cost nothing
# measurable).
MAILBOX_BYTES = 4096
RETURN_WATCH = 1
SITE_WATCHES = 64
PROMOTE_AFTER = 8  # hits through the shared byte before a site gets its own


@functools.lru_cache(maxsize=256)
def cpu_of_thread(thread: str | None) -> int:
    """vCPU index of a gdbstub thread id (``p01.02`` -> 1)."""
    if not thread:
        return 0
    return max(parse_thread_id(thread)[1] - 1, 0)


def vcpu_rips(client: GdbClient) -> list[int]:
    """Every vCPU's RIP (VM stopped)."""
    return list(client.read_register_each("rip", client.threads()).values())


@dataclass
class TrapStats:
    """Where the host's time per hit goes (nanoseconds, summed over ``hits``)."""

    hits: int = 0
    regs_ns: int = 0
    """Reading the vCPU's RIP or registers, when the stop or a handler needs them."""
    handler_ns: int = 0
    """Running the handlers (memory reads they make included)."""
    writeback_ns: int = 0
    """Preparing register write-backs (they are sent with the resume)."""
    caught_pending: int = 0
    """Hits found on another vCPU than the one QEMU reported (SMP)."""
    promoted: int = 0
    """Hot sites given a watchpoint of their own."""

    def per_hit_us(self) -> dict[str, float]:
        n = max(self.hits, 1)
        return {
            "regs": self.regs_ns / n / 1e3,
            "handler": self.handler_ns / n / 1e3,
            "writeback": self.writeback_ns / n / 1e3,
        }


class TrapChannel:
    """What the probe table needs from a channel: sites, arming, and the trap handler."""

    name = "none"

    def __init__(self, vm: VM, manager: KprobeManager) -> None:
        self.vm = vm
        self.manager = manager
        self.unknown_stops = 0
        self.threads: list[str] = []
        self.stats = TrapStats()
        self._handler_end = 0

    def read_insn(self, addr: int) -> x86insn.Insn:
        insn = x86insn.decode(self.vm.read(addr, x86insn.MAX_INSN_SIZE), addr)
        insn.check_probeable()
        return insn

    def prepare_site(self, addr: int) -> ProbeSite:
        raise NotImplementedError

    def commit_site(self, site: ProbeSite) -> None:
        raise NotImplementedError

    def rebuild_site(self, site: ProbeSite) -> None:
        raise NotImplementedError

    def discard_site(self, site: ProbeSite) -> None:
        raise NotImplementedError

    #: Whether probes with a RecordSpec (recorded in the guest) can be placed.
    records = False

    def flush_records(self) -> None:
        """Hand every recorded hit in the guest to its handler now (VM stopped)."""

    def release_record_id(self, kp: Kprobe) -> None:
        """An unregistered recorded probe gives its id back."""

    def arm(self, site: ProbeSite) -> None:
        """Write the int3 (journal first; refuse if the guest changed the bytes)."""
        current = self.vm.memory.read(site.addr, site.insn.length)
        if current != site.insn.bytes:
            raise ProbeTextChanged(site.addr, site.insn.bytes, current)
        site.int3_seq = self.vm.journal.record(
            "virt", site.addr, site.insn.bytes[:1], INT3,
            f"int3 at {self.vm.symbols.describe(site.addr)}",
        )  # fmt: skip
        self.vm.memory.write(site.addr, INT3)
        site.armed = True

    def disarm(self, site: ProbeSite) -> None:
        """Put the original byte back, unless the guest changed it under us."""
        current = self.vm.memory.read(site.addr, 1)
        if current != INT3:
            raise ProbeTextChanged(site.addr, INT3, current)
        self.vm.memory.write(site.addr, site.insn.bytes[:1])
        if site.int3_seq is not None:
            self.vm.journal.undone(site.int3_seq)
        site.int3_seq = None
        site.armed = False

    def emulate(self, site: ProbeSite, regs: PtRegs) -> dict[str, int]:
        """Run a branch on the host, then the post_handlers; the registers to write back.

        For a probe whose instruction the slot cannot follow with a post store (returns,
        indirect branches), and for every branch on the breakpoint channel.
        """
        from kprobevm.x86.emulate import emulate

        result = emulate(site.insn, _gdb_view(regs), self.vm.memory.u64)
        for write in result.writes:
            self.vm.memory.write(write.addr, write.data)
        regs.ip, regs.sp = result.rip, result.rsp
        if result.rcx is not None:
            regs.cx = result.rcx
        self.manager.run_post_handlers(site, regs)
        self._handler_end = time.perf_counter_ns()
        return _gdb_changes(regs.changes(), rip=regs.ip)

    def ensure_running(self) -> None:
        """The trap thread runs while any probe is registered."""
        target = self.vm.target
        target.on_stop = self.on_stop
        target.start()

    def on_stop(self, stop: StopReply) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class WatchpointChannel(TrapChannel):
    """The fast channel: IDT vector 3 -> stub -> slot whose first store is watched."""

    name = "watchpoint"
    records = True
    #: Seconds between drains of the record ring while recorded probes exist.
    RECORD_DRAIN_INTERVAL = 0.1

    def __init__(self, vm: VM, manager: KprobeManager) -> None:
        super().__init__(vm, manager)
        self.recorder: Recorder | None = None
        self.area: SlotArea | None = None
        self.slots: SlotCache | None = None
        self.mailbox = 0
        self.table = 0
        self.table_keys = [EMPTY] * TABLE_SLOTS
        self.idt_gate_addr = 0
        self.idt_seq: int | None = None
        self.orig_gate = b""
        self.new_gate = b""
        self.real_handler = 0
        self.stub = 0
        # RIP at a watchpoint stop -> (site, resume ip for a post stop or None for pre)
        self.rip_map: dict[int, tuple[ProbeSite, int | None]] = {}
        self.ret_store = -1  # RIP after the kretprobe trampoline's watched store
        # mailbox byte -> the hot site whose pre store writes it (its own watchpoint)
        self.watch_sites: dict[int, ProbeSite] = {}
        self._next_watch = 0
        self._shared_hits: dict[int, int] = {}  # site address -> hits via byte 0
        self._regs_ns = 0
        self._handler_end = 0
        self.last_quiescent: dict[str, float] = {}
        self.watchdog: subprocess.Popen[bytes] | None = None

    # -- installation ----------------------------------------------------------------

    def install(self) -> None:
        vm = self.vm
        reserve = vm.slot_reserve
        if reserve is None:
            raise KprobeError("the guest has no reserved memory (memmap=SIZE$BASE) for slots")
        # symbols come over SSH: never while the VM is held stopped
        idt = vm.symbols["idt_table"]
        expected = vm.symbols.get("asm_exc_int3")
        with vm.target.stopped() as client:
            cr3 = client.read_registers()["cr3"]
            area = SlotArea(vm.memory, vm.journal, reserve, cr3)
            area.setup()
            self.area = area
            self.stub = area.map_page(executable=True)
            self.mailbox = area.map_page(executable=False, writable=True)
            table_pages = [area.map_page(executable=False) for _ in range(TABLE_PAGES)]
            if table_pages != [table_pages[0] + i * 4096 for i in range(TABLE_PAGES)]:
                raise KprobeError("slot area: hash table pages are not contiguous")
            self.table = table_pages[0]
            # the kretprobe trampoline and its instance table (the guest frees entries)
            trampoline = area.map_page(executable=True)
            ret_table = area.map_page(executable=False, writable=True)
            code = vm.kretprobes.install(trampoline, ret_table, self.mailbox + RETURN_WATCH)
            vm.memory.write_phys(area.phys(trampoline), code)
            self.ret_store = vm.kretprobes.store_end
            vm.journal.note(kretprobe_table=ret_table, trampoline=trampoline)
            self.threads = client.threads()
            self.slots = self._slot_cache(SLOT_SIZE, grace_seconds=0.05)

            self.idt_gate_addr = gate_address(idt, BP_VECTOR)
            self.orig_gate = vm.memory.read(self.idt_gate_addr, GATE_SIZE)
            self.real_handler = decode_idt_gate(self.orig_gate)
            if expected is not None and expected != self.real_handler:
                raise KprobeError(
                    f"IDT vector 3 points at {vm.symbols.describe(self.real_handler)},"
                    " not asm_exc_int3: someone else owns the #BP vector",
                    address=self.real_handler,
                )
            stub = build_int3_stub(
                self.stub, table=self.table, table_slots=TABLE_SLOTS,
                real_handler=self.real_handler,
            )  # fmt: skip
            vm.memory.write_phys(area.phys(self.stub), stub.code)
            client.insert_breakpoint(WATCH_WRITE, self.mailbox, 1)
            client.insert_breakpoint(WATCH_WRITE, self.mailbox + RETURN_WATCH, 1)
            self.new_gate = encode_idt_gate(self.orig_gate, self.stub + stub.offsets["entry"])
            self.idt_seq = vm.journal.record(
                "virt", self.idt_gate_addr, self.orig_gate, self.new_gate, "IDT vector 3 -> stub"
            )
            vm.memory.write(self.idt_gate_addr, self.new_gate)
        self._start_watchdog()

    def _start_watchdog(self) -> None:
        """A child that sends ``D`` (detach) on our gdbstub connection if we die.

        QEMU keeps a gdbstub watchpoint after its client vanishes, and a hit would then
        stop the VM with nobody to continue it; a detach removes every breakpoint and
        continues. The child shares our socket, so the hot path pays nothing for it.
        """
        fd = self.vm.target.client.fileno()
        self.watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(fd)],
            stdin=subprocess.PIPE, pass_fds=(fd,), close_fds=True,
        )  # fmt: skip

    # -- the hash table the stub reads -----------------------------------------------

    def _slot_cache(self, slot_size: int, grace_seconds: float) -> SlotCache:
        """Cells of executable slot pages (instruction slots, record programs), freed
        only once no vCPU can be inside them (see :meth:`_observe_quiescence`)."""
        assert self.area is not None
        cache = SlotCache(
            ExecutablePages(self.area), slot_size=slot_size, grace_seconds=grace_seconds
        )
        cache.before_collect = self._observe_quiescence
        cache.grace_over = self._grace_over
        cache.in_use = self._slot_in_use
        return cache

    def _table_write(self, index: int, key: int, value: int) -> None:
        assert self.area is not None
        self.vm.memory.write_phys(
            self.area.phys(self.table + 16 * index), struct.pack("<QQ", key, value)
        )
        self.table_keys[index] = key

    def _table_insert(self, addr: int, slot_entry: int) -> None:
        index = stub_hash(addr, TABLE_SLOTS)
        free = None
        for _ in range(TABLE_SLOTS):
            key = self.table_keys[index]
            if key == addr:
                free = index
                break
            if key == TOMBSTONE and free is None:
                free = index
            if key == EMPTY:
                if free is None:
                    free = index
                break
            index = (index + 1) % TABLE_SLOTS
        if free is None:
            raise KprobeError("the stub's probe table is full", address=addr)
        self._table_write(free, addr, slot_entry)

    def _table_remove(self, addr: int) -> None:
        index = stub_hash(addr, TABLE_SLOTS)
        for _ in range(TABLE_SLOTS):
            key = self.table_keys[index]
            if key == addr:
                self._table_write(index, TOMBSTONE, 0)
                return
            if key == EMPTY:
                return
            index = (index + 1) % TABLE_SLOTS

    # -- sites -----------------------------------------------------------------------

    def prepare_site(self, addr: int) -> ProbeSite:
        assert self.slots is not None
        insn = self.read_insn(addr)
        slot = self.slots.get_insn_slot()
        return ProbeSite(addr=addr, insn=insn, slot=slot)

    @staticmethod
    def _slot(site: ProbeSite) -> Slot:
        assert site.slot is not None, "a watchpoint-channel site always has a slot"
        return site.slot

    def _write_slot_code(self, site: ProbeSite) -> None:
        """Two copies of the out-of-line code: the entry (the watched pre store, or for a
        recorded site a jump to its record program), and the continuation a handled vCPU
        (or the record program) goes on through (see :meth:`on_stop`)."""
        assert self.area is not None
        post = site.wants_post and site.insn.kind in ooline.POST_STORE_KINDS
        half = SLOT_SIZE // 2
        slot = self._slot(site)
        cont_addr = slot.address + half
        cont = ooline.make_slot_code(
            site.insn, cont_addr, mailbox=self.mailbox, pre_store=False,
            post_store=post, slot_size=half,
        )  # fmt: skip
        site.cont_rip = cont_addr
        area = self.area

        def write(entry_code: bytes) -> None:
            code = entry_code.ljust(half, b"\xcc") + cont.bytes
            self.vm.memory.write_phys(area.phys(slot.address), code)

        if site.recorded:
            # nothing here stops the guest: the program comes back to the continuation
            write(asm.jmp_rel32(slot.address, self._record_program(site, cont_addr)))
            site.pre_rip, site.post_rip = 0, None
            return
        entry = ooline.make_slot_code(
            site.insn, slot.address, mailbox=self.mailbox, pre_mailbox=site.pre_watch,
            post_store=post, slot_size=half,
        )  # fmt: skip
        write(entry.bytes)
        assert entry.pre_store_end is not None
        site.pre_rip = entry.pre_store_end
        site.post_rip = entry.post_store_end
        # a stop lands right after a store, or after the TB break that follows it
        brk = len(ooline.TB_BREAK)
        self.rip_map[entry.pre_store_end] = (site, None)
        self.rip_map[entry.pre_store_end + brk] = (site, None)
        for end, resume in (*entry.post_exits, *cont.post_exits):
            self.rip_map[end] = (site, resume)
            self.rip_map[end + brk] = (site, resume)

    def _record_program(self, site: ProbeSite, cont: int) -> int:
        """Ids for the site's new recorded probes, and its record program (returning to
        ``cont``); the program's address."""
        recorder = self._recorder()
        for kp in site.probes:
            if kp.record_id is None:
                assert kp.record is not None
                kp.record_id = recorder.add(kp, kp.record)
        return recorder.write_program(site, cont)

    def _recorder(self) -> Recorder:
        """The record ring, set up on the first recorded probe (VM stopped)."""
        if self.recorder is None:
            assert self.area is not None and self.slots is not None
            programs = self._slot_cache(PROGRAM_SIZE, grace_seconds=1.0)
            recorder = Recorder(self.vm, self.area, programs)
            self.vm.target.client.insert_breakpoint(WATCH_WRITE, recorder.layout.drain, 1)
            self.recorder = recorder
            self.vm.target.idle_interval = self.RECORD_DRAIN_INTERVAL
        self.vm.target.on_idle = self.flush_records
        return self.recorder

    def flush_records(self) -> None:
        recorder = self.recorder
        if recorder is None or not recorder.probes:
            return
        run = self.manager.run_recorded
        for kp, record in recorder.drain():
            run(kp, record)

    def release_record_id(self, kp: Kprobe) -> None:
        if self.recorder is not None and kp.record_id is not None:
            self.recorder.remove(kp.record_id)
            if not self.recorder.probes:  # no idle stops for an empty ring
                self.vm.target.on_idle = None
        kp.record_id = None

    def _promote(self, site: ProbeSite) -> None:
        """Give a hot site a mailbox byte and a watchpoint of its own (VM stopped).

        The site moves to a fresh slot whose pre store writes that byte; a vCPU still in
        the old slot finishes there (it goes DIRTY). Bytes are handed out round robin, so
        one comes back into use only after the others: a stale report has been seen by
        then. Sites with a post store stay on byte 0 (their old slot's post stop must
        still be found by its RIP).
        """
        self._shared_hits.pop(site.addr, None)
        if site.wants_post or len(self.watch_sites) >= SITE_WATCHES:
            return
        span = MAILBOX_BYTES - RETURN_WATCH - 1
        for _ in range(span):
            addr = self.mailbox + RETURN_WATCH + 1 + self._next_watch
            self._next_watch = (self._next_watch + 1) % span
            if addr not in self.watch_sites:
                break
        self.vm.target.client.insert_breakpoint(WATCH_WRITE, addr, 1)
        self.watch_sites[addr] = site
        site.pre_watch = addr
        self.rebuild_site(site)
        self.stats.promoted += 1

    def _unwatch_site(self, site: ProbeSite) -> None:
        if site.pre_watch is not None:
            self.vm.target.client.remove_breakpoint(WATCH_WRITE, site.pre_watch, 1)
            del self.watch_sites[site.pre_watch]
            site.pre_watch = None

    def _forget_rips(self, site: ProbeSite) -> None:
        for rip in [r for r, (s, _) in self.rip_map.items() if s is site]:
            del self.rip_map[rip]

    def commit_site(self, site: ProbeSite) -> None:
        self._write_slot_code(site)
        self._table_insert(site.addr, self._slot(site).address)

    def rebuild_site(self, site: ProbeSite) -> None:
        """Move a site to a fresh slot (the old one may be running: it goes DIRTY)."""
        assert self.slots is not None
        old = self._slot(site)
        site.slot = self.slots.get_insn_slot()
        self._forget_rips(site)
        self._write_slot_code(site)
        self._table_insert(site.addr, site.slot.address)
        self.slots.free_insn_slot(old)

    def discard_site(self, site: ProbeSite) -> None:
        assert self.slots is not None
        self._table_remove(site.addr)
        self._forget_rips(site)
        self._unwatch_site(site)
        self._shared_hits.pop(site.addr, None)
        self.slots.free_insn_slot(self._slot(site))
        if self.recorder is not None:
            self.recorder.drop_program(site)

    def _observe_quiescence(self) -> None:
        """Note which vCPUs are in a quiescent state now (VM stopped).

        The host's stand-in for the kernel's RCU grace period before reusing a slot: a
        vCPU seen in user mode, or halted in the idle loop (the byte before RIP is
        ``hlt``), has no kernel context of its own left interrupted inside a slot (the
        guest kernel does not preempt kernel code: PREEMPT_NONE/VOLUNTARY).
        """
        client = self.vm.target.client
        now = time.monotonic()
        for thread in self.threads:
            regs = client.read_registers(thread=thread, wide=False)
            user = regs["cs"] & 3
            if user or self.vm.memory.read(regs["rip"] - 1, 1) == b"\xf4":
                self.last_quiescent[thread] = now

    def _grace_over(self, freed_at: float) -> bool:
        return all(self.last_quiescent.get(t, 0.0) > freed_at for t in self.threads)

    def _slot_in_use(self, start: int, end: int) -> bool:
        return any(start <= rip < end for rip in self.vcpu_rips())

    def vcpu_rips(self) -> list[int]:
        """Every vCPU's RIP (VM stopped)."""
        return vcpu_rips(self.vm.target.client)

    # -- the hot path (trap thread, VM stopped) --------------------------------------

    def on_stop(self, stop: StopReply) -> None:
        """Handle the hit that stopped the VM (and, under SMP, every other pending one).

        With one vCPU each hit is reported at once, and the watchpoint that fired names
        the site (every site's pre store has a mailbox byte and a watchpoint of its
        own): no register is read unless a handler asks. Under SMP QEMU can report a
        vCPU's stop late (its RIP already past the slot), fold two vCPUs' hits into one
        stop, or name a stale watchpoint, so each vCPU's RIP says what it hit. A handled
        vCPU is then sent on through the slot's continuation copy (or past the probe): a
        late report of the same hit never sits at a store's end, so no hit runs twice.
        """
        watch = stop.watch
        if watch is None:
            return
        if self.recorder is not None and watch.address == self.recorder.layout.drain:
            self.flush_records()
            if len(self.threads) > 1:  # QEMU may have folded other vCPUs' hits into it
                self._handle_every_vcpu(self.vm.target.client, stop.thread or "")
            return
        site = self.watch_sites.get(watch.address)
        if site is None and watch.address not in (self.mailbox, self.mailbox + RETURN_WATCH):
            return
        client: GdbClient = self.vm.target.client
        t0 = time.perf_counter_ns()
        self._regs_ns = 0
        thread = stop.thread or ""
        if len(self.threads) > 1:
            self._handle_every_vcpu(client, thread)
        else:
            load = self._loader(client, None)
            if site is not None:
                writes = self._pre(site, self._lazy(load, site, thread), redirect=False)
            elif watch.address == self.mailbox:  # byte 0: the RIP tells which store
                t = time.perf_counter_ns()
                rip = client.read_register("rip")
                self._regs_ns += time.perf_counter_ns() - t
                writes = self._handle(thread, rip, load, redirect=False, promote=True)
            else:
                writes = self._handle(thread, load()["rip"], load, redirect=False)
            if writes:
                self.vm.target.before_resume.extend(client.register_write_packets(writes))
        stats = self.stats
        stats.hits += 1
        stats.regs_ns += self._regs_ns
        stats.handler_ns += self._handler_end - t0 - self._regs_ns
        stats.writeback_ns += time.perf_counter_ns() - self._handler_end

    def _loader(self, client: GdbClient, thread: str | None) -> _VcpuRegs:
        return _VcpuRegs(self, client, thread)

    def _lazy(self, load: _VcpuRegs, site: ProbeSite, thread: str) -> PtRegs:
        return PtRegs.lazy(
            load, known={"ip": site.addr}, cpu=cpu_of_thread(thread), memory=self.vm.memory,
            along=load.along,
        )  # fmt: skip

    def _handle(
        self,
        thread: str,
        rip: int,
        load: _VcpuRegs,
        *,
        redirect: bool,
        promote: bool = False,
    ) -> dict[str, int]:
        """Run the handlers for a vCPU stopped at ``rip``, after a watched store.

        ``redirect`` moves the vCPU on past the store (a hit found on a vCPU QEMU did not
        report, which QEMU may still report later); a reported hit is never reported
        again, so it stays put and costs no register write.
        """
        self._handler_end = time.perf_counter_ns()
        if self._at_return_store(rip):
            # a copy: the client keeps the dict it returned to skip unchanged writes
            gregs = dict(load())
            return self.vm.kretprobes.on_return(gregs, cpu_of_thread(thread), redirect=redirect)
        hit = self.rip_map.get(rip)
        if hit is None:
            # a late report of a hit already handled, or a slot since discarded
            self.unknown_stops += 1
            return {}
        site, resume = hit
        if resume is None:
            writes = self._pre(site, self._lazy(load, site, thread), redirect=redirect)
            if promote:
                hits = self._shared_hits.get(site.addr, 0) + 1
                self._shared_hits[site.addr] = hits
                if hits >= PROMOTE_AFTER:
                    try:
                        self._promote(site)
                    except KprobeVMError as exc:  # it stays on byte 0, which works
                        log.warning("could not promote the probe at %#x: %s", site.addr, exc)
            return writes
        gregs = dict(load())
        gregs["rip"] = resume
        regs = PtRegs.from_gdb(gregs, cpu=cpu_of_thread(thread), memory=self.vm.memory)
        return self._post(site, regs, resume, redirect=redirect)

    def _at_return_store(self, rip: int) -> bool:
        """A vCPU stopped after the kretprobe trampoline's store (or its TB break)."""
        return rip in (self.ret_store, self.ret_store + len(ooline.TB_BREAK))

    def _handle_every_vcpu(self, client: GdbClient, reported: str) -> None:
        """SMP: every vCPU sitting after a watched store is a hit to handle now."""
        rips = client.read_register_each("rip", self.threads)
        resume_writes: dict[str, int] = {}
        for t, rip in rips.items():
            if rip not in self.rip_map and not self._at_return_store(rip):
                continue
            if t != reported:
                self.stats.caught_pending += 1
            writes = self._handle(t, rip, self._loader(client, t), redirect=True)
            if t == reported:
                resume_writes = writes
            elif writes:
                client.write_registers(writes, thread=t)
        # The reported vCPU's writes ride with the resume. Queued last: their Hg must be
        # the last thread selection before the resume goes out.
        if resume_writes:
            self.vm.target.before_resume.extend(
                client.register_write_packets(resume_writes, reported)
            )

    def _pre(self, site: ProbeSite, regs: PtRegs, *, redirect: bool) -> dict[str, int]:
        skip = self.manager.run_pre_handlers(site, regs)
        self._handler_end = time.perf_counter_ns()
        if skip:
            # the handler moved regs.ip itself: the instruction is not run
            writes = _gdb_changes(regs.changes(), rip=regs.ip)
        elif site.wants_post and site.insn.kind not in ooline.POST_STORE_KINDS:
            writes = self.emulate(site, regs)
        else:
            writes = _gdb_changes(regs.changes(), rip=site.cont_rip if redirect else None)
        regs.expire("pt_regs of a finished hit: read registers inside the handler")
        return writes

    def _post(
        self, site: ProbeSite, regs: PtRegs, resume: int, *, redirect: bool
    ) -> dict[str, int]:
        self.manager.run_post_handlers(site, regs)
        self._handler_end = time.perf_counter_ns()
        changes = regs.changes()
        # past the post store the slot only jumps to ``resume``: go there directly
        moved = "ip" in changes or redirect
        return _gdb_changes(changes, rip=regs.ip if moved else None)

    # -- teardown --------------------------------------------------------------------

    def close(self) -> None:
        """Restore the IDT, drop the watchpoint, wait for vCPUs to leave, unmap."""
        vm = self.vm
        target = vm.target
        target.stop()
        with target.stopped() as client:
            # calls in flight return to their callers directly again
            vm.kretprobes.unhijack_all()
            if self.idt_seq is not None:
                current = vm.memory.read(self.idt_gate_addr, GATE_SIZE)
                if current != self.new_gate:
                    raise ProbeTextChanged(self.idt_gate_addr, self.new_gate, current)
                vm.memory.write(self.idt_gate_addr, self.orig_gate)
                vm.journal.undone(self.idt_seq)
                self.idt_seq = None
            client.remove_breakpoint(WATCH_WRITE, self.mailbox, 1)
            client.remove_breakpoint(WATCH_WRITE, self.mailbox + RETURN_WATCH, 1)
            if self.recorder is not None:
                self.flush_records()
                client.remove_breakpoint(WATCH_WRITE, self.recorder.layout.drain, 1)
                target.on_idle = None
                self.recorder = None
            for site in list(self.watch_sites.values()):
                self._unwatch_site(site)
        self._wait_until_out_of_area()
        with target.stopped() as client:
            if self.area is not None:
                self.area.teardown()
                for thread in client.threads():
                    client.select_thread("g", thread)
                    client.write_register("cr3", client.read_register("cr3"))
        self._stop_watchdog()

    def _wait_until_out_of_area(self, timeout: float = 10.0) -> None:
        """Let the guest run until no vCPU is inside the stub, a slot or a table walk."""
        if self.area is None:
            return
        area = self.area
        deadline = time.monotonic() + timeout
        while True:
            with self.vm.target.stopped():
                inside = [r for r in self.vcpu_rips() if area.contains(r)]
            if not inside:
                return
            if time.monotonic() > deadline:
                raise KprobeError(
                    "vCPUs stay inside the slot area: " + ", ".join(f"{r:#x}" for r in inside)
                )
            self.vm.target.resume()
            time.sleep(0.02)

    def _stop_watchdog(self) -> None:
        if self.watchdog is not None and self.watchdog.stdin is not None:
            self.watchdog.stdin.write(b"q")
            self.watchdog.stdin.close()
            self.watchdog.wait(timeout=5)
            self.watchdog = None


class _VcpuRegs:
    """One stopped vCPU's registers at a hit: one timed ``g`` at most (no x87/xmm
    decoding on the hot path), alone or with other packets in its round trip."""

    __slots__ = ("_channel", "_client", "_thread", "_values")

    def __init__(self, channel: WatchpointChannel, client: GdbClient, thread: str | None):
        self._channel, self._client, self._thread = channel, client, thread
        self._values: dict[str, int] | None = None

    def __call__(self) -> dict[str, int]:
        if self._values is None:
            self.along(())
        assert self._values is not None
        return self._values

    def along(self, packets: Sequence[bytes]) -> tuple[dict[str, int], list[bytes]]:
        t = time.perf_counter_ns()
        values, replies = self._client.read_registers_along(packets, self._thread)
        self._channel._regs_ns += time.perf_counter_ns() - t
        self._values = values
        return values, replies


def _gdb_changes(changes: dict[str, int], *, rip: int | None) -> dict[str, int]:
    """Changed pt_regs values by gdb register name, with the RIP to resume at (if any)."""
    from kprobevm.x86.ptregs import GDB_NAMES

    values = {GDB_NAMES[k]: v for k, v in changes.items() if k != "ip"}
    if rip is not None:
        values["rip"] = rip
    return values


def _gdb_view(regs: PtRegs) -> dict[str, int]:
    from kprobevm.x86.ptregs import GDB_NAMES

    values = regs.as_dict()
    return {GDB_NAMES[k]: v for k, v in values.items() if k in GDB_NAMES}


# The watchdog child: wait for our death (stdin EOF) or a quiet exit ("q"); on death,
# detach the gdbstub so QEMU drops our watchpoint and continues the VM. QEMU only stops
# a running VM on any byte it receives (it does not parse it), so: interrupt first, then
# detach, and read until the OK. With multiprocess negotiated, a plain "D" gets E22.
_WATCHDOG = """
import os, select, sys, time
fd = int(sys.argv[1])
def drain(seconds):
    data, end = b"", time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return data
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk
if sys.stdin.buffer.read(1) != b"q":
    for _ in range(5):
        try:
            os.write(fd, b"\\x03")
            drain(0.2)
            os.write(fd, b"$D;1#b0")
            if b"$OK#9a" in drain(1.0):
                break
        except OSError:
            break
"""


class BreakpointChannel(TrapChannel):
    """The fallback: a gdbstub breakpoint on the guest's own #BP vector entry.

    Needs no guest memory of ours. At the stop the vCPU is at the vector's first
    instruction with the exception frame on its stack. For a probe of ours the host
    unwinds the exception (RIP, RSP, RFLAGS from the frame) and runs the handlers, then
    emulates a branch, or puts the original byte back and single-steps that one vCPU
    (``vCont;s``: the others stay stopped, so none can pass the unprobed instruction;
    QEMU's default step flags mask interrupts), then writes the int3 again. Slow by
    design: QEMU flushes its whole TCG cache at every breakpoint stop (FACTS.md).
    """

    name = "breakpoint"

    def __init__(self, vm: VM, manager: KprobeManager) -> None:
        super().__init__(vm, manager)
        self.vector = 0
        self.skip_to = 0
        """Where a trap that is not ours resumes: past the vector's first instruction,
        when that is a NOP (asm_exc_int3 starts with a patched-out clac), else 0."""

    def install(self) -> None:
        vm = self.vm
        idt = vm.symbols["idt_table"]
        with vm.target.stopped() as client:
            self.vector = decode_idt_gate(vm.memory.read(gate_address(idt, BP_VECTOR), GATE_SIZE))
            first = x86insn.decode(vm.memory.read(self.vector, 16), self.vector)
            if first.mnemonic.startswith("nop"):
                self.skip_to = self.vector + first.length
            client.insert_breakpoint(0, self.vector, 1)
            self.threads = client.threads()

    def prepare_site(self, addr: int) -> ProbeSite:
        return ProbeSite(addr=addr, insn=self.read_insn(addr), slot=None)

    def commit_site(self, site: ProbeSite) -> None:
        pass

    def rebuild_site(self, site: ProbeSite) -> None:
        pass

    def discard_site(self, site: ProbeSite) -> None:
        pass

    def on_stop(self, stop: StopReply) -> None:
        client: GdbClient = self.vm.target.client
        thread = stop.thread or ""
        gregs = dict(client.read_registers(wide=False))
        if gregs["rip"] != self.vector:
            return
        memory = self.vm.memory
        frame_rip, cs, rflags, rsp, _ss = struct.unpack("<5Q", memory.read(gregs["rsp"], 40))
        addr = frame_rip - 1
        site = self.manager.table.get(addr)
        if cs & 3 or site is None or not site.armed:
            self._not_ours(client, thread, addr, cs, rsp, rflags)
            return
        self._handler_end = time.perf_counter_ns()
        # the context the int3 interrupted, as the pre_handler must see it
        gregs.update(rip=addr, rsp=rsp, eflags=rflags)
        regs = PtRegs.from_gdb(gregs, cpu=cpu_of_thread(thread), memory=memory)
        if self.manager.run_pre_handlers(site, regs):
            client.write_registers(_gdb_changes(regs.changes(), rip=regs.ip) | _frame(rsp, rflags))
            return
        if site.insn.is_branch:
            # the exception is unwound: RSP and flags come from the frame even when the
            # branch leaves them as they were
            client.write_registers(self.emulate(site, regs) | _frame(regs.sp, regs.flags))
            self.stats.hits += 1
            return
        client.write_registers(_gdb_changes(regs.changes(), rip=addr) | _frame(rsp, rflags))
        memory.write(addr, site.insn.bytes[:1])
        try:
            client.step(thread)
        finally:
            memory.write(addr, INT3)
        if site.wants_post:
            after = dict(client.read_registers(thread=thread, wide=False))
            post = PtRegs.from_gdb(after, cpu=cpu_of_thread(thread), memory=memory)
            self.manager.run_post_handlers(site, post)
            changes = post.changes()
            if changes:
                client.write_registers(_gdb_changes(changes, rip=post.ip), thread=thread)
        self.stats.hits += 1

    def _not_ours(
        self, client: GdbClient, thread: str, addr: int, cs: int, rsp: int, rflags: int
    ) -> None:
        """A trap of someone else's goes to the guest's handler; a vanished int3 retries."""
        if not cs & 3 and self.vm.memory.read(addr, 1) != INT3:
            # the kernel-mode int3 went away (a probe just removed): re-run the instruction
            client.write_registers({"rip": addr} | _frame(rsp, rflags))
            return
        self.unknown_stops += 1
        if self.skip_to:
            client.write_register("rip", self.skip_to)
        else:
            client.step(thread)  # past the breakpoint; the guest's handler goes on

    def close(self) -> None:
        target = self.vm.target
        target.stop()
        with target.stopped() as client:
            client.remove_breakpoint(0, self.vector, 1)


def _frame(rsp: int, rflags: int) -> dict[str, int]:
    """The stack pointer and flags an exception frame gives back (what iretq would)."""
    return {"rsp": rsp, "eflags": rflags}


def install_channel(vm: VM, manager: KprobeManager) -> TrapChannel:
    """The fast channel when the guest allows it, else the breakpoint fallback.

    ``vm.prefer_channel = "breakpoint"`` asks for the fallback outright.
    """
    if vm.prefer_channel != "breakpoint":
        fast = WatchpointChannel(vm, manager)
        try:
            fast.install()
        except KprobeVMError as exc:
            vm.log.warning("fast trap channel unavailable (%s); using the #BP breakpoint", exc)
        else:
            vm.log.info("trap channel: watchpoint (slot area %#x)", fast.stub)
            return fast
    channel = BreakpointChannel(vm, manager)
    channel.install()
    vm.log.info("trap channel: breakpoint on the #BP vector %#x", channel.vector)
    return channel
