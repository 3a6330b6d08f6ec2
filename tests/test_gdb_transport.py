"""GdbTransport: both gdbstub clients are one (mypy checks the assignments below)."""

from __future__ import annotations

import inspect

import pytest

from kprobevm.gdbstub import GdbTransport
from kprobevm.gdbstub.client import GdbClient
from kprobevm.gdbstub.gdbmi_client import GdbMiClient
from kprobevm.gdbstub.memory import MemoryTransport

# The type checker's proof: each client class is a GdbTransport, and a GdbTransport is
# what GuestMemory needs.
_rsp: type[GdbTransport] = GdbClient
_mi: type[GdbTransport] = GdbMiClient
_memory: type[MemoryTransport] = GdbClient


def _members() -> list[str]:
    names = [n for n in vars(GdbTransport) if not n.startswith("_")]
    return sorted({*names, *GdbTransport.__annotations__})


@pytest.mark.parametrize("cls", [GdbClient, GdbMiClient])
def test_clients_have_every_member_with_the_same_parameters(cls: type) -> None:
    for name in _members():
        if name in GdbTransport.__annotations__:
            continue  # a plain attribute, set per instance
        proto, impl = getattr(GdbTransport, name), getattr(cls, name)
        if isinstance(proto, property):
            assert isinstance(impl, property), name
            continue
        want = inspect.signature(proto)
        got = inspect.signature(impl)
        assert list(got.parameters) == list(want.parameters), (cls.__name__, name)
        for p in want.parameters.values():
            assert got.parameters[p.name].kind == p.kind, (cls.__name__, name, p.name)
            assert got.parameters[p.name].default == p.default, (cls.__name__, name, p.name)


def test_the_protocol_is_the_surface_the_package_uses() -> None:
    assert _members() == sorted([
        "running", "closed", "close", "detach", "fileno", "stop_buffered", "cont", "step",
        "interrupt", "poll_stop", "pipeline", "mode_packets", "memory_write_packets",
        "register_write_packets", "read_memory", "write_memory", "read_phys", "write_phys",
        "read_registers", "read_registers_along", "read_register", "read_register_each",
        "read_along", "read_registers_and_each",
        "write_register", "write_registers", "threads", "select_thread",
        "insert_breakpoint", "remove_breakpoint",
    ])
