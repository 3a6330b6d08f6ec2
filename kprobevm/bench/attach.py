"""From ``attach`` to a probe armed on a QEMU started with only ``-gdb`` (scripts/bench-attach).

The guest is the default image's kernel and initramfs with a busy loop as init (no SSH,
no ``memmap=``), as a developer's own QEMU would be. Each round attaches afresh, with
symbols, BTF and the blacklist from guest memory, and registers one kprobe; the time to
each step is taken. Rounds alternate between reading the kernel image through the QEMU
process's memory (same machine) and through the gdbstub alone (as for a QEMU elsewhere),
so both sides of the comparison come from the same run.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kprobevm.guest.image import Image
from kprobevm.guest.vm import attach
from kprobevm.kprobes.core import Kprobe

__all__ = ["AttachRound", "bare_qemu", "measure_attach", "summary"]

LOOP = "mount -t proc proc /proc; echo LOOPING; while :; do cat /proc/version >/dev/null; done"
"""The bare guest's init: opens in a loop (``do_sys_openat2`` keeps being hit)."""
BOOT_DEADLINE = 60.0
STEPS = ("connected", "image found", "host RAM", "kallsyms+BTF decoded", "symbols",
         "blacklist", "armed")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def bare_qemu(image: Image, serial_log: Path, *, qemu: str = "qemu-system-x86_64") -> Iterator[str]:
    """A QEMU with only ``-gdb tcp:...``: ``image``'s kernel (KASLR on: nothing turns it
    off) and initramfs, :data:`LOOP` as init, no SSH, no QMP. Yields ``HOST:PORT`` of
    the gdbstub once the loop runs; kills QEMU on the way out."""
    port = _free_port()
    proc = subprocess.Popen(
        [qemu, "-nodefaults", "-display", "none", "-no-reboot", "-machine", "pc",
         "-accel", "tcg", "-cpu", "qemu64,+rdrand", "-m", "544M",
         "-kernel", str(image.kernel), "-initrd", str(image.initrd),
         "-append", f'console=ttyS0 quiet panic=-1 oops=panic rdinit=/bin/sh -- -c "{LOOP}"',
         "-serial", f"file:{serial_log}", "-gdb", f"tcp:127.0.0.1:{port},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + BOOT_DEADLINE
        while "LOOPING" not in (
            serial_log.read_text(errors="replace") if serial_log.exists() else ""
        ):
            if proc.poll() is not None:
                raise RuntimeError(f"the bare QEMU exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the bare guest's loop did not start in {BOOT_DEADLINE} s")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


@dataclass(frozen=True)
class AttachRound:
    """One attach: seconds from the call to each step (:data:`STEPS`), and how the image
    was read (``host RAM`` or ``gdbstub``)."""

    via: str
    steps: tuple[tuple[str, float], ...]

    @property
    def armed(self) -> float:
        """Seconds from ``attach`` to the probe armed."""
        return dict(self.steps)["armed"]


def one_round(address: str, *, host_ram: bool, function: str = "do_sys_openat2") -> AttachRound:
    """Attach, decode, register one probe on ``function``; the times of each step."""
    host, port = address.rsplit(":", 1)
    t0 = time.perf_counter()
    laps: list[tuple[str, float]] = []

    def lap(step: str) -> None:
        laps.append((step, time.perf_counter() - t0))

    with attach((host, int(port)), name="bench-attach") as vm:
        vm.target  # noqa: B018
        lap("connected")
        vm.kernel_image  # noqa: B018
        lap("image found")
        if not host_ram:
            vm.__dict__["guest_ram"] = None  # as for a QEMU on another machine
        vm.guest_ram  # noqa: B018
        lap("host RAM")
        vm.kernel_in_memory  # noqa: B018
        lap("kallsyms+BTF decoded")
        vm.symbols  # noqa: B018
        lap("symbols")
        vm.kprobe_blacklist  # noqa: B018
        lap("blacklist")
        kp = Kprobe(symbol_name=function)
        vm.register_kprobe(kp)
        lap("armed")
        vm.unregister_kprobe(kp)
        via = "host RAM" if vm.guest_ram is not None else "gdbstub"
    return AttachRound(via, tuple(laps))


def measure_attach(address: str, rounds: int) -> list[AttachRound]:
    """``rounds`` rounds of each way of reading the image, alternating."""
    out = []
    for k in range(2 * rounds):
        out.append(one_round(address, host_ram=k % 2 == 0))
    return out


def summary(results: list[AttachRound]) -> str:
    """Median seconds to each step, per way of reading the image."""
    lines = []
    for via in ("host RAM", "gdbstub"):
        mine = [r for r in results if r.via == via]
        if not mine:
            continue
        cells = [f"{step} {statistics.median(dict(r.steps)[step] for r in mine):.2f}"
                 for step in STEPS]  # fmt: skip
        armed = ", ".join(f"{r.armed:.2f}" for r in mine)
        lines.append(f"{via} ({len(mine)} rounds; armed at {armed} s): median " + ", ".join(cells))
    return "\n".join(lines)
