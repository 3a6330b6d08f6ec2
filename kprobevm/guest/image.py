"""The default guest image: recipe inputs, cache key, build, and the `Image` it yields.

The recipe lives in ``vm-images/`` (init script, inittab, module list, passwd); the
binaries come from Debian packages: the bookworm cloud kernel (``apt-get download``,
``dpkg -x``), ``busybox-static`` and ``dropbear-bin`` from the host. Built artifacts go to
``$KPROBEVM_CACHE`` (default ``$XDG_CACHE_HOME/kprobevm``) under ``images/<key>/``, where
the key hashes every input, so an unchanged recipe is never rebuilt.

An image holds secrets: the initramfs carries the guest's SSH host key and root's
authorized key, ``id_ed25519`` logs into the guest as root. Image directories are 0700 and
those files 0600, created so from the start; an image found with looser modes (built before
kprobevm kept them private) is tightened when loaded.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kprobevm.errors import ImageError, VmlinuxError
from kprobevm.guest.bzimage import extract_vmlinux
from kprobevm.guest.initramfs import Cpio, builtin_modules, module_order

__all__ = [
    "BUILD_VERSION",
    "DEFAULT_CMDLINE",
    "DEFAULT_MEMORY",
    "KERNEL_METAPACKAGE",
    "PRIVATE_DIR_MODE",
    "READY_MARKER",
    "RECIPE_DIR",
    "SECRET_FILES",
    "SECRET_MODE",
    "SLOT_RESERVE",
    "Image",
    "KernelPackage",
    "SelfBuilt",
    "build_image",
    "cache_dir",
    "default_image",
    "kernel_package_image",
]

BUILD_VERSION = 1
"""Bumped whenever this builder changes what it puts in an image (part of the cache key)."""

RECIPE_DIR = Path(__file__).resolve().parents[2] / "vm-images"
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
READY_MARKER = "KPROBEVM-READY"

SLOT_RESERVE: tuple[int, int] = (0x1F000000, 16 << 20)
"""Guest-physical range (start, size) the guest kernel never uses (``memmap=SIZE$START``):
the place where kprobevm's instruction slots live (496 MiB to 512 MiB)."""

DEFAULT_MEMORY = "544M"
"""Guest RAM. Not 512M: SeaBIOS keeps the top 128 KiB of low RAM for itself (e820
reserved, ACPI tables), which at 512M would be the last 128 KiB of SLOT_RESERVE. With
544M the whole reserve is plain RAM that only ``memmap=`` takes from the kernel."""

DEFAULT_CMDLINE = (
    "console=ttyS0 panic=-1 oops=panic nokaslr nopti quiet "
    f"memmap={SLOT_RESERVE[1] >> 20}M${SLOT_RESERVE[0]:#x}"
)
"""``nopti``: the trap path relies on one set of page tables (no PTI user/kernel split)."""

_APT_LISTS = Path("/var/lib/apt/lists")

PRIVATE_DIR_MODE = 0o700
"""Mode of the cache root (when kprobevm creates it), ``images/`` and every image directory."""

SECRET_MODE = 0o600
"""Mode of the files in :data:`SECRET_FILES`."""

SECRET_FILES = ("initrd.cpio", "id_ed25519", "dropbear_ed25519_host_key")
"""The files of an image directory that must stay private to the user: the initramfs (it
holds the guest's SSH host key), the client key (it logs into the guest as root) and the
host key itself. The rest (kernel, vmlinux, config, manifest, public key) comes from public
packages or says nothing secret, and keeps the usual modes inside the private directory."""

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$KPROBEVM_CACHE``, else ``$XDG_CACHE_HOME/kprobevm``, else ``~/.cache/kprobevm``."""
    explicit = os.environ.get("KPROBEVM_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kprobevm"


@dataclass(frozen=True)
class Image:
    """A built guest image: the files QEMU boots and what kprobevm knows about them."""

    directory: Path
    key: str
    kernel: Path
    initrd: Path
    vmlinux: Path
    config: Path
    ssh_key: Path
    manifest: Path
    kernel_package: str
    kernel_version: str
    kernel_release: str
    cmdline: str = DEFAULT_CMDLINE
    slot_reserve: tuple[int, int] = SLOT_RESERVE

    @classmethod
    def load(cls, directory: Path) -> Image:
        """The image whose manifest is in ``directory``, made private if it is not."""
        manifest = directory / "manifest.json"
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise ImageError(f"unreadable image manifest {manifest}", step="load") from exc
        # Only once the manifest shows this is an image: never chmod a directory named
        # by mistake.
        _make_private(directory)
        start, size = data["slot_reserve"]
        return cls(
            directory=directory,
            key=data["key"],
            kernel=directory / "vmlinuz",
            initrd=directory / "initrd.cpio",
            vmlinux=directory / "vmlinux",
            config=directory / "config",
            ssh_key=directory / "id_ed25519",
            manifest=manifest,
            kernel_package=data["kernel_package"],
            kernel_version=data["kernel_version"],
            kernel_release=data["kernel_release"],
            cmdline=data["cmdline"],
            slot_reserve=(int(start), int(size)),
        )


def _make_private(directory: Path) -> None:
    """Give an image directory mode 0700 and its secret files 0600 if they are looser.

    Images built before kprobevm kept them private left the initramfs, and with it the
    guest's SSH host key, readable by every local user. Tightening them when found fixes
    those caches without a rebuild. One warning names the directory; the next load finds
    nothing to tighten and says nothing. A loose image that cannot be tightened (someone
    else owns it) is refused rather than used with its secrets open.
    """
    wanted = [(directory, PRIVATE_DIR_MODE)]
    wanted += [(directory / name, SECRET_MODE) for name in SECRET_FILES]
    changed: list[str] = []
    for path, mode in wanted:
        try:
            current = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue  # a hand-assembled image may lack the separate host key
        except OSError as exc:
            raise ImageError(f"cannot check the mode of {path}: {exc.strerror}",
                             step="load") from exc
        if not current & 0o077:
            continue
        try:
            os.chmod(path, mode)
        except OSError as exc:
            raise ImageError(
                f"{path} in the image {directory} is readable by other users "
                f"(mode {current:04o}) and cannot be made private: {exc.strerror}; "
                f"chmod it to {mode:04o} or remove the image",
                step="load",
            ) from exc
        changed.append(f"{'directory' if path == directory else path.name} was {current:04o}")
    if changed:
        log.warning("image %s was readable by other users (%s): made the directory %04o "
                    "and its secrets %04o", directory, ", ".join(changed),
                    PRIVATE_DIR_MODE, SECRET_MODE)


def _private_dir(path: Path) -> None:
    """Create ``path`` (if missing) with mode 0700; missing parents get the usual modes.

    An existing directory keeps its mode: ``$KPROBEVM_CACHE`` may name a directory the
    user set up on purpose. The image directories inside are private either way.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)


def _write_secret(path: Path, data: bytes) -> None:
    """Write a new file that is 0600 from its creation, never readable by others."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 SECRET_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# -- running host tools ---------------------------------------------------------------------


def _run(step: str, args: Sequence[str], *, cwd: Path | None = None, umask: int = -1) -> str:
    """Run a host tool for build ``step``; ``umask`` (if not -1) is the child's umask."""
    try:
        proc = subprocess.run(
            list(args), cwd=cwd, capture_output=True, text=True, check=False,
            stdin=subprocess.DEVNULL, umask=umask,
        )
    except FileNotFoundError as exc:
        raise ImageError(f"{args[0]} is not installed", step=step, command=" ".join(args)) from exc
    if proc.returncode != 0:
        raise ImageError(
            f"{args[0]} failed with status {proc.returncode}",
            step=step, command=" ".join(args), output=proc.stdout + proc.stderr,
        )
    return proc.stdout


def _log(message: str) -> None:
    print(f"kprobevm: {message}", file=sys.stderr, flush=True)


# -- recipe inputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelPackage:
    """The kernel package an image is built from (``apt-cache`` names the current one of a
    metapackage), or a local ``.deb``."""

    name: str
    version: str
    deb: Path | None = None
    """A local ``.deb`` given by path (None: downloaded with apt)."""
    sha256: str = ""
    """The local ``.deb``'s content hash (part of the cache key)."""


def _apt_lists_fingerprint() -> str:
    """Names, sizes and mtimes of apt's package lists: what ``apt-cache`` answers from."""
    h = hashlib.sha256()
    try:
        entries = sorted(_APT_LISTS.iterdir())
    except OSError:
        return ""
    for entry in entries:
        if "Packages" in entry.name:
            st = entry.stat()
            h.update(f"{entry.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


_DEPENDS_ON_KERNEL = re.compile(r"^Depends:.*?(linux-image-[^\s,(]+) \(= ([^)]+)\)", re.M)


def _apt_show(name: str) -> str | None:
    proc = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", name],
        capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
    )
    return proc.stdout if proc.returncode == 0 and proc.stdout.strip() else None


def _query_kernel_package(metapackage: str) -> KernelPackage | None:
    """The kernel package ``metapackage`` stands for, through apt-cache: a metapackage's
    exact dependency (``linux-image-6.12-cloud-amd64`` -> ``linux-image-6.12.118+deb12-
    cloud-amd64``), followed while that is a metapackage too; a package that depends on
    no kernel package is the kernel package itself."""
    text = _apt_show(metapackage)
    if text is None:
        return None
    found: KernelPackage | None = None
    for _ in range(4):
        dep = _DEPENDS_ON_KERNEL.search(text)
        if dep is None:
            if found is not None:
                return found
            package = re.search(r"^Package: (\S+)", text, re.M)
            version = re.search(r"^Version: (\S+)", text, re.M)
            if package is None or version is None:
                return None
            return KernelPackage(package.group(1), version.group(1))
        found = KernelPackage(dep.group(1), dep.group(2))
        deeper = _apt_show(found.name)
        if deeper is None:
            return found
        text = deeper
    return found


def local_kernel_deb(path: Path) -> KernelPackage:
    """The kernel package in a local ``.deb`` (``dpkg-deb -f``), its content hashed."""
    if not path.is_file():
        raise ImageError(f"kernel package file {path} does not exist", step="resolve kernel")
    out = _run("resolve kernel", ["dpkg-deb", "-f", str(path), "Package", "Version"])
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    if "Package" not in fields or "Version" not in fields:
        raise ImageError(f"{path} has no Package and Version fields", step="resolve kernel",
                         command=f"dpkg-deb -f {path} Package Version", output=out)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return KernelPackage(fields["Package"], fields["Version"], deb=path.resolve(),
                         sha256=digest.hexdigest())


def _memo_path(cache: Path, metapackage: str) -> Path:
    """Where the resolution of ``metapackage`` is remembered (the default's at the old
    place, so existing caches keep theirs)."""
    if metapackage == KERNEL_METAPACKAGE:
        return cache / "kernel-package.json"
    return cache / "kernel-packages" / f"{metapackage}.json"


def resolve_kernel_package(cache: Path, metapackage: str = KERNEL_METAPACKAGE) -> KernelPackage:
    """The kernel package behind ``metapackage`` (a metapackage, a kernel package or a
    local ``.deb``), remembered per state of apt's lists.

    ``apt-cache`` takes over a second here (no binary package cache), so its answer is
    kept in the cache and reused while the lists are unchanged; this keeps a no-op build
    well under a second.
    """
    if metapackage.endswith(".deb"):
        return local_kernel_deb(Path(metapackage))
    if not re.fullmatch(r"linux-image-[A-Za-z0-9.+~-]+", metapackage):
        raise ImageError(
            f"{metapackage!r} is not a Debian kernel package name (linux-image-...) "
            "or a .deb file", step="resolve kernel",
        )
    memo = _memo_path(cache, metapackage)
    fingerprint = _apt_lists_fingerprint()
    try:
        data = json.loads(memo.read_text())
        if data["fingerprint"] == fingerprint and data["metapackage"] == metapackage:
            return KernelPackage(data["name"], data["version"])
    except (OSError, ValueError, KeyError):
        pass
    found = _query_kernel_package(metapackage)
    if found is None and os.geteuid() == 0 and not _apt_lists_fingerprint():
        _log("apt has no package lists: running apt-get update")
        _run("apt-get update", ["apt-get", "update"])
        fingerprint = _apt_lists_fingerprint()
        found = _query_kernel_package(metapackage)
    if found is None:
        offline = _newest_cached_deb(cache, metapackage)
        if offline is None:
            raise ImageError(
                f"apt-cache does not know {metapackage} (run apt-get update as root)",
                step="resolve kernel", command=f"apt-cache show {metapackage}",
            )
        _log(f"apt-cache does not know {metapackage}: using the cached {offline.name}")
        return offline
    _private_dir(cache)
    memo.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(memo, json.dumps({
        "fingerprint": fingerprint, "metapackage": metapackage,
        "name": found.name, "version": found.version,
    }).encode())
    return found


def _newest_cached_deb(cache: Path, metapackage: str = KERNEL_METAPACKAGE) -> KernelPackage | None:
    pattern = ("linux-image-*-cloud-amd64_*.deb" if metapackage == KERNEL_METAPACKAGE
               else f"{metapackage}_*.deb")
    debs = sorted((cache / "debs").glob(pattern), key=lambda p: p.stat().st_mtime)
    if not debs:
        return None
    name, version = debs[-1].name.split("_")[:2]
    return KernelPackage(name, version.replace("%3a", ":"))


def _host_versions() -> dict[str, str]:
    out = _run("host packages", ["dpkg-query", "-W", "-f", "${Package} ${Version}\n",
                                 "busybox-static", "dropbear-bin"])
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def _recipe_files() -> list[Path]:
    if not RECIPE_DIR.is_dir():
        raise ImageError(f"the image recipe directory {RECIPE_DIR} is missing", step="recipe")
    return sorted(p for p in RECIPE_DIR.iterdir() if p.is_file() and not p.name.startswith("."))


def _recipe_hashes() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in _recipe_files()}


def recipe_inputs(cache: Path, kernel_package: str = KERNEL_METAPACKAGE) -> dict[str, object]:
    """Everything an image is made from; its hash is the cache key. The default image's
    inputs are those it always had; a local ``.deb`` adds its content hash."""
    kernel = (resolve_kernel_package(cache) if kernel_package == KERNEL_METAPACKAGE
              else resolve_kernel_package(cache, kernel_package))
    inputs: dict[str, object] = {
        "build_version": BUILD_VERSION,
        "kernel_package": kernel.name,
        "kernel_version": kernel.version,
        "host_packages": _host_versions(),
        "recipe": _recipe_hashes(),
    }
    if kernel.deb is not None:
        inputs["kernel_deb_sha256"] = kernel.sha256
    return inputs


def cache_key(inputs: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


# -- build steps ------------------------------------------------------------------------------


def _download_kernel(cache: Path, kernel: KernelPackage) -> Path:
    """The kernel package's ``.deb``: a local one as given, else from ``debs/`` in the
    cache, downloaded there first (kept: a later build of the same version needs no
    network)."""
    if kernel.deb is not None:
        return kernel.deb
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    pattern = f"{kernel.name}_{kernel.version.replace(':', '%3a')}_*.deb"
    found = sorted(debs.glob(pattern))
    if found:
        return found[0]
    _log(f"downloading {kernel.name} {kernel.version}")
    # apt-get download writes into the current directory; _apt cannot enter a root-owned
    # cache, which only makes apt warn that it downloads unsandboxed.
    with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
        _run("download kernel", ["apt-get", "download", f"{kernel.name}={kernel.version}"],
             cwd=Path(tmp))
        got = sorted(Path(tmp).glob("*.deb"))
        if not got:
            raise ImageError("apt-get download produced no .deb", step="download kernel")
        target = debs / got[0].name
        os.replace(got[0], target)
    return target


def _shared_libraries(binary: str) -> list[Path]:
    """The shared objects ``binary`` links, loader included, as ``ldd`` resolves them."""
    out = _run("ldd", ["ldd", binary])
    libs: list[Path] = []
    for line in out.splitlines():
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    return libs


def _recipe_list(name: str) -> list[str]:
    text = (RECIPE_DIR / name).read_text()
    return [w for line in text.splitlines() if (w := line.split("#")[0].strip())]


def _keys(out: Path) -> tuple[bytes, bytes]:
    """A client key pair (OpenSSH format, kept next to the image) and a dropbear host key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write_secret(out / "id_ed25519", private)
    (out / "id_ed25519.pub").write_bytes(public + b" kprobevm\n")
    host = out / "dropbear_ed25519_host_key"
    # dropbearkey creates its key 0600; the umask keeps it so whatever mode it asks for.
    _run("host key", ["dropbearkey", "-t", "ed25519", "-f", str(host)], umask=0o077)
    return public + b" kprobevm\n", host.read_bytes()


def _initramfs(moddir: Path | None, builtin: frozenset[str],
               out: Path) -> tuple[bytes, list[str]]:
    """The initramfs (returned) and the modules its init loads, in order; the keys are
    written to ``out``. ``moddir`` holds the kernel's modules (None: it has none), and
    the recipe's modules in ``builtin`` are left out."""
    cpio = Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/dropbear", "proc", "sys", "dev",
              "run", "tmp", "var/log", "lib/modules", "mnt"):
        cpio.directory(d)
    cpio.directory("root", 0o700)
    cpio.directory("root/.ssh", 0o700)
    # The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    cpio.chardev("dev/console", 5, 1)
    cpio.file("init", (RECIPE_DIR / "init").read_bytes(), 0o755)
    for name in ("inittab", "passwd", "group", "shells"):
        cpio.file(f"etc/{name}", (RECIPE_DIR / name).read_bytes())

    busybox = shutil.which("busybox") or "/bin/busybox"
    cpio.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    for applet in _run("busybox applets", [busybox, "--list-full"]).split():
        if applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")

    dropbear = shutil.which("dropbear") or "/usr/sbin/dropbear"
    cpio.file("usr/sbin/dropbear", Path(dropbear).read_bytes(), 0o755)
    for lib in _shared_libraries(dropbear):
        cpio.file(str(lib), lib.resolve().read_bytes(), 0o755)

    authorized, host_key = _keys(out)
    cpio.file("root/.ssh/authorized_keys", authorized, 0o600)
    cpio.file("etc/dropbear/dropbear_ed25519_host_key", host_key, 0o600)

    modules = module_order(moddir, _recipe_list("modules"), builtin)
    loaded = {n for n, _ in modules}
    spare: list[tuple[str, bytes]] = []
    for name in _recipe_list("spare-modules"):
        try:
            spare += [m for m in module_order(moddir, [name], builtin) if m[0] not in loaded]
        except ImageError as exc:
            # spare modules serve tests that load one by hand; a kernel without them
            # still makes a guest, and says so
            _log(f"spare module {name} left out: {exc}")
    for name, data in (*modules, *spare):
        cpio.file(f"lib/modules/{name}.ko", data)
    cpio.file("etc/modules.order", "".join(f"{n}\n" for n, _ in modules).encode())
    return cpio.finish(), [n for n, _ in modules]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class SelfBuilt:
    """A developer's own kernel: the bzImage, its vmlinux (used where it is, DWARF or
    not) and, when its virtio drivers are modules, the directory they are installed in
    (``lib/modules/RELEASE``, or an ``INSTALL_MOD_PATH`` holding one)."""

    kernel: Path
    vmlinux: Path
    modules: Path | None = None

    def module_dir(self) -> Path | None:
        """The ``lib/modules/RELEASE`` directory inside ``modules`` (or ``modules`` itself)."""
        if self.modules is None:
            return None
        if not self.modules.is_dir():
            raise ImageError(f"modules directory {self.modules} does not exist", step="modules")
        releases = sorted((self.modules / "lib" / "modules").glob("*/"))
        if len(releases) > 1:
            raise ImageError(
                f"{self.modules} holds modules of several kernels "
                f"({', '.join(r.name for r in releases)}): name one lib/modules/RELEASE",
                step="modules",
            )
        return releases[0] if releases else self.modules


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _builtin_evidence(vmlinux: Path) -> tuple[bytes, list[str]]:
    """What a vmlinux says of its built-in modules: its ``.modinfo`` section and its
    symbol names (b"" and none for a vmlinux cut from a bzImage, or no ELF: a stand-in
    in tests)."""
    from kprobevm.kernel.vmlinux import Vmlinux

    try:
        with Vmlinux(vmlinux) as elf:
            modinfo = elf.read_section(".modinfo") if elf.has_section(".modinfo") else b""
            symbols = elf.symbols
            return modinfo, [s.name for s in symbols] if symbols is not None else []
    except VmlinuxError:
        return b"", []


def _banner_release(vmlinux: Path) -> str:
    """The release in a vmlinux's ``linux_banner`` (``Linux version RELEASE ...``)."""
    from kprobevm.kernel.vmlinux import Vmlinux

    try:
        with Vmlinux(vmlinux) as elf:
            rodata = elf.read_section(".rodata")
    except VmlinuxError as exc:
        raise ImageError(f"{vmlinux} is not a usable vmlinux: {exc}",
                         step="self-built kernel") from exc
    match = re.search(rb"Linux version (\S+)", rodata)
    if match is None:
        raise ImageError(f"{vmlinux} has no linux_banner in .rodata", step="self-built kernel")
    return match.group(1).decode(errors="replace")


def _assemble(key: str, inputs: dict[str, object], target: Path, *, vmlinuz: Path,
              vmlinux: Path | bytes, config: Path | None, moddir: Path | None,
              describe: dict[str, object], started: float) -> None:
    """Write an image directory from a kernel's files and move it into place at
    ``target``: ``vmlinux`` as bytes is written, as a path is linked (used as given)."""
    # mkdtemp makes the work directory 0700 and the image directory in it is 0700 too, so
    # the secrets are private while they are written and after the rename into place.
    work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=target.parent))
    try:
        out = work / "image"
        out.mkdir(mode=PRIVATE_DIR_MODE)
        shutil.copyfile(vmlinuz, out / "vmlinuz")
        if config is not None:
            shutil.copyfile(config, out / "config")
        if isinstance(vmlinux, Path):
            (out / "vmlinux").symlink_to(vmlinux.resolve())
        else:
            (out / "vmlinux").write_bytes(vmlinux)
        builtin = builtin_modules(moddir, *_builtin_evidence(out / "vmlinux"))
        _log("writing the initramfs")
        initrd, modules = _initramfs(moddir, builtin, out)
        _write_secret(out / "initrd.cpio", initrd)
        wanted = [m.replace("-", "_") for m in _recipe_list("modules")]
        manifest = {
            "key": key,
            "inputs": inputs,
            **describe,
            "modules": modules,
            "builtin_modules": sorted(m for m in wanted if m in builtin),
            "cmdline": DEFAULT_CMDLINE,
            "slot_reserve": list(SLOT_RESERVE),
            "ready_marker": READY_MARKER,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.monotonic() - started, 2),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"image {key} built in {time.monotonic() - started:.1f} s: {target}")


def _build(cache: Path, key: str, inputs: dict[str, object], target: Path,
           kernel: KernelPackage | None = None) -> None:
    """Build the image of a kernel package: download (or take) the .deb, unpack it, take
    its kernel, config and modules, extract the vmlinux."""
    started = time.monotonic()
    if kernel is None:
        kernel = KernelPackage(str(inputs["kernel_package"]), str(inputs["kernel_version"]))
    deb = _download_kernel(cache, kernel)
    work = Path(tempfile.mkdtemp(prefix=f".unpack-{key}-", dir=target.parent))
    try:
        extracted = work / "deb"
        _log(f"unpacking {deb.name}")
        _run("unpack kernel", ["dpkg-deb", "-x", str(deb), str(extracted)])
        vmlinuz = sorted((extracted / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise ImageError(f"{deb.name} holds no boot/vmlinuz-*: not a kernel image package",
                             step="unpack kernel")
        release = vmlinuz[0].name.removeprefix("vmlinuz-")
        _log("extracting vmlinux from the bzImage")
        try:
            vmlinux = extract_vmlinux(vmlinuz[0].read_bytes())
        except VmlinuxError as exc:
            raise ImageError(str(exc), step="extract vmlinux") from exc
        moddir = extracted / "lib" / "modules" / release
        config = extracted / "boot" / f"config-{release}"
        _assemble(key, inputs, target, vmlinuz=vmlinuz[0], vmlinux=vmlinux,
                  config=config if config.is_file() else None,
                  moddir=moddir if moddir.is_dir() else None,
                  describe={"kernel_package": kernel.name, "kernel_version": kernel.version,
                            "kernel_release": release},
                  started=started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _self_built_inputs(kernel: SelfBuilt) -> dict[str, object]:
    """A self-built kernel's inputs: the bzImage's content, the vmlinux by path, size and
    mtime (hashing a DWARF vmlinux of hundreds of MB would cost more than the build), and
    every module file's by the same."""
    for what, path in (("kernel", kernel.kernel), ("vmlinux", kernel.vmlinux)):
        if not path.is_file():
            raise ImageError(f"{what} file {path} does not exist", step="self-built kernel")
    vm = kernel.vmlinux.resolve().stat()
    moddir = kernel.module_dir()
    modules: list[str] = []
    if moddir is not None:
        for path in sorted(moddir.rglob("*.ko*")) + sorted(moddir.glob("modules.builtin")):
            st = path.stat()
            modules.append(f"{path.relative_to(moddir)} {st.st_size} {st.st_mtime_ns}")
    return {
        "build_version": BUILD_VERSION,
        "self_built": {
            "kernel_sha256": _file_sha256(kernel.kernel),
            "vmlinux": f"{kernel.vmlinux.resolve()} {vm.st_size} {vm.st_mtime_ns}",
            "modules": str(moddir.resolve()) if moddir is not None else None,
            "module_files": hashlib.sha256("\n".join(modules).encode()).hexdigest(),
        },
        "host_packages": _host_versions(),
        "recipe": _recipe_hashes(),
    }


def _build_self_built(key: str, inputs: dict[str, object], target: Path,
                      kernel: SelfBuilt) -> None:
    started = time.monotonic()
    release = _banner_release(kernel.vmlinux)
    config = next((c for c in (kernel.vmlinux.parent / ".config",) if c.is_file()), None)
    _assemble(key, inputs, target, vmlinuz=kernel.kernel, vmlinux=kernel.vmlinux,
              config=config, moddir=kernel.module_dir(),
              describe={"kernel_package": "self-built", "kernel_version": release,
                        "kernel_release": release, "kernel_source": str(kernel.kernel)},
              started=started)


def build_image(*, force: bool = False, cache: Path | None = None,
                kernel_package: str = KERNEL_METAPACKAGE,
                self_built: SelfBuilt | None = None) -> Image:
    """Build an image unless an identical one is cached; return it.

    ``kernel_package``: a Debian kernel package or metapackage name, or a local ``.deb``
    (the default: the current 6.1 cloud kernel); ``self_built``: a developer's own kernel
    instead. The cache root and ``images/`` are created 0700; a cached image is made
    private by :meth:`Image.load` if it is not.
    """
    cache = cache or cache_dir()
    _private_dir(cache)
    if self_built is not None:
        inputs = _self_built_inputs(self_built)
        package = None
    else:
        inputs = recipe_inputs(cache, kernel_package)
        package = (local_kernel_deb(Path(kernel_package)) if kernel_package.endswith(".deb")
                   else None)
    key = cache_key(inputs)
    images = cache / "images"
    target = images / key
    if not force and (target / "manifest.json").is_file():
        return Image.load(target)
    _private_dir(images)
    with _locked(images / ".lock"):
        # Someone else may have built it while we waited for the lock.
        if (target / "manifest.json").is_file():
            if not force:
                return Image.load(target)
            shutil.rmtree(target)
        if self_built is not None:
            _build_self_built(key, inputs, target, self_built)
        else:
            _build(cache, key, inputs, target, package)
    return Image.load(target)


class _locked:
    """An exclusive ``flock`` on a file, so two processes never build the same image."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def default_image() -> Image:
    """The default guest image, built on first use (and whenever the recipe changes)."""
    return build_image()


def kernel_package_image(name: str) -> Image:
    """The image of Debian kernel package ``name`` (a metapackage such as
    ``linux-image-6.12-cloud-amd64``, a versioned package, or a local ``.deb``), built on
    first use: the package is downloaded once into ``debs/``."""
    return build_image(kernel_package=name)


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/build-image``: build (or find) the default image and print its directory."""
    parser = argparse.ArgumentParser(prog="build-image", description=main.__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--json", action="store_true", help="print the manifest")
    parser.add_argument("--kernel-package", default=KERNEL_METAPACKAGE, metavar="NAME",
                        help="a Debian kernel package or metapackage, or a local .deb"
                             f" (default {KERNEL_METAPACKAGE})")
    args = parser.parse_args(argv)
    # The warning about an image made private, in the same form as the progress lines.
    logging.basicConfig(level=logging.WARNING, format="kprobevm: %(message)s")
    try:
        image = build_image(force=args.force, kernel_package=args.kernel_package)
    except ImageError as exc:
        print(f"build-image: {exc}", file=sys.stderr)
        return 2
    print(image.manifest.read_text() if args.json else image.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
