"""A ``drgn.Program`` for the live guest kernel, served by kprobevm.

drgn (the optional extra ``kprobevm[drgn]``) is given the guest as a custom Linux kernel
target: the guest's own ``VMCOREINFO`` (the text its kernel keeps at
``vmcoreinfo_data`` for crash dumps: release, page table root, KASLR offset, paging mode),
physical memory read through kprobevm (shared RAM, else the gdbstub), kprobevm's
kallsyms as the symbol table, and, when the user has a vmlinux with DWARF (a self-built
kernel, or a distribution's ``-dbg`` package: :mod:`kprobevm.guest.debuginfo`), its
types and variables, once its build id is found to be the running kernel's. Virtual reads
go through kprobevm as well: kernel memory, and in a handler the current task's user
memory, as the handler's own reads.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kprobevm.errors import DrgnError, GuestFaultError, SymbolNotFound, VmlinuxMismatch
from kprobevm.kernel.vmlinux import Vmlinux

if TYPE_CHECKING:
    from kprobevm.kernel.kallsyms import KernelSymbols

__all__ = [
    "DRGN_HINT",
    "PHYS_LIMIT",
    "VmlinuxCheck",
    "check_vmlinux",
    "current_task",
    "drgn_program",
    "guest_vmcoreinfo",
    "running_build_id",
]

DRGN_HINT = "pip install 'kprobevm[drgn]' (or pip install drgn; x86_64 wheels on PyPI)"
PHYS_LIMIT = 1 << 46
"""Physical addresses drgn may ask for: x86-64's 46 bits (reads outside RAM fault)."""
_VMCOREINFO_MAX = 1 << 16  # the kernel keeps it in one page; anything larger is not it
_BANNER_MAX = 512

log = logging.getLogger(__name__)

ReadFn = Callable[[int, int], bytes]


def guest_vmcoreinfo(read: ReadFn, symbols: KernelSymbols) -> bytes:
    """The guest kernel's ``VMCOREINFO`` text, read from its memory (``vmcoreinfo_data``,
    ``vmcoreinfo_size``: built with ``CRASH_CORE``/``VMCORE_INFO``, as kexec and kdump
    need); raises :class:`~kprobevm.errors.DrgnError` when the kernel has none."""
    try:
        data_at, size_at = symbols["vmcoreinfo_data"], symbols["vmcoreinfo_size"]
    except SymbolNotFound as exc:
        raise DrgnError(
            f"the guest kernel keeps no VMCOREINFO ({exc}): it needs CONFIG_VMCORE_INFO "
            "(CRASH_CORE before 6.9) and KALLSYMS_ALL",
            hint="boot a kernel built with them",
        ) from exc
    data = int.from_bytes(read(data_at, 8), "little")
    size = int.from_bytes(read(size_at, 8), "little")
    if not data or not 0 < size <= _VMCOREINFO_MAX:
        raise DrgnError(f"the guest's VMCOREINFO is not set up (at {data:#x}, {size} bytes)",
                        hint="use the guest once its kernel has finished booting")  # fmt: skip
    text = read(data, size)
    if not text.startswith(b"OSRELEASE="):
        raise DrgnError(
            f"the guest's VMCOREINFO at {data:#x} does not start with OSRELEASE=",
            hint="this kernel's vmcoreinfo layout is not one kprobevm knows",
        )
    return text


def drgn_program(
    read_phys: ReadFn, read: ReadFn, symbols: KernelSymbols, vmlinux: Path | str | None = None
) -> Any:
    """A live ``drgn.Program`` over the guest: ``read_phys`` serves its physical memory,
    ``read`` (virtual) finds the VMCOREINFO, ``symbols`` are its kallsyms, ``vmlinux`` a
    file with DWARF for types (None: symbols and memory only).

    Raises :class:`~kprobevm.errors.DrgnError` when drgn is not installed (naming how to
    get it), when the guest has no VMCOREINFO, or when ``vmlinux`` brings no debug info.
    """
    try:
        import drgn
    except ImportError as exc:
        raise DrgnError(f"drgn is not installed ({exc})", hint=DRGN_HINT) from exc

    prog = drgn.Program(drgn.host_platform)
    vmcoreinfo = guest_vmcoreinfo(read, symbols)
    prog.set_linux_kernel_custom(vmcoreinfo, True)

    def segment(read: ReadFn) -> Callable[[int, int, int, bool], bytes]:
        def read_fn(address: int, count: int, offset: int, physical: bool) -> bytes:
            try:
                return read(address, count)
            except GuestFaultError as exc:
                raise drgn.FaultError(str(exc), address) from exc

        return read_fn

    prog.add_memory_segment(0, PHYS_LIMIT, segment(read_phys), physical=True)
    # Virtual reads are kprobevm's too (drgn would walk swapper_pg_dir itself, a Python
    # call per table entry, and never reach a task's user memory).
    for start in (0, 1 << 63):
        prog.add_memory_segment(start, 1 << 63, segment(read))
    prog.register_symbol_finder("kprobevm", drgn.SymbolIndex(_drgn_symbols(drgn, symbols)),
                                enable_index=0)  # fmt: skip
    if vmlinux is not None:
        check_vmlinux(vmlinux, vmcoreinfo, read, symbols)
        _load_vmlinux(drgn, prog, vmlinux)
    return prog


@dataclass(frozen=True)
class VmlinuxCheck:
    """How a vmlinux was found to be the running kernel's: ``build id`` (VMCOREINFO's
    ``BUILD-ID``) or, for a kernel that does not say its build id, ``banner``."""

    evidence: str
    value: str


def running_build_id(vmcoreinfo: bytes) -> str | None:
    """The running kernel's build id as its VMCOREINFO says it (``BUILD-ID=``, 5.9 on)."""
    found = re.search(rb"^BUILD-ID=([0-9a-f]+)$", vmcoreinfo, re.M)
    return found.group(1).decode() if found else None


def check_vmlinux(vmlinux: Path | str, vmcoreinfo: bytes, read: ReadFn,
                  symbols: KernelSymbols) -> VmlinuxCheck:  # fmt: skip
    """Refuse (:class:`~kprobevm.errors.VmlinuxMismatch`) a vmlinux of another build than
    the running kernel, whose DWARF would give wrong types without any error: the build
    ids must be equal, else, when the kernel does not say its own (said on stderr), its
    ``linux_banner`` must be in the vmlinux's read-only data."""
    with Vmlinux(vmlinux) as elf:
        theirs = elf.build_id
        ours = running_build_id(vmcoreinfo)
        if ours is not None:
            if theirs != ours:
                raise VmlinuxMismatch(
                    "the vmlinux given for drgn is not the running kernel's build",
                    vmlinux=str(vmlinux), theirs=f"build id {theirs}", ours=f"build id {ours}",
                )
            return VmlinuxCheck("build id", ours)
        log.warning("the guest's VMCOREINFO says no BUILD-ID: %s is checked by the kernel's"
                    " linux_banner only", vmlinux)  # fmt: skip
        banner = read(symbols["linux_banner"], _BANNER_MAX).split(b"\0")[0]
        if banner not in elf.read_section(".rodata"):
            raise VmlinuxMismatch(
                "the vmlinux given for drgn is not the running kernel's build",
                vmlinux=str(vmlinux), theirs="another linux_banner",
                ours=f"banner {banner.decode(errors='replace').strip()!r}",
            )
        return VmlinuxCheck("banner", banner.decode(errors="replace").strip())


def current_task(prog: Any, gs_base: int) -> Any:
    """``current`` at a hit as a drgn ``struct task_struct *``: the per-CPU pointer at
    ``gs_base`` (the hit's ``regs.gs_base``, its CPU's per-CPU base) plus the variable's
    offset; ``current_task`` up to 6.1, ``pcpu_hot.current_task`` from 6.2. Needs the
    vmlinux's types."""
    import drgn

    try:
        slot = prog["current_task"]
    except KeyError:
        hot = prog["pcpu_hot"]
        slot = drgn.Object(prog, hot.type_, address=gs_base + hot.address_).current_task
        return slot.read_()
    return drgn.Object(prog, slot.type_, address=gs_base + slot.address_).read_()


def _load_vmlinux(drgn: Any, prog: Any, vmlinux: Path | str) -> None:
    """The guest kernel's types and variables from ``vmlinux``'s DWARF; drgn takes the
    file only when it matches the running kernel and has debug info (it says nothing
    when it skips one, so the main module is asked)."""
    hint = "give the running kernel's vmlinux with DWARF (CONFIG_DEBUG_INFO, or its -dbg package)"
    try:
        prog.load_debug_info([vmlinux])
    except drgn.MissingDebugInfoError as exc:
        raise DrgnError(f"no debug info for the guest kernel in {vmlinux} ({exc})",
                        hint=hint) from exc  # fmt: skip
    try:
        taken = prog.main_module().debug_file_path
    except LookupError:
        taken = None
    if taken is None:
        raise DrgnError(f"drgn took no debug info for the guest kernel from {vmlinux} (no "
                        "DWARF, or another build than the running kernel)", hint=hint)  # fmt: skip


def _drgn_symbols(drgn: Any, symbols: KernelSymbols) -> list[Any]:
    """kprobevm's kallsyms as drgn symbols (text as functions, the rest as objects)."""
    func, obj = drgn.SymbolKind.FUNC, drgn.SymbolKind.OBJECT
    local, glob = drgn.SymbolBinding.LOCAL, drgn.SymbolBinding.GLOBAL
    return [
        drgn.Symbol(
            s.name,
            s.address,
            s.size,
            glob if s.type.isupper() else local,
            func if s.is_text else obj,
        )
        for s in symbols
    ]
