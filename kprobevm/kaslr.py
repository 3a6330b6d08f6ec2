"""Find the running kernel's KASLR slide from the host, with no help from inside the guest.

x86-64 puts kernel text at a virtual base that is a multiple of ``CONFIG_PHYSICAL_ALIGN``
(2 MiB) inside the 1 GiB kernel-image window at ``0xffffffff80000000``; only that window's
pages of the image are mapped. So: read a few bytes at each 2 MiB candidate (unmapped
candidates fault at once) and keep the base whose bytes equal the ELF's ``.text``.

The ELF is not byte-for-byte what runs: boot rewrites alternatives, retpoline and return
thunk sites, lock prefixes and paravirt calls (tables in the ELF say where), and with
KASLR the decompressor relocates absolute addresses (no table survives for those). The
windows compared are chosen clear of the ELF's patch tables, and a base wins when a clear
majority of them match, which relocated bytes cannot fake.

A second, independent method reads the #BP gate of the IDT through its fixed read-only
alias in the CPU entry area and compares the handler with ``asm_exc_int3``'s link address.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.errors import GuestMemoryError, KaslrError, VmlinuxError

if TYPE_CHECKING:
    from kprobevm.vmlinux import Vmlinux

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

_WINDOW = 32
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class PatchedRange:
    """Bytes ``[start, end)`` of kernel text that boot may rewrite, and which table says so."""

    start: int
    end: int
    table: str


def _s32_sites(
    vm: Vmlinux, section: str, stride: int, length: Callable[[int], int]
) -> Iterable[tuple[int, int]]:
    """Entries of a table of ``s32`` self-relative offsets (first field of each ``stride``)."""
    if not vm.has_section(section):
        return
    sec = vm.section(section)
    data = vm.read_section(section)
    for off in range(0, len(data) - stride + 1, stride):
        (rel,) = struct.unpack_from("<i", data, off)
        site = (sec.vaddr + off + rel) & _MASK64
        yield site, length(site)


def boot_patched_ranges(vm: Vmlinux) -> list[PatchedRange]:
    """Text bytes that boot may rewrite, from the tables a vmlinux carries in its own sections.

    ``.altinstructions`` (struct alt_instr, 12 bytes on 6.1: instr/repl offsets, cpuid,
    lengths), ``.retpoline_sites`` (indirect call/jmp thunk calls, 5 bytes or 6 for a jcc),
    ``.return_sites`` (``jmp __x86_return_thunk``, 5), ``.smp_locks`` (a ``lock`` prefix,
    1) and ``.parainstructions`` (struct paravirt_patch_site, 16 bytes: absolute address,
    type, length). Tables placed inside other sections (``__jump_table``, ``__mcount_loc``,
    ``.static_call_sites``) need kallsyms' start/stop symbols and are not read here.
    """
    out: list[PatchedRange] = []

    def text_byte(addr: int) -> int:
        try:
            return vm.read(addr, 1)[0]
        except VmlinuxError:
            return 0

    if vm.has_section(".altinstructions"):
        sec = vm.section(".altinstructions")
        data = vm.read_section(".altinstructions")
        for off in range(0, len(data) - 11, 12):
            rel, _repl, _cpuid, instrlen, _replen = struct.unpack_from("<iiHBB", data, off)
            site = (sec.vaddr + off + rel) & _MASK64
            out.append(PatchedRange(site, site + max(instrlen, 1), ".altinstructions"))
    for table, length in (
        (".retpoline_sites", lambda a: 6 if text_byte(a) == 0x0F else 5),
        (".return_sites", lambda a: 5),
        (".smp_locks", lambda a: 1),
    ):
        for site, n in _s32_sites(vm, table, 4, length):
            out.append(PatchedRange(site, site + n, table))
    if vm.has_section(".parainstructions"):
        data = vm.read_section(".parainstructions")
        for off in range(0, len(data) - 15, 16):
            instr, _type, length = struct.unpack_from("<QBB", data, off)
            if instr >= 1 << 63:
                instr = (instr + vm.slide) & _MASK64
            out.append(PatchedRange(instr, instr + max(length, 1), ".parainstructions"))
    out.sort(key=lambda r: r.start)
    return out


def stable_windows(vm: Vmlinux, count: int = 12, size: int = _WINDOW) -> list[int]:
    """Link-time addresses of ``count`` ``size``-byte windows of ``.text`` that no boot patch
    table touches, spread over the whole of ``.text`` (the first one at ``_text`` if clear)."""
    patched = boot_patched_ranges(vm)
    starts = [r.start for r in patched]
    ends_max: list[int] = []
    top = 0
    for r in patched:
        top = max(top, r.end)
        ends_max.append(top)

    def clear(addr: int) -> bool:
        i = bisect.bisect_left(starts, addr + size)  # ranges starting before the window ends
        return i == 0 or ends_max[i - 1] <= addr

    start, end = vm.text_range
    out: list[int] = []
    step = max((end - start - size) // count, size)
    for k in range(count):
        addr = start + k * step
        while addr + size <= end and not clear(addr):
            addr += 16
        if addr + size <= end:
            out.append(addr)
    return out


def find_kaslr_slide(
    read: ReadFn,
    vmlinux: Vmlinux,
    *,
    align: int = KASLR_ALIGN,
    windows: int = 12,
) -> int:
    """The slide (running ``_text`` minus the ELF's) found by matching ``.text`` bytes.

    ``vmlinux`` is the ELF at its link addresses (``slide`` 0). Candidates are tried with
    slide 0 first (``nokaslr``), then every ``align`` step of the kernel image window. A
    candidate wins when its first window matches and at least three quarters of the
    others do (relocated absolute addresses may spoil a few). Raises KaslrError, with what
    was seen, when no base matches.
    """
    if vmlinux.slide:
        raise KaslrError(
            f"find_kaslr_slide needs the unslid ELF (this one has slide {vmlinux.slide:#x})"
        )
    link_text = vmlinux.text_base
    offsets = [w - link_text for w in stable_windows(vmlinux, windows)]
    if not offsets:
        raise KaslrError(f"no stable .text window in {vmlinux.path}")
    expected = [vmlinux.read(link_text + off, _WINDOW) for off in offsets]
    lo = KERNEL_IMAGE_START - link_text
    hi = KERNEL_IMAGE_END - link_text
    candidates = [0, *(s for s in range(lo - lo % align, hi, align) if s != 0)]
    mapped = 0
    best: tuple[int, int] = (-1, 0)
    for slide in candidates:
        base = link_text + slide
        try:
            first = read(base + offsets[0], _WINDOW)
        except GuestMemoryError:
            continue
        mapped += 1
        if first != expected[0]:
            continue
        score = 1
        for off, want in zip(offsets[1:], expected[1:], strict=True):
            try:
                if read(base + off, _WINDOW) == want:
                    score += 1
            except GuestMemoryError:
                pass
        if score > best[0]:
            best = (score, slide)
        if 4 * score >= 3 * len(offsets):
            return slide
    detail = (
        f"best candidate slide {best[1]:#x} matched {best[0]}/{len(offsets)} windows"
        if best[0] > 0
        else "no candidate matched the first window"
    )
    raise KaslrError(
        f"kernel text of {vmlinux.path.name} not found in guest memory: {len(candidates)} "
        f"candidate bases, {mapped} mapped; {detail}"
    )


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
    slide = (handler - asm_exc_int3) & _MASK64
    if slide >= 1 << 63:
        slide -= 1 << 64
    if slide % align:
        raise KaslrError(
            f"#BP gate points at {handler:#x}, {slide:#x} from asm_exc_int3 ({asm_exc_int3:#x}):"
            f" not a multiple of {align:#x}, so not the slid asm_exc_int3"
        )
    return slide
