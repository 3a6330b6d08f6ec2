"""What a harness round must leave as it found: a guest's probed text, IDT gate 3 and
the slot PMD entry, read through a short gdbstub connection (the session under test, a
separate process, needs the stub to itself the rest of the time), and a console with no
sign of kernel trouble."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kprobevm.gdbstub.client import GdbClient
from kprobevm.guest.console import kernel_trouble
from kprobevm.kernel.kallsyms import KernelSymbols
from kprobevm.x86.pagetable import la57_enabled
from kprobevm.x86.slotmap import find_slot_pmd

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = ["GuestFacts", "console_trouble", "guest_facts", "read_state"]

@dataclass(frozen=True)
class GuestFacts:
    """What the session's process needs to attach, and where the checked bytes are."""

    gdb: str
    kallsyms: Path
    cmdline: str
    vmlinux: Path
    places: dict[str, tuple[int, int]]
    """What a round must leave as it found: name -> (address, size), virtual."""
    before: dict[str, bytes]
    """:func:`read_state` when the facts were gathered."""


def guest_facts(vm: VM, directory: Path, functions: Iterable[str]) -> GuestFacts:
    """Files for the session's process (kallsyms in ``directory``), and the state of
    ``functions``' text, the #BP gate and the slot PMD entry now."""
    kallsyms = directory / "kallsyms"
    kallsyms.write_text(vm.read_file("/proc/kallsyms"))
    gdb = vm.endpoints.gdb
    if not isinstance(gdb, str) or vm.vmlinux_path is None:
        raise ValueError("a guest booted by kprobevm (unix gdbstub, image vmlinux) is needed")
    syms = KernelSymbols.from_file(kallsyms)
    places = {name: (syms[name], syms.size(name)) for name in dict.fromkeys(functions)}
    places["idt_gate_3"] = (syms["idt_table"] + 3 * 16, 16)
    facts = GuestFacts(gdb, kallsyms, vm.read_file("/proc/cmdline").strip(), vm.vmlinux_path,
                       places, {})
    facts.before.update(read_state(facts))
    return facts


def read_state(facts: GuestFacts) -> dict[str, bytes]:
    """The places' bytes and the PMD entry a slot area would take (VM stopped briefly)."""
    client = GdbClient.connect(facts.gdb, timeout=15.0)
    try:
        state = {name: client.read_memory(addr, size)
                 for name, (addr, size) in facts.places.items()}  # fmt: skip
        regs = client.read_registers()
        _, pmd = find_slot_pmd(client.read_phys, regs["cr3"], la57=la57_enabled(regs["cr4"]))
        state[f"slot PMD entry {pmd:#x}"] = client.read_phys(pmd, 8)
        return state
    finally:
        client.detach()


def console_trouble(vm: VM, start: int = 0) -> tuple[str, ...]:
    """The serial console's lines from offset ``start`` on that show kernel trouble."""
    return tuple(kernel_trouble(vm.serial_log()[start:]))
