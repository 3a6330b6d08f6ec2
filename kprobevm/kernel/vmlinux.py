"""Vmlinux: the kernel's ELF image on the host (sections, bytes at a virtual address, symbols).

The ELF extracted from a distro bzImage has section headers but no ``.symtab``; a user's
own debug vmlinux has both. Addresses are the link-time ones, moved by ``slide`` when the
guest runs with KASLR (see :mod:`kprobevm.kernel.kaslr`); the per-CPU section (linked at 0 on
x86-64: its addresses are offsets into each CPU's area) never moves.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from kprobevm.closing import Closing
from kprobevm.errors import VmlinuxError
from kprobevm.kernel.kallsyms import KernelSymbols
from kprobevm.x86.constants import MASK64

__all__ = ["Section", "Vmlinux"]

_KERNEL_HALF = 1 << 63


@dataclass(frozen=True)
class Section:
    """One ELF section as loaded: name, virtual address, size, ``SHF_*`` flags, file offset."""

    name: str
    vaddr: int
    size: int
    flags: int
    type: str
    offset: int

    @property
    def end(self) -> int:
        """First address past the section."""
        return self.vaddr + self.size

    @property
    def is_alloc(self) -> bool:
        """Occupies memory at run time (``SHF_ALLOC``)."""
        return bool(self.flags & SH_FLAGS.SHF_ALLOC)

    @property
    def is_exec(self) -> bool:
        """Holds code (``SHF_EXECINSTR``)."""
        return bool(self.flags & SH_FLAGS.SHF_EXECINSTR)

    @property
    def is_write(self) -> bool:
        """Writable at run time (``SHF_WRITE``)."""
        return bool(self.flags & SH_FLAGS.SHF_WRITE)

    @property
    def has_bytes(self) -> bool:
        """Its bytes are in the file (``PROGBITS``-like, not ``NOBITS`` such as ``.bss``)."""
        return self.type != "SHT_NOBITS"

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and self.vaddr <= addr < self.end


class Vmlinux(Closing):
    """The vmlinux ELF: sections by address, bytes at a virtual address, ``.symtab`` symbols.

    Use as a context manager (or call :meth:`close`): it keeps the file open for reads.
    """

    def __init__(self, path: str | Path, *, slide: int = 0) -> None:
        self.path = Path(path)
        self.slide = slide
        try:
            self._file: BinaryIO = open(self.path, "rb")  # noqa: SIM115 (closed by close())
        except OSError as exc:
            raise VmlinuxError(f"cannot open vmlinux {self.path}: {exc}") from exc
        try:
            self._elf = ELFFile(self._file)
            if self._elf.get_machine_arch() != "x64":
                raise VmlinuxError(
                    f"{self.path} is a {self._elf.get_machine_arch()} ELF, not x86-64"
                )
            self._sections = self._load_sections()
        except ELFError as exc:
            self._file.close()
            raise VmlinuxError(f"{self.path} is not a readable ELF: {exc}") from exc
        except VmlinuxError:
            self._file.close()
            raise
        # Kernel-half allocated sections, by address, for section_for() and read().
        self._mapped = sorted(
            (s for s in self._sections if s.is_alloc and s.vaddr >= _KERNEL_HALF and s.size),
            key=lambda s: s.vaddr,
        )
        self._mapped_starts = [s.vaddr for s in self._mapped]
        self._symbols: KernelSymbols | None = None
        self._symbols_loaded = False

    def _load_sections(self) -> list[Section]:
        out = []
        for sec in self._elf.iter_sections():
            if not sec.name:
                continue
            vaddr = int(sec["sh_addr"])
            if vaddr >= _KERNEL_HALF:
                vaddr = (vaddr + self.slide) & MASK64
            out.append(
                Section(
                    name=sec.name,
                    vaddr=vaddr,
                    size=int(sec["sh_size"]),
                    flags=int(sec["sh_flags"]),
                    type=str(sec["sh_type"]),
                    offset=int(sec["sh_offset"]),
                )
            )
        return out

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the ELF file."""
        self._file.close()

    def with_slide(self, slide: int) -> Vmlinux:
        """The same ELF with kernel addresses moved by ``slide`` (a new, separately closed view)."""
        return Vmlinux(self.path, slide=slide)

    # -- sections ----------------------------------------------------------------------

    def sections(self) -> list[Section]:
        """Every named section, in file order (addresses slid)."""
        return list(self._sections)

    def section(self, name: str) -> Section:
        """The section called ``name``."""
        for sec in self._sections:
            if sec.name == name:
                return sec
        raise VmlinuxError(f"{self.path} has no section {name!r}")

    def has_section(self, name: str) -> bool:
        """Whether a section called ``name`` exists."""
        return any(sec.name == name for sec in self._sections)

    def section_for(self, addr: int) -> Section | None:
        """The allocated kernel section containing virtual address ``addr``, or None."""
        i = bisect.bisect_right(self._mapped_starts, addr) - 1
        if i >= 0 and addr < self._mapped[i].end:
            return self._mapped[i]
        return None

    @property
    def text_range(self) -> tuple[int, int]:
        """``[start, end)`` of ``.text`` (the kernel's ``_stext``.. ``_etext`` region)."""
        text = self.section(".text")
        return text.vaddr, text.end

    @property
    def text_base(self) -> int:
        """Start of ``.text`` (``_text`` on x86-64), slid."""
        return self.section(".text").vaddr

    # -- bytes -------------------------------------------------------------------------

    def read(self, addr: int, n: int) -> bytes:
        """``n`` bytes at virtual address ``addr`` as the ELF file holds them.

        The range may span adjacent sections. It is an error (VmlinuxError) when any byte
        lies outside an allocated section or in a ``NOBITS`` one (``.bss``, ``.brk``): those
        have no bytes in the file, and zeros would not match the running kernel.
        """
        out = bytearray()
        cur, left = addr, n
        while left > 0:
            sec = self.section_for(cur)
            if sec is None:
                raise VmlinuxError(
                    f"{cur:#x} is in no section of {self.path.name} "
                    f"(reading {n} bytes at {addr:#x})"
                )
            if not sec.has_bytes:
                raise VmlinuxError(f"{cur:#x} is in {sec.name} ({sec.type}): no bytes in the file")
            take = min(left, sec.end - cur)
            out += self._read_file(sec.offset + (cur - sec.vaddr), take)
            cur += take
            left -= take
        return bytes(out)

    def read_section(self, name: str) -> bytes:
        """The whole contents of section ``name`` (``.BTF``, ``.data..percpu``, ...)."""
        sec = self.section(name)
        if not sec.has_bytes:
            raise VmlinuxError(f"section {name} is {sec.type}: no bytes in the file")
        return self._read_file(sec.offset, sec.size)

    def _read_file(self, offset: int, n: int) -> bytes:
        self._file.seek(offset)
        data = self._file.read(n)
        if len(data) != n:
            raise VmlinuxError(
                f"{self.path} is truncated: wanted {n} bytes at file offset {offset:#x}, "
                f"got {len(data)}"
            )
        return data

    def read_u64(self, addr: int) -> int:
        """A little-endian u64 at ``addr``."""
        return int.from_bytes(self.read(addr, 8), "little")

    @property
    def build_id(self) -> str | None:
        """The GNU build id (hex) from the ELF's notes, or None when it has none: what
        tells one build of a kernel from another (the kernel's VMCOREINFO says its own)."""
        for sec in self._sections:
            if sec.type == "SHT_NOTE" and sec.has_bytes:
                found = gnu_build_id(self._read_file(sec.offset, sec.size))
                if found is not None:
                    return found
        return None

    # -- symbols -----------------------------------------------------------------------

    @property
    def symbols(self) -> KernelSymbols | None:
        """Symbols from ``.symtab`` (slid), or None: a vmlinux cut from a bzImage has none."""
        if not self._symbols_loaded:
            self._symbols = self._load_symbols()
            self._symbols_loaded = True
        return self._symbols

    def _load_symbols(self) -> KernelSymbols | None:
        symtab = self._elf.get_section_by_name(".symtab")
        if not isinstance(symtab, SymbolTableSection):
            return None
        entries: list[tuple[int, str, str, str | None]] = []
        for sym in symtab.iter_symbols():
            kind = sym["st_info"]["type"]
            if not sym.name or kind in ("STT_SECTION", "STT_FILE"):
                continue
            value = int(sym["st_value"])
            if value >= _KERNEL_HALF:
                value = (value + self.slide) & MASK64
            letter = _nm_letter(self.section_for(value), kind, sym["st_info"]["bind"])
            entries.append((value, letter, sym.name, None))
        if not entries:
            return None
        return KernelSymbols(entries)

    def iter_sections_named(self, prefix: str) -> Iterator[Section]:
        """Sections whose name starts with ``prefix``."""
        return (s for s in self._sections if s.name.startswith(prefix))


_NT_GNU_BUILD_ID = 3


def gnu_build_id(notes: bytes) -> str | None:
    """The ``GNU`` ``NT_GNU_BUILD_ID`` note's descriptor in ``notes`` (ELF notes, 4-byte
    aligned), as hex; None when there is none or the notes are cut short."""
    at = 0
    while at + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, at)
        name_at = at + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        end = desc_at + (descsz + 3) // 4 * 4
        if desc_at + descsz > len(notes):
            return None
        if kind == _NT_GNU_BUILD_ID and notes[name_at : name_at + namesz] == b"GNU\0":
            return notes[desc_at : desc_at + descsz].hex()
        at = end
    return None


def _nm_letter(sec: Section | None, kind: str, bind: str) -> str:
    """The ``nm``/kallsyms type letter of an ELF symbol: t/d/r/b, upper case when global."""
    if kind == "STT_FUNC" or (sec is not None and sec.is_exec):
        letter = "t"
    elif sec is None:
        letter = "a"
    elif not sec.has_bytes:
        letter = "b"
    elif sec.is_write:
        letter = "d"
    else:
        letter = "r"
    if bind == "STB_WEAK":
        return "W" if letter == "t" else "V"
    return letter.upper() if bind == "STB_GLOBAL" else letter
