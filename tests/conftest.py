"""Shared fixtures: one default guest for the whole session, checked for kernel trouble after
every test that used it, and a check that no QEMU started by the tests outlives them."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

from kprobevm.guest.console import kernel_trouble
from kprobevm.guest.launcher import QemuMachine
from kprobevm.guest.vm import VM

SESSION_TOKEN = f"KPROBEVM_TEST_SESSION={uuid.uuid4().hex}"
"""Put in the environment of every process the tests start (QEMU inherits it), so the
session can tell its own QEMUs from those of anyone else on the machine."""
os.environ[SESSION_TOKEN.split("=")[0]] = SESSION_TOKEN.split("=")[1]



def session_qemus() -> list[int]:
    """PIDs of live QEMU processes started by this test session (any depth of children)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "comm").read_text().startswith("qemu-system"):
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if SESSION_TOKEN.encode() in environ and state != "Z":
            found.append(int(entry.name))
    return found


def wait_no_qemu(timeout: float = 10.0, *, keep: Collection[int] = ()) -> list[int]:
    """Wait until the session has no QEMU left but those in ``keep`` (the shared guest, say);
    return those still alive at the timeout."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in session_qemus() if p not in keep]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _under_ci() -> bool:
    """``CI`` set to a true value, as CI services (and ``.ci/run``) do."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI a skip is a failure: a guest test that could not boot, or a test whose
    tool (unicorn, gdb, GNU as) is missing, has checked nothing and must not pass."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and _under_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI (CI={os.environ['CI']}), which is a failure: {reason}"


@pytest.fixture(scope="session", autouse=True)
def _no_qemu_left() -> Iterator[None]:
    yield
    left = wait_no_qemu()
    assert not left, f"QEMU processes of this test session still running: {left}"


@pytest.fixture(scope="session")
def vm(kprobevm_vm: VM) -> VM:
    """The default guest, booted once per session by the kprobevm plugin (shared with
    tests that use its ``kprobevm_vm`` and ``kprobes`` fixtures)."""
    return kprobevm_vm


@pytest.fixture(autouse=True)
def _guest_healthy(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used the session guest, fail it if the console shows an oops,
    a BUG, a general protection fault, an unhandled int3 or a panic, or if it left the
    guest stopped (then resume it, so the tests after it get a running guest)."""
    if "vm" not in request.fixturenames:
        yield
        return
    guest: VM = request.getfixturevalue("vm")
    start = len(guest.serial_log())
    yield
    trouble = kernel_trouble(guest.serial_log()[start:])
    if trouble:
        pytest.fail("guest kernel trouble on the serial console:\n" + "\n".join(trouble[:20]))
    machine = guest.machine
    if isinstance(machine, QemuMachine) and machine.alive():
        # A stop of a few milliseconds is the trap thread at work (a kretprobe call that
        # was in flight when its probe went still returns through the trampoline): only
        # a guest that stays stopped was left stopped.
        deadline = time.monotonic() + 2.0
        while (status := machine.status()) != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        if status != "running":
            machine.qmp("cont")
            pytest.fail(f"the test left the shared guest {status!r} (resumed it)")
