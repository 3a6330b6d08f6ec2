"""GdbTransport: what the rest of kprobevm asks of a gdbstub client.

:class:`~kprobevm.gdbstub.client.GdbClient` (RSP over a socket) is the one the engine
runs on; :class:`~kprobevm.gdbstub.gdbmi_client.GdbMiClient` (a real gdb over GDB/MI)
stands in for it in benchmarks. The members are those that run control, the trap
channels, guest memory, the kretprobe and recovery code and the benchmarks call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from kprobevm.errors import GdbError
from kprobevm.gdbstub.packet import BreakpointKind, StopReply

__all__ = [
    "GdbAddress",
    "GdbTransport",
    "format_gdb_address",
    "parse_gdb_address",
    "require_stopped",
]

GdbAddress = str | Path | tuple[str, int]
"""A gdbstub address: a unix socket path, or (host, port)."""


def parse_gdb_address(text: str) -> GdbAddress:
    """``/path/to/socket``, ``HOST:PORT`` or ``:PORT`` (loopback); an existing file
    whose name looks like ``HOST:PORT`` is a socket path."""
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and "/" not in text and not os.path.exists(text):
        return (host or "127.0.0.1", int(port))
    return text


def format_gdb_address(address: GdbAddress) -> str:
    """The address as :func:`parse_gdb_address` reads it (and gdb's ``target remote``)."""
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address)


class GdbTransport(Protocol):
    """A gdbstub client: registers, memory, threads, breakpoints and run control."""

    running: bool
    """True between a resume and the stop that ends it."""

    # -- lifetime --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once closed, by us or because the other end went away."""

    def close(self) -> None:
        """Let go of the stub; a stopped VM stays stopped."""

    def detach(self) -> None:
        """Let the VM run on without us, then close."""

    # -- run control -----------------------------------------------------------------------

    def fileno(self) -> int:
        """A descriptor to select() on for stops (after :attr:`stop_buffered`)."""

    @property
    def stop_buffered(self) -> bool:
        """True when a stop may wait in the client's buffers, where select() cannot see it."""

    def cont(
        self, *, before: Sequence[bytes] = (), thread: str | None = None, defer: bool = False
    ) -> None:
        """Resume, after the ``before`` packets (register and memory writes)."""

    def step(
        self, thread: str | None = None, *, wait: bool = True, timeout: float | None = None
    ) -> StopReply | None:
        """Single-step one vCPU; its stop when ``wait``."""

    def interrupt(self, *, wait: bool = True, timeout: float | None = None) -> StopReply | None:
        """Stop a running target (nothing when it is stopped)."""

    def poll_stop(self) -> StopReply | None:
        """A stop if one has arrived, without blocking."""

    # -- packets sent with the next resume -------------------------------------------------

    def pipeline(self, payloads: Sequence[bytes], *, window: int = 32) -> list[bytes]:
        """Raw packets' replies, in order (``Exx`` included)."""

    def mode_packets(self, phys: bool) -> list[bytes]:
        """The memory-mode switch (if any) the next raw memory packets need."""

    def memory_write_packets(self, addr: int, data: bytes) -> list[bytes]:
        """``M`` packets that write ``data`` at virtual ``addr``."""

    def register_write_packets(
        self, values: dict[str, int], thread: str | None = None
    ) -> list[bytes]:
        """``P`` packets that write ``values`` (selecting ``thread`` first)."""

    # -- memory ----------------------------------------------------------------------------

    def read_memory(self, addr: int, n: int, thread: str | None = None) -> bytes:
        """``n`` bytes of virtual memory at ``addr``."""

    def write_memory(self, addr: int, data: bytes, thread: str | None = None) -> None:
        """Write virtual memory."""

    def read_phys(self, addr: int, n: int) -> bytes:
        """``n`` bytes of guest-physical memory at ``addr``."""

    def write_phys(self, addr: int, data: bytes) -> None:
        """Write guest-physical memory."""

    # -- registers and threads -------------------------------------------------------------

    def read_registers(self, thread: str | None = None, *, wide: bool = True) -> dict[str, int]:
        """Registers by gdb name (``wide=False``: no x87/xmm)."""

    def read_registers_along(
        self, packets: Sequence[bytes], thread: str | None = None, *, wide: bool = False
    ) -> tuple[dict[str, int], list[bytes]]:
        """:meth:`read_registers`, and the replies to ``packets`` sent with it."""

    def read_along(self, packets: Sequence[bytes], thread: str | None = None) -> list[bytes]:
        """The replies to ``packets`` (memory reads), run as ``thread`` sees memory."""

    def read_registers_and_each(
        self, name: str, threads: Sequence[str], thread: str
    ) -> tuple[dict[str, int], dict[str, int]]:
        """Every register of ``thread`` (no x87/xmm) and ``name`` of each of ``threads``;
        ``thread`` is left selected."""

    def read_register(self, name: str, thread: str | None = None) -> int:
        """One register by gdb name."""

    def read_register_each(self, name: str, threads: Sequence[str]) -> dict[str, int]:
        """One register of each thread."""

    def write_register(self, name: str, value: int, thread: str | None = None) -> None:
        """Write one register."""

    def write_registers(self, values: dict[str, int], thread: str | None = None) -> int:
        """Write registers; how many were sent."""

    def threads(self) -> list[str]:
        """vCPU thread ids (``p01.01`` ...)."""

    def select_thread(self, op: str, thread: str) -> None:
        """The vCPU later ``g`` (registers, memory) or ``c`` (resume) operations use."""

    # -- breakpoints -----------------------------------------------------------------------

    def insert_breakpoint(self, kind: BreakpointKind | int, addr: int, length: int = 1) -> None:
        """A breakpoint or watchpoint (``Z`` packet kinds)."""

    def remove_breakpoint(self, kind: BreakpointKind | int, addr: int, length: int = 1) -> None:
        """Remove what :meth:`insert_breakpoint` set."""


def require_stopped(running: bool, what: str) -> None:
    """Refuse a resume (``what``) while the target runs: only its stop may come then."""
    if running:
        raise GdbError(f"{what}: the target is running (wait_stop or interrupt first)")
