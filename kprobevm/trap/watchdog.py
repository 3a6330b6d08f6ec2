"""A child process that detaches our gdbstub connection if this process dies.

QEMU keeps a gdbstub watchpoint after its client vanishes, and a hit would then stop the
VM with nobody to continue it; nor does it resume a VM its vanished client held stopped
(a registration, a handler). A detach removes every breakpoint and continues the VM, so
the VM starts one as soon as it connects to the gdbstub. The child shares our socket
(an inherited file descriptor), so the hot path pays nothing for it. It waits on its
stdin: ``q`` means a quiet exit, end-of-file means we died. The child runs this file by
its path in isolated mode: it imports only the standard library, not the package.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

__all__ = ["Watchdog", "main"]

_INTERRUPT = b"\x03"
# With multiprocess negotiated, a plain "D" gets E22: detach process 1.
_DETACH = b"$D;1#b0"
_OK = b"$OK#9a"


class Watchdog:
    """The parent's handle on the child: start it, and end it quietly."""

    def __init__(self, fd: int) -> None:
        self._child: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-I", __file__, str(fd)],
            stdin=subprocess.PIPE, pass_fds=(fd,), close_fds=True,
        )  # fmt: skip

    def stop(self, timeout: float = 5.0, *, detach: bool = False) -> None:
        """Tell the child we leave on purpose (``detach``: detach the gdbstub as at our
        death, for a VM we could not let go cleanly), and reap it."""
        child, self._child = self._child, None
        if child is None or child.stdin is None:
            return
        try:
            if not detach:
                child.stdin.write(b"q")
            child.stdin.close()
        except BrokenPipeError:
            pass  # it is gone already
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=timeout)


def _drain(fd: int, seconds: float) -> bytes:
    """What the stub sends within ``seconds``."""
    data, end = b"", time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return data
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk


def _detach(fd: int) -> None:
    """Stop the VM, then detach. QEMU only stops a running VM on any byte it receives
    (it does not parse it), so interrupt first, then detach, and read until the OK."""
    for _ in range(5):
        try:
            os.write(fd, _INTERRUPT)
            _drain(fd, 0.2)
            os.write(fd, _DETACH)
            if _OK in _drain(fd, 1.0):
                return
        except OSError:
            return


def main(argv: list[str] | None = None) -> int:
    """The child: wait for our death or a quiet exit; on death, detach."""
    args = sys.argv[1:] if argv is None else argv
    fd = int(args[0])
    if sys.stdin.buffer.read(1) != b"q":
        _detach(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
