"""The quiescence check behind slot reuse, on a stand-in for a stopped guest: a vCPU
whose previous byte cannot be read is "not known quiescent", never an error."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from kprobevm.errors import GdbErrorReply, KprobeError
from kprobevm.trap.grace import Quiescence

PAGE = 0xFFFFFFFFFEE00000
"""The first byte of a page whose predecessor is not mapped."""


@dataclass
class _Client:
    regs: dict[str, dict[str, int]]
    bytes_at: dict[int, bytes] = field(default_factory=dict)

    def read_registers(self, *, thread: str, wide: bool) -> dict[str, int]:
        return self.regs[thread]

    def threads(self) -> list[str]:
        return list(self.regs)

    def read_register_each(self, name: str, threads: list[str]) -> dict[str, int]:
        return {t: self.regs[t][name] for t in threads}

    def read_memory(self, addr: int, n: int) -> bytes:
        if addr not in self.bytes_at:
            raise GdbErrorReply(0x14, sent=b"m%x,%x" % (addr, n))  # not mapped
        return self.bytes_at[addr]


@dataclass
class _Target:
    client: _Client


def test_a_vcpu_at_the_start_of_a_page_after_a_hole_is_not_known_quiescent() -> None:
    client = _Client({
        "p1.1": {"cs": 0x10, "rip": PAGE},  # kernel mode, previous byte unmapped
        "p1.2": {"cs": 0x10, "rip": 0xFFFFFFFF81001001},  # right after the idle sti; hlt
        "p1.3": {"cs": 0x33, "rip": 0x401000},  # user mode
    }, {0xFFFFFFFF81000FFF: b"\xfb\xf4"})  # fmt: skip
    q = Quiescence(_Target(client), ["p1.1", "p1.2", "p1.3"])  # type: ignore[arg-type]
    q.observe()
    assert set(q.last_quiescent) == {"p1.2", "p1.3"}
    assert not q.grace_over(0.0)  # p1.1 was never seen quiescent


def test_a_vcpu_after_an_instruction_ending_in_0xf4_is_not_idle() -> None:
    """``mov %eax,-0xc(%rbp)`` (89 45 f4) ends in the hlt opcode: a vCPU stopped right
    after it runs kernel code (one was seen so in path_init, inside an open)."""
    client = _Client({"p1.1": {"cs": 0x10, "rip": 0xFFFFFFFF81001003}},
                     {0xFFFFFFFF81001001: b"\x45\xf4", 0xFFFFFFFF81001002: b"\xf4"})  # fmt: skip
    q = Quiescence(_Target(client), ["p1.1"])  # type: ignore[arg-type]
    q.observe()
    assert not q.last_quiescent


def test_a_vcpu_in_our_own_code_is_never_quiescent_whatever_byte_precedes_it() -> None:
    """0xf4 before RIP inside the stub is an address byte, not a hlt."""
    stub = 0xFFFFFFFFFE000000
    client = _Client({"p1.1": {"cs": 0x10, "rip": stub + 0x31}}, {stub + 0x30: b"\xf4"})
    q = Quiescence(_Target(client), ["p1.1"],  # type: ignore[arg-type]
                   ours=lambda rip: stub <= rip < stub + 0x200000)  # fmt: skip
    q.observe()
    assert not q.last_quiescent


@dataclass
class _RunningTarget:
    """Run control whose vCPUs move on only through ``moves`` (one state per resume)."""

    client: _Client
    moves: list[dict[str, dict[str, int]]]
    resumes: int = 0

    @contextlib.contextmanager
    def stopped(self) -> Iterator[_Client]:
        yield self.client

    def resume(self) -> None:
        self.resumes += 1
        if self.moves:
            self.client.regs = self.moves.pop(0)


def test_an_area_is_left_only_when_every_vcpu_was_quiescent_since() -> None:
    """No RIP in the area is not enough: a vCPU in kernel code may be in an interrupt
    taken inside a slot. The wait ends when each vCPU has been in user mode or idle."""
    area = SimpleNamespace(contains=lambda rip: rip >= 0xFFFFFFFFFE000000)
    kernel = {"cs": 0x10, "rip": 0xFFFFFFFF81234567}  # outside the area, not quiescent
    user = {"cs": 0x33, "rip": 0x401000}
    target = _RunningTarget(_Client({"p1.1": kernel, "p1.2": user}),
                            [{"p1.1": kernel, "p1.2": kernel}, {"p1.1": user, "p1.2": kernel}])
    q = Quiescence(target, ["p1.1", "p1.2"], ours=area.contains)  # type: ignore[arg-type]
    q.wait_until_out_of(area, timeout=5.0)  # type: ignore[arg-type]
    assert target.resumes == 2  # p1.2 quiescent first, p1.1 two resumes later

    stuck = _RunningTarget(_Client({"p1.1": kernel}), [])
    q = Quiescence(stuck, ["p1.1"], ours=area.contains)  # type: ignore[arg-type]
    with pytest.raises(KprobeError, match="never seen quiescent"):
        q.wait_until_out_of(area, timeout=0.1)  # type: ignore[arg-type]
