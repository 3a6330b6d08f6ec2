"""Which QEMU binary kprobevm runs, and fetching a newer one than the host's.

:func:`resolve_qemu` names the binary: the caller's choice, else ``$KPROBEVM_QEMU``, else
``qemu-system-x86_64`` on PATH. :func:`fetch_qemu` unpacks QEMU from a Debian suite
(``bookworm-backports``: QEMU 10.0 for Debian 12) into the cache through a private apt
configuration, so the host's QEMU, its apt lists and dpkg's database stay untouched.
Under ``<cache>/qemu/`` (0700, like every cache directory)::

    .lock                  flock: one fetch at a time (pytest-xdist workers, say)
    apt/<suite>/           the suite's private apt: sources, lists, cache, ``updated`` stamp
    <suite>-<version>/     a ready build: ``root/`` (the unpacked packages),
                           ``bin/qemu-system-x86_64`` (the wrapper to run), ``build.json``

A build is unpacked in a ``.build-*`` directory and renamed into place once its wrapper
answers ``--version``: a fetch killed half-way leaves no build behind, only a ``.build-*``
directory that the next fetch removes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kprobevm.errors import QemuBinaryError
from kprobevm.guest.image import PRIVATE_DIR_MODE, _locked, _log, _private_dir, cache_dir

__all__ = [
    "DEFAULT_QEMU",
    "DEFAULT_SUITE",
    "LISTS_MAX_AGE",
    "PACKAGES",
    "QEMU_ENV",
    "QemuBuild",
    "fetch_qemu",
    "qemu_version",
    "resolve_qemu",
    "wrapper_script",
]

QEMU_ENV = "KPROBEVM_QEMU"
"""The environment variable naming the QEMU binary when the caller names none."""

DEFAULT_QEMU = "qemu-system-x86_64"
DEFAULT_SUITE = "bookworm-backports"

MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios")
"""What a kprobevm guest needs: the emulator, its modules, its option ROMs
(``linuxboot_dma.bin``, ``kvmvapic.bin``) and SeaBIOS (``bios-256k.bin``). No VGA BIOS
and no iPXE: guests run ``-nodefaults`` with ``romfile=`` on their NIC."""

LISTS_MAX_AGE = 24 * 3600.0
"""Seconds a suite's private package lists are used before ``apt-get update`` runs again."""

_SUITE = re.compile(r"[a-z][a-z0-9.+-]*")
_VERSION = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")

log = logging.getLogger(__name__)


def resolve_qemu(qemu: str | os.PathLike[str] | None = None) -> str:
    """The QEMU binary to run: ``qemu`` when given, else ``$KPROBEVM_QEMU``, else
    ``qemu-system-x86_64`` (a name on PATH or a path, as ``boot(qemu=...)`` takes it)."""
    if qemu is not None:
        return os.fspath(qemu)
    return os.environ.get(QEMU_ENV) or DEFAULT_QEMU


def qemu_version(binary: str | os.PathLike[str]) -> tuple[int, int, int]:
    """(major, minor, micro) from ``BINARY --version`` ("QEMU emulator version 10.0.2 ...")."""
    command = [os.fspath(binary), "--version"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuBinaryError(f"cannot run {command[0]}: {exc}", step="version",
                              command=command) from exc
    output = proc.stdout + proc.stderr
    match = _VERSION.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        why = f"exited with status {proc.returncode}" if proc.returncode else \
            "printed no 'QEMU emulator version X.Y.Z'"
        if "GLIBC_" in output or "cannot open shared object" in output:
            why += " (it was built for other libraries than this host's)"
        raise QemuBinaryError(f"cannot read the version of {command[0]}: it {why}",
                              step="version", command=command, output=output)
    major, minor, micro = match.groups()
    return int(major), int(minor), int(micro or 0)


@dataclass(frozen=True)
class QemuBuild:
    """A QEMU unpacked from a Debian suite into the cache; run it through ``binary``."""

    suite: str
    version: str
    """The Debian version of its ``qemu-system-x86`` (``1:10.0.2+ds-2+deb13u1~bpo12+1``)."""
    binary: Path
    """The wrapper: it points QEMU at the build's modules, ROMs and BIOS."""
    root: Path
    """Where the packages are unpacked (``usr/bin``, ``usr/share/qemu``, ...)."""

    @classmethod
    def load(cls, directory: Path) -> QemuBuild:
        """The build in ``directory`` (a ``<suite>-<version>`` directory of the cache)."""
        try:
            data = json.loads((directory / "build.json").read_text())
            suite, version = str(data["suite"]), str(data["version"])
        except (OSError, ValueError, KeyError) as exc:
            raise QemuBinaryError(f"unreadable QEMU build {directory}: {exc}",
                                  step="load") from exc
        return cls(suite, version, directory / "bin" / DEFAULT_QEMU, directory / "root")


def wrapper_script(root: Path, *, suite: str = "", version: str = "") -> str:
    """The ``sh`` wrapper that runs the QEMU unpacked at ``root`` with its own modules,
    ROMs and BIOS (without ``-L`` it would take the host's, of another QEMU version)."""
    modules = shlex.quote(str(root / "usr/lib/x86_64-linux-gnu/qemu"))
    binary = shlex.quote(str(root / "usr/bin/qemu-system-x86_64"))
    roms = shlex.quote(str(root / "usr/share/qemu"))
    bios = shlex.quote(str(root / "usr/share/seabios"))
    origin = f"QEMU {version} from Debian {suite}" if suite else "QEMU"
    return (
        "#!/bin/sh\n"
        f"# {origin}, unpacked by kprobevm (scripts/fetch-qemu).\n"
        f"export QEMU_MODULE_DIR={modules}\n"
        f'exec {binary} -L {roms} -L {bios} "$@"\n'
    )


# -- running host tools ----------------------------------------------------------------------


def _run(step: str, args: Sequence[str], *, cwd: Path | None = None) -> str:
    """Run a host tool for ``step``; its stdout, or QemuBinaryError with its output."""
    try:
        proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True,
                              check=False, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise QemuBinaryError(f"cannot run {args[0]}: {exc}", step=step,
                              command=args) from exc
    if proc.returncode != 0:
        raise QemuBinaryError(f"{args[0]} failed with status {proc.returncode}", step=step,
                              command=args, output=proc.stdout + proc.stderr)
    return proc.stdout


@dataclass(frozen=True)
class _Deb:
    name: str
    version: str
    filename: str


@dataclass(frozen=True)
class _PrivateApt:
    """apt for one suite with its own sources, lists and cache (the host's stay as they
    are). The host's ``apt.conf.d`` still applies: a proxy configured there is used."""

    directory: Path
    suite: str

    @property
    def _stamp(self) -> Path:
        return self.directory / "updated"

    def sources(self) -> str:
        # Targets: Packages only: no translations, Contents or DEP-11 (apt-file, appstream).
        return (f"Types: deb\nURIs: {MIRROR}\nSuites: {self.suite}\nComponents: main\n"
                f"Targets: Packages\nSigned-By: {KEYRING}\n")

    def options(self) -> list[str]:
        d = self.directory
        return [
            "-o", f"Dir::Etc={d / 'etc'}",
            "-o", "Dir::Etc::sourcelist=/dev/null",
            "-o", f"Dir::Etc::sourceparts={d / 'etc' / 'sources.list.d'}",
            "-o", f"Dir::State={d / 'state'}",
            "-o", f"Dir::Cache={d / 'cache'}",
            "-o", "Dir::State::status=/var/lib/dpkg/status",
            # Root downloads itself: _apt cannot enter the private (0700) directories.
            "-o", "APT::Sandbox::User=root",
            # Without it apt-get update exits 0 when the mirror cannot be reached.
            "-o", "APT::Update::Error-Mode=any",
            # Retry at once, not after seconds of back-off: offline, the cached build
            # is used without a wait.
            "-o", "Acquire::Retries::Delay=false",
        ]

    def prepare(self) -> None:
        """Create the private directories and (re)write the sources file."""
        for d in (self.directory.parent, self.directory):
            _private_dir(d)
        for sub in ("etc/sources.list.d", "etc/preferences.d", "state", "cache"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        sources = self.directory / "etc" / "sources.list.d" / "kprobevm.sources"
        if not sources.is_file() or sources.read_text() != self.sources():
            sources.write_text(self.sources())

    def fresh(self) -> bool:
        """Whether the lists came from this mirror and suite less than a day ago.

        A stamp of our own rather than the lists' mtimes: apt gives those the server's
        Last-Modified time, not the time of the update.
        """
        try:
            age = time.time() - self._stamp.stat().st_mtime
            return 0 <= age < LISTS_MAX_AGE and self._stamp.read_text() == self.sources()
        except OSError:
            return False

    def update(self) -> None:
        _log(f"apt-get update for {self.suite} (private lists)")
        self._stamp.unlink(missing_ok=True)
        _run("apt-get update", ["apt-get", *self.options(), "update"])
        self._stamp.write_text(self.sources())

    def candidates(self, packages: Sequence[str]) -> dict[str, _Deb]:
        """The .deb each package would be, from the lists alone (no network)."""
        wanted = [f"{p}/{self.suite}" for p in packages]
        out = _run("resolve packages",
                   ["apt-get", *self.options(), "download", "--print-uris", *wanted])
        found: dict[str, _Deb] = {}
        for line in out.splitlines():
            # 'URI' name_version_arch.deb size hash, the version's ':' quoted as %3a
            words = line.split()
            if len(words) >= 2 and words[1].endswith(".deb") and words[1].count("_") == 2:
                name, version, _ = words[1].split("_")
                found[name] = _Deb(name, version.replace("%3a", ":"), words[1])
        missing = [p for p in packages if p not in found]
        if missing:
            raise QemuBinaryError(f"{self.suite} lists name no .deb for {', '.join(missing)}",
                                  step="resolve packages", output=out)
        return found

    def download(self, debs: Sequence[_Deb], into: Path) -> list[Path]:
        _log(f"downloading {', '.join(f'{d.name} {d.version}' for d in debs)}")
        wanted = [f"{d.name}={d.version}" for d in debs]
        _run("apt-get download", ["apt-get", *self.options(), "download", *wanted], cwd=into)
        paths = [into / d.filename for d in debs]
        absent = [p.name for p in paths if not p.is_file()]
        if absent:
            raise QemuBinaryError(f"apt-get download did not produce {', '.join(absent)}",
                                  step="apt-get download")
        return paths


# -- the cache ---------------------------------------------------------------------------------


def _build_dir(top: Path, suite: str, version: str) -> Path:
    return top / f"{suite}-{version.replace(':', '%3a')}"


def _usable(directory: Path) -> QemuBuild | None:
    """The build in ``directory`` if its wrapper runs; None (said on stderr) if not."""
    try:
        build = QemuBuild.load(directory)
        qemu_version(build.binary)
    except QemuBinaryError as exc:
        log.warning("the cached QEMU build %s is unusable: %s", directory, exc)
        return None
    return build


def _cached_builds(top: Path, suite: str) -> list[Path]:
    """The suite's build directories in the cache, newest first."""
    found = []
    for entry in top.iterdir():
        manifest = entry / "build.json"
        if entry.name.startswith(".") or not manifest.is_file():
            continue
        try:
            if json.loads(manifest.read_text()).get("suite") == suite:
                found.append((manifest.stat().st_mtime, entry))
        except (OSError, ValueError):
            continue
    return [entry for _, entry in sorted(found, reverse=True)]


def _offline(top: Path, suite: str, exc: QemuBinaryError) -> QemuBuild:
    """The newest cached build of ``suite`` when the mirror cannot be reached; said on
    stderr, with the reason. Without one, ``exc`` is raised."""
    errors = [line for line in exc.output.splitlines() if line.startswith("E: ")]
    reason = errors[0] if errors else str(exc).splitlines()[0]
    for directory in _cached_builds(top, suite):
        build = _usable(directory)
        if build is not None:
            log.warning("cannot fetch QEMU from %s (%s: %s): using the cached build %s",
                        suite, exc.step, reason, directory)
            return build
    raise exc


def _sweep_partial(top: Path) -> None:
    """Remove ``.build-*`` directories: under the lock, each is a killed fetch's."""
    for entry in top.glob(".build-*"):
        log.info("removing %s, left by an interrupted fetch", entry)
        shutil.rmtree(entry, ignore_errors=True)


def _unpack(apt: _PrivateApt, debs: dict[str, _Deb], top: Path, target: Path) -> QemuBuild:
    """Download, unpack and check a build, then rename it to ``target``."""
    started = time.monotonic()
    qemu = debs["qemu-system-x86"]
    work = Path(tempfile.mkdtemp(prefix=f".build-{apt.suite}-", dir=top))  # mode 0700
    try:
        downloads = work / "debs"
        downloads.mkdir()
        files = apt.download([debs[p] for p in PACKAGES], downloads)
        out = work / "build"
        out.mkdir(mode=PRIVATE_DIR_MODE)
        root = out / "root"
        for deb in files:
            _run("unpack", ["dpkg-deb", "-x", str(deb), str(root)])
        shutil.rmtree(downloads)
        wrapper = out / "bin" / DEFAULT_QEMU
        wrapper.parent.mkdir()
        wrapper.write_text(wrapper_script(root, suite=apt.suite, version=qemu.version))
        wrapper.chmod(0o755)
        try:
            major, minor, micro = qemu_version(wrapper)
        except QemuBinaryError as exc:
            raise QemuBinaryError(
                f"QEMU {qemu.version} from {apt.suite} does not run on this host: "
                + str(exc).splitlines()[0],
                step="check", command=exc.command, output=exc.output,
            ) from exc
        # Now with the paths it will have once renamed into place.
        wrapper.write_text(wrapper_script(target / "root", suite=apt.suite,
                                          version=qemu.version))
        (out / "build.json").write_text(json.dumps({
            "suite": apt.suite,
            "version": qemu.version,
            "qemu_version": f"{major}.{minor}.{micro}",
            "packages": {p: debs[p].version for p in PACKAGES},
            "mirror": MIRROR,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, indent=2) + "\n")
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        qemu_version(target / "bin" / DEFAULT_QEMU)
    except QemuBinaryError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    _log(f"QEMU {major}.{minor}.{micro} from {apt.suite} ready in "
         f"{time.monotonic() - started:.1f} s: {target}")
    return QemuBuild.load(target)


def _resolve(apt: _PrivateApt) -> dict[str, _Deb]:
    """The suite's current .debs, updating the lists first when they are stale (or, fresh
    by the stamp, do not answer: someone removed them)."""
    if not apt.fresh():
        apt.update()
        return apt.candidates(PACKAGES)
    try:
        return apt.candidates(PACKAGES)
    except QemuBinaryError as exc:
        log.warning("the private %s lists do not answer (%s): updating them", apt.suite,
                    str(exc).splitlines()[0])
        apt.update()
        return apt.candidates(PACKAGES)


def fetch_qemu(suite: str = DEFAULT_SUITE, *, cache: Path | None = None) -> QemuBuild:
    """The current QEMU of Debian ``suite``, fetched into the cache unless it is there.

    Runs ``apt-get update`` (private lists) when the suite's lists are a day old or more,
    then downloads and unpacks only when the suite has a version not yet cached: a second
    call within a day does no network work. When the mirror cannot be reached, the newest
    cached build of the suite is used (said on stderr). Raises :class:`QemuBinaryError`
    (command line, output tail) otherwise.
    """
    if not _SUITE.fullmatch(suite):
        raise QemuBinaryError(f"{suite!r} is not a Debian suite name", step="suite")
    top = (cache or cache_dir()) / "qemu"
    try:
        _private_dir(top.parent)
        _private_dir(top)
        with _locked(top / ".lock"):
            return _fetch_locked(top, suite)
    except OSError as exc:  # the cache itself: permissions, a full disk
        raise QemuBinaryError(f"cannot use the QEMU cache {top}: {exc}", step="cache") from exc


def _fetch_locked(top: Path, suite: str) -> QemuBuild:
    """:func:`fetch_qemu` once it holds the cache's lock."""
    _sweep_partial(top)
    apt = _PrivateApt(top / "apt" / suite, suite)
    apt.prepare()
    try:
        debs = _resolve(apt)
    except QemuBinaryError as exc:
        return _offline(top, suite, exc)
    target = _build_dir(top, suite, debs["qemu-system-x86"].version)
    if target.exists():
        build = _usable(target)
        if build is not None:
            return build
        shutil.rmtree(target)
    try:
        return _unpack(apt, debs, top, target)
    except QemuBinaryError as exc:
        if exc.step != "apt-get download":
            raise
        return _offline(top, suite, exc)


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/fetch-qemu``: fetch (or find) QEMU from a Debian suite, print its wrapper."""
    parser = argparse.ArgumentParser(prog="fetch-qemu", description=main.__doc__)
    parser.add_argument("--suite", default=DEFAULT_SUITE,
                        help=f"the Debian suite to take QEMU from (default {DEFAULT_SUITE})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="kprobevm: %(message)s")
    try:
        build = fetch_qemu(args.suite)
    except QemuBinaryError as exc:
        print(f"fetch-qemu: {exc}", file=sys.stderr)
        return 2
    print(build.binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
