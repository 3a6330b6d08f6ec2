"""The kernel's ORC unwind tables (``.orc_unwind_ip``, ``.orc_unwind``), read on the host.

objtool writes, for every text address where the stack layout changes, an entry
(``struct orc_entry``, ``arch/x86/include/asm/orc_types.h``) saying how to find the
caller's stack pointer (the CFA) and frame pointer from the current ones, and whether a
``pt_regs`` or an iret frame sits there. ``.orc_unwind_ip`` holds each entry's address as
an ``int`` relative to the slot itself, so a KASLR slide moves every address with the
section; the build sorts both tables (``scripts/sorttable``). ``.orc_lookup`` is filled
by the guest at boot (``unwind_init``, NOBITS in the vmlinux): it only narrows the
binary search that :meth:`OrcTable.find` does over the whole table, with the same result.

The entry's bit layout changed in Linux 6.4 (``type`` grew to 3 bits, with undefined and
end-of-stack types and a ``signal`` bit); :func:`orc_format` decides it from the guest
kernel's version.
"""

from __future__ import annotations

import bisect
import re
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.errors import VmlinuxError
from kprobevm.kernel.vmlinux import Vmlinux
from kprobevm.x86.constants import MASK64

if TYPE_CHECKING:
    from kprobevm.kernel.btf import Btf

__all__ = [
    "ORC_REG_BP",
    "ORC_REG_BP_INDIRECT",
    "ORC_REG_DI",
    "ORC_REG_DX",
    "ORC_REG_PREV_SP",
    "ORC_REG_R10",
    "ORC_REG_R13",
    "ORC_REG_SP",
    "ORC_REG_SP_INDIRECT",
    "ORC_REG_UNDEFINED",
    "ModuleOrcLayout",
    "OrcEntry",
    "OrcFormat",
    "OrcTable",
    "OrcType",
    "banner_version",
    "orc_format",
]

ORC_REG_UNDEFINED = 0
ORC_REG_PREV_SP = 1
ORC_REG_DX = 2
ORC_REG_DI = 3
ORC_REG_BP = 4
ORC_REG_SP = 5
ORC_REG_R10 = 6
ORC_REG_R13 = 7
ORC_REG_BP_INDIRECT = 8
ORC_REG_SP_INDIRECT = 9

_ENTRY = struct.Struct("<hhH")
_MAX_MODULE_ORCS = 1 << 20
_VERSION_RE = re.compile(r"Linux version (\d+)\.(\d+)(?:\.(\d+))?")


class OrcType:
    """The frame kinds an entry describes, in one numbering for both layouts."""

    UNDEFINED = "undefined"
    """No unwind information: the walk cannot go on (an error)."""
    END_OF_STACK = "end"
    """The outermost frame of a kernel thread or of the entry code: the walk ends."""
    CALL = "call"
    """A function's frame: the return address is the word below the CFA."""
    REGS = "regs"
    """A full ``pt_regs`` at the CFA (entry code, an exception, an interrupt)."""
    REGS_PARTIAL = "regs_partial"
    """Only the hardware iret frame (ip, cs, flags, sp, ss) at the CFA."""


@dataclass(frozen=True)
class OrcFormat:
    """How one kernel packs ``struct orc_entry``'s bit fields (the third 16-bit word)."""

    name: str
    signal_bit: bool
    """Linux 6.4 on: ``type:3`` then ``signal:1``; before: ``type:2`` then ``end:1``."""
    indirect_offset_after: bool = True
    """``ORC_REG_SP_INDIRECT`` is ``[sp] + offset`` (Linux 5.12 on, for the IRQ stack
    switch); before, ``[sp + offset]``."""

    def decode(self, sp_offset: int, bp_offset: int, bits: int) -> OrcEntry:
        """One entry from its three words."""
        sp_reg, bp_reg = bits & 0xF, (bits >> 4) & 0xF
        if self.signal_bit:
            kind = (OrcType.UNDEFINED, OrcType.END_OF_STACK, OrcType.CALL, OrcType.REGS,
                    OrcType.REGS_PARTIAL)  # fmt: skip
            raw = (bits >> 8) & 0x7
            typ = kind[raw] if raw < len(kind) else f"unknown type {raw}"
            signal = bool(bits >> 11 & 1)
        else:
            raw = (bits >> 8) & 0x3
            typ = (OrcType.CALL, OrcType.REGS, OrcType.REGS_PARTIAL, f"unknown type {raw}")[raw]
            # before 6.4 an undefined SP marks the end (with the end bit) or an error
            if sp_reg == ORC_REG_UNDEFINED:
                typ = OrcType.END_OF_STACK if bits >> 10 & 1 else OrcType.UNDEFINED
            signal = typ in (OrcType.REGS, OrcType.REGS_PARTIAL)
        return OrcEntry(sp_offset, bp_offset, sp_reg, bp_reg, typ, signal)


#: Linux 6.4 ("x86/unwind/orc: Add 'signal' field to ORC metadata", and the
#: UNDEFINED/END_OF_STACK types of the same series) changed the packing.
#: Linux 5.12 ("x86/unwind/orc: Change REG_SP_INDIRECT") moved the indirect offset.
SIGNAL_FORMAT = OrcFormat("6.4+", signal_bit=True)
END_FORMAT = OrcFormat("5.12-6.3", signal_bit=False)
OLD_FORMAT = OrcFormat("before 5.12", signal_bit=False, indirect_offset_after=False)


def banner_version(banner: str) -> tuple[int, int, int]:
    """(major, minor, patch) of ``linux_banner``'s ``Linux version 6.1.0-57-cloud-amd64``."""
    m = _VERSION_RE.search(banner)
    if m is None:
        raise VmlinuxError(f"no kernel version in linux_banner {banner[:80]!r}")
    return int(m[1]), int(m[2]), int(m[3] or 0)


def orc_format(version: tuple[int, int, int]) -> OrcFormat:
    """The entry layout of a kernel of this version (from its ``linux_banner``)."""
    if version[:2] >= (6, 4):
        return SIGNAL_FORMAT
    return END_FORMAT if version[:2] >= (5, 12) else OLD_FORMAT


@dataclass(frozen=True)
class OrcEntry:
    """One decoded ``struct orc_entry``."""

    sp_offset: int
    bp_offset: int
    sp_reg: int
    bp_reg: int
    type: str
    signal: bool
    """The address is exact (an interrupted instruction), not a return address: the
    caller's entry is looked up at it, not one byte before."""


NULL_ORC_ENTRY = OrcEntry(8, 0, ORC_REG_SP, ORC_REG_UNDEFINED, OrcType.CALL, False)
"""The kernel's entry for ip 0 (a call through a NULL pointer): return address at sp."""
FP_ORC_ENTRY = OrcEntry(16, -16, ORC_REG_BP, ORC_REG_PREV_SP, OrcType.CALL, False)
"""The kernel's guess for code with no ORC (generated code): a frame-pointer frame."""


class OrcTable:
    """The vmlinux's ORC entries by text address (slid with the guest's KASLR slide)."""

    def __init__(self, ips: list[int], entries: bytes, fmt: OrcFormat, text: tuple[int, int]):
        self._ips = ips
        self._entries = entries
        self.format = fmt
        self.text = text
        """[start, end) of the addresses the table covers (the vmlinux's ``_stext`` to
        ``_etext`` and init text alike: its first and last entries)."""

    @classmethod
    def from_vmlinux(cls, vmlinux: Vmlinux, fmt: OrcFormat) -> OrcTable:
        """Read both tables out of ``vmlinux`` (its slide applied to every address)."""
        try:
            ip_sec = vmlinux.section(".orc_unwind_ip")
            raw_ips = vmlinux.read_section(".orc_unwind_ip")
            raw_entries = vmlinux.read_section(".orc_unwind")
        except VmlinuxError as exc:
            raise VmlinuxError(f"{vmlinux.path} has no ORC tables: {exc}") from exc
        n = len(raw_ips) // 4
        if not n or len(raw_ips) % 4 or len(raw_entries) != n * _ENTRY.size:
            raise VmlinuxError(
                f"{vmlinux.path}: .orc_unwind_ip ({len(raw_ips)} bytes) and .orc_unwind "
                f"({len(raw_entries)} bytes) do not describe the same entries"
            )
        rel = array("i")
        rel.frombytes(raw_ips)
        base = ip_sec.vaddr
        ips = [(base + 4 * i + r) & MASK64 for i, r in enumerate(rel)]
        if any(ips[i] > ips[i + 1] for i in range(n - 1)):
            raise VmlinuxError(f"{vmlinux.path}: .orc_unwind_ip is not sorted")
        return cls(ips, raw_entries, fmt, (ips[0], ips[-1]))

    def __len__(self) -> int:
        return len(self._ips)

    def entry(self, index: int) -> OrcEntry:
        """The ``index``-th entry."""
        return self.format.decode(*_ENTRY.unpack_from(self._entries, 6 * index))

    def find(self, ip: int) -> OrcEntry | None:
        """The entry in force at ``ip`` (``orc_find``): the last one at or below it.

        None outside the vmlinux's text: the kernel would then look in a module's table
        or an ftrace trampoline's, which this table does not hold.
        """
        if ip == 0:
            return NULL_ORC_ENTRY
        if not self.text[0] <= ip <= self.text[1]:
            return None
        return self.entry(bisect.bisect_right(self._ips, ip) - 1)


@dataclass(frozen=True)
class ModuleOrcLayout:
    """Where ``struct module`` keeps the module's ORC tables (``arch``, a ``struct
    mod_arch_specific``: ``num_orcs``, ``orc_unwind_ip``, ``orc_unwind``), which the
    kernel sorted when it loaded the module (``unwind_module_init``)."""

    num_orcs: int
    orc_unwind_ip: int
    orc_unwind: int

    @classmethod
    def from_btf(cls, btf: Btf) -> ModuleOrcLayout:
        """The offsets from the kernel's BTF."""
        names = ("num_orcs", "orc_unwind_ip", "orc_unwind")
        return cls(*(btf.member("module", f"arch.{name}").offset for name in names))

    def table(
        self, read: Callable[[int, int], bytes], module: int, fmt: OrcFormat
    ) -> OrcTable | None:
        """The tables of the module whose ``struct module`` is at ``module`` (None: it
        has none), read from guest memory."""
        num = int.from_bytes(read(module + self.num_orcs, 4), "little")
        ip_table = int.from_bytes(read(module + self.orc_unwind_ip, 8), "little")
        entries = int.from_bytes(read(module + self.orc_unwind, 8), "little")
        if not num or not ip_table or not entries:
            return None
        if num > _MAX_MODULE_ORCS:
            raise VmlinuxError(f"module at {module:#x} claims {num} ORC entries")
        rel = array("i")
        rel.frombytes(read(ip_table, 4 * num))
        ips = [(ip_table + 4 * i + r) & MASK64 for i, r in enumerate(rel)]
        raw = read(entries, _ENTRY.size * num)
        if any(ips[i] > ips[i + 1] for i in range(num - 1)):
            raise VmlinuxError(f"module at {module:#x}: its ORC table is not sorted")
        return OrcTable(ips, raw, fmt, (ips[0], ips[-1]))
