"""The watchdog child on a socket pair standing in for the gdbstub connection: it
detaches when its parent vanishes, and says nothing when told to go quietly."""

from __future__ import annotations

import select
import socket
import time

from kprobevm.trap.watchdog import Watchdog


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
