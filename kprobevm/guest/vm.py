"""The VM facade: one guest as kprobevm sees it, whoever started its QEMU.

A `VM` is made from endpoints (gdbstub socket, SSH address, QMP socket, serial log), so
the same object serves a guest booted by :func:`kprobevm.boot` and one attached to with
:func:`kprobevm.attach`. It is the one place where the engine is composed: it builds the
shell, run control, memory, symbols, blacklist, probe table, return probes and trap
channel on first use, and hands each piece what it uses; nothing below it sees the VM.
What comes over SSH (symbols, the kernel command line) is loaded before anything holds
the VM stopped, since SSH cannot answer then.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kprobevm.closing import Closing
from kprobevm.errors import (
    LOST_ERRORS,
    DebugInfoError,
    GdbError,
    GuestFaultError,
    KprobeVMError,
    VMError,
    VMLost,
)
from kprobevm.gdbstub.transport import GdbAddress, GdbTransport, format_gdb_address

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.gdbstub.target import Target
    from kprobevm.guest.guestram import GuestRam, PagingRoot, RamReader
    from kprobevm.guest.image import Image
    from kprobevm.guest.monitor import MonitorGdbstub
    from kprobevm.guest.shell import GuestShell, RunResult
    from kprobevm.kernel.blacklist import Blacklist
    from kprobevm.kernel.btf import Btf
    from kprobevm.kernel.inmemory import KernelInMemory
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kernel.kallsyms_tables import KernelImage
    from kprobevm.kernel.modules import ModuleLayout
    from kprobevm.kernel.patchsites import PatchSites
    from kprobevm.kernel.stacktrace import StackTracer
    from kprobevm.kernel.tasks import TaskLayout
    from kprobevm.kernel.vmlinux import Vmlinux
    from kprobevm.kprobes.aggregations import AggregateProbe
    from kprobevm.kprobes.core import Kprobe, KprobeManager
    from kprobevm.kprobes.funclatency import FuncLatency
    from kprobevm.kprobes.journal import Journal
    from kprobevm.kprobes.kretprobes import Kretprobe, KretprobeManager
    from kprobevm.trap.channel import ChannelKind, TrapChannel, TrapHandlers
    from kprobevm.trap.watchdog import Watchdog
    from kprobevm.x86.addrspace import AddressSpace
    from kprobevm.x86.slotmap import Reserve


def _connect_rsp(address: GdbAddress) -> GdbTransport:
    from kprobevm.gdbstub.client import GdbClient

    return GdbClient.connect(address)


class Machine(Protocol):
    """What a launcher hands the VM so that closing the VM stops its QEMU, and a lost
    VM can say how QEMU ended."""

    def shutdown(self, timeout: float = ...) -> None: ...

    @property
    def command(self) -> list[str]: ...

    def alive(self) -> bool: ...

    def wait_exit(self, timeout: float) -> int | None:
        """QEMU's exit status once it has exited (waiting up to ``timeout`` s), else None."""

    def output(self) -> str:
        """The tail of QEMU's own output (stdout and stderr)."""


_LAST_WORDS = re.compile(r"Kernel panic - not syncing: .*|reboot: .*")


def last_words(serial: str) -> str:
    """The console line that says how the guest kernel ended: its panic (a panic's call
    trace pushes it out of a log's last lines), else its last reboot line; '' if none."""
    said: list[str] = _LAST_WORDS.findall(serial)
    panics = [line for line in said if line.startswith("Kernel panic")]
    return (panics or said or [""])[-1].strip()


LOSS_EXIT_WAIT = 3.0
"""Seconds a lost VM waits for its QEMU to exit, for the exit status: QEMU says ``W``
on the gdbstub (and SSH drops) as it begins to exit, not once it has."""


GdbConnect = Callable[[GdbAddress], GdbTransport]
"""Opens a gdbstub client at an address."""


@dataclass(frozen=True)
class GuestEndpoints:
    """How to reach a guest: gdbstub, SSH, QMP and serial log (any may be absent)."""

    gdb: GdbAddress | None = None
    ssh: tuple[str, int] | None = None
    ssh_key: Path | None = None
    ssh_user: str = "root"
    qmp: str | None = None
    serial_log: Path | None = None


class VM(Closing):
    """One guest: run commands, read and write its memory, place kprobes in it."""

    def __init__(
        self,
        endpoints: GuestEndpoints,
        *,
        name: str = "vm",
        machine: Machine | None = None,
        vmlinux: Path | None = None,
        kallsyms: Path | None = None,
        kernel_cmdline: str | None = None,
        shell: GuestShell | None = None,
        image: Image | None = None,
    ) -> None:
        """``machine`` is the QEMU we started (None when attached); ``vmlinux`` and
        ``kallsyms`` are host files of the running kernel (optional: kallsyms is read
        over SSH, else from the kernel's own tables in guest memory; BTF comes from the
        vmlinux, else, with no SSH, from the image in memory); ``kernel_cmdline`` saves
        reading /proc/cmdline over SSH; ``shell`` is an SSH connection already made;
        ``image`` the guest image whose kernel runs (None: another kernel, or attached)."""
        self.endpoints = endpoints
        self.image = image
        self._connect_gdbstub: GdbConnect = _connect_rsp
        self._channel_kind: ChannelKind = "watchpoint"
        self.name = name
        self.machine = machine
        self.vmlinux_path = vmlinux
        self.kallsyms_path = kallsyms
        self.kernel_cmdline = kernel_cmdline
        self.log = logging.getLogger(f"kprobevm.vm.{name}")
        self._lock = threading.RLock()
        self._shell = shell
        self._target: Target | None = None
        self._watchdog: Watchdog | None = None
        self._kprobes: KprobeManager | None = None
        self._kretprobes: KretprobeManager | None = None
        self._journal: Journal | None = None
        self.journal_path: Path | None = None
        self._closed = False
        self._lost: VMLost | None = None
        self._loss_lock = threading.Lock()

    def use_gdbstub_client(self, connect: GdbConnect) -> None:
        """Reach the gdbstub through ``connect`` (for example a real gdb over gdb/MI, to
        compare with): only before the gdbstub is first used."""
        with self._lock:
            if self._target is not None:
                raise VMError(f"{self.name}: the gdbstub is already connected")
            self._connect_gdbstub = connect

    def use_trap_channel(self, kind: ChannelKind) -> None:
        """The trap channel to install next: ``watchpoint`` (fast, falls back by itself
        when the guest cannot take it) or ``breakpoint`` (the #BP-vector breakpoint)."""
        with self._lock:
            if self._kprobes is not None and self._kprobes.installed_channel is not None:
                raise VMError(f"{self.name}: a trap channel is installed; close it first")
            self._channel_kind = kind

    # -- shell -------------------------------------------------------------------------

    @property
    def shell(self) -> GuestShell:
        """The SSH shell into the guest (connected on first use)."""
        with self._lock:
            if self._shell is None:
                from kprobevm.guest.shell import GuestShell

                if self.endpoints.ssh is None:
                    from kprobevm.errors import VMError

                    raise VMError(f"{self.name}: no SSH address for this guest")
                self._shell = GuestShell(
                    self.endpoints.ssh,
                    user=self.endpoints.ssh_user,
                    key=self.endpoints.ssh_key,
                )
            return self._shell

    def run(
        self, command: str, *, timeout: float = 60.0, check: bool = False
    ) -> RunResult:
        """Run a shell command in the guest; like ``subprocess.run`` with text output.
        Raises :class:`VMLost` (with QEMU's exit status) when the guest goes meanwhile."""
        with self._ssh_loss():
            return self.shell.run(command, timeout=timeout, check=check)

    def read_file(self, path: str) -> str:
        """Read a guest file (for example ``/proc/kallsyms``) as text."""
        with self._ssh_loss():
            return self.shell.read_file(path)

    @contextlib.contextmanager
    def _ssh_loss(self) -> Iterator[None]:
        """SSH that went away carries what is known of QEMU; when QEMU has exited (a
        guest reboot or panic), the whole VM is lost, not only its SSH."""
        try:
            yield
        except VMError as exc:
            if not isinstance(exc, VMLost) and (self.machine is None or self.machine.alive()):
                raise
            raise self._loss(f"SSH: {exc}", only_if_exited=True) from exc

    def serial_log(self) -> str:
        """The guest's serial console output so far ('' when none is recorded)."""
        path = self.endpoints.serial_log
        if path is None or not path.exists():
            return ""
        text: str = path.read_text(errors="replace")
        return text

    # -- the gdbstub ------------------------------------------------------------------

    @property
    def target(self) -> Target:
        """Run control over the gdbstub (connected on first use; the guest keeps running).
        Raises :class:`VMLost` once the guest is gone."""
        with self._lock:
            if not self._closed and (self._lost is not None or (
                    self._target is not None and self._target.client.closed)):
                raise self._loss("the gdbstub connection is gone")
            if self._target is None:
                from kprobevm.gdbstub.target import Target

                if self.endpoints.gdb is None:
                    raise VMError(f"{self.name}: no gdbstub address for this guest")
                from kprobevm.trap.watchdog import Watchdog

                try:
                    client = self._connect_gdbstub(self.endpoints.gdb)
                except (OSError, GdbError) as exc:
                    if self.machine is not None and not self.machine.alive():
                        raise self._loss(f"cannot connect to the gdbstub: {exc}") from exc
                    raise VMError(f"{self.name}: cannot connect to the gdbstub at"
                                  f" {format_gdb_address(self.endpoints.gdb)}: {exc}") from exc
                # QEMU neither resumes the VM nor drops our watchpoints when we vanish:
                # from here on, a death of this process (with the VM held stopped for a
                # registration or a handler, say) gets the gdbstub detached
                self._watchdog = Watchdog(client.fileno())
                # connecting to QEMU's gdbstub stops the VM: let it run on
                client.cont()
                self._target = Target(client, name=self.name, explain_loss=self._loss)
            return self._target

    # -- a guest that went away ----------------------------------------------------------

    @property
    def lost(self) -> VMLost | None:
        """Why the guest is gone (QEMU exited on a reboot or panic, its gdbstub or SSH
        went away), or None while it is there; asks nothing of the guest, so a thread
        waiting for hits can poll it."""
        if self._lost is None and self.machine is not None and not self.machine.alive():
            self._loss("QEMU exited")
        return self._lost

    def _loss(self, why: str, exited: bool = False, *, only_if_exited: bool = False) -> VMLost:
        """The :class:`VMLost` for ``why``, with what is known of QEMU: its exit status
        (waited for briefly), its output and the serial log's tail. The first loss
        noticed is kept (:attr:`lost`; with ``only_if_exited``, only when QEMU is known
        to have exited: SSH alone may go while the guest lives); each call returns a
        fresh error to raise. Takes no VM lock: the trap thread calls it."""
        with self._loss_lock:
            if self._lost is not None:
                return self._lost.again()
            machine = self.machine
            exitcode = machine.wait_exit(LOSS_EXIT_WAIT) if machine is not None else None
            serial = self.serial_log()
            lost = VMLost(
                f"{self.name}: {why}", exitcode=exitcode, qemu_exited=exited,
                guest_said=last_words(serial),
                output=machine.output() if machine is not None else "", serial_log=serial,
            )  # fmt: skip
            if only_if_exited and not lost.qemu_exited:
                return lost
            self._lost = lost
            return lost.again()

    @functools.cached_property
    def memory(self) -> GuestMemory:
        """Raw guest memory: only for code that already holds the VM stopped (reads of
        shared guest RAM need no stop, but the gdbstub answers what the mapping cannot)."""
        from kprobevm.gdbstub.memory import GuestMemory

        return GuestMemory(self.target.client, self.ram_reader)

    @functools.cached_property
    def guest_ram(self) -> GuestRam | None:
        """Guest RAM read on the host: the RAM file of a guest we booted, the QEMU
        process's memory for an attached one (None: everything through the gdbstub)."""
        from kprobevm.guest.guestram import FileRam

        if self.machine is not None:
            ram = getattr(self.machine, "ram", None)
            return FileRam(ram) if ram is not None else None
        return self._attached_ram()

    def _attached_ram(self) -> GuestRam | None:
        """The RAM mapping of the QEMU behind the gdbstub, recognised by bytes the gdbstub
        reads; None (said on stderr, with why) when it is not ours to read."""
        from kprobevm.guest.processram import find_process_ram, gdbstub_peer_pid

        try:
            pid = gdbstub_peer_pid(self.target.client.fileno())
            self._symbols_before_stopping()
            # symbols read from memory come after the RAM: recognise it by kernel text
            image = self.kernel_image if self._symbols_from_memory else None
            with self.target.stopped() as client:
                samples = []
                if image is not None:
                    for paddr in (image.phys, image.phys + 4096):
                        samples.append((paddr, client.read_phys(paddr, 64)))
                for name in () if image is not None else ("linux_banner", "init_task"):
                    paddr = self.translate(self.symbols[name])
                    samples.append((paddr, client.read_phys(paddr, 64)))
                return find_process_ram(pid, samples)
        except (KprobeVMError, OSError) as exc:
            self.log.warning("%s: guest memory reads go through the gdbstub (%s)", self.name,
                             exc)  # fmt: skip
            return None

    @functools.cached_property
    def ram_reader(self) -> RamReader | None:
        """Reads served from :attr:`guest_ram` (None without it)."""
        from kprobevm.guest.guestram import RamReader

        ram = self.guest_ram
        return RamReader(ram, self._paging_root) if ram is not None else None

    def _paging_root(self) -> PagingRoot | None:
        """The kernel's own page table (``init_top_pgt``), found through the gdbstub and
        checked by walking its own address; None (said on stderr) when it cannot be."""
        from kprobevm.guest.guestram import PagingRoot, pa_symbol
        from kprobevm.x86.pagetable import la57_enabled, translate

        ram = self.guest_ram
        try:
            top, phys_base = self.symbols["init_top_pgt"], self.symbols["phys_base"]
            with self.target.stopped() as client:
                la57 = la57_enabled(client.read_registers(wide=False)["cr4"])
                base = int.from_bytes(client.read_memory(phys_base, 8), "little")
            root = PagingRoot(pa_symbol(top, base), la57)
            assert ram is not None
            if translate(ram.read_phys, root.cr3, top, la57=la57).paddr != root.cr3:
                raise GuestFaultError(top, "init_top_pgt does not map itself")
        except (KprobeVMError, KeyError) as exc:
            self.log.warning("%s: kernel memory reads go through the gdbstub: cannot find the "
                             "kernel's page table (%s)", self.name, exc)  # fmt: skip
            return None
        return root

    def _symbols_before_stopping(self) -> None:
        """Load kallsyms now when they come over SSH: a kernel read through shared RAM
        first looks up the kernel's page table by symbol, and SSH cannot answer while the
        VM is held stopped (the lookup would wait out the command's timeout)."""
        if "symbols" not in self.__dict__ and (self.kallsyms_path or self.endpoints.ssh):
            self.symbols  # noqa: B018

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes of guest virtual memory (kernel addresses: any vCPU's view)."""
        self._symbols_before_stopping()
        with self.target.stopped():
            return self.memory.read(address, size)

    def write(self, address: int, data: bytes) -> None:
        """Write guest virtual memory (read-only pages too: the gdbstub writes physically)."""
        self._symbols_before_stopping()
        with self.target.stopped():
            self.memory.write(address, data)

    def read_phys(self, address: int, size: int) -> bytes:
        """``size`` bytes of guest-physical memory (raises :class:`GuestFaultError`
        outside guest RAM)."""
        with self.target.stopped():
            return self.memory.read_phys(address, size)

    def write_phys(self, address: int, data: bytes) -> None:
        """Write guest-physical memory (raises :class:`GuestFaultError` outside RAM)."""
        with self.target.stopped():
            self.memory.write_phys(address, data)

    def translate(self, vaddr: int) -> int:
        """Guest physical address of ``vaddr``, by walking the page tables on the host."""
        from kprobevm.x86.pagetable import la57_enabled, translate

        with self.target.stopped() as client:
            regs = client.read_registers()
            t = translate(client.read_phys, regs["cr3"], vaddr, la57=la57_enabled(regs["cr4"]))
            return t.paddr

    @functools.cached_property
    def address_space(self) -> AddressSpace:
        """Where the guest's user space ends and its kernel half begins: its paging mode,
        read from CR4 (LA57) of the first vCPU (the kernel sets it alike on every one)."""
        from kprobevm.x86.addrspace import AddressSpace

        with self.target.stopped() as client:
            return AddressSpace.from_cr4(client.read_registers()["cr4"])

    # -- the kernel's symbols and image ------------------------------------------------

    @functools.cached_property
    def symbols(self) -> KernelSymbols:
        """Kernel symbols: the given kallsyms file, else the guest's /proc/kallsyms over
        SSH, else the kernel's own kallsyms tables and module list in guest memory."""
        from kprobevm.kernel.kallsyms import KernelSymbols

        if self.kallsyms_path is not None:
            return KernelSymbols.from_file(self.kallsyms_path)
        if self._symbols_from_memory:
            return self._memory_symbols()
        return KernelSymbols.from_text(self.read_file("/proc/kallsyms"))

    @property
    def symbols_source(self) -> str:
        """Where :attr:`symbols` come from: ``file``, ``ssh`` or ``memory``."""
        if self.kallsyms_path is not None:
            return "file"
        return "memory" if self._symbols_from_memory else "ssh"

    @property
    def _symbols_from_memory(self) -> bool:
        return self.kallsyms_path is None and self.endpoints.ssh is None

    def refresh_symbols(self) -> bool:
        """Read the guest's kallsyms again (modules come and go); every engine object
        sees the new table at once. False when symbols come from a fixed file."""
        if self.kallsyms_path is not None:
            return False
        from kprobevm.kernel.kallsyms import KernelSymbols

        if self._symbols_from_memory:
            self.symbols.replace_with(self._memory_symbols())
            return True
        self.symbols.replace_with(KernelSymbols.from_text(self.read_file("/proc/kallsyms")))
        return True

    @functools.cached_property
    def kernel_image(self) -> KernelImage:
        """Where the running kernel image is, from the page tables alone (no symbols)."""
        from kprobevm.kernel.kallsyms_tables import find_kernel_image
        from kprobevm.x86.pagetable import la57_enabled

        with self.target.stopped() as client:
            regs = client.read_registers(wide=False)
            return find_kernel_image(client.read_phys, regs["cr3"],
                                     la57=la57_enabled(regs["cr4"]))  # fmt: skip

    @functools.cached_property
    def kernel_in_memory(self) -> KernelInMemory:
        """The kernel's own kallsyms tables and BTF, decoded from its image in guest
        memory (read once: host RAM access when there is one, else the gdbstub)."""
        from kprobevm.kernel.inmemory import KernelInMemory

        image = self.kernel_image
        ram = self.guest_ram

        def read(vaddr: int, size: int) -> bytes:
            paddr = image.phys + vaddr - image.text  # the image is physically contiguous
            if ram is not None and ram.covers(paddr, size):
                return ram.read_phys(paddr, size)  # read-only tables: no stop needed
            with self.target.stopped() as client:
                return client.read_phys(paddr, size)

        found = None
        if image.rodata is not None:
            start, size = image.rodata
            try:
                found = KernelInMemory.decode(image, read(start, size), start)
            except KprobeVMError as exc:
                self.log.info("%s: kallsyms not in the read-only data (%s); reading the"
                              " whole kernel image", self.name, exc)  # fmt: skip
        if found is None:
            found = KernelInMemory.decode(image, read(image.text, image.size))
        if found.modules_missing is not None:
            self.log.warning("%s: no module symbols: %s", self.name, found.modules_missing)
        return found

    def _memory_symbols(self) -> KernelSymbols:
        """Core symbols from the image, module symbols from the module list read now."""
        from kprobevm.gdbstub.memory import GuestMemory

        kernel = self.kernel_in_memory
        with self.target.stopped() as client:
            # the gdbstub alone: host RAM reads of kernel memory need these very symbols
            return kernel.symbols(GuestMemory(client).read)

    @functools.cached_property
    def kaslr_slide(self) -> int:
        """How far the running kernel's text moved from its link address (0: nokaslr)."""
        from kprobevm.kernel.kaslr import find_kaslr_slide

        elf = self._unslid_vmlinux
        if elf is None:
            return self.symbols["_text"] - 0xFFFFFFFF81000000
        return find_kaslr_slide(self.read, elf)

    @functools.cached_property
    def _unslid_vmlinux(self) -> Vmlinux | None:
        from kprobevm.kernel.vmlinux import Vmlinux

        return Vmlinux(self.vmlinux_path) if self.vmlinux_path is not None else None

    @functools.cached_property
    def vmlinux(self) -> Vmlinux | None:
        """The vmlinux ELF view at the running kernel's addresses (None when not given)."""
        elf = self._unslid_vmlinux
        if elf is None:
            return None
        slide = self.kaslr_slide
        return elf.with_slide(slide) if slide else elf

    @functools.cached_property
    def btf(self) -> Btf | None:
        """The kernel's BTF (the vmlinux ``.BTF`` section; None without a vmlinux or BTF)."""
        from kprobevm.kernel.btf import Btf

        if self.vmlinux is None:
            return self._memory_btf()
        try:
            return Btf.from_vmlinux(self.vmlinux)
        except KprobeVMError as exc:
            self.log.warning("no BTF: %s", exc)
            return None

    def _memory_btf(self) -> Btf | None:
        """The BTF of the kernel image in guest memory when neither vmlinux nor SSH is
        given (None, said, when the image has none; with SSH, as before: none)."""
        if self.endpoints.ssh is not None:
            return None
        try:
            btf = self.kernel_in_memory.btf
        except KprobeVMError as exc:
            self.log.warning("no BTF from guest memory: %s", exc)
            return None
        if btf is None:
            self.log.warning("no BTF: the kernel image holds no .BTF (__start_BTF)")
        return btf

    @functools.cached_property
    def stack_tracer(self) -> StackTracer:
        """Kernel stack traces, unwound on the host with the vmlinux's ORC tables."""
        from kprobevm.kernel.stacktrace import StackTracer

        return StackTracer.for_guest(self.vmlinux, self.symbols, self.read, self.btf)

    @functools.cached_property
    def task_layout(self) -> TaskLayout | None:
        """Where ``current`` and its fields are (from the kernel's BTF; None without it)."""
        from kprobevm.kernel.tasks import TaskLayout

        if self.vmlinux is None:
            btf = self.btf
            try:
                return TaskLayout.from_btf(self.symbols, btf) if btf is not None else None
            except KprobeVMError as exc:
                self.log.warning("no task layout: %s", exc)
                return None
        try:
            return TaskLayout.build(self.symbols, self.vmlinux)
        except KprobeVMError as exc:
            self.log.warning("no task layout: %s", exc)
            return None

    @functools.cached_property
    def kprobe_blacklist(self) -> Blacklist:
        """Where probes are refused (the kernel's kprobe blacklist and ours). Parts it
        cannot rebuild (no vmlinux, a kernel without KPROBES or KALLSYMS_ALL) are in its
        ``missing`` and said on stderr: probes there are not refused."""
        from kprobevm.kernel.blacklist import Blacklist

        blacklist = self._memory_blacklist() if self.vmlinux is None else None
        if blacklist is None:
            blacklist = Blacklist.build(self.symbols, self.vmlinux)
        for part in blacklist.missing:
            self.log.warning("kprobe blacklist incomplete: %s", part)
        return blacklist

    def _memory_blacklist(self) -> Blacklist | None:
        """The kernel's own ``kprobe_blacklist`` list read from guest memory; None when
        the kernel has no such list or no BTF (then it is rebuilt from kallsyms)."""
        from kprobevm.kernel.blacklist import Blacklist
        from kprobevm.kernel.kprobe_blacklist_list import kprobe_blacklist_ranges

        head = self.symbols.get("kprobe_blacklist")
        btf = self.btf
        if head is None or btf is None:
            return None
        try:
            with self.target.stopped():
                ranges = kprobe_blacklist_ranges(self.memory.read, head, btf)
        except KprobeVMError as exc:
            self.log.warning("kprobe blacklist not read from guest memory: %s", exc)
            return None
        return Blacklist.from_kernel_list(self.symbols, ranges)

    def blacklist(self) -> str:
        """The blacklist in the debugfs ``kprobes/blacklist`` format."""
        return self.kprobe_blacklist.format_debugfs()

    @functools.cached_property
    def patch_sites(self) -> PatchSites:
        """Text the guest kernel rewrites at run time (jump labels, alternatives, ...)."""
        from kprobevm.kernel.patchsites import PatchSites
        from kprobevm.kernel.patchsites_memory import LiveTables

        if self.vmlinux is not None or self.btf is None:
            return PatchSites.build(self.symbols, self.vmlinux, self.read)
        # no vmlinux: the kernel's own tables, as it keeps them in memory
        live = LiveTables(self.symbols, self.memory.read, self.btf)
        with self.target.stopped():
            sites = PatchSites.build(self.symbols, None, self.read, live=live)
        for part in sites.missing:
            self.log.warning("run-time patched text not fully known: %s", part)
        return sites

    @functools.cached_property
    def slot_reserve(self) -> Reserve | None:
        """The reserved physical range where slots live: the ``memmap=SIZE$BASE`` of the
        kernel command line (over SSH, else from the kernel's memory), checked against the
        guest's own ``/proc/iomem`` when SSH reaches it (KASLR picks the kernel's physical
        address at boot: it must have kept clear of the range); without one, the pages of
        the first MiB the kernel keeps reserved (:meth:`_first_mib_reserve`). None when
        neither can be had: :attr:`slot_memory_missing` says why."""
        from kprobevm.x86.slotmap import check_reserve, parse_memmap_reserve

        cmdline = self.kernel_cmdline
        if cmdline is None:
            cmdline = self.read_file("/proc/cmdline") if self.endpoints.ssh else \
                self._saved_command_line()
        reserve = parse_memmap_reserve(cmdline)
        if reserve is not None and self.endpoints.ssh is not None:
            check_reserve(self.read_file("/proc/iomem"), reserve)
        elif reserve is not None:
            refused = self._reserve_refused(reserve)
            if refused is not None:
                self.log.warning("%s: %s; looking in the first MiB", self.name, refused)
                return self._first_mib_reserve(refused)
        if reserve is not None:
            self.slot_memory = f"the memmap= reserve {reserve.base:#x}+{reserve.size:#x}"
            return reserve
        return self._first_mib_reserve("no memmap= reserve on the kernel command line")

    def _reserve_refused(self, reserve: Reserve) -> str | None:
        """With no SSH: why ``reserve`` cannot be used, by the kernel's e820 tables (None:
        it can; also when they cannot be read, said on stderr)."""
        from kprobevm.errors import NoSlotMemory
        from kprobevm.x86.lowmem import check_reserve_e820, e820_ram

        self._symbols_before_stopping()
        btf = self.btf
        try:
            with self.target.stopped():
                read, symbols = self.memory.read, self.symbols
                check_reserve_e820(e820_ram(read, symbols, btf),
                                   e820_ram(read, symbols, btf, "e820_table_firmware"),
                                   reserve)  # fmt: skip
        except LOST_ERRORS:
            raise
        except NoSlotMemory as exc:
            return str(exc)
        except (KprobeVMError, KeyError) as exc:
            self.log.warning("%s: the memmap= reserve is used unchecked: the kernel's e820"
                             " table could not be read (%s)", self.name, exc)  # fmt: skip
        return None

    def _saved_command_line(self) -> str:
        """The kernel's command line from its memory (``saved_command_line``), for a guest
        with no SSH; '' when it cannot be read (said on stderr)."""
        try:
            self._symbols_before_stopping()
            with self.target.stopped():
                where = self.memory.u64(self.symbols["saved_command_line"])
                return self.memory.cstring(where).decode(errors="replace")
        except LOST_ERRORS:
            raise
        except (KprobeVMError, KeyError) as exc:
            self.log.warning("%s: the kernel command line could not be read: %s", self.name, exc)
            return ""

    monitor_gdbstub: MonitorGdbstub | None = None
    """The gdbstub found or started through QMP (``attach(qmp=...)``), else None."""

    slot_memory: str | None = None
    """Where the slots live, said in words (None until the probe table is built, or
    when there is no slot memory: then :attr:`slot_memory_missing` says why)."""
    slot_memory_missing: str | None = None

    def _first_mib_reserve(self, why: str) -> Reserve | None:
        """With no usable ``memmap=`` (``why``): the pages of the first MiB the guest
        kernel keeps reserved and unused (:mod:`kprobevm.x86.lowmem`); None, with the
        reason kept, when none can be proven so."""
        from kprobevm.errors import NoSlotMemory
        from kprobevm.tracing.kernel_rules import parse_version
        from kprobevm.trap.watchpoint import CHANNEL_PAGES
        from kprobevm.x86.lowmem import find_low_memory

        self._symbols_before_stopping()
        symbols, btf, la57 = self.symbols, self.btf, self.address_space.la57
        try:
            with self.target.stopped():
                banner = self.memory.read(symbols["linux_banner"], 256)
                version = parse_version(banner.split(b"\0", 1)[0].decode(errors="replace"))
                low = find_low_memory(self.memory.read, symbols, btf, version=version,
                                      la57=la57, min_pages=CHANNEL_PAGES)  # fmt: skip
        except LOST_ERRORS:
            raise
        except (KprobeVMError, KeyError) as exc:
            reason = f"kallsyms has no {exc}" if isinstance(exc, KeyError) else str(exc)
            if not isinstance(exc, (NoSlotMemory, KeyError)):
                reason = f"the guest kernel could not be read: {exc}"
            self.slot_memory_missing = f"{why}, and {reason}"
            return None
        self.slot_memory = low.describe()
        self.log.info("%s: slot memory: %s", self.name, self.slot_memory)
        return low.reserve

    @property
    def journal(self) -> Journal:
        """The write journal of this session (a file on the host)."""
        with self._lock:
            if self._journal is None:
                from kprobevm.kprobes.journal import Journal

                if self.journal_path is None:
                    directory = Path(os.environ.get("KPROBEVM_JOURNAL_DIR", tempfile.gettempdir()))
                    directory.mkdir(parents=True, exist_ok=True)
                    self.journal_path = directory / f"kprobevm-{self.name}-{os.getpid()}.journal"
                gdb = self.endpoints.gdb
                self._journal = Journal(
                    self.journal_path,
                    gdb=format_gdb_address(gdb) if gdb is not None else "",
                )
            return self._journal

    # -- kprobes -------------------------------------------------------------------------

    @property
    def kprobes(self) -> KprobeManager:
        """The probe table (built on first use, with what it checks against)."""
        with self._lock:
            if self._kprobes is None:
                from kprobevm.kprobes.core import KprobeManager
                from kprobevm.x86.arch import has_ibt

                # over SSH, now: nothing below may wait on SSH while the VM is held stopped
                reserve = self.slot_reserve

                def channel_installer(handlers: TrapHandlers) -> TrapChannel:
                    return self._install_channel(handlers, reserve)

                self._kprobes = KprobeManager(
                    symbols=self.symbols, blacklist=self.kprobe_blacklist,
                    patch_sites=self.patch_sites, target=self.target, memory=self.memory,
                    channel_installer=channel_installer, refresh_symbols=self.refresh_symbols,
                    module_layout=self._module_layout, ibt=has_ibt(self.symbols),
                    stack_tracer=lambda: self.stack_tracer,
                )  # fmt: skip
                _restore_at_exit(self)
            return self._kprobes

    @property
    def kretprobes(self) -> KretprobeManager:
        """Return probes, placed through the probe table."""
        with self._lock:
            if self._kretprobes is None:
                from kprobevm.kprobes.kretprobes import KretprobeManager

                self._kretprobes = KretprobeManager(
                    self.kprobes, symbols=self.symbols, target=self.target,
                    memory=self.memory, task_layout=self._task_layout,
                )  # fmt: skip
            return self._kretprobes

    def _task_layout(self) -> TaskLayout | None:
        return self.task_layout

    def _module_layout(self) -> ModuleLayout | None:
        return self.module_layout

    @functools.cached_property
    def module_layout(self) -> ModuleLayout | None:
        """Where ``struct module`` keeps its name (from the vmlinux BTF; None without)."""
        from kprobevm.kernel.modules import ModuleLayout

        try:
            if self.vmlinux is None:
                btf = self.btf
                return ModuleLayout.from_btf(btf) if btf is not None else None
            return ModuleLayout.build(self.vmlinux)
        except KprobeVMError as exc:
            self.log.warning("no module layout: %s", exc)
            return None

    def _install_channel(self, handlers: TrapHandlers, reserve: Reserve | None) -> TrapChannel:
        """The trap channel this VM was told to use, for ``handlers``."""
        from kprobevm.trap.channel import ChannelContext
        from kprobevm.trap.install import install_channel

        ctx = ChannelContext(self.target, self.memory, self.journal, self.symbols, handlers)
        return install_channel(
            self._channel_kind, ctx, reserve=reserve, returns=self.kretprobes,
            task_layout=self._task_layout, reserve_missing=self.slot_memory_missing,
        )  # fmt: skip

    def register_kretprobe(self, rp: Kretprobe) -> None:
        """Probe a function's returns: ``rp.handler(ri, regs)`` runs at each, with the
        return value in ``regs.ax``; ``rp.entry_handler`` at each call.

        Raises :class:`ProbeRefused` (with the kernel's errno name) when the place cannot
        take a return probe (not a function's entry, blacklisted, ...), and
        :class:`KprobeError` when ``rp`` is registered already or the trap channel has no
        slot memory for the trampoline.
        """
        self.kretprobes.register_kretprobe(rp)

    def unregister_kretprobe(self, rp: Kretprobe) -> None:
        """Stop probing new calls; calls in flight still return through the trampoline.
        Raises :class:`KprobeError` when ``rp`` is not registered."""
        self.kretprobes.unregister_kretprobe(rp)

    def register_kprobe(self, kp: Kprobe) -> None:
        """Place ``kp``: its int3 goes into the guest (unless all probes are disarmed) and
        its handlers run on the host at every hit; ``kp.addr`` becomes the probed address.

        Raises :class:`ProbeRefused` with the kernel's errno name when the kernel would
        refuse the place (``BAD_PROBE_ADDR`` unknown symbol or not text, ``EINVAL``
        blacklisted, ``EBUSY`` text the kernel rewrites, ``BAD_INSN_BNDRY`` mid-instruction,
        ``EILSEQ`` an instruction that cannot be probed), :class:`KprobeError` when ``kp``
        is registered already, and :class:`ProbeTextChanged` when the guest's bytes are not
        what was decoded. The guest is unchanged when it raises.
        """
        self.kprobes.register_kprobe(kp)

    def unregister_kprobe(self, kp: Kprobe) -> None:
        """Remove ``kp``; the int3 goes when the last probe at its address goes. Recorded
        hits so far reach its handler first. Raises :class:`KprobeError` when ``kp`` is
        not registered, :class:`ProbeTextChanged` when the guest changed the int3."""
        self.kprobes.unregister_kprobe(kp)

    def register_kprobes(self, kps: list[Kprobe]) -> None:
        """Register a batch with the guest stopped once; all or nothing: when one fails,
        those before it are unregistered and its error (as :meth:`register_kprobe`'s)
        is raised."""
        self.kprobes.register_kprobes(kps)

    def unregister_kprobes(self, kps: list[Kprobe]) -> None:
        """Unregister a batch with the guest stopped once (errors as
        :meth:`unregister_kprobe`'s)."""
        self.kprobes.unregister_kprobes(kps)

    def enable_kprobe(self, kp: Kprobe) -> None:
        """Arm a disabled probe's int3 again (unless all are disarmed)."""
        self.kprobes.enable_kprobe(kp)

    def disable_kprobe(self, kp: Kprobe) -> None:
        """Stop running ``kp``'s handlers; the int3 goes once no probe at its address is
        enabled. It stays registered."""
        self.kprobes.disable_kprobe(kp)

    def arm_all_kprobes(self) -> None:
        """Write every enabled probe's int3 again (debugfs ``kprobes/enabled`` = 1)."""
        self.kprobes.arm_all_kprobes()

    def disarm_all_kprobes(self) -> None:
        """Restore every original byte; probes stay registered (``kprobes/enabled`` = 0)."""
        self.kprobes.disarm_all_kprobes()

    def get_kprobe(self, addr: int) -> Kprobe | None:
        """The first probe registered at ``addr``, or None."""
        return self.kprobes.get_kprobe(addr)

    def flush_records(self) -> None:
        """Run the handlers of every hit recorded in the guest so far (recorded probes)."""
        if self._kprobes is not None:
            self._kprobes.flush_records()

    def settle_records(self, timeout: float = 10.0) -> None:
        """Wait until every unregistered recorded probe's hits in flight are counted:
        its ``nhit + nmissed`` then equals its ``guest_hits``. Raises
        :class:`KprobeError` after ``timeout`` seconds."""
        if self._kprobes is not None:
            self._kprobes.settle_records(timeout)

    def count_by(self, definition: str, by: str, *, depth: int = 16) -> AggregateProbe:
        """Count the hits of ``definition`` (a symbol or a ``p`` line) by ``comm``, ``pid``,
        ``cpu`` or ``stack`` (the kernel stack, at most ``depth`` frames, walked by the
        guest: keys are :class:`~kprobevm.kprobes.aggregations.StackKey`) in the guest, no
        stop per hit; ``.read()`` snapshots the map, ``close()`` removes the probe
        (:mod:`kprobevm.tracing.maps`)."""
        from kprobevm.tracing.maps import BY_KEYS, place_map

        key = next((k for k in BY_KEYS if k == by), None)
        if key is None:
            raise ValueError(f"count by {by!r}: one of {', '.join(BY_KEYS)}")
        return place_map(self, definition, by=key, depth=depth)

    def hist(
        self, definition: str, field: str, *, linear: tuple[int, int, int] | None = None
    ) -> AggregateProbe:
        """A log2 histogram (``linear``: (min, max, step) buckets) of the argument ``field``
        of ``definition``, kept in the guest; ``.read()`` snapshots it."""
        from kprobevm.tracing.maps import place_map

        return place_map(self, definition, field=field, linear=linear)

    def funclatency(
        self, function: str | int, *, unit: str = "ns", maxactive: int = 0
    ) -> FuncLatency:
        """The latencies of ``function``'s calls in ``unit`` (ns, us, ms), a log2 histogram
        kept in the guest; ``.read()`` snapshots it, ``.missed()`` counts calls not timed,
        ``close()`` removes the probe (:mod:`kprobevm.kprobes.funclatency`)."""
        from kprobevm.kprobes.funclatency import FuncLatency

        return FuncLatency(self, function, unit=unit, maxactive=maxactive)

    @property
    def can_record(self) -> bool:
        """Whether recorded probes can be placed (the trap channel records; installs it)."""
        return self.kprobes.install_channel().records

    def original_text(self, address: int, size: int) -> bytes:
        """``size`` bytes of kernel text as the kernel has them: our int3s read as the
        bytes they replaced."""
        return self.kprobes.original_text(address, size)

    def drgn(self, vmlinux: Path | str | None = None) -> Any:
        """A live ``drgn.Program`` for the guest kernel: memory and kallsyms through
        kprobevm, types from ``vmlinux`` when it has DWARF (the optional extra
        ``kprobevm[drgn]``; :mod:`kprobevm.kernel.drgn_program`). Made once per
        ``vmlinux``; make it before probing, and a handler can use it at a hit. Raises
        :class:`~kprobevm.errors.DrgnError` saying what is missing and how to get it."""
        from kprobevm.kernel.drgn_program import drgn_program

        self._symbols_before_stopping()
        key = str(vmlinux) if vmlinux is not None else None
        if key not in self._drgn_programs:
            self._drgn_programs[key] = drgn_program(self.read_phys, self.read, self.symbols,
                                                    vmlinux)  # fmt: skip
        return self._drgn_programs[key]

    @functools.cached_property
    def _drgn_programs(self) -> dict[str | None, Any]:
        return {}

    def debug_vmlinux(self) -> Path:
        """The vmlinux with DWARF of the guest's kernel, for ``drgn(vmlinux=...)``: its
        Debian ``-dbg`` package's, named from the image's recorded kernel package and
        fetched into the cache on first use (:mod:`kprobevm.guest.debuginfo`). Raises
        :class:`~kprobevm.errors.DebugInfoError` when the kernel running is not an image's."""
        from kprobevm.guest.debuginfo import debug_vmlinux

        if self.image is None:
            raise DebugInfoError(
                f"{self.name} runs no image's kernel (attached, or booted with another"
                " kernel): give its vmlinux with DWARF to drgn(vmlinux=...)",
                package="unknown", step="name",
            )
        return debug_vmlinux(self.image)

    def list_kprobes(self) -> str:
        """Registered probes in the debugfs ``kprobes/list`` format, as the kernel prints
        it (:mod:`kprobevm.kprobes.listing`)."""
        from kprobevm.kprobes.listing import kprobes_list

        with self._lock:
            returns = self._kretprobes.entry_probes if self._kretprobes is not None else ()
        return kprobes_list(self.kprobes, returns)

    @property
    def trap_channel(self) -> str:
        """Which trap channel is in use: ``watchpoint`` (fast), ``breakpoint``, or ``none``."""
        manager = self._kprobes
        channel = manager.installed_channel if manager is not None else None
        return channel.name if channel is not None else "none"

    @property
    def trap_fallback(self) -> str | None:
        """Why the fast (watchpoint) channel is not the one in use: the error that made
        it fall back to the breakpoint channel (None otherwise)."""
        manager = self._kprobes
        channel = manager.installed_channel if manager is not None else None
        return channel.fallback_reason if channel is not None else None

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Leave the guest as found, then stop its QEMU when we started it.

        The lock only marks the VM closed: restoring the guest waits on the trap thread,
        which may itself need a property of this VM (and so the lock) to finish its hit.
        A guest that is gone (QEMU exited on a reboot or panic) has nothing to restore:
        close() then only lets go, in seconds, and raises nothing, unless the guest may
        still hold our probes (an attached QEMU whose gdbstub went away): then it raises
        :class:`VMLost` naming the journal to give to ``kprobevm recover``.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        restored = False
        try:
            with _exit_on_next_signal():
                self._restore_guest()
            restored = True
        finally:
            try:
                if self._shell is not None:
                    self._shell.close()
            finally:
                if self.machine is not None:
                    self.machine.shutdown()
                elif self.monitor_gdbstub is not None and restored and self._lost is None:
                    # one we started through QMP; kept for `kprobevm recover` otherwise
                    self.monitor_gdbstub.close()

    def _restore_guest(self) -> None:
        """Unregister every probe, take the trap channel out, close the journal."""
        clean = False
        lost: VMLost | None = None
        try:
            if self._kprobes is not None:
                self._kprobes.close()
            clean = True
        except VMLost as exc:
            lost = exc
            assert self._kprobes is not None
            self._kprobes.abandon()
        finally:
            try:
                if self._target is not None:
                    self._close_target()
            except VMLost as exc:  # noticed only as the trap thread let go
                lost = lost or exc
            finally:
                if self._journal is not None:
                    self._settle_journal(clean, lost)
        if lost is not None and not clean and not self._guest_ends(lost):
            raise VMLost(
                f"{self.name}: the gdbstub went away and QEMU may still run with"
                f" kprobevm's probes in the guest: run 'kprobevm recover"
                f" {self.journal_path}' once it can be reached",
            ) from lost

    def _guest_ends(self, lost: VMLost) -> bool:
        """Whether nothing of ours can outlive the lost guest: QEMU has exited, or it is
        ours and close() is about to stop it."""
        return lost.qemu_exited or self.machine is not None

    def _settle_journal(self, clean: bool, lost: VMLost | None) -> None:
        """Close the journal: settled when every write was undone, or when the guest
        that held them is gone with them (``kprobevm recover`` then finds nothing to do
        and says why); left for recovery otherwise."""
        assert self._journal is not None
        if clean or lost is None or not self._guest_ends(lost):
            self._journal.close(clean=clean)
            return
        self.log.info("%s: the guest is gone; nothing to restore", self.name)
        self._journal.close(clean=True, lost=lost.reason)

    def _close_target(self) -> None:
        """End the trap thread and the connection; the watchdog leaves quietly, or, when
        the VM could not be let go cleanly, detaches the gdbstub as at our death."""
        assert self._target is not None
        let_go = False
        try:
            self._target.close()
            let_go = True
        finally:
            self._target.client.close()
            if self._watchdog is not None:
                self._watchdog.stop(detach=not let_go)

    def __repr__(self) -> str:
        return f"<VM {self.name} gdb={self.endpoints.gdb!r} ssh={self.endpoints.ssh!r}>"


_live: weakref.WeakSet[VM] = weakref.WeakSet()


def _restore_at_exit(vm: VM) -> None:
    """Guests with probes are restored at interpreter exit and on SIGTERM, not only on
    close(): an int3 of ours must not outlive a host that simply ended."""
    if not _live:
        atexit.register(_close_all)
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        ):
            # SystemExit unwinds every ``with`` on the way out, then atexit runs
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _live.add(vm)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """The first SIGTERM unwinds (every ``with`` restores its guest); the next one, or a
    Ctrl-C, ends the process at once."""
    for s in _ASKED_TWICE:
        signal.signal(s, _exit_now)
    raise SystemExit(128 + signum)


_ASKED_TWICE = (signal.SIGTERM, signal.SIGINT)


def _exit_now(signum: int, frame: object) -> None:
    """Asked again while restoring: exit without waiting. Each journal stays for
    ``kprobevm recover``, and the watchdog child detaches the gdbstub, so the guest runs
    on with our probes still in it."""
    journals = " ".join(str(vm.journal_path) for vm in list(_live) if vm.journal_path)
    sys.stderr.write(f"kprobevm: {signal.Signals(signum).name} again: exiting now; the guest"
                     f" keeps kprobevm's probes: run 'kprobevm recover {journals}'\n")
    sys.stderr.flush()
    os._exit(128 + signum)


@contextlib.contextmanager
def _exit_on_next_signal() -> Iterator[None]:
    """While a guest is being restored, SIGTERM or Ctrl-C means exit now (the user asked
    twice: once for the close, once more)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _exit_now) for s in _ASKED_TWICE}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _close_all() -> None:
    for vm in list(_live):
        try:
            vm.close()
        except Exception as exc:  # exiting anyway: say what was left behind
            vm.log.error("could not restore %s at exit: %s (journal %s)",
                         vm.name, exc, vm.journal_path)


def attach(
    gdb: GdbAddress | None = None,
    *,
    qmp: str | Path | None = None,
    ssh: tuple[str, int] | None = None,
    ssh_key: Path | str | None = None,
    ssh_user: str = "root",
    vmlinux: Path | str | None = None,
    kallsyms: Path | str | None = None,
    kernel_cmdline: str | None = None,
    name: str = "attached",
) -> VM:
    """A `VM` for a QEMU that kprobevm did not start; closing it leaves QEMU running.

    The gdbstub alone is enough: with no ``vmlinux``, ``kallsyms`` or ``ssh``, symbols
    (modules' too), BTF, the kprobe blacklist and the run-time patched text are read from
    the kernel's own tables in guest memory. ``kallsyms`` (a file) saves reading
    /proc/kallsyms over SSH; ``kernel_cmdline`` tells where the reserved slot memory is
    when there is no SSH to read /proc/cmdline.
    ``qmp`` (the QMP monitor's unix socket) stands in for ``gdb``: QEMU's gdbstub is
    found through it, or started and, when the VM closes, stopped again
    (:mod:`kprobevm.guest.monitor`).
    """
    monitor = None
    if gdb is None:
        if qmp is None:
            raise VMError("attach: give the gdbstub's address or the QMP monitor's socket")
        from kprobevm.guest.monitor import open_gdbstub

        monitor = open_gdbstub(str(qmp))
        gdb = monitor.address
    vm = VM(
        GuestEndpoints(
            gdb=gdb,
            ssh=ssh,
            ssh_key=Path(ssh_key) if ssh_key is not None else None,
            ssh_user=ssh_user,
            qmp=str(qmp) if qmp is not None else None,
        ),
        name=name,
        vmlinux=Path(vmlinux) if vmlinux is not None else None,
        kallsyms=Path(kallsyms) if kallsyms is not None else None,
        kernel_cmdline=kernel_cmdline,
    )
    vm.monitor_gdbstub = monitor
    return vm
