"""GuestShell: shell commands in the guest over one reused SSH connection (paramiko).

Each command is one SSH channel on the same transport (about 60 ms per command under
TCG), so loops belong inside one command rather than one command per iteration.
"""

from __future__ import annotations

import logging
import select
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko

from kprobevm.closing import Closing
from kprobevm.errors import GuestCommandError, GuestCommandTimeout, VMError, VMLost

__all__ = ["GuestShell", "RunResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """What a guest command did; shaped like ``subprocess.CompletedProcess`` (text mode)."""

    args: str
    returncode: int
    stdout: str
    stderr: str
    duration: float = 0.0

    @property
    def command(self) -> str:
        return self.args

    def check_returncode(self) -> None:
        """Raise :class:`GuestCommandError` if the command exited non-zero."""
        if self.returncode != 0:
            raise GuestCommandError(self.args, self.returncode, self.stdout, self.stderr)


class GuestShell(Closing):
    """An SSH connection to the guest, opened at construction and reused by every run()."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        user: str = "root",
        key: Path | None = None,
        connect_timeout: float = 30.0,
    ) -> None:
        self.address = address
        self.user = user
        self.key = key
        self._client = self._connect(connect_timeout)

    def _connect(self, timeout: float) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        # The guest's host key is made fresh per image and reached only on loopback.
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        pkey = paramiko.Ed25519Key.from_private_key_file(str(self.key)) if self.key else None
        host, port = self.address
        try:
            client.connect(
                host, port, username=self.user, pkey=pkey, timeout=timeout,
                banner_timeout=timeout, auth_timeout=timeout,
                look_for_keys=False, allow_agent=False,
            )
        except (OSError, paramiko.SSHException, EOFError) as exc:
            client.close()
            raise VMError(f"SSH to {self.user}@{host}:{port} failed: {exc}") from exc
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(15)
        return client

    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise VMLost(f"the SSH connection to {self.address[0]}:{self.address[1]} is gone")
        return transport

    def run(self, command: str, *, timeout: float = 60.0, check: bool = False) -> RunResult:
        """Run ``command`` with the guest's ``/bin/sh``; raise on timeout (and on failure
        when ``check``)."""
        started = time.monotonic()
        deadline = started + timeout
        try:
            channel = self._transport().open_session(timeout=timeout)
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise VMLost(f"could not start {command!r} in the guest: {exc}") from exc
        out: list[bytes] = []
        err: list[bytes] = []
        try:
            while True:
                if channel.recv_ready():
                    out.append(channel.recv(1 << 16))
                    continue
                if channel.recv_stderr_ready():
                    err.append(channel.recv_stderr(1 << 16))
                    continue
                if channel.eof_received and channel.exit_status_ready():
                    break
                if channel.closed:
                    # paramiko closes every channel of a connection that drops (QEMU
                    # exiting on a guest reboot), and that also marks the status ready
                    # (-1) with no EOF: without this the wait ran to the timeout
                    transport = self._client.get_transport()
                    if transport is None or not transport.is_active():
                        raise VMLost(f"the SSH connection dropped while {command!r} ran")
                    raise VMLost(f"the guest closed the channel of {command!r} without a status")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestCommandTimeout(command, timeout)
                # The channel's fileno is a pipe paramiko sets on stdout/stderr data and on
                # close; the exit status alone does not set it, hence the short cap.
                select.select([channel], [], [], min(remaining, 0.05))
            # Data and EOF can both arrive between the checks above: drain what is left.
            while channel.recv_ready():
                out.append(channel.recv(1 << 16))
            while channel.recv_stderr_ready():
                err.append(channel.recv_stderr(1 << 16))
            status = channel.recv_exit_status()
        except TimeoutError as exc:
            raise GuestCommandTimeout(command, timeout) from exc
        finally:
            channel.close()
        result = RunResult(
            command, status,
            b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace"),
            time.monotonic() - started,
        )
        log.debug("%r -> %d in %.3f s", command, status, result.duration)
        if check:
            result.check_returncode()
        return result

    def read_file(self, path: str) -> str:
        """The text of a guest file (``GuestCommandError`` when it cannot be read)."""
        return self.run(f"cat -- {shlex.quote(path)}", check=True).stdout

    def close(self) -> None:
        self._client.close()
