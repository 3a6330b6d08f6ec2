"""Which QEMU runs, and fetching one from a Debian suite: the pieces without a network, then
one real fetch from deb.debian.org (marked network) and what later calls do with it."""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kprobevm.errors import KprobeVMError, QemuBinaryError
from kprobevm.guest import qemu_builds
from kprobevm.guest.qemu_builds import (
    DEFAULT_QEMU,
    QEMU_ENV,
    QemuBuild,
    fetch_qemu,
    qemu_version,
    resolve_qemu,
    wrapper_script,
)

UNREACHABLE = "http://127.0.0.1:9/debian"
"""A mirror that refuses connections at once: the network is "down"."""


def script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_resolve_qemu_explicit_then_environment_then_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(QEMU_ENV, raising=False)
    assert resolve_qemu(None) == DEFAULT_QEMU == "qemu-system-x86_64"
    monkeypatch.setenv(QEMU_ENV, "")  # set but empty: as if unset
    assert resolve_qemu() == DEFAULT_QEMU
    monkeypatch.setenv(QEMU_ENV, "/opt/qemu-env")
    assert resolve_qemu(None) == "/opt/qemu-env"
    assert resolve_qemu("/opt/qemu-explicit") == "/opt/qemu-explicit"
    assert resolve_qemu(Path("/opt/qemu-path")) == "/opt/qemu-path"


@pytest.mark.parametrize(("line", "version"), [
    ("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)", (10, 0, 2)),
    ("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)", (7, 2, 22)),
    ("QEMU emulator version 10.1.50 (v10.1.0-1234-gabcdef)", (10, 1, 50)),
])  # fmt: skip
def test_qemu_version_parses_the_first_line(
    tmp_path: Path, line: str, version: tuple[int, int, int]
) -> None:
    fake = script(tmp_path / "qemu", f"echo '{line}'\necho 'Copyright (c) 2003-2025'\n")
    assert qemu_version(fake) == version
    assert qemu_version(str(fake)) == version


def test_qemu_version_errors_carry_the_command_and_output(tmp_path: Path) -> None:
    chatty = script(tmp_path / "chatty", "echo 'not a qemu at all'\n")
    with pytest.raises(QemuBinaryError) as info:
        qemu_version(chatty)
    err = info.value
    assert isinstance(err, KprobeVMError) and err.step == "version"
    assert err.command == [str(chatty), "--version"] and "not a qemu at all" in err.output
    assert "printed no 'QEMU emulator version" in str(err) and str(chatty) in str(err)

    failing = script(tmp_path / "failing", "echo 'libfoo.so.5: cannot open shared object' >&2\n"
                                           "exit 127\n")
    with pytest.raises(QemuBinaryError) as info:
        qemu_version(failing)
    assert "status 127" in str(info.value) and "other libraries" in str(info.value)
    assert "libfoo.so.5" in str(info.value)

    with pytest.raises(QemuBinaryError) as info:
        qemu_version(tmp_path / "absent")
    assert isinstance(info.value.__cause__, OSError)


def test_wrapper_runs_the_build_with_its_own_modules_roms_and_bios(tmp_path: Path) -> None:
    root = tmp_path / "a dir with spaces" / "root"
    text = wrapper_script(root, suite="bookworm-backports", version="1:10.0.2+ds-2")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/sh" and "QEMU 1:10.0.2+ds-2 from Debian bookworm-backports" in text
    assert f"export QEMU_MODULE_DIR='{root}/usr/lib/x86_64-linux-gnu/qemu'" in lines
    assert lines[-1] == (f"exec '{root}/usr/bin/qemu-system-x86_64' -L '{root}/usr/share/qemu'"
                         f" -L '{root}/usr/share/seabios' \"$@\"")
    # Run it: a stand-in QEMU prints what it was given.
    script(root / "usr/bin/qemu-system-x86_64",
           'echo "modules=$QEMU_MODULE_DIR"; for a in "$@"; do echo "arg=$a"; done\n')
    wrapper = script(tmp_path / "wrapper", text.removeprefix("#!/bin/sh\n"))
    out = subprocess.run([wrapper, "-m", "64M", "two words"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == [
        f"modules={root}/usr/lib/x86_64-linux-gnu/qemu",
        "arg=-L", f"arg={root}/usr/share/qemu", "arg=-L", f"arg={root}/usr/share/seabios",
        "arg=-m", "arg=64M", "arg=two words",
    ]


def test_a_build_is_a_frozen_value(tmp_path: Path) -> None:
    build = QemuBuild("bookworm-backports", "1:10.0.2", tmp_path / "bin" / DEFAULT_QEMU,
                      tmp_path / "root")
    with pytest.raises(dataclasses.FrozenInstanceError):
        build.version = "other"  # type: ignore[misc]


def test_a_bad_suite_name_is_refused_before_any_apt(tmp_path: Path) -> None:
    with pytest.raises(QemuBinaryError, match="not a Debian suite"):
        fetch_qemu("../../etc", cache=tmp_path)
    assert not (tmp_path / "qemu").exists()


def test_an_unusable_cache_is_a_qemu_binary_error(tmp_path: Path) -> None:
    (tmp_path / "qemu").write_text("a file where the directory should be")
    with pytest.raises(QemuBinaryError, match="cannot use the QEMU cache") as info:
        fetch_qemu(cache=tmp_path)
    assert isinstance(info.value.__cause__, OSError)


def test_offline_without_a_cached_build_is_an_error_with_apts_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu_builds, "MIRROR", UNREACHABLE)
    with pytest.raises(QemuBinaryError) as info:
        fetch_qemu(cache=tmp_path)
    err = info.value
    assert err.step == "apt-get update" and err.command[0] == "apt-get"
    assert "update" in err.command and "Dir::Etc::sourcelist=/dev/null" in err.command
    assert "127.0.0.1:9" in err.output and "E: Failed to fetch" in str(err)
    # Nothing of the host's apt: the private state is in the cache, private to the user.
    apt = tmp_path / "qemu" / "apt" / "bookworm-backports"
    assert (apt / "state" / "lists").is_dir()
    for d in (tmp_path / "qemu", tmp_path / "qemu" / "apt", apt):
        assert mode(d) == 0o700, d
    sources = (apt / "etc" / "sources.list.d" / "kprobevm.sources").read_text()
    assert "Suites: bookworm-backports\n" in sources and f"URIs: {UNREACHABLE}\n" in sources
    assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n" in sources
    assert not (apt / "updated").exists(), "a failed update leaves the lists stale"


def test_the_lock_is_held_while_fetching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes (pytest-xdist workers) never fetch into one cache at once."""
    held: list[bool] = []

    def probe(apt: object) -> object:
        fd = os.open(tmp_path / "qemu" / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        raise QemuBinaryError("stop here", step="apt-get update")

    monkeypatch.setattr(qemu_builds, "_resolve", probe)
    with pytest.raises(QemuBinaryError, match="stop here"):
        fetch_qemu(cache=tmp_path)
    assert held == [True]


# -- from deb.debian.org ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fetched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, QemuBuild]]:
    """One real fetch of bookworm-backports' QEMU into a cache of this module's own."""
    cache = tmp_path_factory.mktemp("cache")
    yield cache, fetch_qemu(cache=cache)


@pytest.mark.network
def test_fetch_unpacks_a_qemu_that_runs(fetched: tuple[Path, QemuBuild]) -> None:
    cache, build = fetched
    assert build.suite == "bookworm-backports"
    assert build.binary.parent.parent == cache / "qemu" / f"bookworm-backports-{build.version}"\
        .replace(":", "%3a")
    assert qemu_version(build.binary)[0] >= 10
    assert os.access(build.binary, os.X_OK)
    assert build.binary.read_text() == wrapper_script(build.root, suite=build.suite,
                                                      version=build.version)
    assert (build.root / "usr/share/seabios/bios-256k.bin").is_file()
    assert (build.root / "usr/share/qemu/linuxboot_dma.bin").is_file()
    assert mode(build.binary.parent.parent) == 0o700
    assert not list((cache / "qemu").glob(".build-*"))
    # the host's QEMU is not the one fetched
    assert not str(build.root).startswith("/usr")


@pytest.mark.network
def test_a_second_fetch_within_a_day_does_no_network_work(
    fetched: tuple[Path, QemuBuild], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, build = fetched

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the network was used")

    monkeypatch.setattr(qemu_builds._PrivateApt, "update", no_network)
    monkeypatch.setattr(qemu_builds._PrivateApt, "download", no_network)
    assert fetch_qemu(cache=cache) == build


@pytest.mark.network
def test_offline_the_cached_build_is_used_and_said(
    fetched: tuple[Path, QemuBuild], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache, build = fetched
    # what a fetch killed half-way leaves; the next fetch removes it
    leftover = cache / "qemu" / ".build-bookworm-backports-killed"
    (leftover / "build" / "root").mkdir(parents=True)
    monkeypatch.setattr(qemu_builds, "MIRROR", UNREACHABLE)  # new sources: lists are stale
    with caplog.at_level(logging.WARNING, logger=qemu_builds.__name__):
        assert fetch_qemu(cache=cache) == build
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "cannot fetch QEMU from bookworm-backports" in warning[0]
    assert "127.0.0.1:9" in warning[0] and f"using the cached build {build.root.parent}" \
        in warning[0]
    assert not leftover.exists()


@pytest.mark.network
def test_a_broken_cached_build_is_said_and_fetched_again(
    fetched: tuple[Path, QemuBuild], caplog: pytest.LogCaptureFixture
) -> None:
    cache, build = fetched
    (build.root / "usr/bin/qemu-system-x86_64").unlink()
    with caplog.at_level(logging.WARNING, logger=qemu_builds.__name__):
        again = fetch_qemu(cache=cache)
    assert again == build and qemu_version(again.binary)[0] >= 10
    assert any("is unusable" in r.getMessage() for r in caplog.records)
