"""The debugfs ``kprobes/list`` lines of our probes, character for character as the kernel.

The kernel's ``report_probe()`` (kernel/kprobes.c) prints ``ADDR  TYPE  SYM+0xOFF  MOD ``
then the flags: TYPE ``r`` for a return probe's entry probe, ``k`` otherwise; MOD the
module's name, or a blank for the core kernel; ``[GONE]`` and ``[DISABLED]`` as ours
can be, and ``[FTRACE]`` for a probe on a function's ftrace site (the kernel places it
through ftrace, we past the NOP). ``[OPTIMIZED]`` names a jump-optimized probe; a probe
on an ftrace site is listed ``[FTRACE]`` alone, as the kernel lists its own, even when
our jump after the NOP is in (``ProbeSite.optimized`` says so). The kernel lists its
hash table, an order that says nothing; ours are listed by address.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kprobevm.kprobes.core import Kprobe, KprobeManager

__all__ = ["kprobes_list"]


def _line(addr: int, kind: str, place: str, flags: str) -> str:
    return f"{addr:016x}  {kind}  {place} {flags}"


def kprobes_list(manager: KprobeManager, return_entries: Collection[int] = ()) -> str:
    """Every probe of ``manager`` as debugfs ``kprobes/list`` prints it (ending in a
    newline when there is any); ``return_entries`` holds the ``id`` of each return
    probe's entry kprobe."""
    lines = []
    symbols = manager.symbols
    placed = [(kp.addr or site.addr, kp, site) for site in manager.table.values()
              for kp in site.probes if kp is not manager.modules.probe]  # fmt: skip
    for addr, kp, site in sorted(placed, key=lambda entry: entry[0]):
        sym = symbols.lookup(addr)
        if sym is None:
            place = f"{addr:#x}"
        else:
            place = f"{sym.name}+{addr - sym.address:#x}  {sym.module or ' '}"
        flags = "[DISABLED]" if kp.disabled or not site.armed else ""
        flags += "[OPTIMIZED]" if site.optimized and not kp.disabled and not kp.ftrace else ""
        flags += "[FTRACE]" if kp.ftrace else ""
        lines.append(_line(addr, _kind(kp, return_entries), place, flags))
    for kp in manager.gone:  # their module's symbols are gone with it
        lines.append(_line(kp.addr or 0, _kind(kp, return_entries), kp.where(), "[GONE]"))
    return "".join(line + "\n" for line in lines)


def _kind(kp: Kprobe, return_entries: Collection[int]) -> str:
    return "r" if id(kp) in return_entries else "k"
