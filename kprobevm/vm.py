"""The VM facade: one guest as kprobevm sees it, whoever started its QEMU.

A `VM` is made from endpoints (gdbstub socket, SSH address, QMP socket, serial log), so
the same object serves a guest booted by :func:`kprobevm.boot` and one attached to with
:func:`kprobevm.attach`. Subsystems (shell, gdbstub target, memory, symbols, kprobes) are
created lazily on first use.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kprobevm.shell import GuestShell, RunResult


class Machine(Protocol):
    """What a launcher hands the VM so that closing the VM stops its QEMU."""

    def shutdown(self, timeout: float = ...) -> None: ...

    @property
    def command(self) -> list[str]: ...


GdbAddress = str | tuple[str, int]
"""A gdbstub address: a unix socket path, or (host, port) on loopback."""


@dataclass(frozen=True)
class GuestEndpoints:
    """How to reach a guest: gdbstub, SSH, QMP and serial log (any may be absent)."""

    gdb: GdbAddress | None = None
    ssh: tuple[str, int] | None = None
    ssh_key: Path | None = None
    ssh_user: str = "root"
    qmp: str | None = None
    serial_log: Path | None = None


class VM:
    """One guest: run commands, read and write its memory, place kprobes in it."""

    def __init__(
        self,
        endpoints: GuestEndpoints,
        *,
        name: str = "vm",
        machine: Machine | None = None,
        vmlinux: Path | None = None,
        kallsyms: Path | None = None,
        kernel_cmdline: str | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.name = name
        self.machine = machine
        self.vmlinux_path = vmlinux
        self.kallsyms_path = kallsyms
        self.kernel_cmdline = kernel_cmdline
        self.log = logging.getLogger(f"kprobevm.vm.{name}")
        self._lock = threading.RLock()
        self._shell: GuestShell | None = None
        self._closed = False

    # -- shell -------------------------------------------------------------------------

    @property
    def shell(self) -> GuestShell:
        """The SSH shell into the guest (connected on first use)."""
        with self._lock:
            if self._shell is None:
                from kprobevm.shell import GuestShell

                if self.endpoints.ssh is None:
                    from kprobevm.errors import VMError

                    raise VMError(f"{self.name}: no SSH address for this guest")
                self._shell = GuestShell(
                    self.endpoints.ssh,
                    user=self.endpoints.ssh_user,
                    key=self.endpoints.ssh_key,
                )
            return self._shell

    def run(
        self, command: str, *, timeout: float = 60.0, check: bool = False
    ) -> RunResult:
        """Run a shell command in the guest; like ``subprocess.run`` with text output."""
        return self.shell.run(command, timeout=timeout, check=check)

    def read_file(self, path: str) -> str:
        """Read a guest file (for example ``/proc/kallsyms``) as text."""
        return self.shell.read_file(path)

    def serial_log(self) -> str:
        """The guest's serial console output so far ('' when none is recorded)."""
        path = self.endpoints.serial_log
        if path is None or not path.exists():
            return ""
        text: str = path.read_text(errors="replace")
        return text

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Leave the guest as found, then stop its QEMU when we started it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._shell is not None:
                    self._shell.close()
            finally:
                if self.machine is not None:
                    self.machine.shutdown()

    def __enter__(self) -> VM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<VM {self.name} gdb={self.endpoints.gdb!r} ssh={self.endpoints.ssh!r}>"
