"""Where user space ends and the kernel's half begins: set by the paging mode.

With 4-level paging virtual addresses have 48 bits, with 5-level (CR4.LA57) 57, and the
kernel's limits move with them (``TASK_SIZE_MAX`` is ``(1 << 47) - PAGE_SIZE`` or
``(1 << 56) - PAGE_SIZE``; the kernel half starts at the lowest canonical address with
the top bit set). The mode is the guest's: read it from a vCPU's CR4, never assume it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kprobevm.x86.constants import MASK64, PAGE_SIZE
from kprobevm.x86.pagetable import la57_enabled

__all__ = ["FIVE_LEVEL", "FOUR_LEVEL", "AddressSpace"]


@dataclass(frozen=True)
class AddressSpace:
    """The user/kernel split of an x86-64 kernel in one paging mode."""

    la57: bool
    """5-level paging (57-bit virtual addresses)."""

    @classmethod
    def from_cr4(cls, cr4: int) -> AddressSpace:
        """The split a vCPU with this CR4 runs under."""
        return FIVE_LEVEL if la57_enabled(cr4) else FOUR_LEVEL

    @property
    def virtual_bits(self) -> int:
        return 57 if self.la57 else 48

    @property
    def task_size_max(self) -> int:
        """The kernel's ``TASK_SIZE_MAX``: a 64-bit task's user space ends here (one
        guard page below the non-canonical hole)."""
        return (1 << (self.virtual_bits - 1)) - PAGE_SIZE

    @property
    def kernel_start(self) -> int:
        """The lowest canonical kernel-half address."""
        return MASK64 & ~((1 << (self.virtual_bits - 1)) - 1)

    def kernel_read_allowed(self, address: int) -> bool:
        """x86-64 ``copy_from_kernel_nofault_allowed()``: canonical kernel-half addresses
        only, so a kernel read of a user pointer faults."""
        return address & MASK64 >= self.kernel_start

    def user_read_allowed(self, address: int, size: int) -> bool:
        """``access_ok()`` of a ``size``-byte user read at ``address``."""
        return (address & MASK64) + size <= self.task_size_max


FOUR_LEVEL = AddressSpace(la57=False)
FIVE_LEVEL = AddressSpace(la57=True)
