"""``kprobevm funclatency FUNC``: a function's call latencies, a histogram kept in the guest.

bcc's ``funclatency``: FUNC gets a return probe whose hijack keeps each call's entry
time and whose return program counts the call's latency in a per-CPU log2 map
(:mod:`kprobevm.kprobes.funclatency`): no stop and no record per call. CMD runs (or
``--duration`` passes, or Ctrl-C), the probe is removed, and the map is printed as
bpftrace prints a ``hist()`` map keyed by the function (``@nsecs[FUNC]:``, ``[lo, hi)``
buckets in the unit bcc names: nsecs, usecs or msecs), or as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

from kprobevm.errors import KprobeError, ProbeRefused
from kprobevm.tracing.maps import format_map, map_json
from kprobevm.x86.funclatency import UNITS

__all__ = ["add_funclatency_parser", "cmd_funclatency"]


def cmd_funclatency(args: argparse.Namespace) -> int:
    """Time FUNC's calls in the guest (entry to return, no stop per call) and print their
    latencies as a log2 histogram, as bcc's funclatency does (bpftrace's hist() bars)."""
    from kprobevm.cli import EXIT_OK, EXIT_USAGE, _guest, _split_command
    from kprobevm.kprobes.funclatency import FuncLatency
    from kprobevm.maps_cli import _run_until_done, _say

    words, args.command = _split_command(args.words)
    if len(words) != 1:
        print("kprobevm funclatency: give one function", file=sys.stderr)
        return EXIT_USAGE
    (function,) = words
    if args.maxactive < 0:
        print(f"kprobevm funclatency: --maxactive {args.maxactive}: 0 or more", file=sys.stderr)
        return EXIT_USAGE
    unit = "ms" if args.milliseconds else "us" if args.microseconds else args.unit
    with _guest(args) as vm:
        try:
            lat = FuncLatency(vm, function, unit=unit, maxactive=args.maxactive)
        except (ProbeRefused, KprobeError) as exc:
            print(f"kprobevm funclatency: {exc}", file=sys.stderr)
            return EXIT_USAGE
        _say(f"timing {function} in the guest (maxactive {lat.maxactive}, TSC at"
             f" {lat.scale.tsc_khz} kHz)")  # fmt: skip
        try:
            _run_until_done(args, vm)
        finally:
            lat.close()
            _say("probe removed")
        snap, missed = lat.read(), lat.missed()
    name = f"{unit[0]}secs[{function}]"
    if args.json:
        doc = map_json(name, snap) | {"function": function, "unit": unit, "missed": missed,
                                      "maxactive": lat.maxactive}  # fmt: skip
        print(json.dumps(doc, separators=(",", ":")))
    else:
        sys.stdout.write(format_map(name, snap))
        print(f"@{name}: {snap.total} calls, {missed} missed (maxactive {lat.maxactive})")
    return EXIT_OK


def add_funclatency_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``funclatency`` sub-command's parser."""
    from kprobevm.cli import _add_guest_options

    doc = cmd_funclatency.__doc__
    p = sub.add_parser("funclatency", help=doc, description=doc,
                       epilog="FUNC: a function's name (vfs_read)")  # fmt: skip
    p.add_argument("--unit", choices=tuple(UNITS), default="ns",
                   help="nanoseconds (default), microseconds or milliseconds")  # fmt: skip
    p.add_argument("-u", "--microseconds", action="store_true", help="as --unit us (bcc's -u)")
    p.add_argument("-m", "--milliseconds", action="store_true", help="as --unit ms (bcc's -m)")
    p.add_argument("--maxactive", type=int, default=0, metavar="N",
                   help="calls timed at once at most; more are missed (default: the"
                        " kernel's kretprobe default, max(10, 2 * CPUs))")  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object (stable field names)")
    p.add_argument("--duration", type=float, metavar="S",
                   help="time for S seconds (default: until CMD ends, or Ctrl-C)")  # fmt: skip
    p.add_argument("--command-timeout", type=float, default=3600.0, metavar="S",
                   help="seconds CMD may run (default 3600)")  # fmt: skip
    _add_guest_options(p)
    p.add_argument("words", nargs=argparse.REMAINDER, metavar="FUNC [-- CMD...]")
    p.set_defaults(func=cmd_funclatency)
