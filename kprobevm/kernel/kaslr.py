"""Find the running kernel's KASLR slide from the host, with no help from inside the guest.

x86-64 puts kernel text at a virtual base that is a multiple of ``CONFIG_PHYSICAL_ALIGN``
(2 MiB) inside the 1 GiB kernel-image window at ``0xffffffff80000000``; only that window's
pages of the image are mapped. So: read a few bytes at each 2 MiB candidate (unmapped
candidates fault at once) and keep the base whose bytes equal the ELF's ``.text``.

The ELF is not byte-for-byte what runs: boot rewrites alternatives, retpoline and return
thunk sites, lock prefixes and paravirt calls (tables in the ELF say where), and with
KASLR the decompressor relocates absolute addresses (no table survives for those). The
windows compared are chosen clear of the ELF's patch tables and of byte values that could
be relocated immediates, and a base wins when a clear majority of them match.

A second, independent method reads the #BP gate of the IDT through its fixed read-only
alias in the CPU entry area and compares the handler with ``asm_exc_int3``'s link address.
"""

from __future__ import annotations

import bisect
import itertools
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.errors import GuestMemoryError, KaslrError
from kprobevm.x86.constants import MASK64

if TYPE_CHECKING:
    from kprobevm.kernel.vmlinux import Vmlinux

__all__ = [
    "CPU_ENTRY_AREA_RO_IDT",
    "KERNEL_IMAGE_END",
    "KERNEL_IMAGE_START",
    "KERNEL_LINK_TEXT",
    "PatchedRange",
    "ReadFn",
    "boot_patched_ranges",
    "find_kaslr_slide",
    "idt_gate_handler",
    "same_text",
    "slide_from_idt",
    "stable_windows",
]

ReadFn = Callable[[int, int], bytes]
"""``read(address, length) -> bytes`` of guest virtual memory; raises GuestMemoryError."""

KERNEL_IMAGE_START = 0xFFFFFFFF80000000
"""``__START_KERNEL_map``: the kernel image window starts here..."""
KERNEL_IMAGE_END = 0xFFFFFFFFC0000000
"""... and is ``KERNEL_IMAGE_SIZE`` (1 GiB with KASLR) long; modules follow."""
KERNEL_LINK_TEXT = 0xFFFFFFFF81000000
"""Where x86-64 kernels link ``_text`` by default (``CONFIG_PHYSICAL_START`` 16 MiB)."""
KASLR_ALIGN = 0x200000
"""``CONFIG_PHYSICAL_ALIGN`` on x86-64 distro kernels; every slide is a multiple of it."""
CPU_ENTRY_AREA_RO_IDT = 0xFFFFFE0000000000
"""The read-only IDT alias the kernel loads into IDTR (``CPU_ENTRY_AREA_RO_IDT``); fixed,
not randomised, on 6.1 (the per-CPU entry areas after it are randomised from 6.2)."""

_WINDOW = 16
_COUNT = 48
_REJECT_AFTER = 8
_SCAN = 4096


@dataclass(frozen=True)
class PatchedRange:
    """Bytes ``[start, end)`` of kernel text that boot may rewrite, and which table says so."""

    start: int
    end: int
    table: str


def _patched_spans(vm: Vmlinux) -> list[tuple[int, int, str]]:
    """``(start, end, table)`` of every boot patch site, sorted (see boot_patched_ranges)."""
    out: list[tuple[int, int, str]] = []

    def table(name: str, fmt: str) -> Iterator[tuple[int, tuple[int, ...]]]:
        """(address of the entry, fields) of each entry of a table section."""
        if not vm.has_section(name):
            return
        sec = vm.section(name)
        data = vm.read_section(name)
        size = struct.calcsize(fmt)
        usable = len(data) - len(data) % size
        for k, fields in enumerate(struct.iter_unpack(fmt, data[:usable])):
            yield sec.vaddr + k * size, fields

    # struct alt_instr {s32 instr_offset; s32 repl_offset; <feature word>; u8 instrlen;
    # u8 replacementlen;}: the feature word is a u16 cpuid up to 6.2 (12 bytes), a u32
    # ft_flags from 6.3 (14 bytes).
    alt_fmt = _alt_instr_format(vm)
    for entry, (rel, _repl, _feature, instrlen, _replen) in table(".altinstructions", alt_fmt):
        site = (entry + rel) & MASK64
        out.append((site, site + max(instrlen, 1), ".altinstructions"))
    # s32 self-relative sites: thunk calls/jumps (5 bytes, 6 for a jcc: taken as 6),
    # `jmp __x86_return_thunk` (5), `lock` prefixes (1), call depth tracking call sites
    # (5, 6.2+), sealed ENDBR64 (4, IBT kernels), and 6.11+ runtime constants (an 8-byte
    # movabs immediate or a 1-byte shift count, taken whole).
    simple = [
        (".retpoline_sites", 6),
        (".return_sites", 5),
        (".smp_locks", 1),
        (".call_sites", 5),
        (".ibt_endbr_seal", 4),
    ]
    simple += [(sec.name, 10) for sec in vm.iter_sections_named("runtime_")]
    for name, length in simple:
        for entry, (rel,) in table(name, "<i"):
            site = (entry + rel) & MASK64
            out.append((site, site + length, name))
    # struct paravirt_patch_site {u8 *instr; u8 type; u8 len;} (16 bytes with padding).
    for _entry, (instr, _type, length) in table(".parainstructions", "<QBB6x"):
        if instr >= 1 << 63:
            instr = (instr + vm.slide) & MASK64
        out.append((instr, instr + max(length, 1), ".parainstructions"))
    out.sort()
    return out


def _alt_instr_format(vm: Vmlinux) -> str:
    """The struct layout of ``.altinstructions`` entries: the one whose decoded sites land
    in executable sections (a wrong stride decodes garbage offsets)."""
    if not vm.has_section(".altinstructions"):
        return "<iiHBB"
    sec = vm.section(".altinstructions")
    data = vm.read_section(".altinstructions")
    best, best_hits = "<iiHBB", -1
    for fmt in ("<iiHBB", "<iiIBB"):
        size = struct.calcsize(fmt)
        hits = 0
        for k in range(min(64, len(data) // size)):
            rel, repl = struct.unpack_from("<ii", data, k * size)
            entry = sec.vaddr + k * size
            for target in ((entry + rel) & MASK64, (entry + 4 + repl) & MASK64):
                found = vm.section_for(target)
                hits += found is not None and found.is_exec
        if hits > best_hits:
            best, best_hits = fmt, hits
    return best


def boot_patched_ranges(vm: Vmlinux) -> list[PatchedRange]:
    """Text bytes that boot may rewrite, from the tables a vmlinux carries in its own sections.

    ``.altinstructions`` (struct alt_instr, 12 bytes on 6.1, 14 from 6.3: instr/repl
    offsets, feature, lengths), ``.retpoline_sites`` (indirect call/jmp thunk calls, 5
    bytes or 6 for a jcc), ``.return_sites`` (``jmp __x86_return_thunk``, 5),
    ``.smp_locks`` (a ``lock`` prefix, 1), ``.call_sites`` and ``.ibt_endbr_seal`` (newer
    kernels), ``runtime_*`` constants (6.11+) and ``.parainstructions`` (struct
    paravirt_patch_site, 16 bytes: absolute address, type, length; before 6.8). Tables
    placed inside other sections (``__jump_table``, ``__mcount_loc``,
    ``.static_call_sites``) need kallsyms' start/stop symbols and are not read here.
    """
    return [PatchedRange(start, end, name) for start, end, name in _patched_spans(vm)]


def stable_windows(vm: Vmlinux, count: int = _COUNT, size: int = _WINDOW) -> list[int]:
    """Link-time addresses of up to ``count`` ``size``-byte windows of ``.text`` that should
    read the same in the running kernel, spread over the whole of ``.text``.

    A window is kept when no boot patch table touches it, when it is varied enough to be
    found nowhere else (not ``int3`` or NOP padding: at least half its byte values
    distinct), and when none of its bytes could be the top byte of a 32-bit absolute
    address into the image (``0x81``..``0x83`` for an image at ``0xffffffff81000000``):
    with KASLR the decompressor rewrites such immediates and no relocation table survives
    in the vmlinux to say where. Other relocated values (physical addresses, addends) and
    ftrace sites can still spoil a window; :func:`find_kaslr_slide` votes.
    """
    patched = _patched_spans(vm)
    starts = [p[0] for p in patched]
    reach = list(itertools.accumulate((p[1] for p in patched), max))
    start, end = vm.text_range
    image_end = max(s.end for s in vm.sections() if s.is_alloc and s.vaddr >= start)
    lo_top, hi_top = (start >> 24) & 0xFF, ((image_end - 1) >> 24) & 0xFF
    absolute_tops = frozenset(range(lo_top, hi_top + 1))

    def clear(addr: int, data: bytes) -> bool:
        i = bisect.bisect_left(starts, addr + size)  # ranges starting before the window ends
        if i and reach[i - 1] > addr:
            return False
        return len(set(data)) * 2 >= size and not absolute_tops.intersection(data)

    out: list[int] = []
    step = max((end - start - size) // count, size)
    for k in range(count):
        slot = start + k * step
        # Look for a clean window in the first few KiB of each slot (one file read).
        slab = vm.read(slot, min(step, _SCAN, end - slot))
        for off in range(0, len(slab) - size + 1, 8):
            if clear(slot + off, slab[off : off + size]):
                out.append(slot + off)
                break
    return out


_NOP5 = bytes.fromhex("0f1f440000")


def same_text(guest: bytes, elf: bytes) -> bool:
    """Whether guest text equals the ELF's, allowing ftrace's boot-time rewrite of a
    ``call __fentry__`` (``e8`` rel32 in the ELF) into the 5-byte NOP ``0f 1f 44 00 00``."""
    if guest == elf:
        return True
    if len(guest) != len(elf):
        return False
    fixed = bytearray(elf)
    i = guest.find(_NOP5)
    while i >= 0:
        if fixed[i] == 0xE8:
            fixed[i : i + 5] = _NOP5
        i = guest.find(_NOP5, i + 1)
    return guest == bytes(fixed)


def find_kaslr_slide(
    read: ReadFn,
    vmlinux: Vmlinux,
    *,
    align: int = KASLR_ALIGN,
    windows: int = _COUNT,
) -> int:
    """The slide (running ``_text`` minus the ELF's) found by matching ``.text`` bytes.

    ``vmlinux`` is the ELF at its link addresses (``slide`` 0). Slide 0 (``nokaslr``) is
    tried first and accepted when three quarters of the windows match. Otherwise the
    candidate bases are scored: every ``align`` step of the kernel image window (an
    unmapped one costs one read), or, when the IDT's #BP gate is readable at its fixed
    alias, only the bases that put its handler inside ``.text``. The best wins if at
    least a third of the windows match and no other base comes close. Measured on
    Debian's 6.1 with KASLR: the true base matched 33 of 37 windows (relocated immediates
    spoil the rest) and other mapped bases none. Raises KaslrError, with the scores seen,
    when no base qualifies.
    """
    if vmlinux.slide:
        raise KaslrError(
            f"find_kaslr_slide needs the unslid ELF (this one has slide {vmlinux.slide:#x})"
        )
    link_text = vmlinux.text_base
    offsets = [w - link_text for w in stable_windows(vmlinux, windows)]
    if len(offsets) < 4:
        raise KaslrError(f"only {len(offsets)} stable .text windows in {vmlinux.path}")
    expected = [vmlinux.read(link_text + off, _WINDOW) for off in offsets]

    def score(slide: int) -> int | None:
        """Windows matching at ``slide``; None when unmapped. A base whose first
        ``_REJECT_AFTER`` readable windows all differ is given up early (scored 0)."""
        base = link_text + slide
        total = tried = 0
        for k, (off, want) in enumerate(zip(offsets, expected, strict=True)):
            try:
                got = read(base + off, _WINDOW)
            except GuestMemoryError:
                if k == 0:
                    return None  # the image is not mapped there
                continue
            total += same_text(got, want)
            tried += 1
            if tried == _REJECT_AFTER and total == 0:
                return 0
        return total

    n = len(offsets)
    at_zero = score(0)
    if at_zero is not None and 4 * at_zero >= 3 * n:
        return 0
    lo = KERNEL_IMAGE_START - link_text
    hi = KERNEL_IMAGE_END - link_text
    candidates = range(lo - lo % align, hi, align)
    hint = _int3_handler(read)
    text_size = vmlinux.text_range[1] - link_text
    if hint is not None and KERNEL_IMAGE_START <= hint < KERNEL_IMAGE_END:
        # The #BP handler is kernel text: only bases within .text's size below it qualify.
        first = hint - text_size - link_text
        candidates = range(first - first % align + align, hint - link_text + 1, align)
    scores: dict[int, int] = {} if at_zero is None else {0: at_zero}
    for slide in candidates:
        if slide != 0 and (got := score(slide)) is not None:
            scores[slide] = got
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    if ranked:
        best, best_score = ranked[0]
        runner_up = ranked[1][1] if len(ranked) > 1 else 0
        if 3 * best_score >= n and best_score >= 2 * runner_up + 2:
            return best
    seen = ", ".join(f"{sl:#x}: {sc}/{n}" for sl, sc in ranked[:3]) or "nothing mapped"
    raise KaslrError(
        f"kernel text of {vmlinux.path.name} not found in guest memory: "
        f"{len(scores)} of {len(candidates)} candidate bases mapped; best scores {seen}"
    )


def _int3_handler(read: ReadFn) -> int | None:
    """The #BP handler from the IDT's fixed read-only alias, or None when not readable."""
    try:
        return idt_gate_handler(read(CPU_ENTRY_AREA_RO_IDT + 3 * 16, 16))
    except GuestMemoryError:
        return None


def idt_gate_handler(gate: bytes) -> int:
    """The handler address in a 16-byte x86-64 IDT gate descriptor."""
    if len(gate) != 16:
        raise KaslrError(f"an IDT gate is 16 bytes, got {len(gate)}")
    low, _selector, _ist, _type_attr, mid, high, _zero = struct.unpack("<HHBBHII", gate)
    return int(low | (mid << 16) | (high << 32))


def slide_from_idt(
    read: ReadFn,
    asm_exc_int3: int,
    *,
    idt: int = CPU_ENTRY_AREA_RO_IDT,
    align: int = KASLR_ALIGN,
) -> int:
    """The slide from the #BP (vector 3) gate: its handler minus ``asm_exc_int3``'s link address.

    ``asm_exc_int3`` comes from a source that is not slid (a debug vmlinux's ``.symtab``, or
    kallsyms saved from a ``nokaslr`` boot of the same kernel). ``idt`` defaults to the
    kernel's fixed read-only IDT alias; IDTR itself is not in QEMU 7.2's gdbstub registers.
    """
    try:
        gate = read(idt + 3 * 16, 16)
    except GuestMemoryError as exc:
        raise KaslrError(f"the IDT is not readable at {idt:#x}") from exc
    handler = idt_gate_handler(gate)
    slide = (handler - asm_exc_int3) & MASK64
    if slide >= 1 << 63:
        slide -= 1 << 64
    if slide % align:
        raise KaslrError(
            f"#BP gate points at {handler:#x}, {slide:#x} from asm_exc_int3 ({asm_exc_int3:#x}):"
            f" not a multiple of {align:#x}, so not the slid asm_exc_int3"
        )
    return slide
