"""boot(): start QEMU on a guest image, wait until SSH answers, hand back a `VM`.

The launcher only starts and stops QEMU; what it launches is a plain `VM` made from
endpoints (sockets in a private 0700 directory, an SSH port on 127.0.0.1), the same
object a later attach() would build for a QEMU someone else started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kprobevm.errors import (
    GuestNotReady,
    QEMUNotFound,
    VMError,
    VMLaunchFailure,
)
from kprobevm.guest.guestram import RamFile, create_ram_file, parse_memory_size, sweep_stale_ram
from kprobevm.guest.image import (
    DEFAULT_MEMORY,
    READY_MARKER,
    SLOT_RESERVE,
    Image,
    SelfBuilt,
    build_image,
    default_image,
    kernel_package_image,
)
from kprobevm.guest.qemu_builds import QEMU_ENV, resolve_qemu
from kprobevm.guest.shell import GuestShell
from kprobevm.guest.vm import VM, GuestEndpoints

__all__ = ["DEFAULT_CPU", "LA57_CPU", "SLOT_RESERVE", "QemuMachine", "boot", "kernel_cmdline"]

log = logging.getLogger(__name__)

DEFAULT_CPU = "qemu64,+rdrand"
"""QEMU's ``-cpu`` for a guest unless told otherwise (RDRAND feeds the guest's entropy)."""
LA57_CPU = "qemu64,+rdrand,+la57"
"""The default CPU with 5-level paging: the 6.1 cloud kernel turns LA57 on when it sees it."""

_PR_SET_PDEATHSIG = 1
_BOOT_STALL = re.compile(r"soft lockup|self-detected stall|IO-APIC \+ timer doesn't work")
"""What a TCG guest's kernel says when its boot stalled on the host's scheduling (vCPU
threads not run for seconds on a busy host, four vCPUs behind two cores): such a boot,
before kprobevm touched the guest, is tried once more."""
_KVM_READY_TIMEOUT = 8.0
"""How long a KVM boot may take to print the ready marker before we call it hung
(nested KVM on these machines hangs the guest rather than failing)."""


def kernel_cmdline(base: str, *, kaslr: bool = False, append: str = "") -> str:
    """The guest command line: the image's, ``nokaslr`` dropped when ``kaslr``, plus extras."""
    words = base.split()
    if kaslr:
        words = [w for w in words if w != "nokaslr"]
    return " ".join([*words, *append.split()])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pdeathsig_preexec() -> None:
    """In the child before exec: die with the parent (used when setpriv is missing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _tail(path: Path, limit: int = 8192) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


async def _qmp_execute(path: str, command: str, args: dict[str, Any] | None,
                       timeout: float) -> Any:
    from qemu.qmp import QMPClient
    from qemu.qmp.protocol import ConnectError
    from qemu.qmp.qmp_client import GreetingError, NegotiationError

    # QEMU's monitor keeps one output buffer across connections: events queued for the
    # last client (a STOP/RESUME pair per probe hit) can reach the next one ahead of its
    # greeting or in its capabilities negotiation. The failed attempt drains them; the
    # next connection starts clean.
    for attempt in range(3):
        client = QMPClient(f"kprobevm-{os.path.basename(os.path.dirname(path))}")
        try:
            await asyncio.wait_for(client.connect(path), timeout)
            return await asyncio.wait_for(client.execute(command, args), timeout)
        except ConnectError as exc:
            if not isinstance(exc.exc, GreetingError | NegotiationError) or attempt == 2:
                raise
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()
    raise AssertionError("unreachable")


def _kill_group(proc: subprocess.Popen[bytes], private_dir: str, ram: RamFile | None) -> None:
    """Last resort (garbage collection or interpreter exit): kill QEMU, drop its directory
    and its RAM file."""
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    shutil.rmtree(private_dir, ignore_errors=True)
    if ram is not None:
        ram.remove()


@dataclass(frozen=True)
class _Launch:
    command: list[str]
    private_dir: Path
    ssh_port: int
    gdb: str | tuple[str, int]
    ram: RamFile | None


class QemuMachine:
    """A QEMU process we started: its command line, QMP, and how to stop it."""

    def __init__(self, proc: subprocess.Popen[bytes], launch: _Launch, name: str) -> None:
        self.proc = proc
        self._launch = launch
        self.name = name
        self.private_dir = launch.private_dir
        self.qmp_path = launch.private_dir / "qmp.sock"
        self.serial_path = launch.private_dir / "serial.log"
        self.output_path = launch.private_dir / "qemu.log"
        self.ram = launch.ram
        """The file that holds guest RAM, shared with the host (None: QEMU's own RAM)."""
        self._finalizer = weakref.finalize(self, _kill_group, proc, str(launch.private_dir),
                                           launch.ram)  # fmt: skip

    @property
    def command(self) -> list[str]:
        return list(self._launch.command)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int | None:
        """QEMU's exit status once it has exited (waiting up to ``timeout`` s), else None."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def qmp(self, command: str, args: dict[str, Any] | None = None,
            timeout: float = 5.0) -> Any:
        """Execute one QMP command (a fresh connection each time) and return its result."""
        if not self.alive():
            raise VMError(f"{self.name}: QEMU is not running (exit code {self.proc.returncode})")
        try:
            return asyncio.run(_qmp_execute(str(self.qmp_path), command, args, timeout))
        except (TimeoutError, OSError) as exc:
            raise VMError(f"{self.name}: QMP {command} failed: {exc}") from exc
        except Exception as exc:  # qemu.qmp's own errors (ConnectError, ExecuteError...)
            raise VMError(f"{self.name}: QMP {command} failed: {exc!r}") from exc

    def status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``debug``, ...) from ``query-status``."""
        return str(self.qmp("query-status")["status"])

    def serial_log(self) -> str:
        try:
            return self.serial_path.read_text(errors="replace")
        except OSError:
            return ""

    def output(self) -> str:
        return _tail(self.output_path)

    def failure(self, cls: type[VMLaunchFailure], message: str) -> VMLaunchFailure:
        """An error carrying the command line, exit code, QEMU's output and the log tail."""
        return cls(
            message, exitcode=self.proc.poll(), command=self.command,
            output=self.output(), serial_log=_tail(self.serial_path),
        )

    def shutdown(self, timeout: float = 10.0) -> None:
        """Power off through QMP ``quit``; kill QEMU if it lingers; remove its directory."""
        try:
            if self.alive():
                try:
                    self.qmp("quit", timeout=min(timeout, 5.0))
                except VMError as exc:
                    log.debug("%s: QMP quit failed (%s); killing QEMU", self.name, exc)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("%s: QEMU lingered after quit; killing it", self.name)
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            self._finalizer()

    def __repr__(self) -> str:
        return f"<QemuMachine {self.name} pid={self.proc.pid} dir={self.private_dir}>"


def _command(qemu: str, *, kernel: Path, initrd: Path, cmdline: str, memory: str, smp: int,
             accel: str, private_dir: Path, ssh_port: int, gdb_tcp: bool | int,
             ram: RamFile | None, cpu: str) -> tuple[list[str], str | tuple[str, int]]:
    gdb: str | tuple[str, int]
    if gdb_tcp is False:
        gdb = str(private_dir / "gdb.sock")
        gdb_arg = f"unix:{gdb},server=on,wait=off"
    else:
        # Only when asked, and only on loopback: the gdbstub can write all guest memory.
        gdb = ("127.0.0.1", _free_port() if gdb_tcp is True else int(gdb_tcp))
        gdb_arg = f"tcp:{gdb[0]}:{gdb[1]},server=on,wait=off"
    command = [
        qemu,
        "-nodefaults", "-display", "none", "-no-reboot",
        "-machine", "pc", "-accel", accel, "-cpu", cpu,
        "-m", memory, "-smp", str(smp),
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-serial", f"file:{private_dir / 'serial.log'}",
        "-qmp", f"unix:{private_dir / 'qmp.sock'},server=on,wait=off",
        "-gdb", gdb_arg,
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        # romfile= (empty): no iPXE option ROM for SeaBIOS to run; we boot with -kernel.
        "-device", "virtio-net-pci,netdev=n0,romfile=",
    ]
    if ram is not None:
        command += ram.qemu_args()
    return command, gdb


def _spawn(command: list[str], output: Path) -> subprocess.Popen[bytes]:
    """Start QEMU in its own session (Ctrl-C is ours to handle) that dies with this process.

    ``setpriv --pdeathsig KILL`` sets the parent-death signal and then execs QEMU, so no
    Python runs between fork and exec; without setpriv a preexec_fn does the same.
    Either way the signal follows the *thread* that started QEMU: boot from a thread that
    lives as long as the VM.
    """
    setpriv = shutil.which("setpriv")
    with output.open("wb") as out:
        if setpriv is not None:
            return subprocess.Popen(
                [setpriv, "--pdeathsig", "KILL", "--", *command],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_pdeathsig_preexec,
        )


def _wait_ready(machine: QemuMachine, ssh_port: int, key: Path, deadline: float,
                expect_marker: bool) -> GuestShell:
    """Wait for the serial marker (our init prints it), then for SSH to run a command."""
    marker_seen = not expect_marker
    while True:
        if not machine.alive():
            raise machine.failure(VMLaunchFailure, f"{machine.name}: QEMU exited during boot")
        if not marker_seen:
            marker_seen = READY_MARKER in machine.serial_log()
        if marker_seen:
            try:
                shell = GuestShell(("127.0.0.1", ssh_port), key=key,
                                   connect_timeout=max(1.0, deadline - time.monotonic()))
                shell.run("true", timeout=max(1.0, deadline - time.monotonic()), check=True)
                return shell
            except VMError as exc:
                log.debug("%s: SSH not ready yet: %s", machine.name, exc)
                if not machine.alive():
                    continue
        if time.monotonic() >= deadline:
            raise machine.failure(GuestNotReady,
                                  f"{machine.name}: guest not reachable over SSH in time")
        time.sleep(0.05 if not marker_seen else 0.2)


def _ram_file(name: str, spec: _GuestSpec) -> RamFile | None:
    """A RAM file for the guest, or None (said on stderr: every read then costs a gdbstub
    round trip, and draining recorded hits a VM stop)."""
    try:
        return create_ram_file(name, parse_memory_size(spec.memory))
    except (OSError, ValueError) as exc:
        log.warning("%s: guest RAM not shared with the host (%s): memory reads go through "
                    "the gdbstub", name, exc)  # fmt: skip
        return None


def _sweep_stale_dirs() -> None:
    """Remove private directories and RAM files left by a process that was killed (its QEMU
    died with it through the parent-death signal, but nobody removed its files)."""
    sweep_stale_ram()
    for directory in Path(tempfile.gettempdir()).glob("kprobevm-*"):
        try:
            owner = int((directory / "owner").read_text())
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
        except (OSError, ValueError):
            continue


def _hostfwd_failed(output: str) -> bool:
    return "hostfwd" in output or "host forwarding" in output


@dataclass(frozen=True)
class _GuestSpec:
    """What the guest boots with, the same on every attempt."""

    kernel: Path
    initrd: Path
    cmdline: str
    memory: str
    smp: int
    gdb_tcp: bool | int
    key: Path
    shared_ram: bool
    """Guest RAM in a file the host maps too (:mod:`kprobevm.guest.guestram`)."""
    expect_marker: bool
    """The initramfs is the image's: its init prints the ready marker on the serial line."""
    cpu: str = DEFAULT_CPU


def _launch(qemu: str, spec: _GuestSpec, *, name: str, accel: str,
            timeout: float) -> tuple[QemuMachine, GuestShell, int]:
    """One QEMU start; retried by the caller when the SSH port was taken meanwhile."""
    _sweep_stale_dirs()
    private_dir = Path(tempfile.mkdtemp(prefix=f"kprobevm-{name}-"))  # mode 0700
    (private_dir / "owner").write_text(f"{os.getpid()}\n")
    ssh_port = _free_port()
    ram = _ram_file(name, spec) if spec.shared_ram else None
    command, gdb = _command(
        qemu, kernel=spec.kernel, initrd=spec.initrd, cmdline=spec.cmdline, memory=spec.memory,
        smp=spec.smp, accel=accel, private_dir=private_dir, ssh_port=ssh_port,
        gdb_tcp=spec.gdb_tcp, ram=ram, cpu=spec.cpu,
    )
    launch = _Launch(command, private_dir, ssh_port, gdb, ram)
    try:
        proc = _spawn(command, private_dir / "qemu.log")
    except OSError as exc:
        shutil.rmtree(private_dir, ignore_errors=True)
        if ram is not None:
            ram.remove()
        raise VMLaunchFailure(f"{name}: could not start QEMU: {exc}", command=command) from exc
    machine = QemuMachine(proc, launch, name)
    log.info("%s: QEMU pid %d, %s", name, proc.pid, private_dir)
    try:
        shell = _wait_ready(machine, ssh_port, spec.key, time.monotonic() + timeout,
                            spec.expect_marker)
    except BaseException:
        machine.shutdown(timeout=2.0)
        raise
    return machine, shell, ssh_port


_counter = 0


def boot(
    image: Image | None = None,
    *,
    kernel: Path | str | None = None,
    initrd: Path | str | None = None,
    append: str = "",
    memory: str = DEFAULT_MEMORY,
    smp: int = 1,
    accel: str = "tcg",
    kaslr: bool = False,
    cpu: str = DEFAULT_CPU,
    gdb_tcp: bool | int = False,
    qemu: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
    name: str | None = None,
    shared_ram: bool = True,
    kernel_package: str | None = None,
    vmlinux: Path | str | None = None,
    modules: Path | str | None = None,
) -> VM:
    """Boot a guest (the default image unless told otherwise) and return its `VM` once SSH
    answers. Use it as a context manager: leaving the ``with`` powers the guest off.

    Parameters:
        image: the guest image (kernel, initramfs, SSH key); None builds or finds the
            default one in the cache.
        kernel, initrd: another kernel or initramfs than the image's (the image's SSH
            key still reaches the guest).
        append: more kernel command line, after the image's own.
        memory: guest RAM as QEMU's ``-m`` takes it (``544M``).
        smp: the number of vCPUs.
        accel: ``tcg``, ``kvm``, or ``auto`` (KVM when ``/dev/kvm`` is usable, back to TCG,
            said on stderr, when the KVM guest dies or hangs).
        kaslr: boot with KASLR on (the default image boots ``nokaslr``): the kernel's
            virtual and physical base and its direct map, vmalloc and vmemmap bases move.
        cpu: QEMU's ``-cpu`` (default ``qemu64,+rdrand``); :data:`LA57_CPU` adds ``la57``,
            which the guest kernel takes as 5-level paging.
        gdb_tcp: the gdbstub on 127.0.0.1 (a port, or True for a free one) instead of a
            unix socket in the VM's private directory.
        qemu: the QEMU binary, by name on PATH or by path; None: ``$KPROBEVM_QEMU``, else
            ``qemu-system-x86_64`` (``scripts/fetch-qemu`` prints a newer one's path).
        timeout: seconds to wait for the guest's SSH before giving up.
        name: the VM's name in logs, errors and its journal (``vmN`` by default).
        shared_ram: keep guest RAM in a file on ``/dev/shm`` that the host maps too, for
            reads at memory speed and recorded hits drained without a VM stop (when it
            cannot, stderr says so and the gdbstub does it all).
        kernel_package: boot a Debian kernel package's image instead of the default: a
            package or metapackage name (``linux-image-6.12-cloud-amd64``) or a local
            ``.deb``; built on first use with that kernel's own modules.
        vmlinux, modules: with ``kernel``, a self-built kernel: its vmlinux (symbols,
            BTF, DWARF if it has them; used where it is) and, when its virtio drivers are
            modules, the directory they are installed in. An image with an initramfs of
            those modules is built on first use.

    Returns the running `VM`.

    Raises :class:`QEMUNotFound` when the binary is missing, and :class:`VMLaunchFailure`
    (with the command line and QEMU's output) when QEMU fails or the guest never answers.
    """
    global _counter
    _counter += 1
    name = name or f"vm{_counter}"
    wanted = resolve_qemu(qemu)
    binary = shutil.which(wanted)
    if binary is None:
        origin = f" (from ${QEMU_ENV})" if qemu is None and os.environ.get(QEMU_ENV) else ""
        raise QEMUNotFound(f"{name}: QEMU binary {wanted!r}{origin} not found",
                           command=[wanted])
    image, kernel = _choose_image(image, kernel=kernel, kernel_package=kernel_package,
                                  vmlinux=vmlinux, modules=modules, name=name)
    kernel_path = Path(kernel) if kernel is not None else image.kernel
    initrd_path = Path(initrd) if initrd is not None else image.initrd
    cmdline = kernel_cmdline(image.cmdline, kaslr=kaslr, append=append)
    for what, path in (("kernel", kernel_path), ("initrd", initrd_path)):
        if not path.is_file():
            raise VMLaunchFailure(f"{name}: {what} file {path} does not exist",
                                  command=[binary, f"-{what}", str(path)])

    spec = _GuestSpec(kernel_path, initrd_path, cmdline, memory, smp, gdb_tcp, image.ssh_key,
                      shared_ram, expect_marker=initrd_path == image.initrd, cpu=cpu)  # fmt: skip
    machine, shell, ssh_port = _launch_trying(binary, spec, accel, name=name, timeout=timeout)
    return VM(
        GuestEndpoints(
            gdb=machine._launch.gdb, ssh=("127.0.0.1", ssh_port), ssh_key=image.ssh_key,
            qmp=str(machine.qmp_path), serial_log=machine.serial_path,
        ),
        name=name, machine=machine,
        vmlinux=image.vmlinux if kernel_path == image.kernel else None,
        image=image if kernel_path == image.kernel else None,
        kernel_cmdline=cmdline,
        shell=shell,  # the connection readiness already made (a new one costs ~1 s)
    )  # fmt: skip


def _choose_image(
    image: Image | None, *, kernel: Path | str | None, kernel_package: str | None,
    vmlinux: Path | str | None, modules: Path | str | None, name: str,
) -> tuple[Image, Path | str | None]:
    """The image to boot and the kernel to boot it with (None: the image's). The image
    is needed even with another kernel and initrd: its SSH key reaches the guest."""
    if kernel_package is not None:
        if image is not None or kernel is not None or vmlinux is not None:
            raise VMLaunchFailure(
                f"{name}: kernel_package={kernel_package!r} names the kernel; it cannot go "
                "with image, kernel or vmlinux", command=[],
            )
        return kernel_package_image(kernel_package), None
    if vmlinux is not None or modules is not None:
        if kernel is None or vmlinux is None or image is not None:
            raise VMLaunchFailure(
                f"{name}: a self-built kernel needs kernel (its bzImage) and vmlinux "
                "(modules if its virtio drivers are modules), and no image", command=[],
            )
        built = build_image(self_built=SelfBuilt(
            Path(kernel), Path(vmlinux), Path(modules) if modules is not None else None))
        return built, None
    return image or default_image(), kernel


def _launch_trying(
    binary: str, spec: _GuestSpec, accel: str, *, name: str, timeout: float
) -> tuple[QemuMachine, GuestShell, int]:
    """:func:`_launch` with ``accel``, again on TCG when a KVM guest fails (said on
    stderr), and again when the SSH port was taken between choosing and binding it."""
    accels = ["kvm", "tcg"] if accel == "auto" and os.access("/dev/kvm", os.R_OK | os.W_OK) \
        else ["tcg" if accel == "auto" else accel]
    last: VMLaunchFailure | None = None
    stalled = False
    for attempt in range(len(accels) + 3):
        this = accels[min(attempt, len(accels) - 1)]
        limit = min(timeout, _KVM_READY_TIMEOUT) if this == "kvm" else timeout
        try:
            return _launch(binary, spec, name=name, accel=this, timeout=limit)
        except VMLaunchFailure as exc:
            last = exc
            if this == "kvm":
                log.warning("%s: KVM boot failed, falling back to TCG: %s", name, exc)
                accels = ["tcg"]
                continue
            if _hostfwd_failed(exc.output) and attempt < len(accels) + 2:
                log.info("%s: SSH port taken meanwhile; retrying with another", name)
                continue
            said = _BOOT_STALL.search(exc.serial_log) if isinstance(exc, GuestNotReady) else None
            if said is not None and not stalled and attempt < len(accels) + 2:
                stalled = True
                log.warning("%s: the guest's boot stalled under TCG (its kernel said %r);"
                            " booting it once more", name, said.group(0))  # fmt: skip
                continue
            raise
    assert last is not None
    raise last

