"""``kprobevm count --by`` and ``kprobevm hist``: maps kept in the guest, printed at the end.

Each FUNC (or the one definition of ``hist``) is placed as a probe that updates a
per-CPU map in the guest at each hit (:mod:`kprobevm.tracing.maps`): no stop and no
record per hit. CMD runs (or ``--duration`` passes, or Ctrl-C), the probes are removed,
and the maps are printed as bpftrace prints its maps, or as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from kprobevm.errors import ProbeRefused
from kprobevm.kprobes.aggregations import DEFAULT_DEPTH, StackKey
from kprobevm.tracing.maps import BY_KEYS, format_map, map_json, stack_frames, stack_lines
from kprobevm.x86.orc_walk import MAX_DEPTH

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kprobes.aggregations import AggregateProbe, MapSnapshot

__all__ = ["add_hist_parser", "cmd_count_by", "cmd_hist", "parse_linear"]


def parse_linear(text: str) -> tuple[int, int, int]:
    """``MIN,MAX,STEP`` (integers, any base Python reads) for ``--linear``."""
    try:
        lo, hi, step = (int(part, 0) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN,MAX,STEP") from exc
    if step <= 0 or hi <= lo:
        raise argparse.ArgumentTypeError(f"{text!r}: needs MIN < MAX and STEP > 0")
    return lo, hi, step


def _say(message: str) -> None:
    print(f"kprobevm: {message}", file=sys.stderr)


def _run_until_done(args: argparse.Namespace, vm: VM) -> None:
    """CMD, else --duration, else until Ctrl-C (the cli's own wait, with no hits to print)."""
    from kprobevm.cli import _run_in_guest

    thread, box = (_run_in_guest(vm, args.command, args.command_timeout)
                   if args.command else (None, []))  # fmt: skip
    deadline = time.monotonic() + args.duration if args.duration else None
    if thread is None and deadline is None:
        _say("counting in the guest; Ctrl-C stops")
    try:
        while (thread is None or thread.is_alive()) and (
            deadline is None or time.monotonic() < deadline
        ):
            time.sleep(0.05)
    except KeyboardInterrupt:
        _say("interrupted")
    if box:
        result = box[0]
        if isinstance(result, BaseException):
            raise result
        sys.stderr.write(result.stdout + result.stderr)
        if result.returncode:
            _say(f"command exited with status {result.returncode}")


def _place_all(
    args: argparse.Namespace, vm: VM, place: list[tuple[str, dict[str, object]]]
) -> list[AggregateProbe] | int:
    """Each (definition, options) placed; on bad input the ones placed are removed and
    the exit status is returned."""
    from kprobevm.cli import EXIT_USAGE
    from kprobevm.tracing.maps import place_map

    placed: list[AggregateProbe] = []
    try:
        for definition, options in place:
            placed.append(place_map(vm, definition, **options))  # type: ignore[arg-type]
    except (ProbeRefused, ValueError) as exc:
        for m in placed:
            m.close()
        print(f"kprobevm {args.subcommand}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return placed


def _finish(placed: list[AggregateProbe]) -> list[MapSnapshot]:
    for m in placed:
        m.close()
    _say("probes removed")
    return [m.read() for m in placed]


def cmd_count_by(args: argparse.Namespace, funcs: list[str], keys: list[str]) -> int:
    """``count --by KEY FUNC...``: ``@[FUNC, key]: N`` lines, ascending as bpftrace
    prints them; JSON: ``{"probe", "by", "key", "count"}`` per line."""
    from kprobevm.cli import EXIT_OK, _guest

    options: dict[str, object] = {"by": args.by}
    if args.by == "stack":
        options["depth"] = args.stack_depth
    with _guest(args) as vm:
        placed = _place_all(args, vm, [(f, options) for f in funcs])
        if isinstance(placed, int):
            return placed
        _say(f"{len(placed)} probe(s) placed, counting by {args.by} in the guest")
        try:
            _run_until_done(args, vm)
        finally:
            snaps = _finish(placed)
        symbols = vm.symbols
    rows = [(key, k, n) for key, snap in zip(keys, snaps, strict=True) for k, n in snap.counts]
    for key, k, n in sorted(rows, key=lambda r: (r[2], r[0], str(r[1]))):
        if isinstance(k, StackKey):
            _print_stack(key, k, n, symbols, as_json=args.json)
        elif args.json:
            print(json.dumps({"probe": key, "by": args.by, "key": k, "count": n},
                             separators=(",", ":")))  # fmt: skip
        else:
            print(f"@[{key}, {k}]: {n}")
    for key, snap in zip(keys, snaps, strict=True):
        _say_lost(key, snap)
    return EXIT_OK


def _print_stack(
    probe: str, key: StackKey, count: int, symbols: KernelSymbols, *, as_json: bool
) -> None:
    """One stack's count, as bpftrace prints ``@[kstack]`` (or one JSON object)."""
    if as_json:
        frames, cut = stack_frames(key, symbols)
        print(json.dumps({"probe": probe, "by": "stack", "stack": frames, "cut": cut,
                          "count": count}, separators=(",", ":")))  # fmt: skip
    else:
        print("\n".join(stack_lines(key, count, symbols)))


def _say_lost(key: str, snap: MapSnapshot) -> None:
    if snap.dropped:
        _say(f"@[{key}]: {snap.dropped} hit(s) dropped: a CPU's table was full"
             f" ({snap.capacity} keys)")  # fmt: skip
    if snap.faults:
        _say(f"@[{key}]: {snap.faults} hit(s) whose field could not be read")


def cmd_hist(args: argparse.Namespace) -> int:
    """A histogram of one argument of a kprobe_events definition, kept in the guest:
    log2 buckets, or --linear MIN,MAX,STEP ones; printed as bpftrace's hist()/lhist()."""
    from kprobevm.cli import EXIT_OK, EXIT_USAGE, _guest, _split_command
    from kprobevm.tracing.maps import event_name

    words, args.command = _split_command(args.words)
    if len(words) != 1:
        print("kprobevm hist: give one definition (quote it)", file=sys.stderr)
        return EXIT_USAGE
    (definition,) = words
    with _guest(args) as vm:
        placed = _place_all(args, vm, [(definition, {"field": args.field,
                                                     "linear": args.linear})])  # fmt: skip
        if isinstance(placed, int):
            return placed
        _say("1 probe placed, its histogram kept in the guest")
        try:
            _run_until_done(args, vm)
        finally:
            (snap,) = _finish(placed)
    name = event_name(definition)
    if args.json:
        print(json.dumps(map_json(name, snap), separators=(",", ":")))
    else:
        sys.stdout.write(format_map(name, snap))
    return EXIT_OK


def add_hist_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``hist`` sub-command's parser (with the session options ``count`` has)."""
    from kprobevm.cli import _add_session_options

    hist = sub.add_parser("hist", help=cmd_hist.__doc__, description=cmd_hist.__doc__,
                          epilog="DEF: 'p:rd vfs_read count=%dx:u64'; --field count")  # fmt: skip
    hist.add_argument("--field", required=True, metavar="NAME",
                      help="the definition's argument whose values are counted")  # fmt: skip
    hist.add_argument("--linear", type=parse_linear, metavar="MIN,MAX,STEP",
                      help="linear buckets (bpftrace's lhist) instead of log2 ones")  # fmt: skip
    _add_session_options(hist)
    hist.add_argument("words", nargs=argparse.REMAINDER, metavar="DEF [-- CMD...]")
    hist.set_defaults(func=cmd_hist)


def add_by_option(parser: argparse.ArgumentParser) -> None:
    """``count --by``."""
    parser.add_argument("--by", choices=BY_KEYS,
                        help="count in the guest by this key (a per-CPU map; no stop, no"
                             " record per hit); stack: the kernel stack, walked by the"
                             " guest with its ORC tables")  # fmt: skip
    parser.add_argument("--stack-depth", type=_depth, default=DEFAULT_DEPTH, metavar="N",
                        help=f"frames a --by stack key keeps (1..{MAX_DEPTH}, default"
                             f" {DEFAULT_DEPTH}); a deeper stack is shown cut")  # fmt: skip


def _depth(text: str) -> int:
    try:
        n = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of frames") from exc
    if not 1 <= n <= MAX_DEPTH:
        raise argparse.ArgumentTypeError(f"{n} frames: 1..{MAX_DEPTH}")
    return n
