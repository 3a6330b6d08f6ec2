"""The default image: the newc writer, the cache key, its private modes, a real build (vm)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile

from kprobevm.errors import ImageError
from kprobevm.guest import image as image_mod
from kprobevm.guest.image import (
    DEFAULT_CMDLINE,
    DEFAULT_MEMORY,
    SLOT_RESERVE,
    Image,
    KernelPackage,
    build_image,
    cache_dir,
    cache_key,
    default_image,
    recipe_inputs,
)
from kprobevm.guest.initramfs import Cpio


def test_slot_reserve_is_the_memmap_on_the_default_cmdline() -> None:
    start, size = SLOT_RESERVE
    assert f"memmap={size >> 20}M${start:#x}" in DEFAULT_CMDLINE.split()
    # Page aligned, and below the end of the default RAM with room for the firmware's
    # reserved top 128 KiB above it.
    assert start % 4096 == 0
    assert start + size + (128 << 10) <= int(DEFAULT_MEMORY.removesuffix("M")) << 20
    for word in ("console=ttyS0", "panic=-1", "oops=panic", "nokaslr", "nopti"):
        assert word in DEFAULT_CMDLINE.split()


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.delenv("KPROBEVM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "kprobevm"
    monkeypatch.setenv("KPROBEVM_CACHE", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool")
def test_cpio_archive_unpacks_with_the_cpio_tool(tmp_path: Path) -> None:
    archive = Cpio()
    archive.file("init", b"#!/bin/sh\necho hi\n", 0o755)
    archive.file("etc/deep/dir/file", b"x" * 5)  # parents are created
    archive.symlink("bin/sh", "/bin/busybox")
    archive.chardev("dev/console", 5, 1)
    archive.directory("root/.ssh", 0o700)
    data = archive.finish()
    assert len(data) % 512 == 0
    listing = subprocess.run(["cpio", "-itv"], input=data, capture_output=True, check=True)
    lines = listing.stdout.decode().splitlines()
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in lines]
    assert names.index("etc") < names.index("etc/deep") < names.index("etc/deep/dir/file")
    assert any(line.startswith("crw") and "5,   1" in line for line in lines)
    assert any(line.startswith("lrwx") and "bin/sh -> /bin/busybox" in line for line in lines)
    assert any(line.startswith("drwx------") and line.endswith("root/.ssh") for line in lines)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames", "-D", str(out)],
                   input=data, check=True)
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((out / "init").stat().st_mode) == 0o755
    assert (out / "etc/deep/dir/file").read_bytes() == b"xxxxx"


def test_cpio_writes_a_name_once() -> None:
    archive = Cpio()
    archive.file("a", b"1")
    archive.file("a", b"2")
    assert archive.finish().count(b"a\0") == 1


def _pinned_inputs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Recipe inputs without apt or dpkg: a copy of the recipe, a fixed kernel package."""
    recipe = tmp_path / "recipe"
    shutil.copytree(image_mod.RECIPE_DIR, recipe)
    monkeypatch.setattr(image_mod, "RECIPE_DIR", recipe)
    monkeypatch.setattr(image_mod, "resolve_kernel_package",
                        lambda cache: KernelPackage("linux-image-6.1.0-99-cloud-amd64", "6.1.1-1"))
    monkeypatch.setattr(image_mod, "_host_versions",
                        lambda: {"busybox-static": "1", "dropbear-bin": "2"})
    return recipe


def test_cache_key_changes_with_every_input(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    recipe = _pinned_inputs(monkeypatch, tmp_path)
    base = cache_key(recipe_inputs(tmp_path))
    assert cache_key(recipe_inputs(tmp_path)) == base  # stable
    (recipe / "init").write_text((recipe / "init").read_text() + "\n# changed\n")
    changed_recipe = cache_key(recipe_inputs(tmp_path))
    assert changed_recipe != base
    monkeypatch.setattr(image_mod, "_host_versions",
                        lambda: {"busybox-static": "1", "dropbear-bin": "3"})
    assert cache_key(recipe_inputs(tmp_path)) not in (base, changed_recipe)
    monkeypatch.setattr(image_mod, "BUILD_VERSION", image_mod.BUILD_VERSION + 1)
    assert len({base, changed_recipe, cache_key(recipe_inputs(tmp_path))}) == 3


def test_kernel_resolution_is_remembered_while_apt_lists_are_unchanged(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    packages = lists / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4"
    packages.write_bytes(b"v1")
    monkeypatch.setattr(image_mod, "_APT_LISTS", lists)
    calls: list[str] = []

    def query(metapackage: str) -> KernelPackage:
        calls.append(metapackage)
        return KernelPackage(f"linux-image-6.1.0-{len(calls)}-cloud-amd64", "1")

    monkeypatch.setattr(image_mod, "_query_kernel_package", query)
    first = image_mod.resolve_kernel_package(tmp_path)
    assert image_mod.resolve_kernel_package(tmp_path) == first
    assert len(calls) == 1
    packages.write_bytes(b"v2, a newer list")  # apt-get update happened
    assert image_mod.resolve_kernel_package(tmp_path) != first
    assert len(calls) == 2


# -- private modes: a build from a stand-in kernel package, with the host's busybox/dropbear --

_FAKE_KERNEL = KernelPackage("linux-image-6.1.0-99-cloud-amd64", "6.1.1-1")
_FAKE_RELEASE = "6.1.0-99-cloud-amd64"
_BUILD_TOOLS = ("dpkg-deb", "busybox", "dropbear", "dropbearkey", "ldd")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _fake_kernel_deb(debs: Path) -> Path:
    """A .deb like the kernel package's: a stand-in bzImage, a config, a modules directory."""
    root = debs.parent / "deb-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {_FAKE_KERNEL.name}\nVersion: {_FAKE_KERNEL.version}\n"
        "Architecture: amd64\nMaintainer: kprobevm tests <nobody@localhost>\n"
        "Description: stand-in kernel for image tests\n")
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinuz-{_FAKE_RELEASE}").write_bytes(b"not a bzImage")
    (root / "boot" / f"config-{_FAKE_RELEASE}").write_text("CONFIG_KPROBES=y\n")
    (root / "lib" / "modules" / _FAKE_RELEASE).mkdir(parents=True)
    debs.mkdir(parents=True)
    deb = debs / f"{_FAKE_KERNEL.name}_{_FAKE_KERNEL.version}_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    shutil.rmtree(root)
    return deb


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """umask 022, under which files made without an explicit mode come out 0644."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def chmod_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of every ``os.chmod`` from here on (each still done).

    A build that wrote a secret and only then made it private would show up here; files
    must be created with their final mode instead.
    """
    calls: list[str] = []
    real_chmod = os.chmod

    def chmod(path: Any, mode: int, **kwargs: Any) -> None:
        calls.append(str(path))
        real_chmod(path, mode, **kwargs)

    monkeypatch.setattr(os, "chmod", chmod)
    return calls


@pytest.fixture
def fresh_image(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, usual_umask: None,
                chmod_calls: list[str]) -> Image:
    """An image built by the real builder into an empty cache, with no apt and no kernel.

    The kernel package is a stand-in .deb (no download), the vmlinux extraction is
    skipped and the module lists are empty; the initramfs and the keys are made as for the
    real image. ``$KPROBEVM_CACHE`` points at the cache, so ``default_image()`` finds it.
    """
    missing = [tool for tool in _BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    recipe = _pinned_inputs(monkeypatch, tmp_path)
    (recipe / "modules").write_text("")
    (recipe / "spare-modules").write_text("")
    monkeypatch.setattr(image_mod, "extract_vmlinux", lambda bzimage: b"\x7fELF stand-in")
    # Outside the cache, whose root must not exist yet: the test checks the mode the
    # build creates it with.
    deb = _fake_kernel_deb(tmp_path / "debs")
    monkeypatch.setattr(image_mod, "_download_kernel", lambda cache, kernel: deb)
    cache = tmp_path / "cache"
    monkeypatch.setenv("KPROBEVM_CACHE", str(cache))
    chmod_calls.clear()  # copying the recipe kept its modes: only the build counts
    return build_image(cache=cache)


def test_a_fresh_image_is_private_to_its_user(fresh_image: Image,
                                              chmod_calls: list[str]) -> None:
    img = fresh_image
    assert chmod_calls == []  # every mode was right from creation
    host_key = img.directory / "dropbear_ed25519_host_key"
    # The initramfs holds the guest's SSH host key, id_ed25519 logs into the guest as root,
    # and the host key is also kept by itself; the cache root is created by the build.
    modes = {"cache": img.directory.parents[1], "image directory": img.directory,
             "initramfs": img.initrd, "client key": img.ssh_key, "host key": host_key}
    assert {name: oct(_mode(path)) for name, path in modes.items()} == {
        "cache": "0o700", "image directory": "0o700",
        "initramfs": "0o600", "client key": "0o600", "host key": "0o600"}
    assert b"etc/dropbear/dropbear_ed25519_host_key" in img.initrd.read_bytes()


def test_an_image_with_loose_modes_is_made_private_when_found(
        fresh_image: Image, caplog: pytest.LogCaptureFixture) -> None:
    img = fresh_image
    # What a build from before kprobevm kept images private left behind.
    img.directory.chmod(0o755)
    for path in img.directory.iterdir():
        path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger=image_mod.__name__):
        assert default_image() == img
    assert _mode(img.directory) == 0o700
    for secret in (img.initrd, img.ssh_key, img.directory / "dropbear_ed25519_host_key"):
        assert _mode(secret) == 0o600, secret
    assert _mode(img.manifest) == 0o644  # public: left as it was
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(img.directory) in warnings[0].getMessage()
    # Once private, loading it again says nothing.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=image_mod.__name__):
        Image.load(img.directory)
    assert not caplog.records


def test_an_image_with_loose_modes_that_cannot_be_fixed_is_refused(
        fresh_image: Image, monkeypatch: pytest.MonkeyPatch) -> None:
    img = fresh_image
    img.initrd.chmod(0o644)

    def not_owner(path: object, mode: int, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))

    monkeypatch.setattr(os, "chmod", not_owner)  # as if the image belonged to someone else
    with pytest.raises(ImageError, match="other users") as info:
        Image.load(img.directory)
    assert str(img.directory) in str(info.value)


def test_a_directory_without_a_manifest_is_not_touched(tmp_path: Path,
                                                       usual_umask: None) -> None:
    # A wrong image path must not have its modes changed: only a real image is tightened.
    wrong = tmp_path / "not-an-image"
    wrong.mkdir(mode=0o755)
    (wrong / "initrd.cpio").write_bytes(b"")
    with pytest.raises(ImageError, match="unreadable image manifest"):
        Image.load(wrong)
    assert (_mode(wrong), _mode(wrong / "initrd.cpio")) == (0o755, 0o644)


# -- a real build (uses apt and the host's busybox/dropbear; no QEMU) -------------------------


def test_default_image_has_every_artifact_and_a_manifest() -> None:
    img = default_image()
    for path in (img.kernel, img.initrd, img.vmlinux, img.config, img.ssh_key, img.manifest):
        assert path.is_file(), path
    assert stat.S_IMODE(img.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(img.ssh_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(img.initrd.stat().st_mode) == 0o600
    manifest = json.loads(img.manifest.read_text())
    assert manifest["kernel_release"] == img.kernel_release
    assert img.kernel_release.endswith("-cloud-amd64")
    assert manifest["slot_reserve"] == list(SLOT_RESERVE)
    order = manifest["modules"]
    # Dependencies first: the .modinfo "depends=" graph, not a hand-kept list.
    assert order.index("virtio_ring") < order.index("virtio_pci")
    assert order.index("failover") < order.index("net_failover") < order.index("virtio_net")
    with img.vmlinux.open("rb") as f:
        elf = ELFFile(f)
        assert elf["e_machine"] == "EM_X86_64"
        assert elf.get_section_by_name(".text") is not None


def test_rebuild_with_nothing_changed_is_a_no_op() -> None:
    """Nothing rebuilt (scripts/bench-boot times the no-op; this only guards a hang)."""
    first = default_image()
    started = time.monotonic()
    again = build_image()
    elapsed = time.monotonic() - started
    assert again == first
    assert elapsed < 30.0, f"no-op build took {elapsed:.2f} s"


# -- kernel packages other than the default -------------------------------------------------


def test_metapackages_resolve_to_their_kernel_package(monkeypatch: pytest.MonkeyPatch) -> None:
    shows = {
        "linux-image-6.12-cloud-amd64": "Package: linux-image-6.12-cloud-amd64\n"
        "Version: 6.12.118-1~deb12u1\n"
        "Depends: linux-image-6.12.118+deb12-cloud-amd64 (= 6.12.118-1~deb12u1)\n",
        "linux-image-6.12.118+deb12-cloud-amd64":
        "Package: linux-image-6.12.118+deb12-cloud-amd64\n"
        "Version: 6.12.118-1~deb12u1\nDepends: kmod, linux-base (>= 4.3~)\n",
    }
    monkeypatch.setattr(image_mod, "_apt_show", shows.get)
    want = KernelPackage("linux-image-6.12.118+deb12-cloud-amd64", "6.12.118-1~deb12u1")
    assert image_mod._query_kernel_package("linux-image-6.12-cloud-amd64") == want
    assert image_mod._query_kernel_package("linux-image-6.12.118+deb12-cloud-amd64") == want
    assert image_mod._query_kernel_package("linux-image-none") is None


def test_a_name_that_is_no_kernel_package_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a Debian kernel package"):
        image_mod.resolve_kernel_package(tmp_path, "bash")
    with pytest.raises(ImageError, match="does not exist"):
        image_mod.resolve_kernel_package(tmp_path, str(tmp_path / "missing.deb"))


def test_built_in_modules_need_no_file(tmp_path: Path) -> None:
    from kprobevm.guest.initramfs import builtin_modules, module_order

    moddir = tmp_path / "lib" / "modules" / "6.12.0"
    moddir.mkdir(parents=True)
    (moddir / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    builtin = builtin_modules(moddir, b"virtio_net.license=GPL\0virtio_net.file=x\0")
    assert builtin == {"virtio_pci", "virtio_net"}
    initcalls = ["__initcall__kmod_virtio_net__384_4370_virtio_net_driver_init6", "vfs_read"]
    assert builtin_modules(None, symbols=initcalls) == {"virtio_net"}
    assert module_order(moddir, ["virtio_pci", "virtio-net"], builtin) == []
    with pytest.raises(ImageError, match="neither built in nor found"):
        module_order(None, ["failover"], builtin)
