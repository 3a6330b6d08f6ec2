"""HitReader: reads sent ahead with the register read serve the hit; the rest go out as usual."""

from __future__ import annotations

from collections.abc import Sequence

from kprobevm.gdbstub.memory import GuestMemory
from kprobevm.gdbstub.readahead import HitReader, ReadPredictor
from kprobevm.x86.ptregs import PtRegs

RAM = {0x1000 + i: (i * 7) & 0xFF for i in range(0x100)}


class Transport:
    """Guest memory as a dict; counts the reads that reach it."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []

    def read_memory(self, addr: int, n: int) -> bytes:
        self.reads.append((addr, n))
        return bytes(RAM[a] for a in range(addr, addr + n))

    def write_memory(self, addr: int, data: bytes) -> None:
        raise AssertionError("no writes")

    read_phys = read_memory
    write_phys = write_memory


def along(packets: Sequence[bytes]) -> tuple[dict[str, int], list[bytes]]:
    """The stub's answers: a register file and each m packet, E14 where unmapped."""
    replies = []
    for p in packets:
        addr, n = (int(x, 16) for x in p[1:].split(b","))
        if all(a in RAM for a in range(addr, addr + n)):
            replies.append(bytes(RAM[a] for a in range(addr, addr + n)).hex().encode())
        else:
            replies.append(b"E14")
    return {"rdi": 0x1010, "rip": 1}, replies


def test_batch_serves_what_falls_inside_and_nothing_else() -> None:
    transport = Transport()
    regs = PtRegs.lazy(lambda: {}, known={"ip": 5}, cpu=0, along=along)
    reader = HitReader(GuestMemory(transport))
    reader.read_ahead(regs, [(0x1010, 0x20), (0x9000, 8)])  # the second is unmapped
    assert regs.loaded and regs.di == 0x1010 and regs.ip == 5
    assert reader.read(0x1018, 8) == bytes(RAM[a] for a in range(0x1018, 0x1020))
    assert reader.u64(0x1010) == int.from_bytes(bytes(RAM[a] for a in range(0x1010, 0x1018)),
                                                 "little")
    assert transport.reads == []  # both served from the batch
    reader.read(0x102C, 8)  # runs past the batch: read from the guest
    assert transport.reads == [(0x102C, 8)]
    assert reader.served == 2 and reader.reads[-1] == (0x102C, 8)


def test_no_batch_once_registers_are_read() -> None:
    transport = Transport()
    regs = PtRegs.from_gdb({"rdi": 1}, cpu=0)
    reader = HitReader(GuestMemory(transport))
    reader.read_ahead(regs, [(0x1000, 8)])
    reader.read(0x1000, 8)
    assert transport.reads == [(0x1000, 8)] and reader.served == 0


def test_predictor_remembers_per_vcpu() -> None:
    p = ReadPredictor()
    p.remember(1, [(0x10, 8), (0x20, 4), (0x10, 8)])
    assert p.guess(1) == ((0x10, 8), (0x20, 4)) and p.guess(0) == ()
