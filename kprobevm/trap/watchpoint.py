"""The fast trap channel: IDT vector 3 -> our #BP stub -> a slot whose first store is
watched.

The host points IDT vector 3 at a stub in a slot page. The stub finds the probe's slot
in a hash table (:mod:`.stubtable`) and ``iretq``s into it; the slot's first instruction
stores to a mailbox that carries a gdbstub write watchpoint, so the VM stops with every
register as at the probe. Under TCG, QEMU flushes its whole translation cache at a
*breakpoint* stop but not at a watchpoint stop, which is why the trap arrives this way.
A hot site's store has a mailbox byte and watchpoint of its own (:mod:`.hotsites`), so
on one vCPU its hit costs one stop and one ``c``: registers are read only when a handler
asks (other sites cost a ``p`` of RIP too), and written back, with the ``c``, only when
a handler changed them. Under SMP a stop reads every vCPU's RIP, and the reported
vCPU's registers come in that same round trip. The slot then runs the displaced
instruction and jumps back.
Without a host (killed), the watched stores are plain stores and every probe still runs
its instruction: the guest never sees an unknown int3. A recorded site's slot jumps to
a record program instead and never stops the guest (:mod:`kprobevm.kprobes.recorder`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm import faults
from kprobevm.errors import LOST_ERRORS, KprobeError, KprobeVMError, ProbeTextChanged
from kprobevm.gdbstub.client import BreakpointKind
from kprobevm.gdbstub.target import cpu_of_thread
from kprobevm.kprobes.core import ProbeSite
from kprobevm.kprobes.recorder import PROGRAM_SIZE, Recorder, copy_helpers, ring_pages_fitting
from kprobevm.kprobes.retrecord import ReturnRecords
from kprobevm.kprobes.ringfollow import RingFollower
from kprobevm.trap.channel import ChannelContext, ReturnProbes, TrapChannel
from kprobevm.trap.grace import GuestTasks, Quiescence
from kprobevm.trap.hotsites import RETURN_WATCH, VANISHED, HotSites
from kprobevm.trap.optjump import arm_jump
from kprobevm.trap.stubtable import TABLE_SLOTS, StubTable
from kprobevm.x86 import asm, ooline
from kprobevm.x86.addrspace import AddressSpace
from kprobevm.x86.constants import PAGE_SIZE
from kprobevm.x86.idt import (
    BP_VECTOR,
    GATE_SIZE,
    GateHook,
    decode_idt_gate,
    encode_idt_gate,
    gate_address,
)
from kprobevm.x86.pagetable import la57_enabled
from kprobevm.x86.ptregs import PtRegs
from kprobevm.x86.slotmap import SlotArea, flush_tlbs
from kprobevm.x86.stub import ENTRY_SIZE, build_int3_stub

if TYPE_CHECKING:
    from kprobevm.gdbstub.packet import StopReply
    from kprobevm.gdbstub.transport import GdbTransport
    from kprobevm.kernel.tasks import TaskLayout
    from kprobevm.kprobes.core import Kprobe
    from kprobevm.kprobes.slots import Slot
    from kprobevm.trap.grace import GraceRule
    from kprobevm.x86.slotmap import Reserve

__all__ = ["CHANNEL_PAGES", "ChannelPages", "WatchpointChannel"]

log = logging.getLogger(__name__)

SLOT_SIZE = 128
"""Two halves: the entry code and its continuation copy."""
TABLE_PAGES = TABLE_SLOTS * ENTRY_SIZE // PAGE_SIZE
CHANNEL_PAGES = 1 + 2 + TABLE_PAGES + 3 + 1
"""Slot memory the channel itself takes: our page table, the stub, mailbox, hash table,
trampoline, return table and return info pages, and the first slot page."""
SLOT_HEADROOM = 8
"""Pages a record ring leaves for slot and program pages (256 slots or 16 programs)."""
WATCH = BreakpointKind.WRITE_WATCH
RECORD_DRAIN_INTERVAL = 0.1
RUNNING_DRAIN_INTERVAL = 0.01
"""Seconds between drains through shared guest RAM: a look at the ring's head costs
microseconds and no stop, so often enough that the ring rarely reaches its watched mark."""
"""Seconds between drains of the record ring while recorded probes exist."""
DECODE_BATCH = 2000
"""Records an idle drain through shared RAM decodes at most: the rest wait in the host's
backlog for the next tick, so that the trap thread (and the ring follower, which shares
the interpreter with it) is not held for long."""


@dataclass(frozen=True)
class ChannelPages:
    """Where the channel's pages are in the slot area (guest virtual addresses)."""

    stub: int
    mailbox: int
    table: int
    trampoline: int
    return_table: int
    return_info: int
    """Beside the return table: each guest-made entry's probe mask and return program."""

    @classmethod
    def map(cls, area: SlotArea) -> ChannelPages:
        """Map the stub, mailbox, hash table and kretprobe pages (VM stopped)."""
        stub = area.map_page(executable=True)
        mailbox = area.map_page(executable=False, writable=True)
        table = area.map_run(TABLE_PAGES, executable=False)
        trampoline = area.map_page(executable=True)
        return_table = area.map_page(executable=False, writable=True)
        return_info = area.map_page(executable=False, writable=True)
        return cls(stub, mailbox, table, trampoline, return_table, return_info)


class WatchpointChannel(TrapChannel):
    """The fast channel: IDT vector 3 -> stub -> slot whose first store is watched."""

    name = "watchpoint"
    records = True
    optimizes = True

    def __init__(
        self,
        ctx: ChannelContext,
        threads: list[str],
        *,
        area: SlotArea,
        pages: ChannelPages,
        gate: GateHook,
        gate_seq: int,
        returns: ReturnProbes,
        task_layout: Callable[[], TaskLayout | None],
    ) -> None:
        """Use :meth:`install`: this takes what it has already put in the guest."""
        super().__init__(ctx, threads)
        self.area = area
        self.pages = pages
        self.gate = gate
        self._gate_seq: int | None = gate_seq
        self.returns = returns
        self.ret_store = returns.store_end
        """RIP after the kretprobe trampoline's watched store."""
        self.task_layout = task_layout
        self.quiescence = Quiescence(
            ctx.target, threads, ours=area.contains,
            guest=GuestTasks(ctx.memory, ctx.symbols, task_layout()),
        )  # fmt: skip
        self.slots = self.quiescence.slot_cache(area, SLOT_SIZE, grace_seconds=0.05)
        self.table = StubTable(ctx.memory, area, pages.table)
        self.hot = HotSites(ctx.target, pages.mailbox)
        self.recorder: Recorder | None = None
        self.follower: RingFollower | None = None
        """The thread that copies records out of the ring as they come (shared RAM)."""
        self.drains_running = False
        """Recorded hits are drained through shared guest RAM with the VM running."""
        self._jump_targets: dict[int, int] = {}
        """Site address -> where its optimized jump goes: the slot, or a recorded site's
        program (the slot's entry only jumps there)."""
        self.rip_map: dict[int, tuple[ProbeSite, int | None]] = {}
        """RIP at a watchpoint stop -> (site, resume ip for a post stop, None for pre)."""
        self._regs_ns = 0

    # -- installation ----------------------------------------------------------------

    @classmethod
    def install(
        cls,
        ctx: ChannelContext,
        *,
        reserve: Reserve | None,
        returns: ReturnProbes,
        task_layout: Callable[[], TaskLayout | None],
    ) -> WatchpointChannel:
        """Map the slot area, place the stub and the return trampoline, hook vector 3."""
        if reserve is None:
            raise KprobeError("the guest has no reserved memory (memmap=SIZE$BASE) for slots")
        memory, journal = ctx.memory, ctx.journal
        idt = ctx.symbols["idt_table"]
        expected = ctx.symbols.get("asm_exc_int3")
        with ctx.target.stopped() as client:
            # before anything is written: a vector 3 someone else hooked may be a killed
            # session's stub, running from the very pages we would zero
            gate_addr = gate_address(idt, BP_VECTOR)
            original = memory.read(gate_addr, GATE_SIZE)
            real_handler = decode_idt_gate(original)
            if expected is not None and expected != real_handler:
                raise KprobeError(
                    f"IDT vector 3 points at {ctx.symbols.describe(real_handler)},"
                    " not asm_exc_int3: someone else owns the #BP vector",
                    address=real_handler,
                )
            regs = client.read_registers()
            area = SlotArea(memory, journal, reserve, regs["cr3"],
                            la57=la57_enabled(regs["cr4"]),
                            flush_tlbs=lambda: flush_tlbs(ctx.target.client))  # fmt: skip
            area.setup()
            pages = ChannelPages.map(area)
            # the kretprobe trampoline and its instance table (the guest frees entries)
            code = returns.install(pages.trampoline, pages.return_table,
                                   pages.mailbox + RETURN_WATCH,
                                   info=pages.return_info)  # fmt: skip
            memory.write_phys(area.phys(pages.trampoline), code)
            journal.note(kretprobe_table=pages.return_table, trampoline=pages.trampoline)
            threads = client.threads()
            stub = build_int3_stub(pages.stub, table=pages.table, table_slots=TABLE_SLOTS,
                                   real_handler=real_handler,
                                   vanished=pages.mailbox + VANISHED)  # fmt: skip
            memory.write_phys(area.phys(pages.stub), stub.code)
            client.insert_breakpoint(WATCH, pages.mailbox, 1)
            client.insert_breakpoint(WATCH, pages.mailbox + RETURN_WATCH, 1)
            gate = GateHook(gate_addr, original,
                            encode_idt_gate(original, pages.stub + stub.offsets["entry"]))
            seq = journal.record("virt", gate.addr, gate.original, gate.replacement,
                                 "IDT vector 3 -> stub")  # fmt: skip
            faults.kill_point("idt_gate")
            memory.write(gate.addr, gate.replacement)
        channel = cls(ctx, threads, area=area, pages=pages, gate=gate, gate_seq=seq,
                      returns=returns, task_layout=task_layout)  # fmt: skip
        channel.quiescence.rule  # noqa: B018 (read from the kernel now, and logged)
        return channel

    @property
    def grace_rule(self) -> GraceRule:
        return self.quiescence.rule

    def vanished_int3s(self) -> int:
        """Traps the stub found no int3 at any more (a probe just removed, a patch of the
        guest's own just done), each re-executed after a store that has QEMU translate
        the address anew: read from the guest."""
        return self.ctx.memory.u64(self.pages.mailbox + VANISHED)

    # -- sites -----------------------------------------------------------------------

    def prepare_site(self, addr: int) -> ProbeSite:
        insn = self.read_insn(addr)
        return ProbeSite(addr=addr, insn=insn, slot=self.slots.get_insn_slot())

    @staticmethod
    def _slot(site: ProbeSite) -> Slot:
        assert site.slot is not None, "a watchpoint-channel site always has a slot"
        return site.slot

    def _write_slot_code(self, site: ProbeSite) -> None:
        """Two copies of the out-of-line code: the entry (the watched pre store, or for a
        recorded site a jump to its record program), and the continuation a handled vCPU
        (or the record program) goes on through (see :meth:`on_stop`)."""
        post = site.wants_post and site.insn.kind in ooline.POST_STORE_KINDS
        covers = site.opt.insns if site.opt is not None else ()
        half = SLOT_SIZE // 2
        slot = self._slot(site)
        cont_addr = slot.address + half
        mailbox = self.pages.mailbox
        cont = ooline.make_slot_code(
            site.insn, cont_addr, mailbox=mailbox, pre_store=False,
            post_store=post, slot_size=half, covers=covers,
        )  # fmt: skip
        site.cont_rip = cont_addr

        def write(entry_code: bytes) -> None:
            code = entry_code.ljust(half, b"\xcc") + cont.bytes
            self.ctx.memory.write_phys(self.area.phys(slot.address), code)

        if site.recorded:
            # nothing here stops the guest: the program comes back to the continuation
            program = self._record_program(site, cont_addr)
            write(asm.jmp_rel32(slot.address, program))
            self._jump_targets[site.addr] = program  # an optimized jump goes straight there
            site.pre_rip, site.post_rip = 0, None
            return
        self._jump_targets[site.addr] = slot.address
        entry = ooline.make_slot_code(
            site.insn, slot.address, mailbox=mailbox, pre_mailbox=site.pre_watch,
            post_store=post, slot_size=half, covers=covers,
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

    def _forget_rips(self, site: ProbeSite) -> None:
        for rip in [r for r, (s, _) in self.rip_map.items() if s is site]:
            del self.rip_map[rip]

    def commit_site(self, site: ProbeSite) -> None:
        self._write_slot_code(site)
        self.table.insert(site.addr, self._slot(site).address)

    def rebuild_site(self, site: ProbeSite) -> None:
        """Move a site to a fresh slot (the old one may be running: it goes DIRTY). An
        optimized site's jump follows it: nothing can enter the bytes the jump covers
        meanwhile (the int3 sends the way the old slot goes, past all of them)."""
        jumped = site.optimized
        if jumped:
            self.unoptimize(site)
        if site.opt is not None and site.wants_post:
            site.opt = None  # a post_handler runs after the probed instruction alone
        old = self._slot(site)
        site.slot = self.slots.get_insn_slot()
        self._forget_rips(site)
        self._write_slot_code(site)
        self.table.insert(site.addr, site.slot.address)
        self.slots.free_insn_slot(old)
        if jumped and site.opt is not None:
            self.optimize(site)

    def optimize(self, site: ProbeSite) -> None:
        arm_jump(self.ctx, site, self._jump_targets[site.addr])

    def quiescence_for_text(self) -> Quiescence:
        return self.quiescence

    def discard_site(self, site: ProbeSite) -> None:
        self._jump_targets.pop(site.addr, None)
        self.table.remove(site.addr)
        self._forget_rips(site)
        self.hot.forget(site)
        self.slots.free_insn_slot(self._slot(site))
        if self.recorder is not None:
            self.recorder.drop_program(site)

    def _promote(self, site: ProbeSite) -> None:
        """Move a hot site to a slot that stores to a mailbox byte of its own (VM
        stopped); a vCPU still in the old slot finishes there (it goes DIRTY)."""
        try:
            if self.hot.watch(site):
                faults.kill_point("promote_site")
                self.rebuild_site(site)
                self.stats.promoted += 1
        except LOST_ERRORS:
            raise
        except KprobeVMError as exc:  # it stays on byte 0, which works
            log.warning("could not promote the probe at %#x: %s", site.addr, exc)

    # -- recorded probes -------------------------------------------------------------

    def _record_program(self, site: ProbeSite, cont: int) -> int:
        """Ids for the site's new recorded probes, and its record program (returning to
        ``cont``); the program's address."""
        recorder = self._recorder()
        for kp in site.probes:
            if kp.record_id is None:
                assert kp.record is not None
                kp.record_id = recorder.add(kp, kp.record)
        return recorder.write_program(site, cont)

    def why_not_counting(self) -> str | None:
        try:
            self._recorder()
        except KprobeError as exc:
            return str(exc)
        return None

    def _recorder(self) -> Recorder:
        """The record ring, set up on the first recorded probe (VM stopped)."""
        target = self.ctx.target
        if self.recorder is None:
            programs = self.quiescence.slot_cache(self.area, PROGRAM_SIZE, grace_seconds=1.0)
            recorder = Recorder(
                self.ctx.memory, target, self.area, programs,
                helpers=copy_helpers(self.ctx.symbols, self.task_layout(),
                                     AddressSpace(la57=self.area.la57)),
                describe=self.ctx.symbols.describe,
                ring_pages=ring_pages_fitting(self.area.free_pages, keep=SLOT_HEADROOM),
                returns=ReturnRecords(self.ctx.memory, self.area, table=self.pages.return_table,
                                      info=self.pages.return_info,
                                      trampoline=self.pages.trampoline),
            )  # fmt: skip
            target.client.insert_breakpoint(WATCH, recorder.layout.drain, 1)
            self.recorder = recorder
            self.drains_running = self._ring_shared(recorder)
            if self.drains_running:
                target.idle_interval, target.idle_needs_stop = RUNNING_DRAIN_INTERVAL, False
                self.follower = RingFollower(recorder, name=target.name)
                self.follower.start()
            else:
                target.idle_interval = RECORD_DRAIN_INTERVAL
        target.on_idle = self._drain_running if self.drains_running else self.flush_records
        return self.recorder

    def _ring_shared(self, recorder: Recorder) -> bool:
        """Whether the ring can be drained with the VM running (shared guest RAM that
        reaches it); said on stderr when not."""
        direct = recorder.direct
        if direct is not None and direct.read_virt(recorder.layout.head, 8) is not None:
            return True
        why = "guest RAM is not shared with the host" if direct is None else \
            "the kernel's page table was not found"
        log.warning("recorded hits are drained with a VM stop every %g s and whenever the "
                    "ring is 3/4 full: %s", RECORD_DRAIN_INTERVAL, why)  # fmt: skip
        return False

    def flush_records(self, *, running: bool = False, limit: int | None = None) -> None:
        """Hand every recorded hit so far (``limit``: at most that many) to its probe's
        handler (VM stopped, unless ``running`` through shared guest RAM)."""
        recorder = self.recorder
        if recorder is None or not (recorder.probes or recorder.retiring):
            return
        run = self.ctx.handlers.run_recorded
        for kp, record in recorder.drain(running=running, limit=limit):
            run(kp, record)
        if not (recorder.probes or recorder.retiring):  # no idle stops for an empty ring
            self.ctx.target.on_idle = None

    def _drain_running(self) -> None:
        """The idle drain through shared RAM: with the VM running, or stopped when the
        tick falls in a hit's stop. A retired id is judged settled only with the VM
        stopped (it asks which vCPUs are quiescent), so while one waits it gets a stop."""
        recorder = self.recorder
        if recorder is not None and recorder.unjudged() and self.ctx.target.running:
            with self.ctx.target.stopped():
                self.flush_records(limit=DECODE_BATCH)
            return
        self.flush_records(running=self.ctx.target.running, limit=DECODE_BATCH)

    def release_record_id(self, kp: Kprobe) -> None:
        """The id retires; idle drains go on until its hits in flight are counted."""
        if self.recorder is not None and kp.record_id is not None:
            self.recorder.remove(kp.record_id)
        kp.record_id = None

    def records_settling(self) -> int:
        return len(self.recorder.retiring) if self.recorder is not None else 0

    # -- the hot path (trap thread, VM stopped) --------------------------------------

    def on_stop(self, stop: StopReply) -> None:
        """Handle the hit that stopped the VM (and, under SMP, every other pending one).

        With one vCPU each hit is reported at once, and the watchpoint that fired names
        the site (a hot site's pre store has a mailbox byte and a watchpoint of its
        own): no register is read unless a handler asks. Under SMP QEMU can report a
        vCPU's stop late (its RIP already past the slot), fold two vCPUs' hits into one
        stop, or name a stale watchpoint, so each vCPU's RIP says what it hit. A handled
        vCPU is then sent on through the slot's continuation copy (or past the probe): a
        late report of the same hit never sits at a store's end, so no hit runs twice.
        """
        watch = stop.watch
        client = self.ctx.target.client
        if watch is None:
            if len(self.threads) > 1:
                self._handle_folded(client, stop.thread or "")
            return
        mailbox = self.pages.mailbox
        if self.recorder is not None and watch.address == self.recorder.layout.drain:
            self.stats.ring_stops += 1
            # room now, and the idle drain decodes with the VM running; a backlog too
            # large to copy more into is decoded now
            if self.drains_running and not self.recorder.backlog_full:
                self.recorder.copy_out(running=False)
            else:
                self.flush_records()
            if len(self.threads) > 1:  # QEMU may have folded other vCPUs' hits into it
                self._handle_every_vcpu(client, stop.thread or "", hit=False)
            return
        site = self.hot.site_of(watch.address)
        if site is None and watch.address not in (mailbox, mailbox + RETURN_WATCH):
            return
        t0 = time.perf_counter_ns()
        self._regs_ns = 0
        thread = stop.thread or ""
        if len(self.threads) > 1:
            self._handle_every_vcpu(client, thread)
        else:
            load = _VcpuRegs(self, client, None)
            if site is not None:
                writes = self._pre(site, self._lazy(load, site, thread), redirect=False)
            elif watch.address == mailbox:  # byte 0: the RIP tells which store
                t = time.perf_counter_ns()
                rip = client.read_register("rip")
                self._regs_ns += time.perf_counter_ns() - t
                writes = self._handle(thread, rip, load, redirect=False, promote=True)
            else:
                writes = self._handle(thread, load()["rip"], load, redirect=False)
            if writes:
                self.ctx.target.before_resume.extend(client.register_write_packets(writes))
        stats = self.stats
        stats.hits += 1
        stats.regs_ns += self._regs_ns
        stats.handler_ns += self._handler_end - t0 - self._regs_ns
        stats.writeback_ns += time.perf_counter_ns() - self._handler_end

    def _lazy(self, load: _VcpuRegs, site: ProbeSite, thread: str) -> PtRegs:
        return PtRegs.lazy(
            load, known={"ip": site.addr}, cpu=cpu_of_thread(thread), memory=self.ctx.memory,
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
            return self.returns.on_return(gregs, cpu_of_thread(thread), redirect=redirect)
        hit = self.rip_map.get(rip)
        if hit is None:
            # a late report of a hit already handled, or a slot since discarded
            self.unknown_stops += 1
            return {}
        site, resume = hit
        if resume is None:
            writes = self._pre(site, self._lazy(load, site, thread), redirect=redirect)
            if promote and self.hot.shared_hit(site):
                self._promote(site)
            return writes
        gregs = dict(load())
        gregs["rip"] = resume
        regs = PtRegs.from_gdb(gregs, cpu=cpu_of_thread(thread), memory=self.ctx.memory)
        return self._post(site, regs, redirect=redirect)

    def _at_return_store(self, rip: int) -> bool:
        """A vCPU stopped after the kretprobe trampoline's store (or its TB break)."""
        return rip in (self.ret_store, self.ret_store + len(ooline.TB_BREAK))

    def _handle_folded(self, client: GdbTransport, reported: str) -> None:
        """SMP, a stop that names no watchpoint (our own interrupt): QEMU reports only the
        interrupt when a vCPU's watched store races it, and that vCPU sits after the
        store, unreported; a resume would run it on with its hit lost. Every such hit is
        handled now. (Handled hits are always moved past their store under SMP, so a vCPU
        found there is one nobody handled.)"""
        self.stats.folded += self._handle_every_vcpu(client, reported, hit=False)

    def _handle_every_vcpu(self, client: GdbTransport, reported: str, *,
                           hit: bool = True) -> int:
        """SMP: every vCPU sitting after a watched store is a hit to handle now; how many.

        For a ``hit``, the reported vCPU's registers come in the round trip of the
        RIPs (its ``g`` for the others' ``p``): a handler almost always reads them, and
        the stop then costs one round trip before the resume, not two.

        Each vCPU's handlers run with that vCPU selected, since the gdbstub reads
        virtual memory (user memory above all) as the selected vCPU sees it: the
        reported one first (the round trip left it selected), then each other one
        found after a watched store, selected before its handlers run.
        """
        known: dict[str, int] | None = None
        if hit and reported in self.threads:
            t0 = time.perf_counter_ns()
            known, rips = client.read_registers_and_each("rip", self.threads, reported)
            self._regs_ns += time.perf_counter_ns() - t0
        else:
            rips = client.read_register_each("rip", self.threads)
        resume_writes: dict[str, int] = {}
        handled = 0
        order = sorted(rips, key=lambda t: t != reported)  # the reported vCPU first
        for t in order:
            rip = rips[t]
            if rip not in self.rip_map and not self._at_return_store(rip):
                continue
            handled += 1
            if t != reported:
                self.stats.caught_pending += 1
            if known is None or t != reported:
                client.select_thread("g", t)
            load = _VcpuRegs(self, client, t, known if t == reported else None)
            writes = self._handle(t, rip, load, redirect=True)
            if t == reported:
                resume_writes = writes
            elif writes:
                client.write_registers(writes, thread=t)
        # The reported vCPU's writes ride with the resume, behind an Hg of their own:
        # a registration may select other vCPUs before that resume goes out.
        if resume_writes:
            self.ctx.target.before_resume.extend(
                client.register_write_packets(resume_writes, reported)
            )
        return handled

    def _pre(self, site: ProbeSite, regs: PtRegs, *, redirect: bool) -> dict[str, int]:
        skip = self.ctx.handlers.run_pre_handlers(site, regs)
        self._handler_end = time.perf_counter_ns()
        if skip:
            # the handler moved regs.ip itself: the instruction is not run
            writes = regs.gdb_writes(rip=regs.ip)
        elif site.wants_post and site.insn.kind not in ooline.POST_STORE_KINDS:
            writes = self.emulate(site, regs)
        else:
            writes = regs.gdb_writes(rip=site.cont_rip if redirect else None)
        regs.expire("pt_regs of a finished hit: read registers inside the handler")
        return writes

    def _post(self, site: ProbeSite, regs: PtRegs, *, redirect: bool) -> dict[str, int]:
        self.ctx.handlers.run_post_handlers(site, regs)
        self._handler_end = time.perf_counter_ns()
        # past the post store the slot only jumps to the resume ip: go there directly
        moved = "ip" in regs.changes() or redirect
        return regs.gdb_writes(rip=regs.ip if moved else None)

    # -- teardown --------------------------------------------------------------------

    def close(self) -> None:
        """Restore the IDT, drop the watchpoints, wait for vCPUs to leave, unmap."""
        target = self.ctx.target
        target.stop()
        if self.follower is not None:
            self.follower.stop()
            self.follower = None
        recorder = self.recorder
        with target.stopped() as client:
            # calls in flight return to their callers directly again
            self.returns.unhijack_all()
            self._unhook_gate()
            client.remove_breakpoint(WATCH, self.pages.mailbox, 1)
            client.remove_breakpoint(WATCH, self.pages.mailbox + RETURN_WATCH, 1)
            if recorder is not None:
                self._unhijack_recorded(recorder)
                self.flush_records()
                client.remove_breakpoint(WATCH, recorder.layout.drain, 1)
                target.on_idle, target.idle_needs_stop = None, True
            self.hot.forget_all()
        self.quiescence.wait_until_out_of(self.area)
        with target.stopped() as client:
            if recorder is not None:  # the records written since, and the final counts
                # a vCPU that was inside a hijack at the first pass has hijacked since
                self._unhijack_recorded(recorder)
                run = self.ctx.handlers.run_recorded
                for kp, record in recorder.drain(closing=True):
                    run(kp, record)
                self.recorder = None
            self.area.teardown()
            flush_tlbs(client)

    def forget(self) -> None:
        if self.follower is not None:
            self.follower.stop(touch_guest=False)
            self.follower = None

    @staticmethod
    def _unhijack_recorded(recorder: Recorder) -> None:
        """Calls in flight through recorded return probes return directly again."""
        if recorder.returns is not None:
            recorder.returns.unhijack()

    def _unhook_gate(self) -> None:
        """IDT vector 3 back to the guest's handler, unless someone changed it since."""
        if self._gate_seq is None:
            return
        memory, gate = self.ctx.memory, self.gate
        current = memory.read(gate.addr, GATE_SIZE)
        if current != gate.replacement:
            raise ProbeTextChanged(gate.addr, gate.replacement, current)
        memory.write(gate.addr, gate.original)
        self.ctx.journal.undone(self._gate_seq)
        self._gate_seq = None


class _VcpuRegs:
    """One stopped vCPU's registers at a hit: one timed ``g`` at most (no x87/xmm
    decoding on the hot path), alone or with other packets in its round trip; none
    when they came with the stop's RIPs (``known``)."""

    __slots__ = ("_channel", "_client", "_thread", "_values")

    def __init__(self, channel: WatchpointChannel, client: GdbTransport, thread: str | None,
                 known: dict[str, int] | None = None) -> None:
        self._channel, self._client, self._thread = channel, client, thread
        self._values: dict[str, int] | None = known

    def __call__(self) -> dict[str, int]:
        if self._values is None:
            self.along(())
        assert self._values is not None
        return self._values

    def along(self, packets: Sequence[bytes]) -> tuple[dict[str, int], list[bytes]]:
        t = time.perf_counter_ns()
        if self._values is not None:  # read already: the packets alone
            replies = self._client.read_along(packets, self._thread) if packets else []
            self._channel._regs_ns += time.perf_counter_ns() - t
            return self._values, replies
        values, replies = self._client.read_registers_along(packets, self._thread)
        self._channel._regs_ns += time.perf_counter_ns() - t
        self._values = values
        return values, replies
