"""Kprobes: the probe table and its policy, after the kernel's ``kernel/kprobes.c``.

A :class:`Kprobe` names a place (``symbol_name`` + ``offset``, or ``addr``) and handlers.
Probes at one address share one :class:`ProbeSite` (the kernel's aggregate probe): one
int3, one instruction slot, handlers run in registration order. The table is a dict
keyed by address (``kprobe_table``). How traps reach the host and how the displaced
instruction runs is the trap channel's business (:mod:`kprobevm.trap.channel`); this module
decides what may be probed and keeps the counts.

A probe on a function's ftrace site (the 5-byte NOP at its entry) is the kernel's
ftrace-based kprobe: the guest's ftrace owns those five bytes and verifies them before it
patches them, so an int3 there would make the guest's function tracer or its own
kprobes fail (and ftrace turn itself off until reboot). The int3 goes on the instruction
after the NOP instead; the probe still reports the NOP's address, its handlers see that
address in ``regs.ip``, and its post_handler runs as after the NOP, as ftrace runs it.

On a kernel built with X86_KERNEL_IBT a function may start with ``endbr64`` (or its
sealed form), and the kernel's ``arch_adjust_kprobe_addr()`` moves a probe at ``func+0``
to ``func+4``, past it: the probe's address is then ``func+4``, where the ftrace NOP is,
and :meth:`KprobeManager.resolve` does the same.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from kprobevm import faults
from kprobevm.errors import LOST_ERRORS, KprobeError, KprobeVMError, ProbeRefused, SymbolError
from kprobevm.kernel.patchsites import FTRACE_NOP
from kprobevm.kprobes.modules import WATCHED_FUNCTION, ModuleWatch
from kprobevm.kprobes.optimizer import OPTIMIZE_BY_DEFAULT, POST_HANDLER_KEEPS_INT3, Optimizer
from kprobevm.x86.arch import adjust_kprobe_addr, can_probe
from kprobevm.x86.ptregs import PtRegs

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.gdbstub.target import Target
    from kprobevm.kernel.blacklist import Blacklist
    from kprobevm.kernel.kallsyms import KernelSymbols, Symbol
    from kprobevm.kernel.modules import ModuleLayout
    from kprobevm.kernel.patchsites import PatchSites
    from kprobevm.kernel.stacktrace import StackTracer
    from kprobevm.kprobes.recorder import Record, RecordSpec
    from kprobevm.kprobes.slots import Slot
    from kprobevm.trap.channel import TrapChannel, TrapHandlers
    from kprobevm.x86.insn import Insn
    from kprobevm.x86.opt import OptRegion

    ChannelInstaller = Callable[[TrapHandlers], TrapChannel]
    """Puts a trap channel in the guest for the given handlers (the probe table)."""

__all__ = ["Kprobe", "KprobeManager", "PostHandler", "PreHandler", "ProbeSite"]

log = logging.getLogger(__name__)

PreHandler = Callable[["Kprobe", PtRegs], Any]
"""pre_handler(kp, regs): a true return means "regs.ip was changed: skip the insn"."""
PostHandler = Callable[["Kprobe", PtRegs], Any]
"""post_handler(kp, regs): runs after the displaced instruction."""

MAX_KEPT_ERRORS = 8


class KeepsHandlerErrors(Protocol):
    """A probe that keeps its handlers' exceptions: Kprobe and Kretprobe alike."""

    nerrors: int
    errors: list[str]


def keep_handler_error(probe: KeepsHandlerErrors, exc: BaseException) -> None:
    """Count a handler's exception on its probe and keep the last few, formatted."""
    probe.nerrors += 1
    probe.errors.append("".join(traceback.format_exception_only(type(exc), exc)).strip())
    del probe.errors[:-MAX_KEPT_ERRORS]


@dataclass(eq=False)
class Kprobe:
    """One probe (``struct kprobe``): where, which handlers, and its counters.

    Give ``symbol_name`` (plus ``offset``) or ``addr``, not both; ``ValueError`` when
    neither is given, or a recorded probe has a post_handler. Handler exceptions are
    caught, counted in ``nerrors`` and kept in ``errors``: the engine goes on.
    """

    symbol_name: str | None = None
    """A kernel symbol (``do_sys_openat2``, ``mod:sym`` for a module's)."""
    offset: int = 0
    """Bytes past the symbol (or ``addr``): an instruction boundary in its function."""
    addr: int | None = None
    """The address to probe; once registered, the resolved address whichever was given."""
    pre_handler: PreHandler | None = None
    """``pre_handler(kp, regs)`` before the probed instruction runs; a true return means
    it moved ``regs.ip`` itself and the instruction is skipped."""
    post_handler: PostHandler | None = None
    """``post_handler(kp, regs)`` after the probed instruction ran."""
    record: RecordSpec | None = None
    """Record mode: the guest records each hit without stopping; ``pre_handler`` runs on
    the host later, with the hit's registers and reads (:mod:`kprobevm.kprobes.recorder`)."""
    stack: bool = False
    """Give ``pre_handler`` the kernel stack at each hit in ``regs.stack``, unwound on the
    host (:mod:`kprobevm.kernel.stacktrace`); a recorded probe copies
    ``record.stack_size`` bytes of stack (``DEFAULT_STACK_SIZE`` when 0)."""
    _nhit: int = field(default=0, init=False, repr=False)
    nmissed: int = field(default=0, init=False)
    """Hits whose handler did not run: re-entered, or (recorded) the ring was full, or
    the record reached the host after the probe was unregistered."""
    guest_hits: int = field(default=0, init=False)
    """Recorded probes: hits the guest counted, records written and hits missed, read at
    each drain. Once the probe's hits in flight are settled (``settle_records``),
    ``nhit + nmissed == guest_hits``: none was lost uncounted."""
    settling: int = field(default=0, init=False)
    """Recorded probes: unregistrations whose hits in flight are not all counted yet (a
    vCPU may still be inside the probe's program); at 0, ``nmissed`` and ``guest_hits``
    are final until it is registered again."""
    nerrors: int = field(default=0, init=False)
    """Handler exceptions caught (the handler's hit still counts in nhit)."""
    errors: list[str] = field(default_factory=list, init=False, repr=False)
    """The last few handler exceptions, formatted."""
    disabled: bool = field(default=False, init=False)
    registered: bool = field(default=False, init=False)
    gone: bool = field(default=False, init=False)
    """Its module was unloaded: the probe is out of the guest, still registered."""
    ftrace: bool = field(default=False, init=False)
    """On a function's ftrace site: its int3 sits past the NOP (listed ``[FTRACE]``)."""
    record_id: int | None = field(default=None, init=False, repr=False)
    """The tag of this probe's records in the guest's ring (recorded probes only)."""
    counted: bool = field(default=False, init=False)
    """Registered without handlers, so counted in the guest (no stop per hit): ``record``
    is a count-only spec while registered."""
    count_reader: Callable[[], int] | None = field(default=None, init=False, repr=False)
    """Reads this probe's counter in the guest (a count-only probe while registered)."""
    _given_addr: int | None = field(default=None, init=False, repr=False)

    @property
    def nhit(self) -> int:
        """Hits so far; a count-only probe's are read from its counter in the guest."""
        reader = self.count_reader
        return self._nhit + (reader() if reader is not None else 0)

    @nhit.setter
    def nhit(self, value: int) -> None:
        self._nhit = value

    def __post_init__(self) -> None:
        if self.symbol_name is None and self.addr is None:
            raise ValueError("a Kprobe needs symbol_name or addr")
        if self.record is not None and self.post_handler is not None:
            raise ValueError("a recorded Kprobe has no post_handler: nothing stops after it")
        if self.stack and self.record is not None and not self.record.stack_size:
            from kprobevm.kernel.stacktrace import DEFAULT_STACK_SIZE

            self.record = replace(self.record, stack_size=DEFAULT_STACK_SIZE)

    def where(self) -> str:
        if self.symbol_name is not None:
            return f"{self.symbol_name}+{self.offset:#x}" if self.offset else self.symbol_name
        return f"{self.addr:#x}" if self.addr is not None else "?"


@dataclass(eq=False)
class ProbeSite:
    """The aggregate probe at one address: one int3, one slot, several Kprobes."""

    addr: int
    """Where the int3 is (past the NOP for probes on an ftrace site)."""
    insn: Insn
    slot: Slot | None
    """The instruction slot (None on the breakpoint channel, which single-steps)."""
    probes: list[Kprobe] = field(default_factory=list)
    armed: bool = False
    int3_seq: int | None = None
    """Journal sequence of the armed int3 write."""
    pre_rip: int = 0
    """RIP at the pre-handler stop (just after the slot's first watched store)."""
    post_rip: int | None = None
    """RIP at the post-handler stop, when the slot has a second watched store."""
    cont_rip: int = 0
    """Where a handled vCPU goes on: the slot's continuation copy, past the pre store."""
    pre_watch: int | None = None
    """The mailbox byte of this site's pre store, watched on its own: a stop names it."""
    module: str | None = None
    """The module whose text holds the site (None: the core kernel)."""
    opt: OptRegion | None = None
    """What a jump here would cover (its slot copies all of it): None, int3 only."""
    armed_at: float = 0.0
    """When the int3 went in (monotonic): the optimizer's grace period starts there."""
    optimized: bool = False
    """The jump is in the guest instead of the int3 (listed ``[OPTIMIZED]``)."""
    jump: bytes = b""
    jump_seqs: tuple[int, int] | None = None
    """Journal sequences of the jump's displacement and opcode writes."""

    @property
    def original(self) -> bytes:
        """The bytes our int3 (or jump) replaced, as the kernel has them."""
        return self.opt.original if self.opt is not None else self.insn.bytes

    @property
    def enabled(self) -> bool:
        return any(not p.disabled for p in self.probes)

    @property
    def wants_post(self) -> bool:
        """A probe here runs a post_handler after the displaced instruction (an ftrace
        site's probes run theirs after the NOP, at the pre stop)."""
        return any(p.post_handler is not None and not p.ftrace for p in self.probes)

    @property
    def recorded(self) -> bool:
        """Record mode: every probe here is recorded by the guest (no stop per hit)."""
        return bool(self.probes) and self.probes[0].record is not None


class KprobeManager:
    """The probe table of one guest and the kernel's register/unregister policy."""

    def __init__(
        self,
        *,
        symbols: KernelSymbols,
        blacklist: Blacklist,
        patch_sites: PatchSites,
        target: Target,
        memory: GuestMemory,
        channel_installer: ChannelInstaller,
        refresh_symbols: Callable[[], bool] | None = None,
        module_layout: Callable[[], ModuleLayout | None] = lambda: None,
        ibt: bool = False,
        stack_tracer: Callable[[], StackTracer] | None = None,
    ) -> None:
        """``channel_installer`` puts a trap channel in the guest for this table's
        handlers: on the first registration, and again after a close.
        ``refresh_symbols`` reads kallsyms again when a name is not found (a module loaded
        since); ``module_layout`` names a ``struct module`` for probes in modules; ``ibt``:
        the kernel is built with X86_KERNEL_IBT (entry probes go past an ``endbr64``);
        ``stack_tracer`` unwinds the stack of a probe made with ``stack=True``."""
        self.symbols = symbols
        self._stack_tracer = stack_tracer
        self.ibt = ibt
        self.blacklist = blacklist
        self.patch_sites = patch_sites
        self.target = target
        self.memory = memory
        self._channel_installer = channel_installer
        self._refresh_symbols = refresh_symbols
        self.table: dict[int, ProbeSite] = {}
        self.all_disarmed = False
        self._mutex = threading.RLock()  # the kernel's kprobe_mutex
        self._channel: TrapChannel | None = None
        self.handler_errors = 0
        self.gone: list[Kprobe] = []
        """Probes whose module was unloaded: out of the guest, still registered."""
        self.counting_refused: str | None = None
        """Why probes without handlers stop the guest after all (None: they are counted)."""
        self.ftrace_held: dict[int, str] = {}
        """ftrace sites with our int3 on the NOP itself, and why it could not go after it:
        the guest's ftrace cannot patch those functions while they are probed."""
        self.modules = ModuleWatch(memory, module_layout, self._module_going)
        self.optimizer = Optimizer(self, enabled=OPTIMIZE_BY_DEFAULT)
        """Which sites get a jump instead of an int3 (``optimizer.enabled``: the sysctl)."""

    # -- the channel -----------------------------------------------------------------

    def install_channel(self) -> TrapChannel:
        """The trap channel, put in the guest now if it is not there yet (VM running:
        installing it stops the VM itself)."""
        if self._channel is None:
            self._channel = self._channel_installer(self)
        return self._channel

    @property
    def channel(self) -> TrapChannel:
        """The trap channel, installed on first use (fast when possible, else fallback)."""
        return self.install_channel()

    @property
    def installed_channel(self) -> TrapChannel | None:
        """The trap channel if one is in the guest now (never installs one)."""
        return self._channel

    def site_at(self, addr: int) -> ProbeSite | None:
        """The aggregate probe at ``addr`` (the kernel's ``get_kprobe``, for the trap path)."""
        return self.table.get(addr)

    # -- address resolution and checks -----------------------------------------------

    def resolve(self, kp: Kprobe) -> int:
        """The probe's address (the kernel's ``_kprobe_addr``)."""
        return self.resolve_entry(kp)[0]

    def resolve_entry(self, kp: Kprobe) -> tuple[int, bool]:
        """The probe's address and whether it is its function's entry (the kernel's
        ``_kprobe_addr`` with ``arch_adjust_kprobe_addr``: past an ``endbr64`` on IBT)."""
        addr = self._given_address(kp)
        sym = self.symbols.lookup(addr)
        if sym is None or sym.type not in "Tt":
            return addr, False  # refused later, as not in kernel text
        offset = addr - sym.address
        if not self.ibt:
            return addr, offset == 0
        offset, on_entry = adjust_kprobe_addr(self.original_text(sym.address, 4), offset)
        return sym.address + offset, on_entry

    def _given_address(self, kp: Kprobe) -> int:
        if kp.symbol_name is not None and kp.addr is not None:
            raise ProbeRefused(
                "EINVAL", "give symbol_name or addr, not both",
                symbol=kp.symbol_name, address=kp.addr,
            )  # fmt: skip
        if kp.offset < 0:
            raise ProbeRefused("EINVAL", f"negative offset {kp.offset}", symbol=kp.symbol_name)
        if kp.symbol_name is not None:
            try:
                base = self.symbols[kp.symbol_name]
            except SymbolError as exc:
                raise ProbeRefused(
                    "BAD_PROBE_ADDR", str(exc), symbol=kp.symbol_name
                ) from exc
            return base + kp.offset
        assert kp.addr is not None
        return kp.addr + kp.offset

    def int3_place(self, addr: int) -> int:
        """Where the int3 of a probe at ``addr`` goes: past the NOP of an ftrace site, so
        that the guest's ftrace finds its five bytes as it left them."""
        sites = self.patch_sites
        if addr not in sites.ftrace:
            return addr
        after = addr + len(FTRACE_NOP)
        clash = sites.find(after)
        if clash is None:
            return after
        if addr not in self.ftrace_held:
            self.ftrace_held[addr] = f"{clash.reason} right after the NOP"
            log.warning(
                "%s: the int3 goes on the ftrace NOP (%s); the guest's ftrace cannot patch "
                "this function while it is probed", self.symbols.describe(addr),
                self.ftrace_held[addr],
            )  # fmt: skip
        return addr

    def check_probe_address(self, addr: int, kp: Kprobe) -> Symbol:
        """Refuse what the kernel refuses, and what a host-side kprobe must refuse too;
        the symbol the address is in."""
        syms = self.symbols
        sym = syms.lookup(addr)
        if sym is None or sym.type not in "Tt":
            raise ProbeRefused(
                "BAD_PROBE_ADDR", "not in kernel text", address=addr, symbol=kp.symbol_name
            )
        entry = self.blacklist.within_kprobe_blacklist(addr)
        if entry is not None:
            raise ProbeRefused(
                "EINVAL", f"{addr:#x} is blacklisted ({entry})",
                address=addr, symbol=kp.symbol_name,
            )  # fmt: skip
        # past an ftrace NOP the guest's ftrace may patch the NOP as it likes
        reason = self.patch_sites.reserved(addr) if self.int3_place(addr) == addr else None
        if reason is not None:
            raise ProbeRefused(
                "EBUSY", f"the guest kernel rewrites this site ({reason})",
                address=addr, symbol=kp.symbol_name,
            )  # fmt: skip
        if not can_probe(self.original_text(sym.address, sym.size), sym.address, addr):
            raise ProbeRefused(
                "BAD_INSN_BNDRY", f"{syms.describe(addr)} is not an instruction boundary",
                address=addr, symbol=kp.symbol_name,
            )  # fmt: skip
        return sym

    # -- the API ---------------------------------------------------------------------

    def look_up_names(self, kps: list[Kprobe]) -> None:
        """Read kallsyms again if a probe names a symbol it lacks (a module loaded since).

        Over SSH, so before anything holds the VM stopped: SSH cannot answer then.
        """
        missing = any(kp.symbol_name is not None and kp.symbol_name not in self.symbols
                      for kp in kps)  # fmt: skip
        if missing and self._refresh_symbols is not None:
            self._refresh_symbols()

    def register_kprobe(self, kp: Kprobe) -> None:
        """Place ``kp`` (arming its int3 unless all probes are disarmed)."""
        self.look_up_names([kp])
        self._register_kprobe(kp)
        self.optimizer.optimize_pending()

    def _register_kprobe(self, kp: Kprobe) -> None:
        self.install_channel()
        with self._mutex:
            if kp.registered:
                raise KprobeError("probe is already registered", symbol=kp.symbol_name)
            addr = self.resolve(kp)
            if kp.record is not None and not self.channel.records:
                raise ProbeRefused(
                    "EOPNOTSUPP", f"the {self.channel.name} channel cannot record probes",
                    address=addr, symbol=kp.symbol_name,
                )  # fmt: skip
            place = self.int3_place(addr)
            site = self.table.get(place)
            with self.target.stopped():  # a counted site turned stopping loses no hit
                moved = self._decide_counting(kp, site)
                try:
                    self._place_or_join(kp, addr, place, None if moved else site)
                except BaseException:
                    if kp.counted:
                        kp.record, kp.counted = None, False
                    raise
                finally:
                    for other in moved:
                        self._register_kprobe(other)

    def _place_or_join(self, kp: Kprobe, addr: int, place: int, site: ProbeSite | None) -> None:
        """Put ``kp`` (at ``addr``) in a new site with its int3 at ``place``, or in
        ``site`` there."""
        kp.ftrace = place != addr
        if site is None:
            sym = self.check_probe_address(addr, kp)
            if sym.module is not None:
                self._watch_modules(sym.module, self.symbols.describe(addr))
            try:
                self._place_site(place, kp, sym.module)
            except BaseException:
                self._unwatch_modules_if_idle()  # no probe in a module after all
                raise
        else:
            if (kp.record is None) != (not site.recorded):
                raise ProbeRefused(
                    "EBUSY", "recorded and stopping probes cannot share an address",
                    address=addr, symbol=kp.symbol_name,
                )  # fmt: skip
            # (a latency map is updated at the return: its entry shares the hijack)
            if any(p.record is not None and p.record.aggregate is not None
                   and not p.record.at_return for p in (*site.probes, kp)):  # fmt: skip
                raise ProbeRefused(
                    "EBUSY", "a probe keeping a map in the guest cannot share an address",
                    address=addr, symbol=kp.symbol_name,
                )  # fmt: skip
            with self.target.stopped():
                had_post = site.wants_post
                # ftrace runs its probes before the int3 after the NOP is reached
                site.probes.insert(
                    sum(p.ftrace for p in site.probes) if kp.ftrace else len(site.probes), kp
                )
                if site.recorded or (site.wants_post and not had_post):
                    # a recorded aggregate records the newcomer too; one gaining a
                    # post_handler needs a slot with a post stop
                    if site.wants_post and site.opt is not None:
                        self.optimizer.drop(site, POST_HANDLER_KEEPS_INT3)
                    try:
                        self.channel.rebuild_site(site)
                    except BaseException:
                        site.probes.remove(kp)
                        raise
        kp._given_addr = kp.addr
        kp.addr = addr
        kp.registered = True
        self.channel.ensure_running()

    def _decide_counting(self, kp: Kprobe, site: ProbeSite | None) -> list[Kprobe]:
        """Count a handler-less ``kp`` in the guest when it may; when a probe with
        handlers comes to a site of counted probes, take them out (they come back as
        stopping probes, their ``nhit`` kept) and return them."""
        if kp.pre_handler is None and kp.post_handler is None and kp.record is None:
            if (site is None or site.recorded) and self._can_count():
                from kprobevm.kprobes.recorder import RecordSpec

                kp.record, kp.counted = RecordSpec(count_only=True), True
            return []
        if kp.record is not None or site is None or not all(p.counted for p in site.probes):
            return []
        self.channel.flush_records()
        moved = list(site.probes)
        for other in moved:
            self.unregister_kprobe(other)  # its hits so far stay in its nhit
        return moved

    def _can_count(self) -> bool:
        """Whether probes can be counted in the guest; said once on stderr when not."""
        if self.counting_refused is None:
            reason = self.channel.why_not_counting()
            if reason is None:
                return True
            self.counting_refused = reason
            log.warning("probes without handlers will stop the guest at each hit: %s", reason)
        return False

    def _place_site(self, addr: int, kp: Kprobe, module: str | None) -> None:
        """A new aggregate at ``addr`` with ``kp``, written and armed; nothing left on failure."""
        with self.target.stopped():
            self.optimizer.uncover(addr)
            site = self.channel.prepare_site(addr)
            site.module = module
            site.probes.append(kp)
            self.table[addr] = site
            try:
                self.optimizer.prepare(site)
                self.channel.commit_site(site)
                faults.kill_point("arm_kprobe")
                if not self.all_disarmed:
                    self.channel.arm(site)
            except BaseException:
                del self.table[addr]
                self.optimizer.forget(site)
                self.channel.discard_site(site)
                raise

    def register_kprobes(self, kps: list[Kprobe]) -> None:
        """Register several probes with the VM stopped once (the kernel's register_kprobes).

        All or nothing, as in the kernel: a probe that fails unregisters those before it.
        """
        done: list[Kprobe] = []
        self.look_up_names(kps)
        self.install_channel()
        with self._mutex, self.target.stopped():
            try:
                for kp in kps:
                    self._register_kprobe(kp)
                    done.append(kp)
            except BaseException:
                for kp in reversed(done):
                    self.unregister_kprobe(kp)
                raise
        self.optimizer.optimize_pending()

    def unregister_kprobes(self, kps: list[Kprobe]) -> None:
        """Unregister several probes with the VM stopped once."""
        with self._mutex, self.target.stopped():
            for kp in kps:
                self.unregister_kprobe(kp)

    def unregister_kprobe(self, kp: Kprobe) -> None:
        """Remove ``kp``; the int3 goes when the last probe at its address goes."""
        with self._mutex:
            if kp.gone and kp in self.gone:  # its module took it out of the guest
                self.gone.remove(kp)
                self._forget(kp)
                self._unwatch_modules_if_idle()
                return
            site = self.site_of(kp)
            with self.target.stopped():
                if kp.record is not None:
                    self.channel.flush_records()  # its hits so far reach its handler
                site.probes.remove(kp)
                if not site.probes:
                    if site.armed:
                        self.channel.disarm(site)
                    del self.table[site.addr]
                    self.optimizer.forget(site)
                    self.channel.discard_site(site)
                else:
                    if not site.enabled and site.armed:
                        self.channel.disarm(site)
                    if site.recorded:  # its program stops recording kp
                        self.channel.rebuild_site(site)
                if kp.record_id is not None:
                    self.channel.release_record_id(kp)
            self._forget(kp)
            if site.module is not None:
                self._unwatch_modules_if_idle()

    @staticmethod
    def _forget(kp: Kprobe) -> None:
        kp.registered = False
        kp.ftrace = False
        kp.addr = kp._given_addr
        if kp.counted:
            kp.record, kp.counted = None, False

    def enable_kprobe(self, kp: Kprobe) -> None:
        with self._mutex:
            site = self.site_of(kp)
            kp.disabled = False
            with self.target.stopped():
                if site.recorded:
                    self.channel.rebuild_site(site)  # a count program counts it again
                if not site.armed and not self.all_disarmed:
                    self.channel.arm(site)
        self.optimizer.optimize_pending()

    def disable_kprobe(self, kp: Kprobe) -> None:
        with self._mutex:
            site = self.site_of(kp)
            kp.disabled = True
            with self.target.stopped():
                if site.armed and not site.enabled:
                    self.channel.disarm(site)
                elif site.recorded:
                    self.channel.rebuild_site(site)  # its counter is left out

    def arm_all_kprobes(self) -> None:
        """Write every enabled probe's int3 (the debugfs ``kprobes/enabled`` = 1)."""
        with self._mutex, self.target.stopped():
            self.all_disarmed = False
            for site in self.table.values():
                if site.enabled and not site.armed:
                    self.channel.arm(site)
        self.optimizer.optimize_pending()

    def disarm_all_kprobes(self) -> None:
        """Restore every original byte; probes stay registered (``kprobes/enabled`` = 0)."""
        with self._mutex, self.target.stopped():
            self.all_disarmed = True
            for site in self.table.values():
                if site.armed:
                    self.channel.disarm(site)

    def flush_records(self) -> None:
        """Run the handlers of every hit recorded in the guest so far (recorded probes)."""
        if self._channel is not None and self._channel.records:
            with self._mutex, self.target.stopped():
                self._channel.flush_records()

    def settle_records(self, timeout: float = 10.0) -> None:
        """Wait, the guest running, until the hits in flight of every unregistered
        recorded probe are counted (its ``nmissed`` and ``guest_hits`` final), as the
        kernel's unregister waits for handlers in flight. Raises :class:`KprobeError`
        after ``timeout`` seconds (a vCPU never seen in user mode or idle)."""
        deadline = time.monotonic() + timeout
        while (channel := self._channel) is not None and channel.records_settling():
            self.flush_records()  # a drain notes quiescent vCPUs and frees settled ids
            if not channel.records_settling():
                return
            if time.monotonic() > deadline:
                raise KprobeError(
                    f"{channel.records_settling()} unregistered recorded probe(s) still"
                    f" have hits in flight after {timeout:.0f} s"
                )  # fmt: skip
            time.sleep(0.02)

    def get_kprobe(self, addr: int) -> Kprobe | None:
        """The first probe at ``addr`` (the kernel returns the aggregate)."""
        site = self.table.get(self.int3_place(addr))
        return next((p for p in site.probes if p.addr == addr), None) if site else None

    def unregister_all(self) -> None:
        """Unregister every probe, those whose module went included (VM stopped once)."""
        with self._mutex, self.target.stopped():
            for kp in list(self.gone):
                self.unregister_kprobe(kp)
            for site in list(self.table.values()):
                for kp in list(site.probes):
                    if kp.registered:  # the module watch may have gone with the others
                        self.unregister_kprobe(kp)

    def close(self) -> None:
        """Unregister everything and take the trap channel out of the guest."""
        self.optimizer.stop()
        with self._mutex:
            self.unregister_all()
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def abandon(self) -> None:
        """The guest is gone: forget every probe and the channel without touching it
        (nothing of ours outlives the guest). Probes end unregistered, as after
        :meth:`close`; a count-only probe's hits were counted in the guest and went
        with it (its ``nhit`` keeps what the host counted)."""
        self.optimizer.stop()
        with self._mutex:
            for kp in [*self.gone, *(kp for s in self.table.values() for kp in s.probes)]:
                kp.count_reader = None
                self._forget(kp)
            self.table.clear()
            self.gone.clear()
            self.modules.probe = None
            if self._channel is not None:
                self._channel.forget()
            self._channel = None

    def site_of(self, kp: Kprobe) -> ProbeSite:
        """The aggregate probe holding ``kp`` (its int3 may sit past an ftrace NOP)."""
        if not kp.registered:
            raise KprobeError("probe is not registered", symbol=kp.symbol_name)
        if kp.gone:
            raise KprobeError("probe is gone: its module was unloaded", symbol=kp.symbol_name)
        for site in self.table.values():
            if kp in site.probes:
                return site
        raise KprobeError("probe is not in the table", symbol=kp.symbol_name)

    # -- probes in modules -----------------------------------------------------------

    def _watch_modules(self, module: str, where: str) -> None:
        """Before the first probe in a module: our probe on the guest's module unload."""
        if self.modules.probe is None:
            watch = Kprobe(symbol_name=WATCHED_FUNCTION,
                           pre_handler=self.modules.handler(module, where))  # fmt: skip
            self.register_kprobe(watch)
            self.modules.probe = watch

    def _unwatch_modules_if_idle(self) -> None:
        """After the last probe in a module: the unload probe goes too."""
        watch = self.modules.probe
        if watch is None or any(s.module is not None for s in self.table.values()):
            return
        self.modules.probe = None
        if watch.registered:
            self.unregister_kprobe(watch)

    def _module_going(self, module: str) -> None:
        """``module`` is being unloaded (trap thread, VM stopped, its text still mapped):
        its probes leave the guest and are marked gone; its symbols leave the table."""
        sites = [s for s in self.table.values() if s.module == module]
        if any(s.recorded for s in sites):
            self.channel.flush_records()  # the hits so far reach their handlers
        for site in sites:
            if site.armed:
                self.channel.disarm(site)
            del self.table[site.addr]
            self.channel.discard_site(site)
            for kp in site.probes:
                if kp.record_id is not None:
                    self.channel.release_record_id(kp)
                kp.gone = True
                self.gone.append(kp)
        if module in self.symbols.modules():
            self.symbols.replace_with(self.symbols.without_module(module))
        if sites:
            log.warning("module %s unloaded: %d probe(s) in it are gone", module,
                        sum(len(s.probes) for s in sites))  # fmt: skip

    # -- running handlers (trap thread, VM stopped) ----------------------------------

    def run_pre_handlers(self, site: ProbeSite, regs: PtRegs) -> bool:
        """Run the aggregate's pre_handlers; True when one asked to skip the insn."""
        skip = False
        for kp in site.probes:
            if kp.disabled:
                continue
            kp.nhit += 1
            if kp.stack and kp.pre_handler is not None:
                self._attach_stack(kp, regs)
            if kp.ftrace:
                if self._run_ftrace_handlers(kp, site, regs):
                    return True  # ftrace goes where the handler sent it: no int3 after
                continue
            handler = kp.pre_handler
            if handler is not None and self._call(kp, handler, regs, "pre_handler of"):
                skip = True
        return skip

    def _call(self, kp: Kprobe, handler: PreHandler, regs: PtRegs, which: str) -> Any:
        """A handler's return; an exception of its own is kept on ``kp`` (None returned):
        a handler's bug never stops the engine. A lost guest is not the handler's fault,
        and nothing goes on: that one is raised."""
        try:
            return handler(kp, regs)
        except LOST_ERRORS:
            raise
        except Exception as exc:
            self._handler_failed(kp, exc, which)
            return None

    def _run_ftrace_handlers(self, kp: Kprobe, site: ProbeSite, regs: PtRegs) -> bool:
        """An ftrace site's probe, as ftrace runs it: pre_handler at the NOP's address,
        then post_handler just past the NOP, where the int3 is; True when the
        pre_handler moved ``regs.ip`` and asked for it."""
        regs.place_at(kp.addr or site.addr)
        if kp.pre_handler is not None and self._call(kp, kp.pre_handler, regs, "pre_handler of"):
            return True
        regs.place_at(site.addr)  # an ip moved without asking is not followed
        if kp.post_handler is not None:
            self._call(kp, kp.post_handler, regs, "post_handler of")
            regs.place_at(site.addr)
        return False

    def _handler_failed(self, kp: Kprobe, exc: Exception, which: str) -> None:
        """Keep a handler's exception on its probe and count it; the engine goes on."""
        keep_handler_error(kp, exc)
        self.handler_errors += 1
        log.warning("%s %s raised %r", which, kp.where(), exc)

    def run_recorded(self, kp: Kprobe, record: Record) -> None:
        """A recorded hit of ``kp``: its pre_handler, with the hit's registers and reads."""
        from kprobevm.kprobes.recorder import RecordedRegs

        if kp.record is not None and kp.record.count_only:
            return  # a counted probe's nhit is the guest's counter
        if kp.disabled:
            kp.nmissed += 1  # written as it was being disabled: its handler does not run
            return
        kp.nhit += 1
        if kp.pre_handler is None:
            return
        # an ftrace site's hit shows the probe's own address; a return shows the caller
        at_entry = kp.ftrace and not (kp.record is not None and kp.record.at_return)
        regs = RecordedRegs.of(record, self.memory, ip=kp.addr if at_entry else None)
        if kp.stack:
            self._attach_stack(kp, regs, live=False)
            stack, size = regs.stack, kp.record.stack_size if kp.record else 0
            if stack is not None and stack.error is not None:
                why = f"{stack.error}, past the {size} bytes of stack the record holds?"
                regs.stack = replace(stack, error=why)
        try:
            kp.pre_handler(kp, regs)
            if regs.changes():
                raise KprobeError(
                    "a recorded probe's handler changed registers: the hit is over",
                    symbol=kp.symbol_name, address=kp.addr,
                )  # fmt: skip
        except LOST_ERRORS:
            raise
        except Exception as exc:
            self._handler_failed(kp, exc, "pre_handler of recorded")

    def _attach_stack(self, kp: Kprobe, regs: PtRegs, *, live: bool = True) -> None:
        """``regs.stack`` for ``kp``'s handler: the walk starts one past the probe, at the
        ``regs->ip`` a kernel kprobe handler sees (after int3, or from ftrace). ``live``:
        the guest is stopped at the hit (not a recorded hit's memory)."""
        if regs.stack is not None:
            return
        if self._stack_tracer is None or regs.memory is None:
            raise KprobeError("no stack tracer: stack=True needs the VM's vmlinux", address=kp.addr)
        ip = (kp.addr or regs.ip) + 1
        try:
            regs.stack = self._stack_tracer().at_hit(regs.as_dict(), regs.memory, ip=ip, live=live)
        except LOST_ERRORS:
            raise
        except KprobeVMError as exc:
            self._handler_failed(kp, exc, "stack trace of")

    def run_post_handlers(self, site: ProbeSite, regs: PtRegs) -> None:
        for kp in site.probes:
            if kp.disabled or kp.post_handler is None or kp.ftrace:
                continue
            self._call(kp, kp.post_handler, regs, "post_handler of")

    def original_text(self, addr: int, n: int) -> bytes:
        """``n`` bytes of guest text as the kernel has them, our probes' int3s read as the
        bytes they replaced."""
        with self.target.stopped():
            code = bytearray(self.memory.read(addr, n))
        for site in self.table.values():
            for i, byte in enumerate(site.original):
                if 0 <= site.addr + i - addr < n:
                    code[site.addr + i - addr] = byte
        return bytes(code)
