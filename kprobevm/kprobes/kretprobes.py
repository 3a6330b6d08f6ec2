"""Return probes (the kernel's kretprobes), with the return path kept in guest memory.

At a function's entry (a Kprobe there) the host saves the return address of the call in
an instance table in the slot area, keyed by the stack slot that holds it, and puts the
trampoline's address in that slot. When the function returns into the trampoline, the
trampoline (guest code) finds its entry by the stack pointer, puts the real return
address back in the slot, frees the entry, does a watched store (the host runs
``handler`` with ``regs.ax`` the return value) and returns to the caller. The guest needs
no host for any of this: with the host gone, or the probe unregistered, a pending return
still lands where it should.

Calls live per stack slot, which is per (task stack, depth): the kernel's per-task
instance list. Several return probes on one function share the call's one hijack: each
gets its own instance (a :data:`Chain` per slot), and at the return every handler runs,
the last hooked first, as the kernel's rethook runs them. ``maxactive`` bounds the
instances of one kretprobe in flight; a hit past it counts in ``nmissed``. A call whose
stack slot no longer holds the trampoline (a function that never returned, like
``do_exit``) is reclaimed when the table needs room.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kprobevm.errors import LOST_ERRORS, GuestFaultError, KprobeError, ProbeRefused
from kprobevm.gdbstub.readahead import HitReader, ReadPredictor
from kprobevm.kprobes.core import Kprobe, keep_handler_error
from kprobevm.kprobes.retrecord import GUEST_ENTRIES
from kprobevm.x86.ptregs import PtRegs, to_gdb_names
from kprobevm.x86.rethook import ENTRY, build_trampoline

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.gdbstub.target import Target
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kernel.tasks import TaskLayout
    from kprobevm.kprobes.core import KprobeManager
    from kprobevm.kprobes.recorder import RecordSpec

__all__ = ["Chain", "Kretprobe", "KretprobeInstance", "KretprobeManager"]

log = logging.getLogger(__name__)

TABLE_ENTRIES = 4096 // ENTRY

RetHandler = Callable[["KretprobeInstance", PtRegs], Any]

Chain = list["KretprobeInstance"]
"""The instances of one call whose return the trampoline took, in the order their entry
handlers ran (the kernel's rethook list for one frame); all share the first's table
entry and real return address."""


@dataclass(eq=False)
class KretprobeInstance:
    """One call in flight (``struct kretprobe_instance``): where it returns, and scratch."""

    rp: Kretprobe
    slot: int
    """Address of the stack slot that held the return address."""
    ret_addr: int
    cpu: int
    data: bytearray
    """``data_size`` bytes the entry_handler may fill for the handler (the kernel's ri->data)."""
    index: int = -1
    task: int = 0
    """The calling task's ``task_struct *`` (0 when the kernel's BTF is not at hand)."""
    task_stack: int = 0
    queued_at: int = -1
    """``Target.write_backs`` when its table entry and hijack were queued: until the
    count moves on they are not in the guest, and the slot still holds the real address."""
    chained: bool = False
    """Another return probe on this function took this call's return first (it runs
    earlier at the entry): the kernel's instance then holds that probe's trampoline as
    its return address, which tracefs prints as ``[unknown/kretprobe'd]``. ``ret_addr``
    is the real caller all the same."""


@dataclass(eq=False)
class Kretprobe:
    """A return probe (``struct kretprobe``) on a function's entry.

    Handler exceptions are caught, counted in ``nerrors`` and kept in ``errors``, as a
    Kprobe's are: the engine goes on.
    """

    symbol_name: str | None = None
    """The function (or give ``addr``: its entry)."""
    handler: RetHandler | None = None
    """``handler(ri, regs)`` at each return: ``regs.ax`` is the return value,
    ``regs.ip`` where the function returns to."""
    entry_handler: RetHandler | None = None
    """Runs at entry; a true return means "do not probe this call's return"."""
    maxactive: int = 0
    """Instances in flight at most (0: the kernel's default, max(10, 2 * vCPUs))."""
    data_size: int = 0
    """Bytes of ``ri.data`` for the entry_handler to pass things to the handler."""
    addr: int | None = None
    offset: int = 0
    """Must stay 0: a return probe goes on an entry (``BAD_RETPROBE`` otherwise)."""
    record: RecordSpec | None = None
    """Recorded: the guest hijacks each call and records its return (registers as
    returned, and these captures, read at the return), with no VM stop; ``handler``
    runs later on the host with a :class:`~kprobevm.kprobes.recorder.RecordedRegs`.
    No ``entry_handler`` then. Its figures are those of :attr:`recorded`."""
    nhit: int = field(default=0, init=False)
    """Returns handled."""
    nmissed: int = field(default=0, init=False)
    """Calls whose return could not be probed (maxactive reached or no table room)."""
    nerrors: int = field(default=0, init=False)
    """Exceptions the handler and entry_handler raised (the hit still counts)."""
    errors: list[str] = field(default_factory=list, init=False, repr=False)
    """The last few of those exceptions, formatted (as ``Kprobe.errors``)."""
    registered: bool = field(default=False, init=False)
    kp: Kprobe | None = field(default=None, init=False, repr=False)
    active: int = field(default=0, init=False)
    recorded: Kprobe | None = field(default=None, init=False, repr=False)
    """A recorded return probe's entry kprobe, kept after the unregister: its
    ``guest_hits`` (calls the guest hijacked or missed), ``nhit`` (returns handled) and
    ``nmissed`` (maxactive reached, no free entry, ring full, or drained after the
    unregister) settle as a recorded Kprobe's do."""

    @property
    def gone(self) -> bool:
        """Its function's module was unloaded: out of the guest, still registered until
        unregistered (the kernel's ``[GONE]``)."""
        return self.kp is not None and self.kp.gone


class KretprobeManager:
    """Registered return probes of one guest and the instances in flight."""

    def __init__(
        self,
        kprobes: KprobeManager,
        *,
        symbols: KernelSymbols,
        target: Target,
        memory: GuestMemory,
        task_layout: Callable[[], TaskLayout | None],
    ) -> None:
        """Return probes are kprobes at function entries: ``kprobes`` places them.
        ``task_layout`` gives ``current``'s field offsets (None without the kernel's
        BTF), asked for at the first registration."""
        self.kprobes = kprobes
        self.symbols = symbols
        self.target = target
        self.memory = memory
        self.task_layout = task_layout
        self.trampoline = 0
        self.store_end = 0
        self.table = 0
        self.entries: list[Chain | None] = [None] * TABLE_ENTRIES
        """The call holding each guest table entry (None: free)."""
        self.by_slot: dict[int, Chain] = {}
        """The call in flight whose return address was at each stack slot."""
        self.entry_probes: set[int] = set()
        """``id`` of each registered return probe's entry kprobe (kprobes/list shows ``r``)."""
        self.stale_returns = 0
        self.reclaimed = 0
        self.handler_errors = 0
        self.layout: TaskLayout | None = None
        self._entry_reads = ReadPredictor()

    def install(
        self, trampoline: int, table: int, mailbox: int, *, info: int | None = None
    ) -> bytes:
        """Place the trampoline at ``trampoline`` (mapped executable) over ``table``;
        ``info``: the page of the guest-made entries' return programs."""
        code, self.store_end = build_trampoline(
            trampoline, table=table, entries=TABLE_ENTRIES, mailbox=mailbox, info=info
        )
        self.trampoline, self.table = trampoline, table
        return code

    # -- registration ------------------------------------------------------------------

    def register_kretprobe(self, rp: Kretprobe) -> None:
        if rp.registered:
            raise KprobeError("kretprobe is already registered", symbol=rp.symbol_name)
        self.kprobes.install_channel()  # the trampoline comes with the watchpoint channel
        if not self.trampoline:
            raise KprobeError(
                "return probes need the watchpoint trap channel: its slot memory holds"
                " the trampoline", symbol=rp.symbol_name,
            )  # fmt: skip
        if rp.offset:
            raise ProbeRefused(
                "BAD_RETPROBE", "a return probe goes on a function's entry (offset 0)",
                symbol=rp.symbol_name,
            )  # fmt: skip
        if rp.record is not None and rp.entry_handler is not None:
            raise KprobeError("a recorded return probe has no entry_handler: nothing stops"
                              " at its entry", symbol=rp.symbol_name)  # fmt: skip
        kp = Kprobe(symbol_name=rp.symbol_name, addr=rp.addr, pre_handler=self._entry_for(rp))
        self.kprobes.look_up_names([kp])
        addr, on_entry = self.kprobes.resolve_entry(kp)
        if not on_entry:
            raise ProbeRefused(
                "BAD_RETPROBE", "not a function's entry", address=addr, symbol=rp.symbol_name
            )
        if rp.maxactive <= 0:
            rp.maxactive = max(10, 2 * (os.cpu_count() or 1), 2 * self._vcpus())
        self.layout = self.task_layout()  # BTF parsed now, not at the first hit
        if rp.record is not None:
            kp.pre_handler = self._recorded_return_for(rp)
            kp.record = dataclasses.replace(rp.record, at_return=True, maxactive=rp.maxactive)
            rp.recorded = kp
        self.kprobes.register_kprobe(kp)
        rp.kp = kp
        rp.registered = True
        self.entry_probes.add(id(kp))

    def unregister_kretprobe(self, rp: Kretprobe) -> None:
        """Stop probing new calls; calls in flight still return through the trampoline."""
        if not rp.registered or rp.kp is None:
            raise KprobeError("kretprobe is not registered", symbol=rp.symbol_name)
        self.kprobes.unregister_kprobe(rp.kp)
        self.entry_probes.discard(id(rp.kp))
        rp.kp = None
        rp.registered = False

    def _handler_failed(self, rp: Kretprobe, exc: Exception, which: str) -> None:
        """Keep a handler's exception on its kretprobe and count it; the engine goes on."""
        keep_handler_error(rp, exc)
        self.handler_errors += 1
        log.warning("%s of kretprobe %s raised %r", which, rp.symbol_name or rp.addr, exc)

    def _vcpus(self) -> int:
        with self.target.stopped() as client:
            return len(client.threads())

    # -- the entry (trap thread, VM stopped) -------------------------------------------

    def _entry_for(self, rp: Kretprobe) -> Callable[[Kprobe, PtRegs], None]:
        def entry(kp: Kprobe, regs: PtRegs) -> None:
            self._entry(rp, regs)

        return entry

    def _recorded_return_for(self, rp: Kretprobe) -> Callable[[Kprobe, PtRegs], None]:
        """The handler of a recorded return: ``regs`` as the function returned. The
        function's one hijack serves all its recorded return probes; the kernel's would
        each hook the call in turn, so each but the first to run at the entry is
        ``chained``."""
        kprobes = self.kprobes

        def recorded(kp: Kprobe, regs: PtRegs) -> None:
            rp.nhit += 1
            if rp.handler is None:
                return
            ri = KretprobeInstance(rp=rp, slot=regs.sp - 8, ret_addr=regs.ip, cpu=regs.cpu,
                                   data=bytearray(rp.data_size))  # fmt: skip
            site = kprobes.table.get(kprobes.int3_place(kp.addr or 0))
            if site is not None and site.probes[0] is not kp:
                first = next((p for p in site.probes if p.record is not None
                              and p.record.at_return and not p.disabled), kp)  # fmt: skip
                ri.chained = first is not kp
            rp.handler(ri, regs)  # its exceptions are kept on kp, as a recorded Kprobe's

        return recorded

    def _entry(self, rp: Kretprobe, regs: PtRegs) -> None:
        if not rp.registered:
            return
        if rp.active >= rp.maxactive and not self._reclaim(rp):
            rp.nmissed += 1
            return
        # The stack slot, current and its stack repeat from call to call in a hot loop:
        # the last entry's reads on this vCPU go out with the register read.
        memory = HitReader(self.memory)
        memory.read_ahead(regs, self._entry_reads.guess(regs.cpu))
        slot = regs.sp
        layout = self.layout
        ret_addr = memory.u64(slot)
        task = memory.u64(regs.gs_base + layout.current) if layout is not None else 0
        chain = self._hooked_call(slot, ret_addr)
        ri = KretprobeInstance(
            rp=rp, slot=slot, ret_addr=ret_addr, cpu=regs.cpu,
            data=bytearray(rp.data_size), task=task,
        )  # fmt: skip
        if chain is not None:  # another return probe on this function hooked this call
            first = chain[0]
            ri.ret_addr, ri.index, ri.queued_at = first.ret_addr, first.index, first.queued_at
            ri.task_stack, ri.chained = first.task_stack, True
        elif layout is not None and task:
            ri.task_stack = memory.u64(task + layout.stack)
        self._entry_reads.remember(regs.cpu, memory.reads)
        if rp.entry_handler is not None:
            try:
                if rp.entry_handler(ri, regs):
                    return
            except LOST_ERRORS:
                raise
            except Exception as exc:
                self._handler_failed(rp, exc, "entry_handler")
        if chain is not None:
            chain.append(ri)  # the call's one hijack returns through every instance
            rp.active += 1
            return
        old = self.by_slot.pop(slot, None)
        if old is not None:  # the call that used this slot before never came back
            self._free(old)
            # its guest entry goes too: the trampoline must find only this call's
            self.target.queue_write(self.table + ENTRY * old[0].index, bytes(ENTRY))
        if ret_addr == self.trampoline:
            # our trampoline already, with no call of ours behind it: hooking would make
            # the trampoline return into itself
            rp.nmissed += 1
            return
        index = self._alloc()
        if index is None:
            rp.nmissed += 1
            return
        ri.index = index
        chain = [ri]
        self.entries[index] = chain
        self.by_slot[slot] = chain
        rp.active += 1
        # Both writes ride with the resume: the table entry first, then the hijack.
        target = self.target
        target.queue_write(self.table + ENTRY * index, struct.pack("<QQ", slot, ri.ret_addr))
        target.queue_write(slot, struct.pack("<Q", self.trampoline))
        ri.queued_at = target.write_backs

    def _hooked_call(self, slot: int, ret_addr: int) -> Chain | None:
        """The call at ``slot`` if a return probe already hooked it at this very entry
        (several return probes on one function): its hijack is still queued, or the
        slot holds our trampoline already, which only this call's entry can have put
        there. A call left at the slot from before is not this one."""
        chain = self.by_slot.get(slot)
        if chain is None:
            return None
        if chain[0].queued_at == self.target.write_backs or ret_addr == self.trampoline:
            return chain
        return None

    def _dead(self, chain: Chain) -> bool:
        """A call that will never come back through the trampoline.

        Its stack slot lost our address (the stack moved on), or its task has exited
        (a function like do_exit that never returns) or is gone (stack pointer changed).
        """
        ri = chain[0]
        if ri.queued_at == self.target.write_backs:
            return False  # its hijack is still queued: the slot is not ours yet
        memory = self.memory
        try:
            if memory.u64(ri.slot) != self.trampoline:
                return True
        except GuestFaultError:
            return True  # its stack is unmapped: the task is gone
        layout = self.layout
        if layout is None or not ri.task:
            return False
        try:
            return (
                memory.u64(ri.task + layout.stack) != ri.task_stack
                or memory.s32(ri.task + layout.exit_state) != 0
            )
        except GuestFaultError:
            return True  # its task_struct is gone with it

    def _reclaim(self, rp: Kretprobe | None = None) -> bool:
        """Free the dead calls (those with an instance of ``rp``, or all); True if any
        instance was freed."""
        freed = False
        for chain in list(self.by_slot.values()):
            if rp is not None and all(ri.rp is not rp for ri in chain):
                continue
            if self._dead(chain):
                first = chain[0]
                self.by_slot.pop(first.slot, None)
                self._free(chain)
                self.memory.write(self.table + ENTRY * first.index, bytes(ENTRY))
                self.reclaimed += len(chain)
                freed = True
        return freed

    def _alloc(self) -> int | None:
        for _ in range(2):
            # the first GUEST_ENTRIES are the guest's (recorded return probes)
            for i in range(GUEST_ENTRIES, len(self.entries)):
                if self.entries[i] is None:
                    return i
            if not self._reclaim():
                break
        return None

    def _free(self, chain: Chain) -> None:
        """Give the call's table entry (host side) and every instance's count back."""
        index = chain[0].index
        if 0 <= index < len(self.entries) and self.entries[index] is chain:
            self.entries[index] = None
        for ri in chain:
            ri.rp.active -= 1

    # -- the return (trap thread, VM stopped) ------------------------------------------

    def on_return(self, gregs: dict[str, int], cpu: int, *, redirect: bool) -> dict[str, int]:
        """Run the handlers of the return that stopped at the trampoline's store: every
        return probe's on that call, the last hooked first (the kernel's order).

        Returns the registers (gdb names) the handlers changed, to be written back.
        """
        slot = gregs["rsp"]
        chain = self.by_slot.pop(slot, None)
        if chain is None:
            self.stale_returns += 1
            return {}
        self._free(chain)
        ret_addr = chain[0].ret_addr
        # For a return QEMU did not report (SMP), the host does the trampoline's ret: the
        # vCPU leaves the trampoline now, so a late report cannot pass for another return.
        leave = {"rip": ret_addr, "rsp": slot + 8} if redirect else {}
        runs = [ri for ri in reversed(chain) if ri.rp.registered and ri.rp.handler is not None]
        if not runs:
            return leave
        gregs = dict(gregs)
        gregs["rip"] = ret_addr
        gregs["rsp"] = slot + 8  # as right after the function's ret
        regs = PtRegs.from_gdb(gregs, cpu=cpu, memory=self.memory)
        for ri in runs:  # one pt_regs for all, as the kernel passes its one frame
            rp = ri.rp
            assert rp.handler is not None
            rp.nhit += 1
            try:
                rp.handler(ri, regs)
            except LOST_ERRORS:
                raise
            except Exception as exc:
                self._handler_failed(rp, exc, "handler")
        return to_gdb_names(regs.changes(), skip=("ip", "sp")) | leave

    # -- teardown ------------------------------------------------------------------------

    def unhijack_all(self) -> int:
        """Put every pending call's return address back on its stack (VM stopped).

        The guest's table entries stay: a vCPU already inside the trampoline (its slot
        still holds the trampoline's address until the trampoline writes the real one
        back) must find its entry, or it stops on the trampoline's ud2. Nothing new is
        hijacked after this, and the table goes with the slot area."""
        memory = self.memory
        restored = 0
        for chain in list(self.by_slot.values()):
            ri = chain[0]
            try:
                pending = memory.u64(ri.slot) == self.trampoline
            except GuestFaultError:
                pending = False  # the task and its (vmalloc'd) stack are gone
            if pending:
                memory.write(ri.slot, struct.pack("<Q", ri.ret_addr))
                restored += 1
            self._free(chain)
        self.by_slot.clear()
        return restored
