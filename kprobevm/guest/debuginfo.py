"""The DWARF vmlinux of a guest image's kernel, from Debian's ``-dbg`` package.

A Debian kernel package ``linux-image-RELEASE`` at version V has its debug info in
``linux-image-RELEASE-dbg`` at the same V, whose ``usr/lib/debug/boot/vmlinux-RELEASE``
is the very build's vmlinux with DWARF (what drgn needs for types). The package is
named from what the image recorded (its kernel package and version), downloaded with
``apt-get download`` (nothing installed), and only the vmlinux is taken out of it into
``debuginfo/`` in kprobevm's cache; the ``.deb`` (some 280 MB) is not kept. The vmlinux
must carry the build id of the image's own kernel, else it is refused: DWARF of another
build describes other types without any error.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kprobevm.errors import DebugInfoError, VmlinuxError, VmlinuxMismatch
from kprobevm.guest.image import Image, cache_dir
from kprobevm.kernel.vmlinux import Vmlinux

__all__ = [
    "DOWNLOAD_TIMEOUT",
    "EXTRACT_TIMEOUT",
    "DebugPackage",
    "check_build_id",
    "debug_vmlinux",
]

DOWNLOAD_TIMEOUT = 1800.0
"""Seconds ``apt-get download`` may take for the ``-dbg`` package (some 280 MB: 3 s on a
near mirror, half an hour at 150 KB/s)."""

EXTRACT_TIMEOUT = 900.0
"""Seconds taking the vmlinux out of the ``.deb`` may take (xz: some 25 s here)."""

_STALL_SECONDS = 60
"""apt's own limit for a connection that sends nothing (``Acquire::http::Timeout``)."""


@dataclass(frozen=True)
class DebugPackage:
    """The ``-dbg`` package of a Debian kernel package, and where its vmlinux is in it."""

    name: str
    version: str
    release: str

    @classmethod
    def of_image(cls, image: Image) -> DebugPackage:
        """The debug package of the kernel package ``image`` was built from, as the image
        recorded it; an image of a self-built kernel has none (its own vmlinux serves)."""
        package, release = image.kernel_package, image.kernel_release
        if not re.fullmatch(r"linux-image-[A-Za-z0-9.+~-]+", package):
            raise DebugInfoError(
                f"image {image.key} was not built from a Debian kernel package: its vmlinux"
                " with DWARF is the one it was built with", package=package, step="name",
            )
        if package != f"linux-image-{release}":
            raise DebugInfoError(
                f"image {image.key}'s kernel package does not name its release {release}",
                package=package, step="name",
            )
        return cls(f"{package}-dbg", image.kernel_version, release)

    @property
    def member(self) -> str:
        """The vmlinux's path in the package's data archive."""
        return f"./usr/lib/debug/boot/vmlinux-{self.release}"

    @property
    def cache_name(self) -> str:
        """The cache directory of this package version (``:`` as apt writes it in names)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}"


def debug_vmlinux(
    image: Image,
    *,
    cache: Path | None = None,
    download_timeout: float = DOWNLOAD_TIMEOUT,
    extract_timeout: float = EXTRACT_TIMEOUT,
) -> Path:
    """The vmlinux with DWARF of ``image``'s kernel: from the cache, else downloaded and
    extracted there first (said on stderr, with the times). Safe to run from several
    processes at once: one fetches, the others wait for it; a fetch cut short leaves
    nothing behind but temporary files, removed at the next.

    Raises :class:`~kprobevm.errors.DebugInfoError` when the package cannot be had and
    :class:`~kprobevm.errors.VmlinuxMismatch` when its build id is not the image's.
    """
    package = DebugPackage.of_image(image)
    expected = _build_id(image.vmlinux, package)
    directory = (cache or cache_dir()) / "debuginfo" / package.cache_name
    target = directory / "vmlinux"
    if target.is_file():
        check_build_id(target, expected)
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory / ".lock"):
        if not target.is_file():  # else another process fetched it while we waited
            _fetch(package, directory, target, download_timeout, extract_timeout, expected)
    check_build_id(target, expected)
    return target


def check_build_id(vmlinux: Path, expected: str) -> None:
    """Refuse ``vmlinux`` unless its build id is ``expected``."""
    found = _build_id(vmlinux, None)
    if found != expected:
        raise VmlinuxMismatch("a vmlinux of another kernel build", vmlinux=str(vmlinux),
                              theirs=f"build id {found}", ours=f"build id {expected}")  # fmt: skip


def _build_id(vmlinux: Path, package: DebugPackage | None) -> str:
    try:
        with Vmlinux(vmlinux) as elf:
            found = elf.build_id
    except VmlinuxError as exc:
        if package is None:
            raise
        raise DebugInfoError(f"the image's vmlinux {vmlinux} is unreadable: {exc}",
                             package=package.name, step="build id") from exc  # fmt: skip
    if found is None:
        raise VmlinuxError(f"{vmlinux} has no GNU build id note: nothing tells its build")
    return found


def _fetch(package: DebugPackage, directory: Path, target: Path, download_timeout: float,
           extract_timeout: float, expected: str) -> None:  # fmt: skip
    """Download the package into a temporary directory beside ``target``, take the
    vmlinux out into a temporary file, check it, and rename it into place."""
    for stale in directory.glob(".fetch-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=directory))
    try:
        started = time.monotonic()
        _say(f"downloading {package.name} {package.version} (the guest kernel's DWARF)")
        _run(package, "download", work, download_timeout, [
            "apt-get", "download", "-q", "-o", f"Acquire::http::Timeout={_STALL_SECONDS}",
            f"{package.name}={package.version}",
        ])
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise DebugInfoError("apt-get download left no .deb", package=package.name,
                                 step="download")  # fmt: skip
        size = debs[0].stat().st_size
        fetched = time.monotonic()
        _say(f"downloaded {size / 1e6:.0f} MB in {fetched - started:.1f} s;"
             f" extracting {package.member}")  # fmt: skip
        partial = work / "vmlinux"
        _extract(package, debs[0], partial, extract_timeout)
        debs[0].unlink()
        check_build_id(partial, expected)
        os.replace(partial, target)
        _say(f"extracted {target.stat().st_size / 1e6:.0f} MB in"
             f" {time.monotonic() - fetched:.1f} s: {target}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _extract(package: DebugPackage, deb: Path, out: Path, timeout: float) -> None:
    """``dpkg-deb --fsys-tarfile DEB | tar -xO MEMBER > out``, both ended at the deadline."""
    dpkg = ["dpkg-deb", "--fsys-tarfile", str(deb)]
    tar = ["tar", "-x", "-O", "-f", "-", package.member]
    command = f"{' '.join(dpkg)} | {' '.join(tar)}"
    deadline = time.monotonic() + timeout
    with out.open("wb") as sink, tempfile.TemporaryFile() as errors:
        try:
            # a process group of their own in our session (tar may only join a group
            # of the session it is in)
            archive = subprocess.Popen(dpkg, stdout=subprocess.PIPE, stderr=errors,
                                       stdin=subprocess.DEVNULL, process_group=0)
        except OSError as exc:
            raise DebugInfoError(f"dpkg-deb could not be started: {exc}",
                                 package=package.name, step="extract",
                                 command=command) from exc  # fmt: skip
        procs = [archive]
        try:
            assert archive.stdout is not None
            procs.append(subprocess.Popen(tar, stdin=archive.stdout, stdout=sink,
                                          stderr=errors, process_group=archive.pid))
            archive.stdout.close()  # tar holds the pipe now: dpkg-deb sees it close
            statuses = [_wait(p, deadline) for p in procs]
        except (subprocess.TimeoutExpired, OSError) as exc:
            for proc in procs:  # tar is in dpkg-deb's process group
                _kill_group(proc)
            why = (f"took longer than {timeout:.0f} s"
                   if isinstance(exc, subprocess.TimeoutExpired) else f"failed: {exc}")
            raise DebugInfoError(f"extracting the vmlinux {why}",
                                 package=package.name, step="extract",
                                 command=command) from exc  # fmt: skip
        if any(statuses):
            raise DebugInfoError(
                f"extracting the vmlinux failed (status {statuses}): the package may not"
                f" hold {package.member}", package=package.name, step="extract",
                command=command, output=_read_all(errors),
            )


def _run(package: DebugPackage, step: str, cwd: Path, timeout: float,
         args: Sequence[str]) -> None:  # fmt: skip
    """Run a host tool in its own process group, all of it killed at the deadline (apt
    leaves its download methods behind otherwise)."""
    command = " ".join(args)
    try:
        proc = subprocess.Popen(list(args), cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                start_new_session=True)  # fmt: skip
    except FileNotFoundError as exc:
        raise DebugInfoError(f"{args[0]} is not installed", package=package.name, step=step,
                             command=command) from exc  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        raise DebugInfoError(f"{args[0]} took longer than {timeout:.0f} s",
                             package=package.name, step=step, command=command) from exc
    if proc.returncode != 0:
        raise DebugInfoError(f"{args[0]} failed with status {proc.returncode}",
                             package=package.name, step=step, command=command,
                             output=output)  # fmt: skip


def _wait(proc: subprocess.Popen[bytes], deadline: float) -> int:
    return proc.wait(timeout=max(0.0, deadline - time.monotonic()))


def _kill_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_all(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock``: one process fetches a package version at a time."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _say(message: str) -> None:
    print(f"kprobevm: {message}", file=sys.stderr, flush=True)
