"""One benchmark run: every contender on the same guest image and workload, then outputs.

The gdb contenders go first, before kprobevm opens the VM's gdbstub (QEMU serves one
client at a time); kprobevm over gdb/MI gets a fresh VM of the same image.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kprobevm.bench import engine, gdbscript, guest, idle
from kprobevm.bench.report import BenchReport, HitRate, markdown, to_json
from kprobevm.bench.workload import DENSE_FUNCTION, Run, run_opens, unhit_functions
from kprobevm.guest.qemu_builds import resolve_qemu

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = ["FULL", "QUICK", "BenchConfig", "main", "run"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    """Workload sizes (opens) and probe counts for one run."""

    opens: int = 20000
    """Baseline runs (no probe)."""
    hit_opens: int = 5000
    """kprobevm's contenders and the guest's kprobe."""
    gdbmi_opens: int = 1500
    gdb_opens: int = 300
    """gdb's breakpoints: about 12 hits/s, keep it small."""
    idle_counts: tuple[int, ...] = (0, 10, 100, 1000)
    idle_rounds: int = 5
    """The guest's speed drifts up to 2x within minutes here: many short rounds."""
    idle_opens: int = 3000
    registration_counts: tuple[int, ...] = (1, 100, 1000)
    paired_rounds: int = 120
    """kprobevm's idle cost at the largest count, by paired armed/disarmed rounds."""
    paired_opens: int = 2000


FULL = BenchConfig()
QUICK = BenchConfig(opens=5000, hit_opens=2000, gdbmi_opens=500, gdb_opens=100,
                    idle_rounds=1, idle_opens=2000, paired_rounds=6, paired_opens=1000)


def _command_line_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    m = re.search(r"(\d+\.\d+[\w.:~+-]*)", out)
    return m[1] if m else out.strip().splitlines()[0] if out.strip() else "?"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _accel(vm: VM) -> str:
    command = vm.machine.command if vm.machine is not None else []
    for i, arg in enumerate(command):
        if arg == "-accel" and i + 1 < len(command):
            return command[i + 1].split(",")[0]
        if arg.startswith("accel="):
            return arg.split("=", 1)[1]
    return "?"


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _qemu_of(vm: VM) -> str:
    """The QEMU binary that runs ``vm`` (the resolved default for an attached one)."""
    command = vm.machine.command if vm.machine is not None else []
    return command[0] if command else resolve_qemu()


def environment(vm: VM) -> dict[str, Any]:
    """Where the figures come from: host, QEMU, gdb, guest kernel, load."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_start": _loadavg(),
        "qemu_version": _command_line_version([_qemu_of(vm), "--version"]),
        "gdb_version": _command_line_version(["gdb", "--version"]),
        "python": platform.python_version(),
        "kernel_release": vm.run("uname -r", check=True).stdout.strip(),
        "guest_cpus": vm.run("nproc", check=True).stdout.strip(),
        "accel": _accel(vm),
    }


def _median_run(runs: Sequence[Run]) -> Run:
    """The run with the median rate."""
    ordered = sorted(runs, key=lambda r: r.ops_per_s)
    return ordered[len(ordered) // 2]


def run(config: BenchConfig = FULL, progress: Progress | None = None, *,
        qemu: str | None = None, kernel_package: str | None = None) -> BenchReport:
    """Boot (``qemu``: the QEMU binary, as ``boot`` takes it; ``kernel_package``: a Debian
    kernel package's image instead of the default), measure everything, power off; the
    figures of this one run."""
    import kprobevm

    say = progress or (lambda _msg: None)
    notes: list[str] = []
    with kprobevm.boot(name="bench", qemu=qemu, kernel_package=kernel_package) as vm:
        env = environment(vm)
        _ = vm.symbols  # kallsyms over SSH, before any timing
        run_opens(vm, min(config.opens, 1000))  # warm the page cache and TCG
        baselines = [run_opens(vm, config.opens)]
        say(f"baseline {baselines[0].ops_per_s:,.0f} opens/s")

        # gdb first: the VM's own gdbstub client is not open yet
        hit_rates: list[HitRate] = []
        for measure in (gdbscript.measure_gdb_python, gdbscript.measure_gdb_commands):
            hr = measure(vm, config.gdb_opens)
            say(f"{hr.name}: {hr.hits} hits, {hr.hits_per_s or 0:,.1f}/s {hr.reason}")
            hit_rates.append(hr)
        gdb_dense = gdbscript.measure_gdb_python(
            vm, max(config.gdb_opens // 4, 25), function=DENSE_FUNCTION
        )
        say(f"dense gdb_python: {gdb_dense.hits} hits, {gdb_dense.hits_per_s or 0:,.1f}/s"
            f" {gdb_dense.reason}")
        hr = guest.measure_guest_kprobe(vm, config.hit_opens)
        say(f"{hr.name}: {hr.hits_per_s or 0:,.0f} hits/s {hr.reason}")
        hit_rates.append(hr)

        empty, sample = engine.measure_empty(vm, config.hit_opens)
        say(f"kprobevm: {empty.hits_per_s or 0:,.0f} hits/s, channel {vm.trap_channel}")
        args, _ = engine.measure_args(vm, config.hit_opens)
        say(f"kprobevm_args: {args.hits_per_s or 0:,.0f} hits/s")
        kret = engine.measure_kretprobe(vm, config.hit_opens)
        say(f"kprobevm_kretprobe: {kret.hits_per_s or 0:,.0f} hits/s {kret.reason}")
        recorded = [engine.measure_recorded(vm, config.hit_opens, args=a) for a in (False, True)]
        for hr in recorded:
            say(f"{hr.name}: {hr.hits_per_s or 0:,.0f} hits/s {hr.reason}")
        dense, _ = engine.measure_empty(vm, config.hit_opens, function=DENSE_FUNCTION)
        say(f"dense kprobevm: {dense.hits_per_s or 0:,.0f} hits/s")
        baselines.append(run_opens(vm, config.opens))
        baseline = _median_run(baselines)
        per_hit = engine.per_hit_breakdown(sample, empty.run, baseline) if empty.run else {}

        wanted = max((*config.idle_counts, *config.registration_counts), default=0)
        names = idle.probeable(vm, unhit_functions(vm), wanted)
        if len(names) < wanted:
            notes.append(f"only {len(names)} probeable idle functions found, {wanted} wanted")
        say(f"{len(names)} idle functions")
        memory = _memory_at(vm, names)
        say(f"memory {memory}")
        idle_points = idle.measure_idle(
            vm, names, [n for n in config.idle_counts if n <= len(names)],
            rounds=config.idle_rounds, opens=config.idle_opens,
        )  # fmt: skip
        say("idle " + ", ".join(f"{p.kind}/{p.probes}: {p.ops_per_s:,.0f}" for p in idle_points))
        paired = idle.measure_idle_paired(
            vm, names[: max(config.idle_counts)], rounds=config.paired_rounds,
            opens=config.paired_opens,
        )  # fmt: skip
        lo, hi = paired.interval()
        say(f"paired idle, {paired.probes} probes: {paired.median:+.1%} ({lo:+.1%}..{hi:+.1%})")
        registration = idle.measure_registration(
            vm, names, [n for n in config.registration_counts if n <= len(names)])
        say(f"registration {registration}")
        hit_idle = sum(p.hits for p in idle_points)
        if hit_idle:
            notes.append(f"{hit_idle} hits on the supposedly idle probes")
        env["loadavg_end"] = _loadavg()

    gdbmi = _measure_gdbmi(config, qemu, kernel_package)
    say(f"kprobevm_gdbmi: {gdbmi.hits_per_s or 0:,.1f} hits/s {gdbmi.reason}")
    env["loadavg_end"] = _loadavg()
    env["baseline_runs_ops_per_s"] = [round(r.ops_per_s, 1) for r in baselines]
    order = {"kprobevm": 0, "kprobevm_args": 1, "kprobevm_kretprobe": 2,
             "kprobevm_recorded": 3, "kprobevm_recorded_args": 4, "kprobevm_gdbmi": 5,
             "guest_kprobe": 6, "gdb_python": 7, "gdb_commands": 8}
    rates = sorted([empty, args, kret, *recorded, gdbmi, *hit_rates],
                   key=lambda h: order.get(h.name, 99))
    return BenchReport(env, baseline, rates, idle_points, registration, per_hit, memory, notes,
                       dense=(dense, gdb_dense), paired_idle=paired)


def _memory_at(vm: VM, names: Sequence[str]) -> dict[str, float]:
    """Host RSS and slot pages with 1,000 probes (or as many as found) registered."""
    from kprobevm.kprobes.core import Kprobe

    kps = [Kprobe(symbol_name=n, pre_handler=lambda kp, regs: None) for n in names[:1000]]
    rss_before = idle.host_rss_kib()
    vm.register_kprobes(kps)
    try:
        rss_at = idle.host_rss_kib()
        slots = getattr(vm.kprobes.channel, "slots", None)  # the watchpoint channel's
        stats: dict[str, int] = slots.stats() if slots is not None else {}
    finally:
        vm.unregister_kprobes(kps)
    return {"probes": float(len(kps)), "host_rss_kib": float(rss_at),
            "host_rss_delta_kib": float(rss_at - rss_before),
            "slot_pages": float(stats.get("pages", 0)), "slots_used": float(stats.get("used", 0))}


def _measure_gdbmi(config: BenchConfig, qemu: str | None,
                   kernel_package: str | None = None) -> HitRate:
    """The engine with its gdbstub client swapped for a real gdb, on a fresh VM."""
    import kprobevm
    from kprobevm.errors import KprobeVMError
    from kprobevm.gdbstub.gdbmi_client import GdbMiClient

    try:
        with kprobevm.boot(name="bench-gdbmi", qemu=qemu, kernel_package=kernel_package) as vm:
            # before the gdbstub is first opened
            vm.use_gdbstub_client(GdbMiClient.connect)
            _ = vm.symbols
            run_opens(vm, min(config.opens, 1000))
            hr, _sample = engine.measure_empty(vm, config.gdbmi_opens, name="kprobevm_gdbmi",
                                               description="kprobevm over gdb/MI (pygdbmi)")
            return hr
    except KprobeVMError as exc:
        return HitRate("kprobevm_gdbmi", "kprobevm over gdb/MI (pygdbmi)",
                       reason=f"failed: {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/bench`` / ``kprobevm bench``."""
    ap = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small counts, under 3 minutes")
    ap.add_argument("--json", type=Path, help="write every figure and the environment here")
    ap.add_argument("--markdown", type=Path, help="write the tables here (else stdout only)")
    ap.add_argument("--plot", type=Path, help="write the PNG plot here")
    ap.add_argument("-q", "--silent", action="store_true", help="no progress lines")
    ap.add_argument("--qemu", metavar="PATH",
                    help="the QEMU binary (default: $KPROBEVM_QEMU, else qemu-system-x86_64)")
    ap.add_argument("--kernel-package", metavar="NAME",
                    help="boot a Debian kernel package's image instead of the default")
    args = ap.parse_args(argv)
    config = QUICK if args.quick else FULL
    progress: Progress | None = None if args.silent else (
        lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    report = run(config, progress, qemu=args.qemu, kernel_package=args.kernel_package)
    report = replace(report, environment={**report.environment, "mode": "quick" if args.quick
                                           else "full"})
    table = markdown(report)
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(to_json(report), indent=2) + "\n")
    if args.plot:
        from kprobevm.bench.plot import save_plot

        save_plot(report, args.plot)
    return 0

