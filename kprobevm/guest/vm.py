"""The VM facade: one guest as kprobevm sees it, whoever started its QEMU.

A `VM` is made from endpoints (gdbstub socket, SSH address, QMP socket, serial log), so
the same object serves a guest booted by :func:`kprobevm.boot` and one attached to with
:func:`kprobevm.attach`. Subsystems (shell, gdbstub target, memory, symbols, kprobes) are
created lazily on first use.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import signal
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from kprobevm.closing import Closing
from kprobevm.errors import VMError, VMLost

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.gdbstub.target import Target
    from kprobevm.guest.shell import GuestShell, RunResult
    from kprobevm.kernel.blacklist import Blacklist
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kernel.patchsites import PatchSites
    from kprobevm.kernel.tasks import TaskLayout
    from kprobevm.kernel.vmlinux import Vmlinux
    from kprobevm.kprobes.core import Kprobe, KprobeManager
    from kprobevm.kprobes.journal import Journal
    from kprobevm.kprobes.kretprobes import Kretprobe, KretprobeManager
    from kprobevm.x86.slotmap import Reserve


class Machine(Protocol):
    """What a launcher hands the VM so that closing the VM stops its QEMU."""

    def shutdown(self, timeout: float = ...) -> None: ...

    @property
    def command(self) -> list[str]: ...


GdbAddress = str | tuple[str, int]
"""A gdbstub address: a unix socket path, or (host, port) on loopback."""


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
        transport: str = "rsp",
    ) -> None:
        self.endpoints = endpoints
        self.transport = transport
        """The gdbstub client: ``rsp`` (GdbClient) or ``gdbmi`` (a real gdb, for benchmarks)."""
        self.name = name
        self.machine = machine
        self.vmlinux_path = vmlinux
        self.kallsyms_path = kallsyms
        self.kernel_cmdline = kernel_cmdline
        self.log = logging.getLogger(f"kprobevm.guest.vm.{name}")
        self._lock = threading.RLock()
        self._shell: GuestShell | None = None
        self._target: Target | None = None
        self._kprobes: KprobeManager | None = None
        self._kretprobes: KretprobeManager | None = None
        self._journal: Journal | None = None
        self.journal_path: Path | None = None
        self._closed = False
        self.prefer_channel = "watchpoint"
        """The trap channel to install: ``watchpoint`` (fast, falls back by itself when it
        cannot be set up) or ``breakpoint`` (the #BP-vector breakpoint, for comparison)."""

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
        """Run a shell command in the guest; like ``subprocess.run`` with text output."""
        return self.shell.run(command, timeout=timeout, check=check)

    def read_file(self, path: str) -> str:
        """Read a guest file (for example ``/proc/kallsyms``) as text."""
        return self.shell.read_file(path)

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
        """Run control over the gdbstub (connected on first use; the guest keeps running)."""
        with self._lock:
            if self._target is not None and self._target.client.closed and not self._closed:
                raise VMLost(f"{self.name}: the gdbstub connection is gone; {self._qemu_state()}")
            if self._target is None:
                from kprobevm.gdbstub.client import GdbClient
                from kprobevm.gdbstub.target import Target

                if self.endpoints.gdb is None:
                    raise VMError(f"{self.name}: no gdbstub address for this guest")
                if self.transport == "gdbmi":
                    from kprobevm.gdbstub.gdbmi_client import GdbMiClient

                    # the same interface as far as the engine goes (see gdbmi_client.py)
                    client: GdbClient = GdbMiClient.connect(  # type: ignore[assignment]
                        self.endpoints.gdb
                    )
                else:
                    client = GdbClient.connect(self.endpoints.gdb)
                # connecting stopped the VM (FACTS.md): let it run on
                client.cont()
                self._target = Target(client, name=self.name)
            return self._target

    def _qemu_state(self) -> str:
        """What we know of QEMU, for an error: alive, and its output when it died."""
        machine = self.machine
        alive = getattr(machine, "alive", None)
        if machine is None or alive is None:
            return "QEMU was not started by us"
        if alive():
            return "QEMU is still running"
        output = getattr(machine, "output", lambda: "")()
        return "QEMU has exited:\n" + "\n".join(output.splitlines()[-10:])

    @functools.cached_property
    def memory(self) -> GuestMemory:
        """Raw guest memory: only for code that already holds the VM stopped."""
        from kprobevm.gdbstub.memory import GuestMemory

        return GuestMemory(self.target.client)

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes of guest virtual memory (kernel addresses: any vCPU's view)."""
        with self.target.stopped():
            return self.memory.read(address, size)

    def write(self, address: int, data: bytes) -> None:
        """Write guest virtual memory (read-only pages too: the gdbstub writes physically)."""
        with self.target.stopped():
            self.memory.write(address, data)

    def read_phys(self, address: int, size: int) -> bytes:
        with self.target.stopped():
            return self.memory.read_phys(address, size)

    def write_phys(self, address: int, data: bytes) -> None:
        with self.target.stopped():
            self.memory.write_phys(address, data)

    def translate(self, vaddr: int) -> int:
        """Guest physical address of ``vaddr``, by walking the page tables on the host."""
        from kprobevm.x86.pagetable import translate

        with self.target.stopped() as client:
            regs = client.read_registers()
            t = translate(client.read_phys, regs["cr3"], vaddr, la57=bool(regs["cr4"] >> 12 & 1))
            return t.paddr

    # -- the kernel's symbols and image ------------------------------------------------

    @functools.cached_property
    def symbols(self) -> KernelSymbols:
        """Kernel symbols: the given kallsyms file, else the guest's /proc/kallsyms."""
        from kprobevm.kernel.kallsyms import KernelSymbols

        if self.kallsyms_path is not None:
            return KernelSymbols.from_file(self.kallsyms_path)
        return KernelSymbols.from_text(self.read_file("/proc/kallsyms"))

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
    def task_layout(self) -> TaskLayout | None:
        """Where ``current`` and its fields are (from the vmlinux BTF; None without it)."""
        from kprobevm.errors import KprobeVMError
        from kprobevm.kernel.tasks import TaskLayout

        if self.vmlinux is None:
            return None
        try:
            return TaskLayout.build(self.symbols, self.vmlinux)
        except KprobeVMError as exc:
            self.log.warning("no task layout: %s", exc)
            return None

    @functools.cached_property
    def kprobe_blacklist(self) -> Blacklist:
        """Where probes are refused (the kernel's kprobe blacklist and ours)."""
        from kprobevm.kernel.blacklist import Blacklist

        return Blacklist.build(self.symbols, self.vmlinux)

    def blacklist(self) -> str:
        """The blacklist in the debugfs ``kprobes/blacklist`` format."""
        return self.kprobe_blacklist.format_debugfs()

    @functools.cached_property
    def patch_sites(self) -> PatchSites:
        """Text the guest kernel rewrites at run time (jump labels, alternatives, ...)."""
        from kprobevm.kernel.patchsites import PatchSites

        return PatchSites.build(self.symbols, self.vmlinux, self.read)

    @functools.cached_property
    def slot_reserve(self) -> Reserve | None:
        """The reserved physical range (``memmap=SIZE$BASE``) where slots live."""
        from kprobevm.x86.slotmap import parse_memmap_reserve

        cmdline = self.kernel_cmdline
        if cmdline is None:
            cmdline = self.read_file("/proc/cmdline") if self.endpoints.ssh else ""
        return parse_memmap_reserve(cmdline)

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
                    gdb=gdb if isinstance(gdb, str) else f"{gdb[0]}:{gdb[1]}" if gdb else "",
                )
            return self._journal

    # -- kprobes -------------------------------------------------------------------------

    @property
    def kprobes(self) -> KprobeManager:
        with self._lock:
            if self._kprobes is None:
                from kprobevm.kprobes.core import KprobeManager

                self._kprobes = KprobeManager(self)
                _restore_at_exit(self)
            return self._kprobes

    @property
    def kretprobes(self) -> KretprobeManager:
        with self._lock:
            if self._kretprobes is None:
                from kprobevm.kprobes.kretprobes import KretprobeManager

                self._kretprobes = KretprobeManager(self)
            return self._kretprobes

    def register_kretprobe(self, rp: Kretprobe) -> None:
        """Probe a function's returns: ``rp.handler(ri, regs)`` runs with ``regs.ax``."""
        self.kprobes.channel  # noqa: B018 (the trampoline comes with the channel)
        self.kretprobes.register_kretprobe(rp)

    def unregister_kretprobe(self, rp: Kretprobe) -> None:
        self.kretprobes.unregister_kretprobe(rp)

    def register_kprobe(self, kp: Kprobe) -> None:
        """Place a probe; its handlers run on the host at every hit."""
        self.kprobes.register_kprobe(kp)

    def unregister_kprobe(self, kp: Kprobe) -> None:
        self.kprobes.unregister_kprobe(kp)

    def register_kprobes(self, kps: list[Kprobe]) -> None:
        """Register a batch with the guest stopped once; all or nothing."""
        self.kprobes.register_kprobes(kps)

    def unregister_kprobes(self, kps: list[Kprobe]) -> None:
        self.kprobes.unregister_kprobes(kps)

    def enable_kprobe(self, kp: Kprobe) -> None:
        self.kprobes.enable_kprobe(kp)

    def disable_kprobe(self, kp: Kprobe) -> None:
        self.kprobes.disable_kprobe(kp)

    def arm_all_kprobes(self) -> None:
        self.kprobes.arm_all_kprobes()

    def disarm_all_kprobes(self) -> None:
        self.kprobes.disarm_all_kprobes()

    def get_kprobe(self, addr: int) -> Kprobe | None:
        return self.kprobes.get_kprobe(addr)

    def original_text(self, address: int, size: int) -> bytes:
        """``size`` bytes of kernel text as the kernel has them: our int3s read as the
        bytes they replaced."""
        return self.kprobes.original_text(address, size)

    def list_kprobes(self) -> str:
        """Registered probes in the debugfs ``kprobes/list`` format."""
        return self.kprobes.list_kprobes()

    @property
    def trap_channel(self) -> str:
        """Which trap channel is in use: ``watchpoint`` (fast), ``breakpoint``, or ``none``."""
        manager = self._kprobes
        channel = manager._channel if manager is not None else None
        return channel.name if channel is not None else "none"

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Leave the guest as found, then stop its QEMU when we started it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._restore_guest()
            finally:
                try:
                    if self._shell is not None:
                        self._shell.close()
                finally:
                    if self.machine is not None:
                        self.machine.shutdown()

    def _restore_guest(self) -> None:
        """Unregister every probe, take the trap channel out, close the journal."""
        clean = True
        try:
            if self._kprobes is not None:
                self._kprobes.close()
        except BaseException:
            clean = False
            raise
        finally:
            if self._target is not None:
                self._target.close()
                self._target.client.close()
            if self._journal is not None:
                self._journal.close(clean=clean)

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
    raise SystemExit(128 + signum)


def _close_all() -> None:
    for vm in list(_live):
        try:
            vm.close()
        except Exception as exc:  # exiting anyway: say what was left behind
            vm.log.error("could not restore %s at exit: %s (journal %s)",
                         vm.name, exc, vm.journal_path)


def attach(
    gdb: GdbAddress,
    *,
    ssh: tuple[str, int] | None = None,
    ssh_key: Path | str | None = None,
    ssh_user: str = "root",
    vmlinux: Path | str | None = None,
    kallsyms: Path | str | None = None,
    kernel_cmdline: str | None = None,
    name: str = "attached",
) -> VM:
    """A `VM` for a QEMU that kprobevm did not start; closing it leaves QEMU running.

    ``kallsyms`` (a file) saves reading /proc/kallsyms over SSH; ``kernel_cmdline``
    tells where the reserved slot memory is when there is no SSH to read /proc/cmdline.
    """
    return VM(
        GuestEndpoints(
            gdb=gdb,
            ssh=ssh,
            ssh_key=Path(ssh_key) if ssh_key is not None else None,
            ssh_user=ssh_user,
        ),
        name=name,
        vmlinux=Path(vmlinux) if vmlinux is not None else None,
        kallsyms=Path(kallsyms) if kallsyms is not None else None,
        kernel_cmdline=kernel_cmdline,
    )
