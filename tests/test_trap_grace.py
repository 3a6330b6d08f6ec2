"""The quiescence check behind slot reuse, on a stand-in for a stopped guest: a vCPU
whose previous byte cannot be read is "not known quiescent", never an error."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

from kprobevm.errors import GuestFaultError
from kprobevm.trap.grace import Quiescence

PAGE = 0xFFFFFFFFFEE00000
"""The first byte of a page whose predecessor is not mapped."""


@dataclass
class _Client:
    regs: dict[str, dict[str, int]]

    def read_registers(self, *, thread: str, wide: bool) -> dict[str, int]:
        return self.regs[thread]


@dataclass
class _Target:
    client: _Client


@dataclass
class _Memory:
    bytes_at: dict[int, bytes] = field(default_factory=dict)

    def read(self, addr: int, n: int) -> bytes:
        if addr not in self.bytes_at:
            raise GuestFaultError(addr, "not mapped (gdbstub E14)")
        return self.bytes_at[addr]


def test_a_vcpu_at_the_start_of_a_page_after_a_hole_is_not_known_quiescent() -> None:
    client = _Client({
        "p1.1": {"cs": 0x10, "rip": PAGE},  # kernel mode, previous byte unmapped
        "p1.2": {"cs": 0x10, "rip": 0xFFFFFFFF81001001},  # right after a hlt
        "p1.3": {"cs": 0x33, "rip": 0x401000},  # user mode
    })  # fmt: skip
    memory = _Memory({0xFFFFFFFF81001000: b"\xf4"})
    q = Quiescence(_Target(client), memory, ["p1.1", "p1.2", "p1.3"])  # type: ignore[arg-type]
    q.observe()
    assert set(q.last_quiescent) == {"p1.2", "p1.3"}
    assert not q.grace_over(0.0)  # p1.1 was never seen quiescent


def test_a_vcpu_in_our_own_code_is_never_quiescent_whatever_byte_precedes_it() -> None:
    """0xf4 before RIP inside the stub is an address byte, not a hlt."""
    stub = 0xFFFFFFFFFE000000
    client = _Client({"p1.1": {"cs": 0x10, "rip": stub + 0x31}})
    memory = _Memory({stub + 0x30: b"\xf4"})
    q = Quiescence(_Target(client), memory, ["p1.1"],  # type: ignore[arg-type]
                   ours=lambda rip: stub <= rip < stub + 0x200000)  # fmt: skip
    q.observe()
    assert not q.last_quiescent


class _RunningTarget:
    """A guest whose one vCPU, outside the slot area, stays in kernel mode (in an
    interrupt handler, say) for two resumes, then returns to user mode."""

    def __init__(self) -> None:
        self.resumes = 0
        self.client = self

    @contextlib.contextmanager
    def stopped(self) -> Iterator[_RunningTarget]:
        yield self

    def resume(self) -> None:
        self.resumes += 1

    def threads(self) -> list[str]:
        return ["p1.1"]

    def read_registers(self, *, thread: str, wide: bool) -> dict[str, int]:
        return {"cs": 0x33 if self.resumes >= 2 else 0x10, "rip": 0xFFFFFFFF81001234}

    def read_register_each(self, name: str, threads: list[str]) -> dict[str, int]:
        return {t: self.read_registers(thread=t, wide=False)[name] for t in threads}


def test_the_area_is_let_go_only_once_each_vcpu_was_seen_quiescent() -> None:
    """RIP outside the area is not enough: an interrupt handler may return into a slot."""
    target = _RunningTarget()
    q = Quiescence(target, _Memory(), ["p1.1"])  # type: ignore[arg-type]
    area = SimpleNamespace(contains=lambda rip: 0xFFFFFFFFFEE00000 <= rip < 0xFFFFFFFFFF000000)
    q.wait_until_out_of(area)  # type: ignore[arg-type]
    assert target.resumes == 2
