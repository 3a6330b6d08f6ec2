"""The ``kprobevm`` command: one function per sub-command, progress on stderr, results on
stdout. Exit codes: 0 ok, 1 usage, 2 a VM (or image) error; ``run`` exits with CMD's status.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from kprobevm.errors import KprobeVMError
from kprobevm.image import DEFAULT_MEMORY

if TYPE_CHECKING:
    from types import FrameType

    from kprobevm.vm import VM

__all__ = ["EXIT_OK", "EXIT_USAGE", "EXIT_VM", "main"]

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_VM = 2

Command = Callable[[argparse.Namespace], int]


def _progress(message: str) -> None:
    print(f"kprobevm: {message}", file=sys.stderr, flush=True)


def _add_boot_options(parser: argparse.ArgumentParser) -> None:
    """The guest options shared by every sub-command that boots a VM."""
    group = parser.add_argument_group("guest")
    group.add_argument("--smp", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    group.add_argument("--memory", default=DEFAULT_MEMORY,
                       help=f"guest RAM (default {DEFAULT_MEMORY})")
    group.add_argument("--kernel", type=Path, help="a bzImage instead of the default image's")
    group.add_argument("--initrd", type=Path, help="an initramfs instead of the default one")
    group.add_argument("--append", default="", help="extra kernel command-line words")
    group.add_argument("--kaslr", action="store_true", help="boot without nokaslr")
    group.add_argument("--accel", default="tcg", choices=("tcg", "kvm", "auto"),
                       help="accelerator (auto tries KVM, falls back to TCG)")
    group.add_argument("--timeout", type=float, default=60.0, metavar="S",
                       help="seconds to wait for SSH (default 60)")


def _boot(args: argparse.Namespace) -> VM:
    """Boot from the parsed options (imported late: ``kprobevm --help`` stays fast)."""
    from kprobevm.launcher import boot

    _progress("booting the guest")
    return boot(
        kernel=args.kernel, initrd=args.initrd, append=args.append, memory=args.memory,
        smp=args.smp, accel=args.accel, kaslr=args.kaslr, timeout=args.timeout,
    )


def cmd_run(args: argparse.Namespace) -> int:
    """Boot, run CMD in the guest, print its output, power off, exit with its status."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("kprobevm run: no command given (kprobevm run -- CMD...)", file=sys.stderr)
        return EXIT_USAGE
    started = time.monotonic()
    with _boot(args) as vm:
        _progress(f"guest ready in {time.monotonic() - started:.1f} s")
        # One word is taken as a shell command line; several are quoted as argv.
        line = command[0] if len(command) == 1 else shlex.join(command)
        result = vm.run(line, timeout=args.command_timeout)
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.write(result.stderr)
        _progress("powering off")
    return int(result.returncode)


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    """SIGTERM ends ``kprobevm boot`` the way Ctrl-C does: a clean power-off."""
    raise KeyboardInterrupt


def cmd_boot(args: argparse.Namespace) -> int:
    """Boot and stay up until Ctrl-C (or SIGTERM), printing how to reach the guest."""
    from kprobevm.launcher import QemuMachine

    with _boot(args) as vm:
        ep = vm.endpoints
        assert ep.ssh is not None
        host, port = ep.ssh
        ssh = shlex.join([
            "ssh", "-i", str(ep.ssh_key), "-p", str(port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", f"{ep.ssh_user}@{host}",
        ])
        gdb = ep.gdb if isinstance(ep.gdb, str) else f"{ep.gdb[0]}:{ep.gdb[1]}" if ep.gdb else "-"
        print(f"ssh:     {ssh}")
        print(f"gdb:     {gdb}   (gdb vmlinux -ex 'target remote {gdb}')")
        print(f"qmp:     {ep.qmp}")
        print(f"serial:  {ep.serial_log}")
        print(f"vmlinux: {vm.vmlinux_path}")
        sys.stdout.flush()
        _progress("guest is up; Ctrl-C powers it off")
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            while not isinstance(vm.machine, QemuMachine) or vm.machine.alive():
                time.sleep(0.5)
            _progress("QEMU exited")
            return EXIT_VM
        except KeyboardInterrupt:
            _progress("powering off")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; later sub-commands (trace, count, list, ...) add themselves here."""
    parser = argparse.ArgumentParser(
        prog="kprobevm", description="Linux kprobes for a QEMU x86_64 guest, driven from the host.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress (-vv: debug)")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help=cmd_run.__doc__, description=cmd_run.__doc__)
    _add_boot_options(run)
    run.add_argument("--command-timeout", type=float, default=3600.0, metavar="S",
                     help="seconds CMD may run (default 3600)")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")
    run.set_defaults(func=cmd_run)

    boot = sub.add_parser("boot", help=cmd_boot.__doc__, description=cmd_boot.__doc__)
    _add_boot_options(boot)
    boot.set_defaults(func=cmd_boot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kprobevm`` command."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help, 2 for a usage error
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                            format="%(name)s: %(message)s")
    func: Command = args.func
    try:
        return func(args)
    except KprobeVMError as exc:
        print(f"kprobevm {args.subcommand}: {exc}", file=sys.stderr)
        return EXIT_VM
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
