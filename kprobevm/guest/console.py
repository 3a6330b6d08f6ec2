"""What a guest kernel in trouble says on its serial console.

x86's ``die()`` names the trap on an oops's first line (``int3:``, ``general protection
fault:``, ``invalid opcode:``); a bad page fault says ``BUG:`` and ``Oops:``; a panic says
``Kernel panic``. ``panic=-1`` on the kernel command line is no trouble.
"""

from __future__ import annotations

import re

__all__ = ["KERNEL_TROUBLE", "kernel_trouble"]

KERNEL_TROUBLE = re.compile(r"int3:|Oops|BUG:|general protection|invalid opcode:|\bpanic\b(?!=)")


def kernel_trouble(text: str) -> list[str]:
    """The lines of a console log that show an oops, a BUG, a fault, an int3 or a panic."""
    return [line for line in text.splitlines() if KERNEL_TROUBLE.search(line)]
