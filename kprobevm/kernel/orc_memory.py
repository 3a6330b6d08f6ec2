"""Where the running guest kernel keeps its ORC tables, for the walk the guest runs itself.

:mod:`kprobevm.x86.orc_walk` reads the kernel's own ``.orc_unwind_ip``, ``.orc_unwind``
and ``orc_lookup`` in guest memory; this finds them by kallsyms (the KASLR slide is in
the addresses already), with the bounds of core and init text, the entry layout of the
kernel's version, and the per-CPU and ``task_struct`` offsets that bound the stack reads.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kprobevm.errors import KprobeError
from kprobevm.kernel.btf import BtfError, percpu_location
from kprobevm.kernel.orc import banner_version, orc_format
from kprobevm.x86.orc_walk import OrcWalkTables

if TYPE_CHECKING:
    from collections.abc import Callable

    from kprobevm.kernel.btf import Btf
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kernel.tasks import TaskLayout

__all__ = ["orc_walk_tables"]

log = logging.getLogger(__name__)

_SYMBOLS = (
    "_stext", "_etext", "_sinittext", "_einittext", "__start_orc_unwind_ip",
    "__stop_orc_unwind_ip", "__start_orc_unwind", "orc_lookup", "orc_lookup_end",
)  # fmt: skip


def orc_walk_tables(
    symbols: KernelSymbols,
    btf: Btf | None,
    tasks: TaskLayout | None,
    thread_size: int,
    read: Callable[[int, int], bytes],
) -> OrcWalkTables:
    """The guest's tables for the in-guest walk; KprobeError says what is missing."""
    missing = [name for name in _SYMBOLS if symbols.get(name) is None]
    if missing:
        raise KprobeError("a count by stack needs the kernel's ORC symbols: no "
                          + ", ".join(missing))
    if btf is None or tasks is None or not tasks.stack:
        raise KprobeError("a count by stack needs the kernel's BTF (task_struct.stack)")
    try:
        irq = percpu_location(symbols, btf, (("pcpu_hot", "hardirq_stack_ptr"),
                                             ("hardirq_stack_ptr", None)))  # fmt: skip
    except BtfError as exc:
        raise KprobeError(f"a count by stack needs the IRQ stack's per-CPU pointer: {exc}") from exc
    s = {name: symbols[name] for name in _SYMBOLS}
    # orc_lookup is filled by the kernel at boot (unwind_init), which sets orc_init last;
    # a kernel whose tables failed its checks leaves it false, and so the lookup unfilled
    ready = symbols.get("orc_init")
    if ready is None:
        log.warning("kallsyms has no orc_init: whether the kernel filled orc_lookup at boot"
                    " is not checked")  # fmt: skip
    elif not read(ready, 1)[0]:
        raise KprobeError("the guest kernel disabled its ORC unwinder at boot (orc_init is"
                          " false): its orc_lookup table is not filled")  # fmt: skip
    banner = read(symbols["linux_banner"], 256).split(b"\0", 1)[0].decode("ascii", "replace")
    fmt = orc_format(banner_version(banner))
    count = (s["__stop_orc_unwind_ip"] - s["__start_orc_unwind_ip"]) // 4
    return OrcWalkTables(
        text=(s["_stext"], s["_etext"]),
        init_text=(s["_sinittext"], s["_einittext"]),
        ip_table=s["__start_orc_unwind_ip"],
        entries=s["__start_orc_unwind"],
        count=count,
        lookup=s["orc_lookup"],
        lookup_blocks=(s["orc_lookup_end"] - s["orc_lookup"]) // 4,
        signal_bit=fmt.signal_bit,
        indirect_offset_after=fmt.indirect_offset_after,
        thread_size=thread_size,
        task_stack=tasks.stack,
        irq_stack_ptr=irq.offset,
        current_task=tasks.current,
    )
