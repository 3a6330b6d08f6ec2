"""The kprobe blacklist: kernel text where probes are refused, rebuilt on the host.

The kernel builds its list once at boot (``populate_kprobe_blacklist()`` in kernel/kprobes.c
and ``arch_populate_kprobe_blacklist()`` for x86), in this order:

1. every function named by ``NOKPROBE_SYMBOL()``: an array of addresses between
   ``__start_kprobe_blacklist`` and ``__stop_kprobe_blacklist`` in ``.init.data``, freed
   after boot, so kprobevm reads it from the vmlinux file; each address that is kernel text
   becomes ``[addr, addr + size of its kallsyms symbol)``;
2. every symbol of ``.kprobes.text`` (``__kprobes`` functions);
3. every symbol of ``.noinstr.text`` (``noinstr`` functions);
4. on x86, every symbol of ``.entry.text``.

Walking an area goes symbol by symbol with kallsyms sizes (``kprobe_add_area_blacklist``),
so the entries are those the guest's ``/sys/kernel/debug/kprobes/blacklist`` prints.
``within_kprobe_blacklist`` also refuses a suffixed copy (``foo.cold``, ``foo.isra.0``) of
a blacklisted ``foo``, as the kernel does. kprobevm adds its own refusals after the
kernel's (reason ``kprobevm``): ``__irqentry_text`` and ``__softirqentry_text`` where a
kernel still has them, the IDT, and whatever the engine registers (its stub and slots).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.errors import SymbolError, VmlinuxError
from kprobevm.x86.constants import MASK64

if TYPE_CHECKING:
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kernel.vmlinux import Vmlinux

__all__ = ["KERNEL_REASONS", "Blacklist", "BlacklistEntry"]

NOKPROBE = "NOKPROBE_SYMBOL"
KPROBES_TEXT = ".kprobes.text"
NOINSTR_TEXT = ".noinstr.text"
ENTRY_TEXT = ".entry.text"
KPROBEVM = "kprobevm"
KERNEL_REASONS = frozenset({NOKPROBE, KPROBES_TEXT, NOINSTR_TEXT, ENTRY_TEXT})
"""Reasons that come from the kernel's own list (what its debugfs file prints)."""

# (start symbol, end symbol, reason) of the kernel's area blacklists, in its order.
_KERNEL_AREAS = (
    ("__kprobes_text_start", "__kprobes_text_end", KPROBES_TEXT),
    ("__noinstr_text_start", "__noinstr_text_end", NOINSTR_TEXT),
    ("__entry_text_start", "__entry_text_end", ENTRY_TEXT),
)
# Areas older kernels (and other architectures) blacklist; kprobevm refuses them too.
_EXTRA_AREAS = (
    ("__irqentry_text_start", "__irqentry_text_end", KPROBEVM),
    ("__softirqentry_text_start", "__softirqentry_text_end", KPROBEVM),
)
_KERNEL_HALF = 1 << 63


@dataclass(frozen=True)
class BlacklistEntry:
    """``[start, end)`` refused for probes; ``symbol`` names it (``%ps``), ``reason`` says why."""

    start: int
    end: int
    symbol: str
    reason: str

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and self.start <= addr < self.end

    def format_debugfs(self) -> str:
        """One line of ``kprobes/blacklist``: ``0x%px-0x%px\\t%ps``."""
        return f"0x{self.start:016x}-0x{self.end:016x}\t{self.symbol}"


class Blacklist:
    """Where probes are refused: the kernel's list (same entries, same order) plus ours."""

    def __init__(
        self,
        entries: Iterable[BlacklistEntry],
        *,
        symbols: KernelSymbols | None = None,
        missing: Iterable[str] = (),
    ) -> None:
        self._entries = list(entries)
        self._symbols = symbols
        self.missing = list(missing)
        """Parts of the kernel's list that could not be rebuilt (and why)."""
        self._lock = threading.Lock()
        self._reindex()

    def _reindex(self) -> None:
        ordered = sorted(self._entries, key=lambda e: (e.start, e.end))
        self._sorted = ordered
        self._starts = [e.start for e in ordered]
        # Running maximum of ends: lets a lookup stop scanning back at the first entry
        # before which nothing can reach the address (entries may overlap).
        top = 0
        self._max_end = []
        for e in ordered:
            top = max(top, e.end)
            self._max_end.append(top)

    # -- building ----------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        syms: KernelSymbols,
        vmlinux: Vmlinux | None,
        *,
        idt: bool = True,
    ) -> Blacklist:
        """The kernel's blacklist rebuilt from kallsyms (running addresses) and the vmlinux.

        ``vmlinux`` must be the view at the running kernel's addresses (``with_slide``); without
        it the ``NOKPROBE_SYMBOL`` part cannot be read and is listed in ``missing``.
        """
        entries: list[BlacklistEntry] = []
        missing: list[str] = []
        if vmlinux is None:
            missing.append(
                "NOKPROBE_SYMBOL functions: the table is in .init.data, freed "
                "after boot, and no vmlinux ELF was given to read it from"
            )
        else:
            try:
                entries += _nokprobe_entries(syms, vmlinux)
            except (SymbolError, VmlinuxError) as exc:
                missing.append(f"NOKPROBE_SYMBOL functions: {exc}")
        for start_sym, end_sym, reason in _KERNEL_AREAS:
            if start_sym in syms and end_sym in syms:
                entries += _area_entries(syms, syms[start_sym], syms[end_sym], reason)
            else:
                missing.append(f"{reason}: {start_sym}/{end_sym} not in kallsyms")
        for start_sym, end_sym, reason in _EXTRA_AREAS:
            if start_sym in syms and end_sym in syms:
                entries += _area_entries(syms, syms[start_sym], syms[end_sym], reason)
        if idt and "idt_table" in syms:
            # The IDT is data (probes there are refused as non-text anyway); listed so that
            # an explicit `addr=` probe gets this reason.
            start = syms["idt_table"]
            entries.append(BlacklistEntry(start, start + 256 * 16, "idt_table", KPROBEVM))
        return cls(entries, symbols=syms, missing=missing)

    @classmethod
    def from_kernel_list(
        cls, syms: KernelSymbols, ranges: Iterable[tuple[int, int]], *, idt: bool = True
    ) -> Blacklist:
        """The kernel's own list as read from its memory (``[start, end)`` of each
        ``kprobe_blacklist_entry``, in list order, modules' entries included), then
        kprobevm's refusals as in :meth:`build`. An entry's reason is the area it lies in
        (``.kprobes.text``, ``.noinstr.text``, ``.entry.text``), else ``NOKPROBE_SYMBOL``."""
        areas = [(syms[a], syms[b], reason) for a, b, reason in _KERNEL_AREAS
                 if a in syms and b in syms]  # fmt: skip
        entries = []
        for start, end in ranges:
            reason = next((r for lo, hi, r in areas if lo <= start < hi), NOKPROBE)
            entries.append(BlacklistEntry(start, end, _name(syms, start), reason))
        for start_sym, end_sym, reason in _EXTRA_AREAS:
            if start_sym in syms and end_sym in syms:
                entries += _area_entries(syms, syms[start_sym], syms[end_sym], reason)
        if idt and "idt_table" in syms:
            start = syms["idt_table"]
            entries.append(BlacklistEntry(start, start + 256 * 16, "idt_table", KPROBEVM))
        return cls(entries, symbols=syms)

    def add(self, start: int, end: int, symbol: str, reason: str = KPROBEVM) -> BlacklistEntry:
        """Refuse ``[start, end)`` too (kprobevm's stub and slot pages); returns the entry."""
        entry = BlacklistEntry(start, end, symbol, reason)
        with self._lock:
            self._entries.append(entry)
            self._reindex()
        return entry

    def remove(self, entry: BlacklistEntry) -> None:
        """Withdraw an entry made by :meth:`add`."""
        with self._lock:
            self._entries.remove(entry)
            self._reindex()

    # -- queries -----------------------------------------------------------------------

    def _hit(self, addr: int) -> BlacklistEntry | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        while i >= 0 and self._max_end[i] > addr:
            entry = self._sorted[i]
            if addr < entry.end:
                return entry
            i -= 1
        return None

    def within_kprobe_blacklist(self, addr: int) -> BlacklistEntry | None:
        """The entry refusing a probe at ``addr``, or None.

        Like the kernel, a suffixed symbol (``foo.cold``, ``foo.constprop.0``) is refused when
        its base ``foo`` is.
        """
        hit = self._hit(addr)
        if hit is not None or self._symbols is None:
            return hit
        sym = self._symbols.lookup(addr)
        if sym is None or "." not in sym.name:
            return None
        base = sym.name.split(".", 1)[0]
        for other in self._symbols.all(base):
            if other.module == sym.module:
                hit = self._hit(other.address)
                if hit is not None:
                    return hit
        return None

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and self.within_kprobe_blacklist(addr) is not None

    def __iter__(self) -> Iterator[BlacklistEntry]:
        """Entries in the kernel's order (its list first, then kprobevm's)."""
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def format_debugfs(self, *, kernel_only: bool = False) -> str:
        """The ``/sys/kernel/debug/kprobes/blacklist`` text (``kernel_only``: just the kernel's)."""
        return "".join(
            e.format_debugfs() + "\n"
            for e in self._entries
            if not kernel_only or e.reason in KERNEL_REASONS
        )

    @staticmethod
    def parse_debugfs(text: str) -> list[tuple[int, int, str]]:
        """``(start, end, symbol)`` of each line of a debugfs ``kprobes/blacklist`` text."""
        out = []
        for line in text.splitlines():
            if not line.strip():
                continue
            rng, _, name = line.partition("\t")
            lo, _, hi = rng.partition("-")
            out.append((int(lo, 16), int(hi, 16), name.strip()))
        return out


def _name(syms: KernelSymbols, addr: int) -> str:
    """``%ps``: the symbol name, ``[module]`` appended for module symbols."""
    sym = syms.lookup(addr)
    if sym is None:
        return f"{addr:#x}"
    return sym.name if sym.module is None else f"{sym.name} [{sym.module}]"


def _ksym_entry(syms: KernelSymbols, addr: int, reason: str) -> BlacklistEntry | None:
    """``kprobe_add_ksym_blacklist``: ``[addr, addr + size of the containing symbol)``."""
    sym = syms.lookup(addr)
    if sym is None:
        return None
    return BlacklistEntry(addr, addr + sym.size, _name(syms, addr), reason)


def _area_entries(syms: KernelSymbols, start: int, end: int, reason: str) -> list[BlacklistEntry]:
    """``kprobe_add_area_blacklist``: one entry per symbol from ``start`` to ``end``."""
    out = []
    addr = start
    while addr < end:
        entry = _ksym_entry(syms, addr, reason)
        if entry is None:
            break  # the kernel gives up on the area at an address kallsyms cannot size
        out.append(entry)
        addr += max(entry.end - entry.start, 1)
    return out


def _nokprobe_entries(syms: KernelSymbols, vmlinux: Vmlinux) -> list[BlacklistEntry]:
    """Entries for the ``_kprobe_blacklist`` array, read from the ELF file (freed in the guest)."""
    start = syms["__start_kprobe_blacklist"]
    stop = syms["__stop_kprobe_blacklist"]
    if stop < start or (stop - start) % 8:
        raise VmlinuxError(
            f"_kprobe_blacklist bounds {start:#x}..{stop:#x} are not an array of addresses"
        )
    data = vmlinux.read(start, stop - start)
    out = []
    for off in range(0, len(data), 8):
        link_addr = int.from_bytes(data[off : off + 8], "little")
        # The file holds link-time addresses; the kernel relocated them when it slid.
        addr = (link_addr + vmlinux.slide) & MASK64 if link_addr >= _KERNEL_HALF else link_addr
        sec = vmlinux.section_for(addr)
        if sec is None or not sec.is_exec:
            continue  # not kernel text: the kernel skips it too (-EINVAL)
        entry = _ksym_entry(syms, addr, NOKPROBE)
        if entry is not None:
            out.append(entry)
    return out
