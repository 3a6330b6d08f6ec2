"""The ``kprobevm`` command: one function per sub-command, progress on stderr, results on
stdout. Exit codes: 0 ok, 1 usage (a bad probe definition included, printed as the
kernel's error_log shows it), 2 a VM (or image) error, 3 (``trace`` and ``count``) a
probe handler raised: the run went on and its output is complete but for the hits whose
handler failed, each error is on stderr. ``run`` exits with CMD's status.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

from kprobevm.errors import KprobeVMError, ProbeSyntaxError
from kprobevm.gdbstub.transport import format_gdb_address, parse_gdb_address
from kprobevm.guest.image import DEFAULT_MEMORY
from kprobevm.kernel.stacktrace import DEFAULT_STACK_SIZE
from kprobevm.kprobes.optimizer import OPTIMIZE_BY_DEFAULT
from kprobevm.tracing.capture import DEFAULT_STRING_SIZE, MODES

if TYPE_CHECKING:
    from types import FrameType

    from kprobevm.guest.shell import RunResult
    from kprobevm.guest.vm import VM
    from kprobevm.tracing import EventHit, ProbeEvent
    from kprobevm.tracing.session import TraceSession

__all__ = ["EXIT_HANDLER", "EXIT_OK", "EXIT_USAGE", "EXIT_VM", "main"]

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_VM = 2
EXIT_HANDLER = 3
"""``trace``/``count``: a handler (entry or return probe) raised; those hits are lost."""

EXIT_EPILOG = """exit status: 0 ok; 1 usage or a definition the kernel would reject; 2 a VM error;
3 a probe handler raised (each error is printed as "handler error: ...")."""

Command = Callable[[argparse.Namespace], int]


def _progress(message: str) -> None:
    print(f"kprobevm: {message}", file=sys.stderr, flush=True)


def _add_boot_options(parser: argparse.ArgumentParser, *, vmlinux: bool = True) -> None:
    """The guest options shared by every sub-command that boots a VM (``vmlinux``: add
    ``--vmlinux`` here; sub-commands that also attach have it already)."""
    group = parser.add_argument_group("guest")
    group.add_argument("--smp", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    group.add_argument("--memory", default=DEFAULT_MEMORY,
                       help=f"guest RAM (default {DEFAULT_MEMORY})")
    group.add_argument("--kernel", type=Path, help="a bzImage instead of the default image's")
    group.add_argument("--initrd", type=Path, help="an initramfs instead of the default one")
    group.add_argument("--kernel-package", metavar="NAME",
                       help="boot a Debian kernel package instead of the default image's"
                            " kernel: a package or metapackage (linux-image-6.12-cloud-amd64)"
                            " or a local .deb; its image is built on first use")
    if vmlinux:
        group.add_argument("--vmlinux", type=Path, metavar="V",
                           help="with --kernel: a self-built kernel's vmlinux (its symbols,"
                                " BTF and DWARF are used as they are)")
    group.add_argument("--modules", type=Path, metavar="DIR",
                       help="with --kernel and --vmlinux: where the self-built kernel's"
                            " modules are installed (lib/modules/RELEASE or its root), when"
                            " virtio-net or virtio-pci are modules")
    group.add_argument("--append", default="", help="extra kernel command-line words")
    group.add_argument("--kaslr", action="store_true",
                       help="boot with KASLR on (the default image boots nokaslr)")
    group.add_argument("--cpu", default=None, metavar="MODEL",
                       help="QEMU's -cpu (default qemu64,+rdrand; qemu64,+rdrand,+la57 for"
                            " 5-level paging)")
    group.add_argument("--accel", default="tcg", choices=("tcg", "kvm", "auto"),
                       help="accelerator (auto tries KVM, falls back to TCG)")
    group.add_argument("--timeout", type=float, default=60.0, metavar="S",
                       help="seconds to wait for SSH (default 60)")
    group.add_argument("--qemu", metavar="PATH",
                       help="the QEMU binary (default: $KPROBEVM_QEMU, else"
                            " qemu-system-x86_64 on PATH; scripts/fetch-qemu gets a newer one)")


def _boot(args: argparse.Namespace) -> VM:
    """Boot from the parsed options (imported late: ``kprobevm --help`` stays fast)."""
    from kprobevm.guest.launcher import DEFAULT_CPU, boot

    _progress("booting the guest")
    return boot(
        kernel=args.kernel, initrd=args.initrd, append=args.append, memory=args.memory,
        smp=args.smp, accel=args.accel, kaslr=args.kaslr, timeout=args.timeout,
        qemu=args.qemu, kernel_package=args.kernel_package,
        vmlinux=args.vmlinux if args.kernel is not None else None, modules=args.modules,
        cpu=args.cpu or DEFAULT_CPU,
    )


def _ssh_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host or "127.0.0.1", int(port)


def _add_guest_options(parser: argparse.ArgumentParser) -> None:
    """``--boot`` (with the boot options) or ``--attach`` to a running QEMU."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--boot", action="store_true",
                       help="boot the default image (or --kernel/--initrd) for this run")
    which.add_argument("--attach", type=parse_gdb_address, metavar="GDB_SOCKET",
                       help="a running QEMU's gdbstub: a unix socket path or HOST:PORT")
    which.add_argument("--attach-qmp", metavar="SOCKET",
                       help="a running QEMU's QMP socket: its gdbstub is used, or started"
                            " for the session and stopped after")
    attach = parser.add_argument_group("attach")
    attach.add_argument("--ssh", type=_ssh_address, metavar="HOST:PORT",
                        help="the attached guest's SSH address (runs CMD, reads kallsyms);"
                             " without it, symbols come from guest memory and CMD cannot run")
    attach.add_argument("--ssh-key", type=Path, metavar="K", help="private key for --ssh")
    attach.add_argument("--vmlinux", type=Path, metavar="V",
                        help="the attached guest's vmlinux (its BTF gives comm and pid);"
                             " with --boot --kernel, a self-built kernel's")
    attach.add_argument("--kallsyms", type=Path, metavar="F",
                        help="the attached guest's /proc/kallsyms as a file")
    _add_boot_options(parser, vmlinux=False)


def _guest(args: argparse.Namespace) -> VM:
    """The VM these options name: booted, or attached to."""
    if args.boot:
        return _boot(args)
    from kprobevm.guest.vm import attach

    if args.attach is None:
        _progress(f"attaching through the QMP monitor {args.attach_qmp}")
    else:
        _progress(f"attaching to {format_gdb_address(args.attach)}")
    if args.ssh is None and args.vmlinux is None:
        _progress("no --ssh or --vmlinux: symbols, BTF, module symbols and the kprobe"
                  " blacklist are read from guest memory")  # fmt: skip
    vm = attach(args.attach, qmp=args.attach_qmp, ssh=args.ssh, ssh_key=args.ssh_key,
                vmlinux=args.vmlinux, kallsyms=args.kallsyms)
    if vm.monitor_gdbstub is not None:
        how = "started" if vm.monitor_gdbstub.started else "found"
        _progress(f"gdbstub {how} through QMP: {format_gdb_address(vm.monitor_gdbstub.address)}")
    return vm


def _say_channel(vm: VM) -> None:
    """The trap channel in use on stderr: the slow fallback with its reason and cost."""
    from kprobevm.trap.install import FALLBACK_COST

    if vm.trap_channel == "breakpoint" and vm.trap_fallback is not None:
        _progress(f"slow trap channel (breakpoint on the #BP vector): {vm.trap_fallback};"
                  f" {FALLBACK_COST}")  # fmt: skip
    elif vm.trap_channel == "watchpoint" and vm.slot_memory is not None:
        _progress(f"trap channel: watchpoint; slot memory: {vm.slot_memory}")


def _probe_error(sub: str, exc: ProbeSyntaxError) -> int:
    """A rejected definition as the kernel's error_log prints it; exit 1."""
    message = str(exc).split("\n", 1)[0]
    print(f"kprobevm {sub}: error: {message}", file=sys.stderr)
    print(f"  Command: {exc.text}", file=sys.stderr)
    print(" " * (len("  Command: ") + exc.position) + "^", file=sys.stderr)
    return EXIT_USAGE


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
    from kprobevm.guest.launcher import QemuMachine

    with _boot(args) as vm:
        ep = vm.endpoints
        assert ep.ssh is not None
        host, port = ep.ssh
        ssh = shlex.join([
            "ssh", "-i", str(ep.ssh_key), "-p", str(port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", f"{ep.ssh_user}@{host}",
        ])
        gdb = format_gdb_address(ep.gdb) if ep.gdb is not None else "-"
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


def _split_command(words: Sequence[str]) -> tuple[list[str], list[str]]:
    """DEF... [-- CMD...] -> (definitions, command words)."""
    words = list(words)
    if "--" in words:
        i = words.index("--")
        return words[:i], words[i + 1 :]
    return words, []


def _count_definition(func: str) -> str:
    """A ``count`` FUNC: a symbol (``vfs_read``, ``vfs_read+4``, ``vfs_read%return``) or a
    full definition."""
    word = func.strip()
    if " " in word or (word[:1] in "pr" and ":" in word.split(" ", 1)[0]):
        return word
    return f"p {word}"


def _count_key(func: str, event: ProbeEvent) -> str:
    word = func.strip()
    return word if word == _count_definition(word)[2:] else event.event


def _print_hits(session: TraceSession, out: TextIO, as_json: bool) -> int:
    n = 0
    for hit in session.drain():
        out.write(_hit_text(hit, as_json))
        n += 1
    if n:
        out.flush()
    return n


def _hit_text(hit: EventHit, as_json: bool) -> str:
    if as_json:
        return json.dumps(hit.to_json(), separators=(",", ":")) + "\n"
    return "\n".join(hit.lines()) + "\n"


def _run_in_guest(
    vm: VM, command: list[str], timeout: float
) -> tuple[threading.Thread, list[RunResult | BaseException]]:
    """Run CMD in a thread: the main thread keeps printing hits meanwhile."""
    line = command[0] if len(command) == 1 else shlex.join(command)
    box: list[RunResult | BaseException] = []

    def work() -> None:
        try:
            box.append(vm.run(line, timeout=timeout))
        except BaseException as exc:  # handed to the main thread
            box.append(exc)

    thread = threading.Thread(target=work, name="kprobevm-cmd", daemon=True)
    thread.start()
    return thread, box


def _session(args: argparse.Namespace, definitions: list[str], *, count_only: bool) -> int:
    """What trace and count share: parse, guest, plan, place, wait, unregister, close."""
    from kprobevm.tracing import session as trace

    sub = args.subcommand
    try:
        events, notes = trace.check_definitions(definitions)
    except ProbeSyntaxError as exc:
        return _probe_error(sub, exc)
    for note in notes:
        _progress(note)
    if not events:
        print(f"kprobevm {sub}: no probe definitions", file=sys.stderr)
        return EXIT_USAGE
    if not 1 <= args.string_size <= 4096:
        print(f"kprobevm {sub}: --string-size {args.string_size} is not in 1..4096",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    stacktrace, stack_size = getattr(args, "stacktrace", False), getattr(args, "stack_size", 0)
    if stacktrace and (not 8 <= stack_size <= 4096 or stack_size % 8):
        print(f"kprobevm {sub}: --stack-size {stack_size} is not a multiple of 8 in 8..4096",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    returns = [f"{e.group}/{e.event}" for e in events if e.is_return]
    if stacktrace and returns:
        print(f"kprobevm {sub}: --stacktrace is for entry probes; {', '.join(returns)} is a"
              " return probe", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    if args.command and not args.boot and args.ssh is None:
        print(f"kprobevm {sub}: -- CMD runs in the guest over SSH, and --attach has no --ssh"
              " HOST:PORT: give --ssh, or trace for --duration S", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    out = sys.stdout
    with _guest(args) as vm:
        vm.kprobes.optimizer.enabled = args.optimize
        try:
            plan = trace.plan_events(vm, events)
        except ProbeSyntaxError as exc:
            return _probe_error(sub, exc)
        if args.dry_run:
            for p in plan:
                print(p.describe())
            return EXIT_OK
        if args.mode == "record":
            _, why = trace.record_specs(
                vm, plan, count_only=count_only, string_size=args.string_size,
                have_btf=vm.task_layout is not None, stack_size=stack_size if stacktrace else 0,
            )  # fmt: skip
            if why:
                print(f"kprobevm {sub}: --mode record: {why}", file=sys.stderr)
                return EXIT_USAGE
        session = trace.TraceSession(
            vm, plan, count_only=count_only, mode=args.mode, string_size=args.string_size,
            stacktrace=stacktrace, stack_size=stack_size or DEFAULT_STACK_SIZE,
        )  # fmt: skip
        session.start()
        reader_gone = False
        try:
            _progress(f"{len(plan)} probe(s) placed")
            _say_channel(vm)
            if session.record_refused is not None:
                _progress(f"not recorded, stopping at each hit: {session.record_refused}")
            _wait(args, vm, session, out, count_only=count_only)
        except BrokenPipeError:
            reader_gone = True  # `| head`: stop tracing, no error
        finally:
            session.stop()
            _progress("probes removed")
        return _finish(args, session, out, count_only=count_only, reader_gone=reader_gone)


def _finish(
    args: argparse.Namespace,
    session: TraceSession,
    out: TextIO,
    *,
    count_only: bool,
    reader_gone: bool = False,
) -> int:
    """After the probes are removed: the last hits or the counts on ``out`` (unless its
    reader is gone), what was missed and what the handlers raised on stderr. Returns
    EXIT_HANDLER when a handler raised: its hit is missing from the output."""
    if not reader_gone and not count_only:
        _print_hits(session, out, args.json)
    missed = session.missed()
    if missed:
        _progress(f"{missed} hit(s) missed (kretprobe maxactive, full ring or re-entry)")
    errors = session.handler_errors()
    for error in errors:
        _progress(f"handler error: {error}")
    if not reader_gone and count_only:
        _print_counts(args, session)
    return EXIT_HANDLER if errors else EXIT_OK


def _wait(
    args: argparse.Namespace, vm: VM, session: TraceSession, out: TextIO, *, count_only: bool
) -> None:
    """Until CMD ends, --duration passes or Ctrl-C; printing hits as they come."""
    deadline = time.monotonic() + args.duration if args.duration else None
    thread = None
    box: list[RunResult | BaseException] = []
    if args.command:
        thread, box = _run_in_guest(vm, args.command, args.command_timeout)
    elif deadline is None:
        _progress("tracing; Ctrl-C stops")
    try:
        while True:
            if not count_only:
                _print_hits(session, out, args.json)
            if thread is not None and not thread.is_alive():
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(0.02)
    except KeyboardInterrupt:
        _progress("interrupted")
    if thread is not None and box:
        result = box[0]
        if isinstance(result, BaseException):
            raise result
        sys.stderr.write(result.stdout)
        sys.stderr.write(result.stderr)
        if result.returncode:
            _progress(f"command exited with status {result.returncode}")


def _print_counts(args: argparse.Namespace, session: TraceSession) -> None:
    by_plan = {id(p): key for key, p in zip(args.keys, session.plan, strict=True)}
    rows = [(by_plan[id(p)], n) for p, n in session.counts()]
    for key, n in sorted(rows, key=lambda r: (r[1], r[0])):  # bpftrace prints ascending
        if args.json:
            print(json.dumps({"probe": key, "count": n}, separators=(",", ":")))
        else:
            print(f"@[{key}]: {n}")


def _probe_words(args: argparse.Namespace, what: str) -> list[str]:
    """``args.words`` (DEF... [-- CMD...]) split: CMD into ``args.command``, the rest
    returned; when there is no DEF, says "no ``what``" on stderr and returns []."""
    words, args.command = _split_command(args.words)
    if not words:
        print(f"kprobevm {args.subcommand}: no {what}", file=sys.stderr)
    return words


def cmd_trace(args: argparse.Namespace) -> int:
    """Place kprobe_events definitions, run CMD (or wait), print one line per hit."""
    definitions = _probe_words(args, "probe definitions")
    if not definitions:
        return EXIT_USAGE
    return _session(args, definitions, count_only=False)


def cmd_count(args: argparse.Namespace) -> int:
    """Count hits per probe; print ``@[FUNC]: N`` lines at the end, as bpftrace does
    (``--by comm|pid|cpu``: ``@[FUNC, KEY]: N``, counted in the guest)."""
    funcs = _probe_words(args, "functions")
    if not funcs:
        return EXIT_USAGE
    from kprobevm.tracing import EventDeletion, parse_event

    definitions = [_count_definition(f) for f in funcs]
    keys = []
    for func, text in zip(funcs, definitions, strict=True):
        try:
            event = parse_event(text)
        except ProbeSyntaxError as exc:
            return _probe_error("count", exc)
        if isinstance(event, EventDeletion):
            print(f"kprobevm count: {func!r} deletes; nothing to count", file=sys.stderr)
            return EXIT_USAGE
        keys.append(_count_key(func, event))
    args.keys = keys
    if args.by is not None:
        from kprobevm.maps_cli import cmd_count_by

        return cmd_count_by(args, definitions, keys)
    return _session(args, definitions, count_only=True)


def cmd_list(args: argparse.Namespace) -> int:
    """Print the probes kprobevm has placed in the guest (debugfs ``kprobes/list`` format)."""
    with _guest(args) as vm:
        sys.stdout.write(vm.list_kprobes())
    return EXIT_OK


def cmd_blacklist(args: argparse.Namespace) -> int:
    """Print the kprobe blacklist (debugfs format); with SYMBOL, its line or "not
    blacklisted" (exit 0 when blacklisted, 1 when not, like grep)."""
    with _guest(args) as vm:
        if args.symbol is None:
            sys.stdout.write(vm.blacklist())
            return EXIT_OK
        try:
            address = vm.symbols[args.symbol]
        except KeyError:
            print(f"kprobevm blacklist: no symbol {args.symbol!r}", file=sys.stderr)
            return EXIT_USAGE
        entry = vm.kprobe_blacklist.within_kprobe_blacklist(address)
        if entry is None:
            print(f"{args.symbol}: not blacklisted")
            return EXIT_USAGE
        print(entry.format_debugfs())
    return EXIT_OK


def cmd_recover(args: argparse.Namespace) -> int:
    """Undo what a dead session left in a guest, from its journal (exit 2 on conflicts)."""
    from kprobevm.kprobes.recover import recover

    report = recover(args.journal, gdb=args.gdb)
    print(report.summary())
    return EXIT_OK if report.ok else EXIT_VM


def cmd_debuginfo(args: argparse.Namespace) -> int:
    """Print the path of the guest kernel's vmlinux with DWARF (for drgn's types): its
    Debian -dbg package's, downloaded and extracted into the cache on first use."""
    from kprobevm.guest.debuginfo import debug_vmlinux
    from kprobevm.guest.image import default_image, kernel_package_image

    image = (default_image() if args.kernel_package is None
             else kernel_package_image(args.kernel_package))  # fmt: skip
    print(debug_vmlinux(image))
    return EXIT_OK


def _add_session_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per line (stable field names)")
    parser.add_argument("--duration", type=float, metavar="S",
                        help="trace for S seconds (default: until CMD ends, or Ctrl-C)")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve and print what would be placed; write nothing")
    parser.add_argument("--command-timeout", type=float, default=3600.0, metavar="S",
                        help="seconds CMD may run (default 3600)")
    parser.add_argument("--mode", choices=MODES, default="auto",
                        help="record: the guest records each hit, no stop (entry probes);"
                             " stop: the guest stops at each hit; auto (default): record"
                             " when every probe can be")
    parser.add_argument("--optimize", action=argparse.BooleanOptionalAction,
                        default=OPTIMIZE_BY_DEFAULT,
                        help="a jump instead of the int3 where the kernel's optprobe rules"
                             " allow (the kernel's sysctl debug.kprobes-optimization;"
                             f" default: {'on' if OPTIMIZE_BY_DEFAULT else 'off'})")
    parser.add_argument("--string-size", type=int, default=DEFAULT_STRING_SIZE, metavar="N",
                        help="bytes a recorded string keeps, NUL included (default"
                             f" {DEFAULT_STRING_SIZE}; 1..4096)")
    _add_guest_options(parser)


TRACE_EPILOG = (
    """DEF is a kprobe_events definition, as tracefs takes it:
  'p:open do_sys_openat2 dfd=%di:s32 filename=+0(%si):ustring'
  'r:openret do_sys_openat2 ret=$retval:s32'
CMD's output goes to stderr; stdout has one line per hit in the ftrace format
(comm-pid [cpu] flags timestamp: event: (where) args). Recorded events (--mode) are
written by the guest at each hit without stopping it and printed in batches; their
timestamps are the guest's TSC since boot. Events that stop the guest (return probes,
--mode stop) are stamped with host monotonic time since the probes were placed.
On x86_64 a user pointer needs :ustring (or +u0(...)): a plain :string prints (fault),
as the kernel does.

"""
    + EXIT_EPILOG
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; later sub-commands (trace, count, list, ...) add themselves here."""
    from kprobevm import funclatency_cli, maps_cli

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

    raw = argparse.RawDescriptionHelpFormatter
    trace = sub.add_parser("trace", help=cmd_trace.__doc__, description=cmd_trace.__doc__,
                           epilog=TRACE_EPILOG, formatter_class=raw)
    _add_session_options(trace)
    trace.add_argument("--stacktrace", action="store_true",
                       help="after each line, the kernel stack at the hit as tracefs prints"
                            " it with options/stacktrace and sym-offset (entry probes),"
                            " unwound on the host with the vmlinux's ORC tables")
    trace.add_argument("--stack-size", type=int, default=DEFAULT_STACK_SIZE, metavar="N",
                       help="with --stacktrace, bytes of stack a recorded hit copies from"
                            f" %%sp up (default {DEFAULT_STACK_SIZE}; 8..4096, a multiple of"
                            " 8), and as many from the stack below an IRQ stack: a deeper"
                            " stack is cut there")
    trace.add_argument("words", nargs=argparse.REMAINDER, metavar="DEF... [-- CMD...]")
    trace.set_defaults(func=cmd_trace)

    count = sub.add_parser("count", help=cmd_count.__doc__, description=cmd_count.__doc__,
                           epilog="FUNC: a symbol (vfs_read, vfs_read%return) or a definition."
                                  "\n\n" + EXIT_EPILOG, formatter_class=raw)
    _add_session_options(count)
    maps_cli.add_by_option(count)
    count.add_argument("words", nargs=argparse.REMAINDER, metavar="FUNC... [-- CMD...]")
    count.set_defaults(func=cmd_count)
    maps_cli.add_hist_parser(sub)
    funclatency_cli.add_funclatency_parser(sub)

    lst = sub.add_parser("list", help=cmd_list.__doc__, description=cmd_list.__doc__)
    _add_guest_options(lst)
    lst.set_defaults(func=cmd_list)

    bl = sub.add_parser("blacklist", help=cmd_blacklist.__doc__,
                        description=cmd_blacklist.__doc__)
    _add_guest_options(bl)
    bl.add_argument("symbol", nargs="?", metavar="SYMBOL")
    bl.set_defaults(func=cmd_blacklist)

    dbg = sub.add_parser("debuginfo", help=cmd_debuginfo.__doc__,
                         description=cmd_debuginfo.__doc__)
    dbg.add_argument("--kernel-package", metavar="NAME",
                     help="the image of this Debian kernel package (as run --kernel-package"
                          " takes it) instead of the default image")
    dbg.set_defaults(func=cmd_debuginfo)

    rec = sub.add_parser("recover", help=cmd_recover.__doc__, description=cmd_recover.__doc__)
    rec.add_argument("journal", type=Path, metavar="JOURNAL")
    rec.add_argument("--gdb", metavar="ADDR",
                     help="the gdbstub (default: the one the journal names)")
    rec.set_defaults(func=cmd_recover)
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
    except ProbeSyntaxError as exc:
        return _probe_error(args.subcommand, exc)
    except KprobeVMError as exc:
        print(f"kprobevm {args.subcommand}: {exc}", file=sys.stderr)
        return EXIT_VM
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
