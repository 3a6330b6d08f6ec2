"""The kprobevm pytest plugin (pytest11 entry point): a booted guest and a probe session.

- ``kprobevm_vm`` (session): the guest, booted once (``--kprobevm-kernel``,
  ``--kprobevm-initrd``, ``--kprobevm-image``, ``--kprobevm-kernel-package``,
  ``--kprobevm-smp``, ``--kprobevm-kaslr``, ``--kprobevm-cpu`` choose what boots,
  ``--kprobevm-qemu`` (else ``$KPROBEVM_QEMU``) the QEMU that boots it).
- ``kprobes`` (function): a :class:`ProbeSession`; at teardown it unregisters what the
  test placed, checks the probed functions' text is as before and the serial console
  shows no oops, and fails the test otherwise. ``kprobes.hist(...)`` and
  ``kprobes.count_by(...)`` place maps the guest keeps (``.read()`` snapshots them).
- the ``vm`` marker: without that QEMU the marked tests skip, saying why.
- a failing test that used the guest gets the serial log's tail in its report.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kprobevm.errors import KprobeVMError
from kprobevm.guest.console import KERNEL_TROUBLE, kernel_trouble
from kprobevm.guest.qemu_builds import QEMU_ENV, resolve_qemu

if TYPE_CHECKING:
    from kprobevm.guest.shell import RunResult
    from kprobevm.guest.vm import VM
    from kprobevm.kprobes.aggregations import AggregateProbe
    from kprobevm.kprobes.core import Kprobe
    from kprobevm.kprobes.funclatency import FuncLatency
    from kprobevm.kprobes.kretprobes import Kretprobe
    from kprobevm.tracing import ArgValue, EventHit
    from kprobevm.tracing.session import PlannedProbe, TraceSession

__all__ = ["KERNEL_TROUBLE", "EventProbe", "ProbeSession", "kernel_trouble"]

SERIAL_TAIL_LINES = 40

_VM_KEY = pytest.StashKey["VM"]()


def _qemu_missing(config: pytest.Config) -> str | None:
    """Why the guest cannot boot (the QEMU that would boot it is missing), or None."""
    qemu = resolve_qemu(config.getoption("kprobevm_qemu"))
    if shutil.which(qemu) is not None:
        return None
    where = "" if os.sep in qemu else " on PATH"
    return (f"kprobevm: {qemu} not found{where} (install qemu-system-x86, or name a QEMU"
            f" with --kprobevm-qemu or ${QEMU_ENV})")


# --- hooks ------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kprobevm", "kprobevm guest")
    group.addoption("--kprobevm-kernel", type=Path, metavar="BZIMAGE",
                    help="boot this kernel instead of the default image's")
    group.addoption("--kprobevm-initrd", type=Path, metavar="INITRD",
                    help="boot this initramfs instead of the default image's")
    group.addoption("--kprobevm-image", type=Path, metavar="DIR",
                    help="a built image directory (scripts/build-image) instead of the default")
    group.addoption("--kprobevm-kernel-package", metavar="NAME",
                    help="boot a Debian kernel package's image (linux-image-6.12-cloud-amd64,"
                         " a versioned name, or a local .deb), built on first use")
    group.addoption("--kprobevm-smp", type=int, default=1, metavar="N",
                    help="vCPUs of the guest (default 1)")
    group.addoption("--kprobevm-kaslr", action="store_true",
                    help="boot the guest with KASLR on (the default image boots nokaslr)")
    group.addoption("--kprobevm-cpu", metavar="MODEL",
                    help="QEMU's -cpu for the guest (qemu64,+rdrand,+la57: 5-level paging)")
    group.addoption("--kprobevm-qemu", metavar="PATH",
                    help=f"the QEMU binary (default: ${QEMU_ENV}, else qemu-system-x86_64)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: the test needs a real QEMU guest (kprobevm)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _qemu_missing(config)
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("vm") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not report.failed or "kprobevm_vm" not in getattr(item, "fixturenames", ()):
        return
    vm = item.config.stash.get(_VM_KEY, None)
    if vm is None:
        return
    tail = vm.serial_log().splitlines()[-SERIAL_TAIL_LINES:]
    report.sections.append(
        (f"kprobevm serial log (last {len(tail)} lines)", "\n".join(tail))
    )


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kprobevm_vm(request: pytest.FixtureRequest) -> Iterator[VM]:
    """The guest, booted once per session (skips when QEMU is missing)."""
    reason = _qemu_missing(request.config)
    if reason is not None:
        pytest.skip(reason)
    from kprobevm.guest.image import Image
    from kprobevm.guest.launcher import DEFAULT_CPU, boot

    opt = request.config.getoption
    image_dir: Path | None = opt("kprobevm_image")
    image = Image.load(image_dir) if image_dir is not None else None
    with boot(image, kernel=opt("kprobevm_kernel"), initrd=opt("kprobevm_initrd"),
              smp=opt("kprobevm_smp"), kaslr=opt("kprobevm_kaslr"), qemu=opt("kprobevm_qemu"),
              cpu=opt("kprobevm_cpu") or DEFAULT_CPU, name="session",
              kernel_package=opt("kprobevm_kernel_package")) as guest:
        request.config.stash[_VM_KEY] = guest
        try:
            yield guest
        finally:
            del request.config.stash[_VM_KEY]


@pytest.fixture
def kprobes(kprobevm_vm: VM) -> Iterator[ProbeSession]:
    """A probe session on the shared guest, checked and emptied at teardown."""
    session = ProbeSession(kprobevm_vm)
    yield session
    problems = session.close()
    if problems:
        pytest.fail("kprobevm: " + "\n".join(problems), pytrace=False)


# --- the probe session ---------------------------------------------------------------------


class EventProbe:
    """One kprobe_events definition placed by a test; its hits arrive in :attr:`hits`."""

    def __init__(self, planned: PlannedProbe) -> None:
        self.planned = planned
        self.hits: list[EventHit] = []
        """Every hit so far (appended on the trap thread; read after the guest command)."""

    @property
    def name(self) -> str:
        return self.planned.event.event

    def values(self, arg: str) -> list[ArgValue]:
        """The value of argument ``arg`` at each hit (``bytes`` for strings)."""
        from kprobevm.tracing.session import args_of

        return [args_of(hit)[arg] for hit in self.hits]

    def lines(self) -> list[str]:
        """The hits as ftrace-format lines."""
        return [hit.line() for hit in self.hits]

    def __repr__(self) -> str:
        return f"<EventProbe {self.planned.event.definition()!r} hits={len(self.hits)}>"


class ProbeSession:
    """What the ``kprobes`` fixture gives a test: place probes, run commands, check hits.

    Every function a probe goes into is hashed before the probe is placed, so
    :meth:`close` can tell whether the guest's text came back as it was.
    """

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self._kprobes: list[Kprobe] = []
        self._kretprobes: list[Kretprobe] = []
        self._traces: list[TraceSession] = []
        self._maps: list[AggregateProbe] = []
        self._text: dict[str, tuple[int, int, str]] = {}  # function -> (addr, size, sha256)
        self._serial_start = len(vm.serial_log())

    # -- placing ------------------------------------------------------------------------

    def register(self, kp: Kprobe) -> Kprobe:
        """``vm.register_kprobe(kp)``, undone at teardown."""
        self._remember_text(self._address_of(kp.symbol_name, kp.offset, kp.addr))
        self.vm.register_kprobe(kp)
        self._kprobes.append(kp)
        return kp

    def kretprobe(self, rp: Kretprobe) -> Kretprobe:
        """``vm.register_kretprobe(rp)``, undone at teardown."""
        self._remember_text(self._address_of(rp.symbol_name, rp.offset, rp.addr))
        self.vm.register_kretprobe(rp)
        self._kretprobes.append(rp)
        return rp

    def event(self, definition: str) -> EventProbe:
        """Place one kprobe_events definition (``p:open do_sys_openat2 f=+0(%si):ustring``)."""
        return self.events(definition)[0]

    def events(self, *definitions: str) -> list[EventProbe]:
        """Place several definitions; raises ``ProbeSyntaxError`` as the kernel would."""
        from kprobevm.tracing.session import TraceSession, check_definitions, plan_events

        events, notes = check_definitions(definitions)
        if notes:
            raise ValueError("; ".join(notes))
        plan = plan_events(self.vm, events)
        probes = [EventProbe(p) for p in plan]
        for p in plan:
            self._remember_text(p.resolved.address)
        for planned, probe in zip(plan, probes, strict=True):
            session = TraceSession(self.vm, [planned], on_hit=probe.hits.append)
            session.start()
            self._traces.append(session)
        return probes

    def hist(
        self, definition: str, field: str, *, linear: tuple[int, int, int] | None = None
    ) -> AggregateProbe:
        """``vm.hist(...)``: a histogram of ``field`` kept in the guest; ``.read()`` it."""
        return self._map(self.vm.hist(definition, field, linear=linear))

    def funclatency(
        self, function: str | int, *, unit: str = "ns", maxactive: int = 0
    ) -> FuncLatency:
        """``vm.funclatency(...)``: ``function``'s call latencies, a histogram in the guest."""
        placed = self.vm.funclatency(function, unit=unit, maxactive=maxactive)
        self._map(placed)
        return placed

    def count_by(self, definition: str, by: str, *, depth: int = 16) -> AggregateProbe:
        """``vm.count_by(...)``: hits counted by comm, pid, cpu or stack in the guest."""
        return self._map(self.vm.count_by(definition, by, depth=depth))

    def _map(self, placed: AggregateProbe) -> AggregateProbe:
        # placed already: the text is read as the kernel has it, our int3 undone
        assert placed.kp.addr is not None
        sym = self.vm.symbols.lookup(placed.kp.addr)
        if sym is not None and sym.name not in self._text:
            size = max(sym.size, 1)
            digest = hashlib.sha256(self.vm.original_text(sym.address, size)).hexdigest()
            self._text[sym.name] = (sym.address, size, digest)
        self._maps.append(placed)
        return placed

    def run(self, command: str, *, timeout: float = 60.0, check: bool = False) -> RunResult:
        """Run a shell command in the guest (the probes fire meanwhile); when it returns,
        the hits the guest recorded are in the probes' ``hits``."""
        try:
            return self.vm.run(command, timeout=timeout, check=check)
        finally:
            self.vm.flush_records()

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> list[str]:
        """Unregister everything; return what is wrong (text not restored, oops lines)."""
        problems: list[str] = []
        for placed in reversed(self._maps):
            self._undo(problems, placed.close)
        for trace in reversed(self._traces):
            problems += [f"handler error: {e}" for e in trace.handler_errors()]
            self._undo(problems, trace.stop)
        for rp in reversed(self._kretprobes):
            if rp.registered:
                self._undo(problems, functools.partial(self.vm.unregister_kretprobe, rp))
        for kp in reversed(self._kprobes):
            if kp.registered:
                self._undo(problems, functools.partial(self.vm.unregister_kprobe, kp))
        self._traces, self._kretprobes, self._kprobes, self._maps = [], [], [], []
        for name, (addr, size, digest) in self._text.items():
            try:
                now = hashlib.sha256(self.vm.read(addr, size)).hexdigest()
            except KprobeVMError as exc:
                problems.append(f"cannot read back {name}: {exc}")
                continue
            if now != digest:
                problems.append(f"kernel text not restored: {name} ({addr:#x}, {size} bytes)")
        trouble = kernel_trouble(self.vm.serial_log()[self._serial_start :])
        if trouble:
            problems.append(
                "guest kernel trouble on the serial console:\n" + "\n".join(trouble[:20])
            )
        return problems

    @staticmethod
    def _undo(problems: list[str], undo: Callable[[], object]) -> None:
        try:
            undo()
        except KprobeVMError as exc:
            problems.append(f"unregister failed: {exc}")

    def _address_of(self, symbol: str | None, offset: int, addr: int | None) -> int:
        if addr is not None:
            return addr
        assert symbol is not None
        return self.vm.symbols[symbol] + offset

    def _remember_text(self, address: int) -> None:
        sym = self.vm.symbols.lookup(address)
        if sym is None or sym.name in self._text:
            return
        size = max(sym.size, 1)
        digest = hashlib.sha256(self.vm.read(sym.address, size)).hexdigest()
        self._text[sym.name] = (sym.address, size, digest)
