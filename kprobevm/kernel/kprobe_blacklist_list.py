"""The kernel's kprobe blacklist as it keeps it: the ``kprobe_blacklist`` list in memory.

``populate_kprobe_blacklist()`` fills the list at boot (``NOKPROBE_SYMBOL`` functions, the
``.kprobes.text``, ``.noinstr.text`` and x86 ``.entry.text`` areas), and module loading
adds each module's own; debugfs ``kprobes/blacklist`` prints the list in its order. Read
from memory, it needs neither the vmlinux (the ``NOKPROBE_SYMBOL`` table is freed after
boot) nor SSH. The entry's layout comes from the kernel's BTF.
"""

from __future__ import annotations

from collections.abc import Callable

from kprobevm.kernel.btf import Btf
from kprobevm.kernel.module_kallsyms import list_for_each

__all__ = ["kprobe_blacklist_ranges"]


def kprobe_blacklist_ranges(
    read: Callable[[int, int], bytes], head: int, btf: Btf
) -> list[tuple[int, int]]:
    """``(start_addr, end_addr)`` of each ``struct kprobe_blacklist_entry`` on the list at
    ``head`` (the kernel's ``kprobe_blacklist``), in list order."""
    node_at = btf.struct_member_offset("kprobe_blacklist_entry", "list")
    start_at = btf.struct_member_offset("kprobe_blacklist_entry", "start_addr")
    end_at = btf.struct_member_offset("kprobe_blacklist_entry", "end_addr")
    lo, hi = min(start_at, end_at), max(start_at, end_at) + 8
    out = []
    for node in list_for_each(read, head, "kprobe_blacklist"):
        raw = read(node - node_at + lo, hi - lo)
        start = int.from_bytes(raw[start_at - lo : start_at - lo + 8], "little")
        end = int.from_bytes(raw[end_at - lo : end_at - lo + 8], "little")
        out.append((start, end))
    return out
