"""A QEMU as a kernel developer starts one by hand: the default image's kernel and
initramfs, no ``memmap=``, no SSH, only a gdbstub (``-gdb tcp:...``) or only a QMP
monitor, and a busy loop as init that counts its own opens on the serial console.

The loop is ``cat /proc/version`` (one ``do_sys_openat2`` per round: the loop's output
goes to /dev/null, opened once before it) and every :data:`MARK_EVERY` rounds it prints
``loop N`` on a descriptor it holds (no open), so the host reads from the console how
many opens the guest made and how fast, with nothing else in the guest to ask.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from kprobevm.errors import VMError
from kprobevm.gdbstub.transport import GdbAddress
from kprobevm.guest.image import Image, default_image
from kprobevm.guest.launcher import DEFAULT_CPU, _free_port
from kprobevm.guest.qemu_builds import resolve_qemu

__all__ = ["MARK_EVERY", "BareQemu", "LoopMark"]

MARK_EVERY = 50
"""Rounds of the open loop between two ``loop N`` lines on the console."""
LOOP = (
    "mount -t proc proc /proc; exec 3>&1; i=0; while :; do cat /proc/version;"
    f" i=$((i+1)); [ $((i%{MARK_EVERY})) -eq 0 ] && echo loop $i >&3; done >/dev/null"
)
_MARK = re.compile(rb"^loop (\d+)\r?$", re.M)
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class LoopMark:
    """The loop's last count on the console, when the host read it, and the CPU time the
    QEMU process had used by then (seconds, all its threads)."""

    rounds: int
    at: float
    cpu: float = 0.0
    printed_after: float | None = None
    """For a mark :meth:`BareQemu.next_mark` waited for: when the host last looked and
    did not see it yet (the line was printed between then and ``at``; a host that was
    not scheduled for a while sees it late, and the guest's count has gone on)."""


class BareQemu:
    """One bare QEMU (TCG, 1 vCPU) running the open loop; killed on leaving the ``with``."""

    def __init__(self, *, gdb: bool = True, qmp: bool = False, memory: str = "544M",
                 qemu: str | None = None, kaslr: bool = False,
                 image: Image | None = None, append: str = "") -> None:  # fmt: skip
        """``image``: whose kernel and initramfs (default: the default image's);
        ``kaslr``: leave KASLR on, as a QEMU started by hand has it (``nokaslr`` else);
        ``append``: more kernel command line, before the init's."""
        image = image if image is not None else default_image()
        self.directory = Path(tempfile.mkdtemp(prefix="kprobevm-bare-"))
        self.serial = self.directory / "serial.log"
        self.gdb: GdbAddress | None = ("127.0.0.1", _free_port()) if gdb else None
        self.qmp: str | None = str(self.directory / "qmp.sock") if qmp else None
        cmdline = (f"console=ttyS0 panic=-1 oops=panic quiet {'' if kaslr else 'nokaslr'}"
                   f' {append} rdinit=/bin/sh -- -c "{LOOP}"')  # fmt: skip
        command = [
            resolve_qemu(qemu), "-nodefaults", "-display", "none", "-no-reboot",
            "-machine", "pc", "-accel", "tcg", "-cpu", DEFAULT_CPU, "-m", memory,
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
            "-serial", f"file:{self.serial}",
        ]  # fmt: skip
        if self.gdb is not None:
            command += ["-gdb", f"tcp:{self.gdb[0]}:{self.gdb[1]},server=on,wait=off"]
        if self.qmp is not None:
            command += ["-qmp", f"unix:{self.qmp},server=on,wait=off"]
        self.command = command
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def __enter__(self) -> BareQemu:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.kill()

    def kill(self) -> None:
        """Kill QEMU and remove its directory."""
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def console(self) -> str:
        """The serial console so far."""
        try:
            return self.serial.read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def mark(self) -> LoopMark:
        """The loop's latest count on the console (0 before its first line)."""
        try:
            raw = self.serial.read_bytes()
        except OSError:
            raw = b""
        found = _MARK.findall(raw)
        return LoopMark(int(found[-1]) if found else 0, time.monotonic(), self.cpu_seconds())

    def cpu_seconds(self) -> float:
        """User and system CPU time of the QEMU process so far: on a loaded host the
        guest's wall-clock rate is as much the other processes' as its own, while the
        CPU time QEMU spends per loop round is the guest's work (0.0 once it is gone)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def wait_loop(self, timeout: float = 60.0) -> LoopMark:
        """Wait for the loop's first line (the guest booted to its init)."""
        deadline = time.monotonic() + timeout
        while (mark := self.mark()).rounds == 0:
            if self.proc.poll() is not None:
                raise VMError(f"bare QEMU exited with status {self.proc.returncode}:"
                              f" {self.console()[-2000:]}")  # fmt: skip
            if time.monotonic() > deadline:
                raise VMError(f"the guest's open loop printed nothing in {timeout:g} s:"
                              f" {self.console()[-2000:]}")  # fmt: skip
            time.sleep(0.1)
        return mark

    def next_mark(self, after: int, timeout: float = 30.0) -> LoopMark:
        """Wait for a count past ``after`` and return it as soon as it is seen."""
        looked = time.monotonic()
        deadline = looked + timeout
        while (mark := self.mark()).rounds <= after:
            if time.monotonic() > deadline:
                raise VMError(f"the guest's open loop stopped at {after} rounds"
                              f" ({timeout:g} s without a line)")  # fmt: skip
            time.sleep(0.005)
            looked = time.monotonic()
        return replace(mark, printed_after=looked)

    def window(self, seconds: float) -> tuple[LoopMark, LoopMark]:
        """Two marks about ``seconds`` apart, each taken as soon as the loop prints it."""
        start = self.next_mark(self.mark().rounds)
        time.sleep(seconds)
        return start, self.next_mark(self.mark().rounds)

    def rate(self, seconds: float) -> float:
        """Loop rounds per second over about ``seconds``, between two marks."""
        start, end = self.window(seconds)
        return (end.rounds - start.rounds) / (end.at - start.at)
