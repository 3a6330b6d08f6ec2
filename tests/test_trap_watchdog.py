"""The watchdog child on a socket pair standing in for the gdbstub connection: it
detaches when its parent vanishes, and says nothing when told to go quietly."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from kprobevm.trap.watchdog import Watchdog
from tests.fakestub import QemuLike, serve_on_unix_socket


def _read_until(sock: socket.socket, marker: bytes, timeout: float) -> bytes:
    data, end = b"", time.monotonic() + timeout
    while marker not in data and time.monotonic() < end:
        if select.select([sock], [], [], 0.1)[0]:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data


def test_a_vanished_parent_gets_the_vm_interrupted_and_detached() -> None:
    ours, stub = socket.socketpair()
    with ours, stub:
        dog = Watchdog(ours.fileno())
        child = dog._child
        assert child is not None and child.stdin is not None
        child.stdin.close()  # what our death looks like from the child: EOF, no "q"
        sent = _read_until(stub, b"$D;1#b0", timeout=10.0)
        assert sent.startswith(b"\x03") and sent.endswith(b"$D;1#b0")
        stub.sendall(b"+$OK#9a")
        assert child.wait(timeout=10) == 0


def test_a_quiet_stop_sends_nothing() -> None:
    ours, stub = socket.socketpair()
    with ours, stub:
        dog = Watchdog(ours.fileno())
        child = dog._child
        assert child is not None
        dog.stop()
        assert child.returncode == 0
        assert not select.select([stub], [], [], 0.2)[0]
        dog.stop()  # twice is harmless


# A host that connects to the (fake) gdbstub, holds the VM stopped, and is killed there.
HOLDER = r"""
import sys, time
from pathlib import Path
from kprobevm.guest.vm import GuestEndpoints, VM
vm = VM(GuestEndpoints(gdb=Path(sys.argv[1])), name="holder")
with vm.target.stopped():
    print("holding", flush=True)
    time.sleep(60)
"""


def test_a_host_killed_while_holding_the_vm_stopped_gets_it_detached(tmp_path: Path) -> None:
    """QEMU resumes no VM for a client that vanished: the watchdog must be there from
    the connection on, not only once a trap channel is in (a kill mid-install)."""
    target = QemuLike()
    stub = serve_on_unix_socket(target, tmp_path / "gdb.sock")
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "gdb.sock")], stdout=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )  # fmt: skip
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "holding"
        assert not target.running
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 10
    while b"D;1" not in stub.received and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"D;1" in stub.received
