"""The gdbstub of a QEMU reached through its QMP monitor: found, or started and stopped.

QEMU names its gdbstub's character device ``gdb``: ``query-chardev`` lists it with its
address (``disconnected:tcp:127.0.0.1:1234,server=on`` while no client is connected).
QEMU 7.2 has no ``info gdbserver``, and a second ``gdbserver`` there fails
(``duplicate yank instance``), so an existing gdbstub is used as it is, and one is
started (``gdbserver`` through ``human-monitor-command``, on a unix socket in a private
directory) only when there is none. One we started is stopped (``gdbserver none``) when
the session ends, leaving the QEMU as found.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kprobevm.errors import VMError
from kprobevm.gdbstub.transport import GdbAddress

__all__ = ["MonitorGdbstub", "gdbstub_of_chardev", "open_gdbstub", "qmp_execute"]

QMP_TIMEOUT = 10.0
"""Seconds one monitor command may take."""
GDB_CHARDEV = "gdb"


def qmp_execute(path: str, command: str, args: dict[str, Any] | None = None) -> Any:
    """One QMP command on a fresh connection to the monitor at ``path``; its result."""
    from kprobevm.guest.launcher import _qmp_execute

    try:
        return asyncio.run(_qmp_execute(path, command, args, QMP_TIMEOUT))
    except (OSError, TimeoutError) as exc:
        raise VMError(f"QMP {command} at {path} failed: {exc}") from exc
    except Exception as exc:  # qemu.qmp's own errors (ConnectError, ExecuteError...)
        raise VMError(f"QMP {command} at {path} failed: {exc!r}") from exc


def gdbstub_of_chardev(filename: str) -> GdbAddress:
    """The address a gdbstub chardev listens on, from its ``query-chardev`` filename;
    raises VMError when a client is connected already (QEMU serves one) or the kind is
    not a socket."""
    if "<->" in filename:
        raise VMError(f"QEMU's gdbstub has a client already ({filename}): it serves one;"
                      " detach that debugger first")  # fmt: skip
    spec = filename.removeprefix("disconnected:")
    kind, _, rest = spec.partition(":")
    where = rest.split(",", 1)[0]
    if kind == "unix" and where:
        return where
    if kind == "tcp":
        host, _, port = where.rpartition(":")
        if port.isdigit():
            return (host if host not in ("", "0.0.0.0", "::") else "127.0.0.1", int(port))
    raise VMError(f"QEMU's gdbstub listens on {filename!r}: not a socket kprobevm can reach")


@dataclass(frozen=True)
class MonitorGdbstub:
    """A gdbstub reached through QMP: where it listens, and whether we started it."""

    qmp: str
    address: GdbAddress
    started: bool
    directory: Path | None = None
    """The private directory of the socket of a gdbstub we started."""

    def close(self) -> None:
        """Stop a gdbstub we started (``gdbserver none``) and remove its directory; one
        that was there already is left running."""
        if not self.started:
            return
        try:
            hmp(self.qmp, "gdbserver none")
        finally:
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)


def hmp(qmp: str, command: str) -> str:
    """One human-monitor command through QMP; its text output."""
    return str(qmp_execute(qmp, "human-monitor-command", {"command-line": command}))


def open_gdbstub(qmp: str) -> MonitorGdbstub:
    """The gdbstub of the QEMU whose QMP monitor is at ``qmp``: the one it has, else one
    started on a unix socket in a new private directory (0700)."""
    for dev in qmp_execute(qmp, "query-chardev"):
        if dev.get("label") == GDB_CHARDEV:
            return MonitorGdbstub(qmp, gdbstub_of_chardev(str(dev["filename"])), started=False)
    directory = Path(tempfile.mkdtemp(prefix="kprobevm-gdb-"))
    path = directory / "gdb.sock"
    said = hmp(qmp, f"gdbserver unix:{path},server=on,wait=off")
    if not path.exists():
        shutil.rmtree(directory, ignore_errors=True)
        raise VMError(f"QEMU did not start a gdbstub at {path} through {qmp}: {said.strip()!r}")
    return MonitorGdbstub(qmp, str(path), started=True, directory=directory)
