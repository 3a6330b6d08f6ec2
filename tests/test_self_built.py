"""A developer's own kernel, booted from what its build leaves: a bzImage, its vmlinux and
the tree its modules were installed into (``boot(kernel=, vmlinux=, modules=)``, the CLI's
``--kernel/--vmlinux/--modules``).

Debian's 6.12 cloud kernel stands in for a self-built one, as its parts: the bzImage, the
vmlinux cut out of it, and its ``lib/modules/RELEASE`` tree under an ``INSTALL_MOD_PATH``
(its virtio-net is a module there, so the image must take it, with its dependencies, from
the tree given). Nothing of the kernel-package path is used to boot it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import kprobevm
from kprobevm import cli
from kprobevm.guest.bzimage import extract_vmlinux
from kprobevm.guest.console import kernel_trouble
from kprobevm.guest.image import _download_kernel as download_kernel
from kprobevm.guest.image import cache_dir, kernel_package_image, resolve_kernel_package
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.x86.ptregs import PtRegs

PACKAGE = "linux-image-6.12-cloud-amd64"


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, str]:
    """(bzImage, vmlinux, module install root, release) as a kernel build leaves them."""
    kernel_package_image(PACKAGE)  # the .deb in the cache, as a build's inputs
    deb = download_kernel(cache_dir(), resolve_kernel_package(cache_dir(), PACKAGE))
    root = tmp_path_factory.mktemp("self-built")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    bzimage = next((root / "boot").glob("vmlinuz-*"))
    vmlinux = root / "vmlinux"
    vmlinux.write_bytes(extract_vmlinux(bzimage.read_bytes()))
    return bzimage, vmlinux, root, bzimage.name.removeprefix("vmlinuz-")


@pytest.mark.vm
def test_a_self_built_kernel_boots_and_takes_probes(build: tuple[Path, Path, Path, str]) -> None:
    bzimage, vmlinux, modules, release = build
    with kprobevm.boot(name="self-built", kernel=bzimage, vmlinux=vmlinux,
                       modules=modules) as vm:  # fmt: skip
        assert vm.run("uname -r").stdout.strip() == release
        assert "virtio_net" in vm.run("cat /proc/modules").stdout  # from the tree given
        addr = vm.symbols["do_sys_openat2"]
        before = vm.read(addr, 32)
        seen: list[int] = []

        def pre(kp: Kprobe, regs: PtRegs) -> None:
            seen.append(regs.ip)

        stopping = Kprobe(symbol_name="do_sys_openat2", pre_handler=pre)
        recorded = Kprobe(symbol_name="vfs_read", pre_handler=pre, record=RecordSpec())
        vm.register_kprobe(stopping)
        vm.register_kprobe(recorded)
        try:
            vm.run("for i in 1 2 3; do head -c1 /etc/passwd; done >/dev/null")
            vm.flush_records()
        finally:
            vm.unregister_kprobe(stopping)
            vm.unregister_kprobe(recorded)
        assert stopping.nhit >= 3 and recorded.nhit >= 3, (stopping.nhit, recorded.nhit)
        assert stopping.nerrors == recorded.nerrors == 0
        assert vm.read(addr, 32) == before
        assert not kernel_trouble(vm.serial_log())


def test_a_self_built_kernel_needs_its_vmlinux(
    build: tuple[Path, Path, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """--modules without --vmlinux is refused before anything boots."""
    bzimage, _, modules, _ = build
    code = cli.main(["run", "--kernel", str(bzimage), "--modules", str(modules), "--", "true"])
    err = capsys.readouterr().err
    assert code != 0 and "vmlinux" in err, err
