"""The pytest plugin, used by test files of their own (pytester): skips without QEMU; on a
real guest a passing probe test, a failing one with the serial log in its report, and a
teardown that catches kernel text left changed (one boot for all three)."""

from __future__ import annotations

import pytest

from kprobevm.guest.image import cache_dir
from kprobevm.guest.qemu_builds import QEMU_ENV

pytest_plugins = ["pytester"]

GUEST_TESTS = '''
import pytest
from kprobevm.tracing.session import args_of


def test_open_is_seen(kprobes):
    probe = kprobes.event("p:open do_sys_openat2 filename=+0(%si):ustring")
    kprobes.run("cat /etc/os-release >/dev/null")
    cats = [h for h in probe.hits if h.comm == "cat"]
    assert b"/etc/os-release" in [args_of(h)["filename"] for h in cats]
    assert "filename=\\"/etc/os-release\\"" in "\\n".join(probe.lines())


def test_fails_with_the_serial_log(kprobevm_vm):
    assert kprobevm_vm.run("echo hello").stdout == "goodbye\\n"


@pytest.fixture
def cold_byte(kprobevm_vm):
    """A byte inside the reboot system call, which nothing runs while the test does."""
    sym = kprobevm_vm.symbols.symbol("__x64_sys_reboot")
    addr = sym.address + sym.size // 2
    old = kprobevm_vm.read(addr, 1)
    yield addr, bytes([old[0] ^ 0xFF])
    kprobevm_vm.write(addr, old)


def test_text_left_changed(cold_byte, kprobes, kprobevm_vm):
    kprobes.event("p:rb __x64_sys_reboot")
    kprobevm_vm.write(*cold_byte)
'''


def test_marked_tests_skip_without_qemu(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.vm
        def test_marked():
            raise AssertionError("must not run")

        def test_fixture(kprobevm_vm):
            raise AssertionError("must not run")

        def test_plain():
            pass
        """
    )
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv(QEMU_ENV, raising=False)
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*qemu-system-x86_64 not found on PATH*"])


MARKED = """
import pytest

@pytest.mark.vm
def test_marked():
    raise AssertionError("must not run")
"""


def test_the_qemu_checked_is_the_one_named(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--kprobevm-qemu, else $KPROBEVM_QEMU, is the QEMU whose absence skips vm tests."""
    pytester.makepyfile(MARKED)
    monkeypatch.setenv(QEMU_ENV, "/nonexistent/env-qemu")
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*/nonexistent/env-qemu not found (*--kprobevm-qemu*"])
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider",
                                "--kprobevm-qemu", "/nonexistent/option-qemu")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*/nonexistent/option-qemu not found*"])
    # a QEMU that exists (any executable will do for the check) lets the test run
    fake = pytester.path / "fake-qemu"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    result = pytester.runpytest("-p", "no:cacheprovider", "--kprobevm-qemu", str(fake))
    result.assert_outcomes(failed=1)


def test_options_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--kprobevm-kernel*", "*--kprobevm-image*",
                                 "*--kprobevm-kaslr*", "*--kprobevm-cpu*",
                                 "*--kprobevm-qemu*"])
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.vm:*"])


@pytest.mark.vm
def test_plugin_on_a_real_guest(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pytester moves HOME: keep the image cache where the default image is built
    monkeypatch.setenv("KPROBEVM_CACHE", str(cache_dir()))
    pytester.makepyfile(GUEST_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", timeout=300)
    result.assert_outcomes(passed=2, failed=1, errors=1)
    out = result.stdout.str()
    # the failing test's report carries the guest's console
    assert "kprobevm serial log (last" in out and "KPROBEVM-READY" in out
    # the teardown saw vfs_read's bytes differ from before the probe
    assert "kernel text not restored: __x64_sys_reboot" in out
