"""The kprobe optimizer (``kernel/kprobes.c``'s ``kprobe_optimizer`` and the
``debug.kprobes-optimization`` sysctl): which sites get a jump instead of an int3, and when.

A new site whose instructions allow it (:func:`kprobevm.x86.opt.find_region`; no
post_handler, no other probe and no text the kernel patches under the jump; on an
ftrace site, the jump goes after the NOP, which stays the guest's ftrace's) gets a slot
that copies every covered instruction, and goes in with its int3 as any site. Once no
vCPU, and no task it may have interrupted, can be inside the covered bytes any more
(:meth:`kprobevm.trap.grace.Quiescence.wait_until_out_of_text`), the int3 becomes the jump
(:mod:`kprobevm.trap.optjump`): looked at once after the registration, then by a thread
of the optimizer's own while sites wait (the kernel's delayed optimizer). A probe
registered later inside a covered range takes the jump (and the covering) away first, as
the kernel unoptimizes an aggregate probe.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from kprobevm.errors import LOST_ERRORS, KprobeError, KprobeVMError
from kprobevm.kernel.patchsites import FTRACE_NOP
from kprobevm.x86 import asm, ooline
from kprobevm.x86.opt import OptRegion, find_region

if TYPE_CHECKING:
    from kprobevm.kprobes.core import KprobeManager, ProbeSite

__all__ = ["POST_HANDLER_KEEPS_INT3", "Optimizer"]

log = logging.getLogger(__name__)

POST_HANDLER_KEEPS_INT3 = "a post_handler runs after the probed instruction alone"
"""Why a site with a post_handler is not optimized (the kernel's rule too)."""
GRACE_TIMEOUT = 2.0
"""Seconds sites may wait for the guest to leave the bytes their jumps cover before
stderr says they still have their int3 (the optimizer goes on trying)."""
OPTIMIZE_BY_DEFAULT = True
"""Jumps go in where the optprobe rules allow, as the kernel's sysctl
``debug.kprobes-optimization`` is on by default; ``optimizer.enabled = False`` (or
``--no-optimize``) keeps every probe on its int3."""

RETRY_INTERVAL = 0.05
"""Seconds between the optimizer thread's looks at the guest."""


class Optimizer:
    """Which sites of a probe table are jump-optimized; ``enabled`` is the sysctl."""

    def __init__(self, manager: KprobeManager, *, enabled: bool = OPTIMIZE_BY_DEFAULT) -> None:
        self.manager = manager
        self._enabled = enabled
        self.why_not: dict[int, str] = {}
        """Site address -> why it keeps its int3 (no jump, or not yet)."""
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def enabled(self) -> bool:
        """Whether sites are optimized (``sysctl debug.kprobes-optimization``)."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        """Off: every jump goes back to its int3 now. On: sites that may take one get it."""
        manager = self.manager
        self._enabled = value
        if value:
            self.optimize_pending()
            return
        channel = manager.installed_channel
        if channel is None:
            return
        with manager._mutex, manager.target.stopped():
            for site in manager.table.values():
                if site.optimized:
                    channel.unoptimize(site)

    # -- deciding (VM stopped, a new site before its slot code is written) -------------

    def uncover(self, addr: int) -> None:
        """Before a new site at ``addr``: take away the jump (and the covering) of any
        site whose jump covers it, so that its bytes read as the kernel's again."""
        for other in list(self.manager.table.values()):
            region = other.opt
            if region is not None and region.addr < addr < region.end:
                self._uncover(other, f"a probe at {addr:#x} inside its jump")

    def prepare(self, site: ProbeSite) -> None:
        """Give a new site a region if it may have one (before its slot code is written)."""
        manager = self.manager
        why = self._region(site)
        if isinstance(why, OptRegion):
            site.opt = why
            self.why_not[site.addr] = "not yet: waiting for the guest to leave the covered bytes"
        else:
            self.why_not[site.addr] = why
            log.debug("%s keeps its int3: %s", manager.symbols.describe(site.addr), why)

    def forget(self, site: ProbeSite) -> None:
        """The site is gone."""
        self.why_not.pop(site.addr, None)

    def drop(self, site: ProbeSite, why: str) -> None:
        """``site`` keeps its int3 from now on; its slot code must be written anew (by
        the caller) to run its own instruction only."""
        if site.optimized:
            self.manager.channel.unoptimize(site)
        site.opt = None
        self.why_not[site.addr] = why

    def _uncover(self, site: ProbeSite, why: str) -> None:
        self.drop(site, why)
        self.manager.channel.rebuild_site(site)

    def _region(self, site: ProbeSite) -> OptRegion | str:
        manager = self.manager
        if not manager.channel.optimizes:
            return f"the {manager.channel.name} channel has no slot to jump to"
        if site.wants_post:
            return POST_HANDLER_KEEPS_INT3
        # a jump label or alternative under the jump would be patched by the kernel one day
        if site.module is not None:
            return f"in module {site.module}, whose patched text the host does not know"
        if unknown := manager.patch_sites.unknown_at_run_time:
            return f"the text the kernel patches is not all known ({'; '.join(unknown)})"
        sym = manager.symbols.lookup(site.addr)
        if sym is None or not sym.size:
            return "no function around it"
        func = manager.original_text(sym.address, sym.size)
        region = find_region(func, sym.address, site.addr,
                             reserved=lambda lo, hi: self._reserved(site, lo, hi),
                             fixup=self._fixup)  # fmt: skip
        if isinstance(region, str) or site.slot is None:
            return region if isinstance(region, str) else "no slot"
        if (changed := self._changed(region, func, sym.address)) is not None:
            return changed
        try:  # in reach of the slot: the jump, and each copy's RIP-relative operand
            asm.jmp_rel32(site.addr, site.slot.address)
            for insn in region.insns:
                ooline.relocate(insn, site.slot.address)
        except KprobeError as exc:
            return str(exc)
        return region

    def _reserved(self, site: ProbeSite, lo: int, hi: int) -> str | None:
        """What else owns a byte of ``[lo, hi)``: patched text, an ftrace NOP, a probe."""
        patch = self.manager.patch_sites
        for addr in range(lo, hi):
            found = patch.find(addr)
            if found is not None:
                return f"{found.reason} at {found.start:#x} under the jump"
        for start in range(lo - len(FTRACE_NOP) + 1, hi):
            if start in patch.ftrace:
                return f"the ftrace NOP at {start:#x} under the jump"
        for other in self.manager.table:
            if other != site.addr and lo <= other < hi:
                return f"another probe at {other:#x} under the jump"
        return None

    def _changed(self, region: OptRegion, text: bytes, at: int) -> str | None:
        """Why the covered bytes (``text`` read at ``at``, our int3s undone) may not be
        copied: the kernel image's bytes are unknown, or the guest changed them (its own
        kprobe or optprobe, which it takes out lazily); None when they are the image's."""
        reference = self.manager.patch_sites.kernel_bytes
        if reference is None:
            return ("no vmlinux to check the covered bytes against (the guest's own kprobes"
                    " patch text too)")
        size = region.end - region.addr
        live = text[region.addr - at : region.addr - at + size]
        try:
            kernel = reference(region.addr, size)
        except KprobeVMError as exc:
            return f"the covered bytes are not in the vmlinux: {exc}"
        if live != kernel:
            return (f"the guest changed the covered bytes at {region.addr:#x} (its own kprobe?):"
                    f" {live.hex()} where the vmlinux has {kernel.hex()}")
        return None

    def _fixup(self, addr: int) -> str | None:
        found = self.manager.patch_sites.find(addr)
        if found is not None and found.reason == "exception table":
            return f"an exception-table entry at {addr:#x}"
        return None

    # -- optimizing (the guest running between looks) ----------------------------------

    def optimize_pending(self) -> None:
        """After registrations: one look now (an idle guest lets every jump in at once);
        sites that must wait for the guest are left to a thread of the optimizer's own,
        as the kernel leaves them to its delayed optimizer. A thread that holds the VM
        stopped (or the trap thread) only hands them over."""
        manager = self.manager
        if not self._enabled or manager.installed_channel is None:
            return
        if not manager.target.holds_here and self._attempt(timeout=0.0):
            return
        self._start_worker()

    def _attempt(self, timeout: float) -> bool:
        """Jumps for every armed site with a region once the guest is out of the bytes
        they cover, waiting at most ``timeout`` seconds; True when none is left."""
        manager = self.manager
        channel = manager.installed_channel
        if channel is None:
            return True
        with manager._mutex:
            pending = self._pending()
        if not pending:
            return True
        since = max(s.armed_at for s in pending)
        ranges = [(s.addr + 1, s.opt.end) for s in pending if s.opt is not None]
        quiescence = channel.quiescence_for_text()
        assert quiescence is not None
        why = quiescence.wait_until_out_of_text(ranges, since, timeout)
        if why is not None:
            for site in pending:
                self.why_not[site.addr] = f"not yet: {why}"
            return False
        with manager._mutex, manager.target.stopped():
            if manager.installed_channel is not channel:
                return True  # closed meanwhile
            for site in self._pending():
                if site.armed_at <= since:
                    # the guest may have patched the bytes since the region was chosen
                    assert site.opt is not None
                    opt = site.opt
                    now = manager.original_text(opt.addr, opt.end - opt.addr)
                    if (changed := self._changed(opt, now, opt.addr)) is not None:
                        self._uncover(site, changed)
                        continue
                    channel.optimize(site)
                    self.why_not.pop(site.addr, None)
            return not self._pending()

    def _pending(self) -> list[ProbeSite]:
        return [s for s in self.manager.table.values()
                if s.opt is not None and s.armed and not s.optimized and s.enabled]  # fmt: skip

    def _start_worker(self) -> None:
        with self._lock:
            if self._worker is not None and self._worker.is_alive():
                return
            self._stopping.clear()
            self._worker = threading.Thread(target=self._work, name="kprobevm-optimizer",
                                            daemon=True)  # fmt: skip
            self._worker.start()

    def _work(self) -> None:
        """Try again every :data:`RETRY_INTERVAL` until no site waits (said once on
        stderr when one waited :data:`GRACE_TIMEOUT` seconds)."""
        said = False
        started = time.monotonic()
        while not self._stopping.wait(RETRY_INTERVAL):
            try:
                if not self._enabled or self._attempt(timeout=RETRY_INTERVAL):
                    return
            except LOST_ERRORS:
                return
            except KprobeVMError as exc:
                log.warning("the kprobe optimizer stopped: %s; probes keep their int3", exc)
                return
            if not said and time.monotonic() - started > GRACE_TIMEOUT:
                said = True
                why = next(iter(self.why_not.values()), "")
                log.warning("probes keep their int3 for now (%s); the optimizer goes on", why)

    def stop(self) -> None:
        """End the optimizer's thread (the table is being closed or abandoned)."""
        self._stopping.set()
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=GRACE_TIMEOUT + 1.0)

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until every site that may be optimized is, and the optimizer's thread is
        through: a look it had begun would stop the guest once more (tests and benchmarks
        count the stops that follow)."""
        deadline = time.monotonic() + timeout
        while self._enabled and not self._attempt(timeout=max(deadline - time.monotonic(), 0)):
            if time.monotonic() > deadline:
                raise KprobeError(
                    f"{len(self._pending())} probe(s) not optimized after"
                    f" {timeout:g} s: {next(iter(self.why_not.values()), '')}"
                )
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            # nothing is pending: its next look ends it without a stop
            worker.join(timeout=max(deadline - time.monotonic(), 1.0))
            if worker.is_alive():
                raise KprobeError(f"the optimizer's thread still looks after {timeout:g} s")
