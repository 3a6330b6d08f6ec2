"""GuestMemory over the fake stub: integers, strings, faults."""

from __future__ import annotations

import pytest

from kprobevm.errors import GuestFaultError
from kprobevm.gdbstub.client import GdbClient
from kprobevm.gdbstub.memory import GuestMemory
from tests.fakestub import RAM_BASE, RAM_SIZE, FakeStub, QemuLike


@pytest.fixture
def mem() -> tuple[GuestMemory, QemuLike]:
    target = QemuLike()
    stub = FakeStub(target)
    client = GdbClient(stub.client_sock, timeout=1.0)
    client.handshake()
    return GuestMemory(client), target


def test_integers_signed_and_unsigned(mem: tuple[GuestMemory, QemuLike]) -> None:
    m, t = mem
    t.ram[0:8] = bytes.fromhex("feffffff80000000")
    assert m.u8(RAM_BASE) == 0xFE and m.s8(RAM_BASE) == -2
    assert m.u16(RAM_BASE) == 0xFFFE and m.s16(RAM_BASE) == -2
    assert m.u32(RAM_BASE) == 0xFFFFFFFE and m.s32(RAM_BASE) == -2
    assert m.u64(RAM_BASE) == 0x80FFFFFFFE and m.s64(RAM_BASE) == 0x80FFFFFFFE
    m.write_u64(RAM_BASE + 8, -1)
    assert m.u64(RAM_BASE + 8) == 2**64 - 1
    m.write_u16(RAM_BASE + 16, 0xBEEF)
    assert t.ram[16:18] == b"\xef\xbe"
    m.write_u32(RAM_BASE + 20, 7)
    m.write_u8(RAM_BASE + 24, 255)
    assert m.u32(RAM_BASE + 20) == 7 and m.u8(RAM_BASE + 24) == 255
    with pytest.raises(ValueError):
        m.write_u8(RAM_BASE, 256)


def test_cstring_bounded_and_across_pages(mem: tuple[GuestMemory, QemuLike]) -> None:
    m, t = mem
    t.ram[0x100:0x106] = b"hello\0"
    assert m.cstring(RAM_BASE + 0x100) == b"hello"
    assert m.cstring(RAM_BASE + 0x100, max_len=3) == b"hel"
    long = b"x" * 5000 + b"\0"
    t.ram[0x1F00:0x1F00 + len(long)] = long
    assert m.cstring(RAM_BASE + 0x1F00, max_len=10000) == b"x" * 5000
    # A string that ends right before unmapped memory reads fine.
    end = RAM_BASE + RAM_SIZE
    t.ram[-4:] = b"abc\0"
    assert m.cstring(end - 4) == b"abc"


def test_unmapped_address_raises_guest_fault(mem: tuple[GuestMemory, QemuLike]) -> None:
    m, t = mem
    end = RAM_BASE + RAM_SIZE
    t.ram[-3:] = b"abc"
    with pytest.raises(GuestFaultError) as exc:
        m.read(end - 16, 64)  # the second chunk is outside RAM
    assert exc.value.address == end
    with pytest.raises(GuestFaultError):
        m.u64(0x10)
    with pytest.raises(GuestFaultError):
        m.write(0x10, b"x")
    with pytest.raises(GuestFaultError):
        m.cstring(end - 3)  # no NUL before the end of RAM


def test_physical_access(mem: tuple[GuestMemory, QemuLike]) -> None:
    m, t = mem
    m.write_phys(RAM_BASE + 0x40, b"phys")
    assert t.ram[0x40:0x44] == b"phys" and t.phys
    assert m.read_phys(RAM_BASE + 0x40, 4) == b"phys"
    assert m.read(RAM_BASE + 0x40, 4) == b"phys" and not t.phys
