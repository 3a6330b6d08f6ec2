"""Guest RAM of a QEMU kprobevm did not start, read from the QEMU process's memory.

An attached QEMU keeps its guest's RAM in a mapping of its own. On the same machine,
with permission to trace it (root, or its owner where ptrace is not restricted), the
host reads that mapping through ``/proc/PID/mem`` at memory speed. The QEMU is found
behind the gdbstub connection (the peer of a unix socket, the owner of the listening
TCP port); the mapping is the one whose bytes at a few guest-physical addresses are
the bytes the gdbstub reads there, with the VM stopped.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from kprobevm.errors import VMError
from kprobevm.guest.guestram import GuestRam

__all__ = ["ProcessRam", "find_process_ram", "gdbstub_peer_pid"]

log = logging.getLogger(__name__)

_MIN_RAM = 32 << 20
_SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)


class ProcessRam(GuestRam):
    """Guest RAM at ``base`` in process ``pid``'s memory."""

    def __init__(self, pid: int, base: int, size: int) -> None:
        super().__init__(size, f"process {pid} at {base:#x}")
        self.pid, self.base = pid, base
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
        except OSError as exc:
            raise VMError(f"cannot open the memory of QEMU process {pid}: {exc}") from exc

    def _get(self, at: int, n: int) -> bytes:
        return os.pread(self._fd, n, self.base + at)

    def _put(self, at: int, data: bytes) -> None:
        os.pwrite(self._fd, data, self.base + at)

    def store_fd(self) -> int | None:
        return os.dup(self._fd)

    def store_offset(self, paddr: int, n: int) -> int:
        return self.base + super().store_offset(paddr, n)

    def close(self) -> None:
        os.close(self._fd)


def gdbstub_peer_pid(fd: int) -> int:
    """The process at the other end of a gdbstub connection (``VMError`` when unknown)."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        if sock.family == socket.AF_UNIX:
            pid: int = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED,
                                                            struct.calcsize("3i")))[0]  # fmt: skip
            if pid > 0:
                return pid
            raise VMError("the gdbstub's unix socket names no peer process")
        host, port = sock.getpeername()[:2]
    finally:
        sock.close()
    return _tcp_listener_pid(host, port)


def _tcp_listener_pid(host: str, port: int) -> int:
    """The process that owns the listening socket of a local TCP ``port``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f"socket:[{inode}]")
    for pid, link in _fd_links():
        if link in inodes:
            return pid
    raise VMError(f"no local process listens on the gdbstub's port {host}:{port}")


def _fd_links() -> Iterator[tuple[int, str]]:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                yield int(proc.name), os.readlink(fd)
        except OSError:
            continue


def _candidates(pid: int) -> Iterator[tuple[int, int]]:
    """Writable private or shared mappings big enough to be guest RAM: (start, size)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        cols = line.split()
        start, end = (int(x, 16) for x in cols[0].split("-"))
        if cols[1].startswith("rw") and end - start >= _MIN_RAM:
            yield start, end - start


def find_process_ram(
    pid: int, samples: list[tuple[int, bytes]], read: Callable[[int, int, int], bytes] | None = None
) -> ProcessRam:
    """The mapping of QEMU process ``pid`` that holds guest RAM: the one whose bytes at
    each sample's guest-physical address are the sample's bytes (read by the gdbstub
    with the VM stopped). ``VMError`` when none does, or when we may not read it."""
    if not samples:
        raise VMError("no guest-physical samples to recognise the RAM mapping by")
    try:
        candidates = list(_candidates(pid))
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError as exc:
        raise VMError(f"cannot read the memory of QEMU process {pid}: {exc}") from exc
    pread = read or (lambda f, n, at: os.pread(f, n, at))
    try:
        for start, size in candidates:
            try:
                if all(paddr + len(data) <= size and pread(fd, len(data), start + paddr) == data
                       for paddr, data in samples):  # fmt: skip
                    log.info("guest RAM: %d MiB at %#x in QEMU process %d", size >> 20, start, pid)
                    return ProcessRam(pid, start, size)
            except OSError:
                continue
    finally:
        os.close(fd)
    raise VMError(f"no mapping of QEMU process {pid} holds the guest's RAM "
                  f"({len(candidates)} candidates)")  # fmt: skip

