"""GuestMemory: typed reads and writes of guest memory through the gdbstub.

Virtual addresses are read in the context of the gdbstub's current vCPU (its CR3);
physical ones through QEMU's ``PhyMemMode``. QEMU answers ``E14`` (EFAULT) for an ``m``
at an address it cannot translate or reach: that becomes :class:`GuestFaultError`.
Where guest RAM is shared with the host, a :class:`DirectMemory` answers reads first,
at memory speed; writes always go through the gdbstub (TCG must see code writes).
"""

from __future__ import annotations

from typing import Protocol

from kprobevm.errors import GdbErrorReply, GuestFaultError
from kprobevm.gdbstub.packet import parse_memory_request
from kprobevm.x86.constants import PAGE_SIZE

__all__ = ["EFAULT", "DirectMemory", "GuestMemory", "MemoryTransport"]

EFAULT = 0x0E
"""The errno QEMU's gdbstub puts in ``Exx`` when guest memory cannot be accessed."""


class MemoryTransport(Protocol):
    """What GuestMemory needs from a transport (every GdbTransport fits)."""

    def read_memory(self, addr: int, n: int) -> bytes: ...
    def write_memory(self, addr: int, data: bytes) -> None: ...
    def read_phys(self, addr: int, n: int) -> bytes: ...
    def write_phys(self, addr: int, data: bytes) -> None: ...


class DirectMemory(Protocol):
    """Guest memory with no gdbstub (guest RAM mapped on the host), the VM running or not.
    Reads return None, and a data write False, where the gdbstub must do it instead."""

    def read_virt(self, addr: int, n: int) -> bytes | None: ...
    def read_phys(self, paddr: int, n: int) -> bytes | None: ...
    def write_data(self, addr: int, data: bytes) -> bool: ...


class GuestMemory:
    """Guest memory by address: bytes, fixed-width integers, bounded C strings."""

    def __init__(self, transport: MemoryTransport, direct: DirectMemory | None = None) -> None:
        self.transport = transport
        self.direct = direct
        """Where reads go first (None: every read is a gdbstub round trip)."""

    # -- bytes -------------------------------------------------------------------------

    def read(self, addr: int, n: int) -> bytes:
        """``n`` bytes at virtual ``addr``."""
        if self.direct is not None and (data := self.direct.read_virt(addr, n)) is not None:
            return data
        try:
            return self.transport.read_memory(addr, n)
        except GdbErrorReply as exc:
            raise _fault(exc, addr, "not mapped") from exc

    def write(self, addr: int, data: bytes) -> None:
        """Write ``data`` at virtual ``addr`` (read-only kernel pages too: QEMU writes
        through the debug path)."""
        try:
            self.transport.write_memory(addr, data)
        except GdbErrorReply as exc:
            raise _fault(exc, addr, "not mapped") from exc

    def read_phys(self, paddr: int, n: int) -> bytes:
        """``n`` bytes at guest-physical ``paddr``."""
        if self.direct is not None and (data := self.direct.read_phys(paddr, n)) is not None:
            return data
        try:
            return self.transport.read_phys(paddr, n)
        except GdbErrorReply as exc:
            raise _fault(exc, paddr, "no guest RAM") from exc

    def write_phys(self, paddr: int, data: bytes) -> None:
        """Write ``data`` at guest-physical ``paddr``."""
        try:
            self.transport.write_phys(paddr, data)
        except GdbErrorReply as exc:
            raise _fault(exc, paddr, "no guest RAM") from exc

    # -- integers ----------------------------------------------------------------------

    def _uint(self, addr: int, size: int, signed: bool = False) -> int:
        return int.from_bytes(self.read(addr, size), "little", signed=signed)

    def u8(self, addr: int) -> int:
        """``u8`` at ``addr``."""
        return self._uint(addr, 1)

    def u16(self, addr: int) -> int:
        """``u16`` at ``addr`` (little-endian)."""
        return self._uint(addr, 2)

    def u32(self, addr: int) -> int:
        """``u32`` at ``addr``."""
        return self._uint(addr, 4)

    def u64(self, addr: int) -> int:
        """``u64`` at ``addr``."""
        return self._uint(addr, 8)

    def s8(self, addr: int) -> int:
        """``s8`` at ``addr``."""
        return self._uint(addr, 1, True)

    def s16(self, addr: int) -> int:
        """``s16`` at ``addr``."""
        return self._uint(addr, 2, True)

    def s32(self, addr: int) -> int:
        """``s32`` at ``addr``."""
        return self._uint(addr, 4, True)

    def s64(self, addr: int) -> int:
        """``s64`` at ``addr``."""
        return self._uint(addr, 8, True)

    def _write_int(self, addr: int, value: int, size: int) -> None:
        # Accept either signedness: a negative value is stored in two's complement.
        if not -(1 << (8 * size - 1)) <= value < (1 << (8 * size)):
            raise ValueError(f"{value} does not fit in {size} bytes")
        self.write(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def write_u8(self, addr: int, value: int) -> None:
        """Store one byte."""
        self._write_int(addr, value, 1)

    def write_u16(self, addr: int, value: int) -> None:
        """Store a 16-bit value."""
        self._write_int(addr, value, 2)

    def write_u32(self, addr: int, value: int) -> None:
        """Store a 32-bit value."""
        self._write_int(addr, value, 4)

    def write_u64(self, addr: int, value: int) -> None:
        """Store a 64-bit value."""
        self._write_int(addr, value, 8)

    # -- strings -----------------------------------------------------------------------

    def cstring(self, addr: int, max_len: int = 4096) -> bytes:
        """The NUL-terminated string at ``addr`` (without the NUL), at most ``max_len`` bytes.

        Reads page by page, so a string ending just before an unmapped page reads fine.
        """
        out = bytearray()
        while len(out) < max_len:
            page_left = PAGE_SIZE - (addr & (PAGE_SIZE - 1))
            n = min(page_left, max_len - len(out), 256 if not out else PAGE_SIZE)
            chunk = self.read(addr, n)
            nul = chunk.find(b"\0")
            if nul >= 0:
                out += chunk[:nul]
                return bytes(out)
            out += chunk
            addr += n
        return bytes(out[:max_len])


def _fault(exc: GdbErrorReply, addr: int, reason: str) -> GuestFaultError:
    """The fault at the chunk the stub refused (chunks never cross a page)."""
    where = addr
    if exc.sent is not None and exc.sent[:1] in (b"m", b"M"):
        where = parse_memory_request(exc.sent)[0]
    if exc.code != EFAULT:
        reason = f"{reason} (gdbstub E{exc.code:02x})"
    return GuestFaultError(where, reason)
