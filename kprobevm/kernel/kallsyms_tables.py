"""The running kernel's own kallsyms tables, found and decoded from guest memory.

With no vmlinux, no kallsyms file and no SSH, the host still has the kernel image in guest
memory, and in it the tables ``scripts/kallsyms`` generated at build time (``.rodata``):

- ``kallsyms_num_syms`` (u32) and, right after it, ``kallsyms_names``: per symbol a length
  (one byte, or two as ULEB128 when above 0x7f) and that many token codes; the first
  character a name expands to is its type letter (``T``, ``t``, ``D``, ...);
- ``kallsyms_markers`` (u32) right after the names: the offset of every 256th name;
- ``kallsyms_seqs_of_names`` on kernels that have it (name order, not used here);
- ``kallsyms_token_table``: 256 NUL-terminated strings, then ``kallsyms_token_index``:
  256 u16 offsets into it;
- ``kallsyms_offsets`` (s32) and ``kallsyms_relative_base`` (a pointer), or on kernels
  without base-relative kallsyms ``kallsyms_addresses`` (pointers): before
  ``kallsyms_num_syms`` up to 6.3, after ``kallsyms_token_index`` from 6.4.

Each table starts 8-byte aligned. The tables carry no symbol of their own, so they are
found by their structure: a character that occurs in symbol names is its own token, so
the token table holds ``"0\\0" ... "9\\0"`` in a row; the token index after it must give
every token's offset; the markers and the names before it must agree with each other;
and the addresses must be sorted and put ``_text`` where the page tables put it. Which
layout and which address encoding the kernel uses is decided by those checks, never by
a version number.

The kernel image itself is found without symbols: the kernel maps only its own image in
the 1 GiB window at ``0xffffffff80000000`` (``cleanup_highmap`` clears the rest of the
window's page directory), so the one run of present page-directory entries there is the
image, ``_text`` at its first 2 MiB (KASLR moves it in 2 MiB steps).
"""

from __future__ import annotations

import array
import bisect
import itertools
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kprobevm.errors import GuestFaultError, SymbolError
from kprobevm.kernel.kallsyms import KernelSymbols
from kprobevm.x86.constants import MASK64
from kprobevm.x86.pagetable import ADDR_MASK, NX, PAGE_SIZE_2M, PRESENT, PS, RW, translate, walk

__all__ = [
    "KERNEL_IMAGE_WINDOW",
    "KallsymsTables",
    "KernelImage",
    "decode_kallsyms",
    "find_kallsyms_tables",
    "find_kernel_image",
    "kallsyms_from_image",
]

KERNEL_IMAGE_WINDOW = 0xFFFFFFFF80000000
"""``__START_KERNEL_map``: the 1 GiB page directory that maps only the kernel image."""

ReadPhys = Callable[[int, int], bytes]

_KERNEL_HALF = 1 << 63
_DIGIT_TOKENS = b"".join(b"%d\0" % d for d in range(10))
_ALIGN = 8
_MAX_SEQS_GAP = 4 << 20
"""How far before the token table the markers may end (``kallsyms_seqs_of_names``, 3 or 4
bytes a symbol, may sit between): room for a million symbols."""
_MAX_NAME_ENTRY = 2 + 512
"""A name entry's largest size: a two-byte length and KSYM_NAME_LEN (512) tokens."""


@dataclass(frozen=True)
class KernelImage:
    """Where the running kernel image is: ``_text`` (virtual), its guest-physical address,
    and how many bytes from it are mapped (whole 2 MiB pages, ``.bss`` included)."""

    text: int
    phys: int
    size: int
    rodata: tuple[int, int] | None = None
    """``(start, size)`` of the read-only data (kallsyms and BTF live there), told by the
    page directory: from the first read-only non-executable 2 MiB page to the first
    writable one; None when the mapping does not show it."""

    def contains(self, vaddr: int) -> bool:
        """Whether ``vaddr`` is inside the mapped image."""
        return self.text <= vaddr < self.text + self.size


def find_kernel_image(read_phys: ReadPhys, cr3: int, *, la57: bool = False) -> KernelImage:
    """The kernel image from the page tables at ``cr3``: the run of present entries of the
    page directory that maps ``0xffffffff80000000`` (any CR3 of a running kernel shares
    it). Raises :class:`GuestFaultError` when the window is not mapped as a kernel maps it.
    """
    entries = walk(read_phys, cr3, KERNEL_IMAGE_WINDOW, la57=la57)
    pd = entries[-1]
    if pd.level != 2:
        raise GuestFaultError(
            KERNEL_IMAGE_WINDOW,
            f"the kernel image window is not mapped through a page directory "
            f"(walk stopped at level {pd.level}, entry {pd.value:#x})",
        )
    table = pd.paddr - 8 * pd.index
    raw = read_phys(table, 4096)
    pd_entries = struct.unpack("<512Q", raw)
    present = [bool(e & PRESENT) for e in pd_entries]
    try:
        first = present.index(True)
    except ValueError:
        raise GuestFaultError(
            KERNEL_IMAGE_WINDOW, f"no page of the kernel image window is mapped (PD {table:#x})"
        ) from None
    count = 1
    while first + count < 512 and present[first + count]:
        count += 1
    text = KERNEL_IMAGE_WINDOW + first * PAGE_SIZE_2M
    phys = translate(read_phys, cr3, text, la57=la57).paddr & ADDR_MASK
    return KernelImage(text=text, phys=phys, size=count * PAGE_SIZE_2M,
                       rodata=_rodata(pd_entries[first : first + count], text))  # fmt: skip


def _rodata(entries: tuple[int, ...], text: int) -> tuple[int, int] | None:
    """Read-only data in the image's page-directory entries: text is mapped read-only
    and executable, rodata read-only and not executable, data writable (``.text`` and
    ``.rodata`` tails mapped with 4 KiB pages may sit between)."""

    def huge(e: int, rw: bool, nx: bool) -> bool:
        return bool(e & PS) and bool(e & RW) is rw and bool(e & NX) is nx

    start = next((k for k, e in enumerate(entries) if huge(e, False, True)), None)
    if start is None:
        return None
    end = next((k for k in range(start, len(entries)) if huge(entries[k], True, True)), None)
    if end is None:
        return None
    return text + start * PAGE_SIZE_2M, (end - start) * PAGE_SIZE_2M


@dataclass(frozen=True)
class KallsymsTables:
    """Where each kallsyms table is (offsets into the image read from ``_text``) and how
    addresses are kept: ``relative`` (s32 offsets from ``kallsyms_relative_base``),
    ``absolute_percpu`` (negative offsets relative, the others absolute per-CPU
    offsets) or ``absolute`` (``kallsyms_addresses``: one pointer each)."""

    num_syms: int
    names: int
    markers: int
    token_table: int
    token_index: int
    addresses: int
    relative_base: int | None
    encoding: str
    count: int
    """The number of symbols (the value of ``kallsyms_num_syms``)."""


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


def _token_strings(image: bytes, start: int) -> tuple[list[int], int] | None:
    """Offsets of the 256 strings from ``start`` and the end of the last one (its NUL
    included); None when the image ends first."""
    offs: list[int] = []
    at = start
    for _ in range(256):
        end = image.find(b"\0", at)
        if end < 0:
            return None
        offs.append(at - start)
        at = end + 1
    return offs, at


def _token_tables(image: bytes) -> list[tuple[int, int]]:
    """``(token_table, token_index)`` offsets of every place where the digit tokens sit
    in a token table that its index confirms."""
    found: list[tuple[int, int]] = []
    at = image.find(_DIGIT_TOKENS)
    while at >= 0:
        # Walk back over the 48 strings of codes 0x00..0x2f to the table's start.
        start = at
        for _ in range(0x30):
            start = image.rfind(b"\0", 0, start - 1) + 1
        if start % _ALIGN == 0:
            walked = _token_strings(image, start)
            if walked is not None:
                offs, end = walked
                index = _align(end)
                got = struct.unpack_from("<256H", image, index) if index + 512 <= len(image) else ()
                if list(got) == offs and offs[0x30] == at - start:
                    found.append((start, index))
        at = image.find(_DIGIT_TOKENS, at + 1)
    return found


def _markers_before(image: bytes, limit: int) -> Iterator[tuple[int, list[int]]]:
    """Candidate ``kallsyms_markers`` arrays ending at most ``_MAX_SEQS_GAP`` before
    ``limit``, nearest first: 8-aligned, starting with 0, strictly increasing by what
    256 names take."""
    lo = max(0, limit - _MAX_SEQS_GAP)
    end = limit
    while True:
        # markers[0] is 0 and markers[1] is what the first 256 names take.
        found = image.rfind(b"\0\0\0\0", lo, end)
        if found < 0:
            return
        at = found - found % _ALIGN
        end = at + 3  # the next window to look at starts before ``at``
        if at < lo or at + 8 > limit or image[at : at + 4] != b"\0\0\0\0":
            continue
        first = struct.unpack_from("<I", image, at + 4)[0]
        if not 2 * 256 <= first <= _MAX_NAME_ENTRY * 256:
            continue
        marks = [0]
        pos = at + 4
        while pos + 4 <= limit:
            value = struct.unpack_from("<I", image, pos)[0]
            if not 2 * 256 <= value - marks[-1] <= _MAX_NAME_ENTRY * 256:
                break
            marks.append(value)
            pos += 4
        yield at, marks


def _walk_names(image: bytes, start: int, count: int) -> list[int] | None:
    """Offsets (from ``start``) of ``count`` name entries, plus the end as the last item;
    None when an entry runs off the image."""
    offs: list[int] = []
    at = start
    size = len(image)
    for _ in range(count):
        if at >= size:
            return None
        offs.append(at - start)
        n = image[at]
        if n & 0x80:
            if at + 1 >= size:
                return None
            n = (n & 0x7F) | (image[at + 1] << 7)
            at += 2
        else:
            at += 1
        if n == 0:
            return None  # scripts/kallsyms emits no empty name
        at += n
    offs.append(at - start)
    return offs


def _names_before(image: bytes, markers_at: int, marks: list[int]) -> tuple[int, int] | None:
    """``(kallsyms_num_syms offset, count)``: the u32 just before the names that end at
    ``markers_at`` and agree with ``marks`` at every 256th entry."""
    m = len(marks)
    last = marks[-1]
    at = markers_at - last - 8
    at -= at % _ALIGN
    lowest = markers_at - last - 256 * _MAX_NAME_ENTRY - 8
    while at >= max(lowest, 0):
        count, high = struct.unpack_from("<II", image, at)
        if high == 0 and (count + 255) >> 8 == m:
            names = at + 8
            offs = _walk_names(image, names, count)
            if (
                offs is not None
                and markers_at - _ALIGN < names + offs[-1] <= markers_at
                and all(offs[256 * k] == marks[k] for k in range(m))
            ):
                return at, count
        at -= _ALIGN
    return None


def find_kallsyms_tables(image: bytes, text: int, base: int | None = None) -> KallsymsTables:
    """The kallsyms tables in ``image``, kernel memory read from virtual address ``base``
    (``text``, where ``_text`` is, when None); offsets in the result are into ``image``.
    Raises :class:`SymbolError` with what was seen when they are not there (a kernel
    built without ``CONFIG_KALLSYMS``, or memory read wrongly)."""
    where = text if base is None else base
    tables = _token_tables(image)
    if not tables:
        raise SymbolError(
            f"no kallsyms token table in {len(image) >> 20} MiB of kernel memory at "
            f"{where:#x} (a kernel without CONFIG_KALLSYMS?)"
        )
    tried: list[str] = []
    for token_table, token_index in tables:
        seen = len(tried)
        for markers, marks in _markers_before(image, token_table):
            found = _names_before(image, markers, marks)
            if found is None:
                tried.append(f"markers at {where + markers:#x}: no names before them")
                continue
            num_syms, count = found
            layout = _addresses(image, text, num_syms, token_index, count)
            if layout is None:
                tried.append(f"{count} names at {where + num_syms + 8:#x}: no address table")
                continue
            addresses, base, encoding = layout
            return KallsymsTables(
                num_syms=num_syms, names=num_syms + 8, markers=markers,
                token_table=token_table, token_index=token_index, addresses=addresses,
                relative_base=base, encoding=encoding, count=count,
            )  # fmt: skip
        if len(tried) == seen:
            tried.append(f"token table at {where + token_table:#x}: no markers before it")
    raise SymbolError(
        f"kallsyms tables not found in kernel memory at {where:#x}: " + "; ".join(tried[:6])
    )


def _addresses(
    image: bytes, text: int, num_syms: int, token_index: int, count: int
) -> tuple[int, int | None, str] | None:
    """``(table offset, relative_base offset or None, encoding)`` of the address table:
    the candidate (before ``kallsyms_num_syms`` up to 6.3, after the token index from
    6.4; s32 offsets or pointers) whose values are sorted kernel addresses."""
    after = _align(token_index + 512)
    candidates: list[tuple[int, int | None]] = [
        (num_syms - 8 - _align(4 * count), num_syms - 8),
        (after, after + _align(4 * count)),
        (num_syms - 8 * count, None),
        (after, None),
    ]
    for table, base_at in candidates:
        if table < 0 or (base_at is None and table + 8 * count > len(image)):
            continue
        if base_at is not None and base_at + 8 > len(image):
            continue
        for encoding in ("absolute_percpu", "relative") if base_at is not None else ("absolute",):
            values = _decode_addresses(image, table, base_at, count, encoding)
            if values is not None and _plausible(values, text):
                return table, base_at, encoding
    return None


def _decode_addresses(
    image: bytes, table: int, base_at: int | None, count: int, encoding: str
) -> list[int] | None:
    """The symbol addresses as the kernel's ``kallsyms_sym_address()`` computes them."""
    if encoding == "absolute":
        raw = array.array("Q", image[table : table + 8 * count])
    else:
        raw = array.array("i", image[table : table + 4 * count])
    if sys.byteorder != "little":
        raw.byteswap()
    if len(raw) != count:
        return None
    if encoding == "absolute":
        return list(raw)
    assert base_at is not None
    base = int.from_bytes(image[base_at : base_at + 8], "little")
    if encoding == "relative":
        return [(base + (off & 0xFFFFFFFF)) & MASK64 for off in raw]
    return [off if off >= 0 else (base - 1 - off) & MASK64 for off in raw]


def _plausible(values: list[int], text: int) -> bool:
    """Sorted, and the lowest kernel-half address is ``_text``'s (the image's first
    byte: per-CPU offsets are small, every other symbol lies above it)."""
    if any(a > b for a, b in itertools.pairwise(values)):
        return False
    kernel = bisect.bisect_left(values, _KERNEL_HALF)
    return kernel < len(values) and values[kernel] == text


def decode_kallsyms(image: bytes, text: int, tables: KallsymsTables) -> KernelSymbols:
    """Every symbol of the tables, with its type letter and address, as the kernel's
    ``/proc/kallsyms`` lists the core kernel's. Raises :class:`SymbolError` when the
    decoded ``_text`` is not at ``text``."""
    index = struct.unpack_from("<256H", image, tables.token_index)
    tokens = []
    for off in index:
        at = tables.token_table + off
        tokens.append(image[at : image.index(b"\0", at)].decode("ascii", "replace"))
    addrs = _decode_addresses(image, tables.addresses, tables.relative_base, tables.count,
                              tables.encoding)  # fmt: skip
    assert addrs is not None
    names: list[str] = []
    at = tables.names
    for _ in range(tables.count):
        n = image[at]
        if n & 0x80:
            n = (n & 0x7F) | (image[at + 1] << 7)
            at += 1
        names.append("".join([tokens[c] for c in image[at + 1 : at + 1 + n]]))
        at += 1 + n
    # the first character a name expands to is its type letter
    types = [full[:1] for full in names]
    names = [full[1:] for full in names]
    syms = KernelSymbols.from_columns(addrs, types, names, [None] * len(names))
    if syms.get("_text") != text:
        got = syms.get("_text")
        raise SymbolError(
            f"kallsyms decoded from memory put _text at "
            f"{'nothing' if got is None else hex(got)}, the page tables at {text:#x}"
        )
    return syms


def kallsyms_from_image(
    image: bytes, text: int, base: int | None = None
) -> tuple[KernelSymbols, KallsymsTables]:
    """Find and decode the core kernel's kallsyms in ``image`` (kernel memory read from
    ``base``, by default from ``_text`` at ``text``)."""
    tables = find_kallsyms_tables(image, text, base)
    return decode_kallsyms(image, text, tables), tables
