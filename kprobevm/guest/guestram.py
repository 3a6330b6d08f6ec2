"""Guest RAM shared with the host: QEMU's RAM in a file that the host maps too.

A guest kprobevm boots keeps its RAM in a ``memory-backend-file`` with ``share=on`` in a
private directory on ``/dev/shm`` (0700; the file 0600). The host maps the same file,
so it reads guest-physical memory at memory speed with no gdbstub round trip and no VM
stop. Only data goes through the mapping: kernel text and slot code are written through
the gdbstub, because TCG notices a code write only when it comes through QEMU (a store
from another process into the file would leave stale translated code behind).

On the ``pc`` machine, RAM below 4 GiB starts at guest-physical 0 at the start of the
file; when RAM reaches 3.5 GiB, the low part stops at 3 GiB and the rest is at 4 GiB.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kprobevm.errors import GuestFaultError, VMError
from kprobevm.x86.constants import MASK64, PAGE_SIZE
from kprobevm.x86.pagetable import ADDR_MASK, PRESENT, PS

__all__ = [
    "SHM_DIR",
    "START_KERNEL_MAP",
    "FileRam",
    "GuestRam",
    "PagingRoot",
    "RamFile",
    "RamReader",
    "create_ram_file",
    "pa_symbol",
    "parse_memory_size",
    "sweep_stale_ram",
]

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
"""A tmpfs: a RAM file on a disk would make the kernel write guest RAM back to disk."""
_PREFIX = "kprobevm-ram-"
_LOWMEM_SPLIT = 0xE000_0000  # the pc machine splits RAM of this size or more
_LOWMEM_GB_ALIGNED = 0xC000_0000
_HIGH_START = 1 << 32
_SIZE = re.compile(r"^(\d+)([KMGT]?)B?$", re.IGNORECASE)
_U64 = struct.Struct("<Q")
_OFFSET_1G = (1 << 30) - 1
_OFFSET_2M = (1 << 21) - 1
_FRAME_1G = ADDR_MASK & ~_OFFSET_1G
_FRAME_2M = ADDR_MASK & ~_OFFSET_2M


def parse_memory_size(memory: str) -> int:
    """Bytes in a QEMU ``-m`` size (``544M``, ``2G``; a bare number is MiB, as QEMU has it)."""
    m = _SIZE.match(memory.strip())
    if m is None:
        raise ValueError(f"not a memory size: {memory!r}")
    unit = m[2].upper() or "M"
    return int(m[1]) << {"K": 10, "M": 20, "G": 30, "T": 40}[unit]


@dataclass(frozen=True)
class RamFile:
    """The file behind a guest's RAM, and what QEMU is told about it."""

    path: Path
    size: int

    def qemu_args(self) -> list[str]:
        """The ``-machine``/``-object`` arguments that put guest RAM in this file."""
        return [
            "-object",
            f"memory-backend-file,id=kprobevm-ram,size={self.size},mem-path={self.path},share=on",
            "-machine", "memory-backend=kprobevm-ram",
        ]  # fmt: skip

    def remove(self) -> None:
        """Remove the file and its directory (QEMU keeps its mapping while it runs)."""
        shutil.rmtree(self.path.parent, ignore_errors=True)


def create_ram_file(name: str, size: int, *, base: Path = SHM_DIR) -> RamFile:
    """A 0600 file of ``size`` bytes in a new 0700 directory under ``base``, with this
    process as its owner; ``OSError`` when ``base`` cannot hold it."""
    free = shutil.disk_usage(base).free
    if free < size:
        raise OSError(f"{base} has {free >> 20} MiB free, the guest needs {size >> 20} MiB")
    directory = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{name}-", dir=base))  # 0700
    try:
        (directory / "owner").write_text(f"{os.getpid()}\n")
        path = directory / "ram"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return RamFile(path, size)


def sweep_stale_ram(base: Path = SHM_DIR) -> list[Path]:
    """Remove RAM files whose owner process is gone (killed before it could); the
    directories removed."""
    removed = []
    for directory in base.glob(f"{_PREFIX}*"):
        try:
            os.kill(int((directory / "owner").read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
        except (OSError, ValueError):
            continue
    return removed


class GuestRam:
    """Guest-physical RAM seen from the host: the ``pc`` machine's layout over a byte
    store (a mapping of the RAM file, or the memory of the QEMU process). Reads of data,
    and data writes the guest reads back, such as a ring's tail."""

    def __init__(self, size: int, where: str) -> None:
        self.size = size
        self.where = where
        """The file or process the RAM is read from, for messages."""
        low = size if size < _LOWMEM_SPLIT else _LOWMEM_GB_ALIGNED
        self._low = low
        # (guest-physical start, end, offset in the store)
        self.ranges = [(0, low, 0)]
        if size > low:
            self.ranges.append((_HIGH_START, _HIGH_START + size - low, low))

    def _get(self, at: int, n: int) -> bytes:
        raise NotImplementedError

    def _put(self, at: int, data: bytes) -> None:
        raise NotImplementedError

    def _offset(self, paddr: int, n: int) -> int:
        if paddr >= 0 and paddr + n <= self._low:
            return paddr  # the common case, first
        for start, end, offset in self.ranges:
            if start <= paddr and paddr + n <= end:
                return offset + paddr - start
        raise GuestFaultError(paddr, f"{n} bytes at {paddr:#x} are not in guest RAM")

    def read_if_ram(self, paddr: int, n: int) -> bytes | None:
        """``n`` bytes at ``paddr`` if they are guest RAM, else None."""
        if not self.covers(paddr, n):
            return None
        return self._get(self._offset(paddr, n), n)

    def covers(self, paddr: int, n: int) -> bool:
        """Whether ``n`` bytes at ``paddr`` are guest RAM."""
        return any(start <= paddr and paddr + n <= end for start, end, _ in self.ranges)

    def read_phys(self, paddr: int, n: int) -> bytes:
        """``n`` bytes of guest RAM at ``paddr``, read now (the guest may be running)."""
        return self._get(self._offset(paddr, n), n)

    def u64(self, paddr: int) -> int:
        """The little-endian u64 at ``paddr`` (a page-table entry, a ring's head)."""
        return int.from_bytes(self._get(self._offset(paddr, 8), 8), "little")

    def write_phys(self, paddr: int, data: bytes) -> None:
        """Store data (never code: TCG would not see it) at guest-physical ``paddr``."""
        self._put(self._offset(paddr, len(data)), data)

    def close(self) -> None:
        """Let go of the store."""

    def store_fd(self) -> int | None:
        """A new file descriptor on the store, for another process of ours (the ring
        follower's child) to read and write the same RAM with ``pread``/``pwrite`` at
        :meth:`store_offset`; the caller closes it. None: this store has none."""
        return None

    def store_offset(self, paddr: int, n: int) -> int:
        """Where ``n`` bytes at guest-physical ``paddr`` are in :meth:`store_fd`'s file."""
        return self._offset(paddr, n)


class FileRam(GuestRam):
    """Guest RAM through a host mapping of the RAM file of a guest kprobevm booted."""

    def __init__(self, ram: RamFile) -> None:
        super().__init__(ram.size, str(ram.path))
        try:
            fd = os.open(ram.path, os.O_RDWR)
        except OSError as exc:
            raise VMError(f"cannot open the guest RAM file {ram.path}: {exc}") from exc
        try:
            self._map = mmap.mmap(fd, ram.size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        finally:
            os.close(fd)
        self.path = ram.path
        self._all_low = self._low == ram.size  # no high RAM: file offset == address

    def _get(self, at: int, n: int) -> bytes:
        return self._map[at : at + n]

    def _put(self, at: int, data: bytes) -> None:
        self._map[at : at + len(data)] = data

    def read_if_ram(self, paddr: int, n: int) -> bytes | None:
        if paddr >= 0 and paddr + n <= self._low:
            return self._map[paddr : paddr + n]  # every read goes here: no calls
        return super().read_if_ram(paddr, n)

    def walk(self, cr3: int, la57: bool, addr: int) -> int | None:
        """:meth:`RamReader.walk` with the entries unpacked from the mapping in place
        (a stopping handler's read pays for this walk, so no call per entry)."""
        m, low, unpack = self._map, self._low, _U64.unpack_from
        table = cr3 & ADDR_MASK
        for shift in _SHIFTS_5 if la57 else _SHIFTS_4:
            at = table + ((addr >> shift) & 0x1FF) * 8
            if at + 8 > low:  # a table in high RAM: the general walk
                return walk_tables(self.u64, cr3, la57, addr)
            entry: int = unpack(m, at)[0]
            if not entry & PRESENT:
                return None
            if shift in (30, 21) and entry & PS:
                span = 1 << shift
                return (entry & ADDR_MASK & ~(span - 1)) | (addr & (span - 1))
            table = entry & ADDR_MASK
        return table | (addr & (PAGE_SIZE - 1))

    def page_reader(self, root: PagingRoot) -> Callable[[int, int], bytes | None]:
        """A reader of ``n`` bytes at a kernel virtual address within one page through
        ``root`` (None: not mapped, not RAM). A stopping handler's read is this, on a
        cold CPU just woken from the gdbstub's socket, where each Python operation costs
        several times its hot cost: so the 4-level walk is unrolled in a closure over its
        constants, with no call and no bounds check per entry (an entry beyond the
        mapping raises ``struct.error``, and with no high RAM all of it is RAM)."""
        if root.la57 or not self._all_low:
            return lambda addr, n: self._walked_read(root, addr, n)
        return _unrolled_reader(self._map, root.cr3 & ADDR_MASK)

    def _walked_read(self, root: PagingRoot, addr: int, n: int) -> bytes | None:
        try:
            paddr = self.walk(root.cr3, root.la57, addr)
        except GuestFaultError:
            return None
        return self.read_if_ram(paddr, n) if paddr is not None else None

    def u64(self, paddr: int) -> int:
        if paddr >= 0 and paddr + 8 <= self._low:  # each page-table entry of a walk
            return int(_U64.unpack_from(self._map, paddr)[0])  # no bytes object made
        return super().u64(paddr)

    def store_fd(self) -> int | None:
        return os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        self._map.close()


START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
"""Where the kernel image is mapped: its virtual address minus this plus ``phys_base``
is its physical address (:func:`pa_symbol`)."""


def pa_symbol(vaddr: int, phys_base: int) -> int:
    """The kernel's ``__pa_symbol()``: the physical address of a kernel-image address.
    ``phys_base`` is the u64 the guest holds, which wraps below zero when KASLR moved the
    image further in virtual than in physical memory (the sum wraps back)."""
    return (vaddr - START_KERNEL_MAP + phys_base) & MASK64
_KERNEL_HALF = 1 << 63
_SHIFTS_4 = (39, 30, 21, 12)
_SHIFTS_5 = (48, 39, 30, 21, 12)


def _unrolled_reader(m: mmap.mmap, top: int) -> Callable[[int, int], bytes | None]:
    """:meth:`FileRam.page_reader` for 4-level paging over a mapping that is all RAM."""
    unpack, low = _U64.unpack_from, len(m)

    def read(addr: int, n: int) -> bytes | None:
        try:
            entry: int = unpack(m, top + ((addr >> 36) & 0xFF8))[0]
            if not entry & PRESENT:
                return None
            entry = unpack(m, (entry & ADDR_MASK) + ((addr >> 27) & 0xFF8))[0]
            if not entry & PRESENT:
                return None
            if entry & PS:
                paddr = (entry & _FRAME_1G) | (addr & _OFFSET_1G)
            else:
                entry = unpack(m, (entry & ADDR_MASK) + ((addr >> 18) & 0xFF8))[0]
                if not entry & PRESENT:
                    return None
                if entry & PS:
                    paddr = (entry & _FRAME_2M) | (addr & _OFFSET_2M)
                else:
                    entry = unpack(m, (entry & ADDR_MASK) + ((addr >> 9) & 0xFF8))[0]
                    if not entry & PRESENT:
                        return None
                    paddr = (entry & ADDR_MASK) | (addr & (PAGE_SIZE - 1))
        except struct.error:  # a table beyond RAM: not ours to judge
            return None
        if paddr + n > low:
            return None
        return m[paddr : paddr + n]

    return read


@dataclass(frozen=True)
class PagingRoot:
    """The kernel's own top-level page table (``init_top_pgt``) and the paging mode."""

    cr3: int
    la57: bool


class RamReader:
    """Reads answered from the mapping (a :class:`~kprobevm.gdbstub.memory.DirectMemory`):
    guest-physical RAM, and kernel virtual addresses through the kernel's own page table
    walked on the host. Anything else (user memory, MMIO, an unmapped page) is left to
    the gdbstub, whose answer is the reference."""

    def __init__(self, ram: GuestRam, root: Callable[[], PagingRoot | None]) -> None:
        self.ram = ram
        self._find_root = root
        self._root: PagingRoot | None = None
        self._looked = False
        self._read_page: Callable[[int, int], bytes | None] | None = None
        self.reads = 0
        """Reads served from the mapping."""

    def root(self) -> PagingRoot | None:
        """The kernel's page table, found once (None: virtual reads go to the gdbstub)."""
        if not self._looked:
            self._root = self._find_root()
            self._looked = True
        return self._root

    def read_phys(self, paddr: int, n: int) -> bytes | None:
        data = self.ram.read_if_ram(paddr, n)
        if data is not None:
            self.reads += 1
        return data

    def read_virt(self, addr: int, n: int) -> bytes | None:
        if addr < _KERNEL_HALF or n <= 0:
            return None  # user memory is the current task's: the vCPU's own view
        read_page = self._read_page
        if read_page is None:
            root = self.root()
            if root is None:
                return None
            read_page = self._read_page = self._page_reader(root)
        if (addr & (PAGE_SIZE - 1)) + n <= PAGE_SIZE:  # one page (a handler's read): one walk
            data = read_page(addr, n)
            if data is not None:
                self.reads += 1
            return data
        root = self._root
        assert root is not None
        out = b""
        while n > 0:
            chunk = min(n, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            try:
                paddr = self._translate(root, addr)
            except GuestFaultError:  # a table outside RAM: not ours to judge
                return None
            data = self.ram.read_if_ram(paddr, chunk) if paddr is not None else None
            if data is None:
                return None
            out += data
            addr, n = addr + chunk, n - chunk
        self.reads += 1
        return out

    def write_data(self, addr: int, data: bytes) -> bool:
        """Store ``data`` (never code: TCG would not see it) at kernel virtual ``addr``
        within one page; False when the mapping cannot."""
        root = self.root()
        if root is None or addr < _KERNEL_HALF or (addr & (PAGE_SIZE - 1)) + len(data) > PAGE_SIZE:
            return False
        try:
            paddr = self._translate(root, addr)
        except GuestFaultError:
            return False
        if paddr is None or not self.ram.covers(paddr, len(data)):
            return False
        self.ram.write_phys(paddr, data)
        return True

    def _page_reader(self, root: PagingRoot) -> Callable[[int, int], bytes | None]:
        ram = self.ram
        if isinstance(ram, FileRam):
            return ram.page_reader(root)

        def read(addr: int, n: int) -> bytes | None:
            try:
                paddr = walk_tables(ram.u64, root.cr3, root.la57, addr)
            except GuestFaultError:
                return None
            return ram.read_if_ram(paddr, n) if paddr is not None else None

        return read

    def _translate(self, root: PagingRoot, addr: int) -> int | None:
        ram = self.ram
        if isinstance(ram, FileRam):
            return ram.walk(root.cr3, root.la57, addr)
        return walk_tables(ram.u64, root.cr3, root.la57, addr)


def walk_tables(u64: Callable[[int], int], cr3: int, la57: bool, addr: int) -> int | None:
    """The MMU's walk, cut to what a read needs (present bits, large pages): this runs for
    every read, so no entry objects (:func:`kprobevm.x86.pagetable.translate` is the full
    walk). ``u64`` reads an entry at a physical address; None: not mapped."""
    table = cr3 & ADDR_MASK
    for shift in _SHIFTS_5 if la57 else _SHIFTS_4:
        entry = u64(table + ((addr >> shift) & 0x1FF) * 8)
        if not entry & PRESENT:
            return None
        if shift in (30, 21) and entry & PS:
            span = 1 << shift
            return (entry & ADDR_MASK & ~(span - 1)) | (addr & (span - 1))
        table = entry & ADDR_MASK
    return table | (addr & (PAGE_SIZE - 1))
