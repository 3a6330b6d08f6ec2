"""The probe paths on newer QEMUs than Debian 12's: QEMU 10.0 from bookworm-backports,
fetched into the cache. Each test boots its own guest on that QEMU.

QEMU 8.1 and later stop a running VM on any byte but answer only ``\\x03``; a client
that slips an ack in while the guest runs hangs there. These tests are the ones that
hung: stopping and recorded probes on 1 and 2 vCPUs, a return probe, and close while
the guest is busy and probed.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator

import pytest

from kprobevm.guest.console import kernel_trouble
from kprobevm.guest.launcher import boot
from kprobevm.guest.qemu_builds import fetch_qemu, qemu_version
from kprobevm.guest.vm import VM
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.kretprobes import Kretprobe
from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.x86.ptregs import PtRegs
from tests.test_kretprobes import wait_returned

pytestmark = pytest.mark.vm

NEWER_QEMUS = ["bookworm-backports"]
"""Debian suites whose QEMU the suite fetches and tests (10.0.2 there, December 2026)."""
HOT = ["do_sys_openat2", "vfs_read", "kmem_cache_alloc"]
LOOP = "while :; do cat /proc/version >/dev/null; head -c1 /etc/passwd >/dev/null; done"
CLOSE_DEADLINE = 60.0
"""Generous: only turns a hang into a failure (the figure is the benchmark's)."""


@pytest.fixture(scope="module", params=NEWER_QEMUS)
def qemu(request: pytest.FixtureRequest) -> str:
    """The wrapper of a fetched QEMU; a fetch that fails is an error, never a skip."""
    build = fetch_qemu(request.param)
    assert qemu_version(str(build.binary)) >= (8, 1, 0), build
    return str(build.binary)


def digest(vm: VM, names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        sym = vm.symbols.symbol(name)
        out[name] = hashlib.sha256(vm.read(sym.address, sym.size)).hexdigest()
    return out


@pytest.fixture(params=[1, 2], ids=["smp1", "smp2"])
def guest(qemu: str, request: pytest.FixtureRequest) -> Iterator[VM]:
    """A guest on the newer QEMU, checked at the end: clean console, text as it was."""
    with boot(qemu=qemu, smp=request.param, name=f"q10-smp{request.param}") as vm:
        before = digest(vm, HOT)
        yield vm
        assert digest(vm, HOT) == before
        assert kernel_trouble(vm.serial_log()) == []


def busy(vm: VM, seconds: int = 3) -> None:
    """Run the open/read loop on every vCPU for ``seconds``."""
    vm.run(f"for c in $(seq $(nproc)); do (timeout {seconds} sh -c '{LOOP}' &) ; done;"
           f" sleep {seconds + 1}", check=True)


def test_stopping_probes(guest: VM) -> None:
    seen: list[int] = []

    def pre(kp: Kprobe, regs: PtRegs) -> None:
        seen.append(regs.ip)

    kps = [Kprobe(symbol_name=name, pre_handler=pre) for name in HOT[:2]]
    guest.register_kprobes(kps)
    try:
        busy(guest)
    finally:
        for kp in kps:
            guest.unregister_kprobe(kp)
    assert all(kp.nhit > 0 for kp in kps), [kp.nhit for kp in kps]
    assert len(seen) == sum(kp.nhit for kp in kps)


def test_recorded_probes(guest: VM) -> None:
    comms: list[str] = []
    kp = Kprobe(symbol_name="do_sys_openat2", record=RecordSpec(),
                pre_handler=lambda kp, regs: comms.append(regs.record.comm))  # type: ignore[attr-defined]
    guest.register_kprobe(kp)
    try:
        busy(guest)
        guest.flush_records()
    finally:
        guest.unregister_kprobe(kp)
    assert kp.nhit > 0 and len(comms) == kp.nhit
    assert "cat" in comms


def test_return_probe(guest: VM) -> None:
    values: list[int] = []
    rp = Kretprobe(symbol_name="do_sys_openat2", handler=lambda ri, regs: values.append(regs.ax))
    guest.register_kretprobe(rp)
    try:
        guest.run("cat /nonexistent 2>/dev/null; cat /proc/version >/dev/null")
    finally:
        guest.unregister_kretprobe(rp)
    wait_returned(rp)
    assert (1 << 64) - 2 in values  # -ENOENT
    assert rp.nhit == len(values) > 1


@pytest.mark.parametrize("smp", [2])
def test_close_while_busy_and_probed(qemu: str, smp: int) -> None:
    """Leaving the ``with`` by an exception, with stopping probes on hot functions and
    the guest's workload still running, ends in time."""
    outcome: list[BaseException | float] = []

    def session() -> None:
        try:
            with boot(qemu=qemu, smp=smp, name="q10-close") as vm:
                vm.register_kprobes([Kprobe(symbol_name=n, pre_handler=lambda kp, regs: None)
                                     for n in HOT])
                vm.run(f"for c in $(seq {smp}); do (sh -c '{LOOP}' &); done")
                time.sleep(2)
                started = time.monotonic()
                try:
                    raise RuntimeError("the test leaves")
                finally:
                    outcome.append(started)
        except RuntimeError:
            outcome.append(time.monotonic() - outcome[0])  # type: ignore[operator]
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=session, daemon=True)
    thread.start()
    thread.join(CLOSE_DEADLINE + 60)
    assert not thread.is_alive(), "close() hung on a busy, probed guest"
    assert isinstance(outcome[-1], float), outcome[-1]
    assert outcome[-1] < CLOSE_DEADLINE
