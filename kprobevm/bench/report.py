"""The benchmark's figures as values, and their two renderings: JSON and a markdown table.

Ratios are the claims (absolute rates move 2x between runs on a shared machine), so every
hit rate is also given relative to kprobevm's, measured in the same run.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kprobevm.bench.workload import DENSE_FUNCTION, Run

__all__ = [
    "REFERENCE",
    "BenchReport",
    "HitRate",
    "IdlePoint",
    "idle_slowdown",
    "markdown",
    "ratio",
    "to_json",
]

REFERENCE = "kprobevm"
"""The contender every other one is compared with."""
RECORDED = "kprobevm_recorded"
"""The recorded contender: the guest records each hit, the handler runs from the record."""
REQUIRED = ("kprobevm", "kprobevm_gdbmi", "gdb_python", "gdb_commands", "guest_kprobe")
"""Keys ``hits_per_s`` always holds (None when a contender could not run)."""


@dataclass(frozen=True)
class HitRate:
    """One contender on the hot function: hits it handled while the workload ran."""

    name: str
    description: str
    hits: int = 0
    run: Run | None = None
    """The workload run with the probe in place (None: the contender did not run)."""
    reason: str = ""
    """Why the contender is not available ('' when it ran)."""
    extra: Mapping[str, float] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.run is not None and not self.reason

    @property
    def hits_per_s(self) -> float | None:
        if self.run is None or self.run.seconds <= 0 or self.reason:
            return None
        return self.hits / self.run.seconds

    @property
    def ops_per_s(self) -> float | None:
        return self.run.ops_per_s if self.run is not None and not self.reason else None


@dataclass(frozen=True)
class PairedIdle:
    """kprobevm's idle cost by paired rounds: ``probes`` armed, then disarmed (or the other
    way round), the workload timed each way; each round's own slowdown, 1 - armed/disarmed.

    Pairing adjacent runs cancels the machine's slow drift; the median of the rounds and a
    bootstrap interval say how much of the figure the remaining noise leaves.
    """

    probes: int
    ratios: tuple[float, ...]
    hits: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.ratios) if self.ratios else float("nan")

    def interval(self, level: float = 0.95, resamples: int = 4000) -> tuple[float, float]:
        """Bootstrap interval of the median (seeded: the same rounds give the same interval)."""
        if not self.ratios:
            return float("nan"), float("nan")
        rng = random.Random(1)
        k = len(self.ratios)
        boots = sorted(
            statistics.median(rng.choices(self.ratios, k=k)) for _ in range(resamples)
        )
        tail = (1 - level) / 2
        return boots[int(tail * resamples)], boots[int((1 - tail) * resamples) - 1]


@dataclass(frozen=True)
class IdlePoint:
    """The workload's rate with ``probes`` armed where it never goes (median of rounds)."""

    kind: str
    """``kprobevm`` or ``gdb_breakpoints``."""
    probes: int
    samples: tuple[float, ...]
    """ops/s of each round."""
    hits: int = 0
    """Hits on the supposedly idle probes (should be 0)."""

    @property
    def ops_per_s(self) -> float:
        return statistics.median(self.samples) if self.samples else 0.0


@dataclass(frozen=True)
class BenchReport:
    """Every figure of one run."""

    environment: Mapping[str, Any]
    baseline: Run
    """The workload with no probe at all."""
    hit_rates: Sequence[HitRate]
    idle: Sequence[IdlePoint] = ()
    registration: Mapping[str, float] = field(default_factory=dict)
    """``register_N_s`` / ``unregister_N_s`` for each N."""
    per_hit_us: Mapping[str, float] = field(default_factory=dict)
    memory: Mapping[str, float] = field(default_factory=dict)
    notes: Sequence[str] = ()
    dense: Sequence[HitRate] = ()
    """kprobevm and gdb's Python breakpoint on DENSE_FUNCTION (same workload)."""
    paired_idle: PairedIdle | None = None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _reference_rate(report: BenchReport, name: str = REFERENCE) -> float | None:
    for hr in report.hit_rates:
        if hr.name == name:
            return hr.hits_per_s
    return None


def idle_slowdown(points: Sequence[IdlePoint]) -> dict[str, dict[int, float]]:
    """Per kind, the fraction of the workload's rate lost at each probe count (0.05 = 5%
    slower): the median over rounds of each round's rate against the same round's
    0-probe rate, so that the machine's drift between rounds cancels out."""
    out: dict[str, dict[int, float]] = {}
    for kind in sorted({p.kind for p in points}):
        mine = {p.probes: p.samples for p in points if p.kind == kind}
        base = mine.get(0)
        if not base:
            continue
        out[kind] = {
            n: statistics.median(1.0 - s / z for s, z in zip(samples, base, strict=False) if z)
            for n, samples in sorted(mine.items())
        }
    return out


def to_json(report: BenchReport) -> dict[str, Any]:
    """Everything, as plain JSON values."""
    ref = _reference_rate(report)
    recorded = _reference_rate(report, RECORDED)
    contenders: dict[str, Any] = {}
    for hr in report.hit_rates:
        contenders[hr.name] = {
            "description": hr.description,
            "available": hr.available,
            "reason": hr.reason or None,
            "hits": hr.hits,
            "seconds": hr.run.seconds if hr.run else None,
            "workload_ops": hr.run.ops if hr.run else None,
            "hits_per_s": hr.hits_per_s,
            "workload_ops_per_s": hr.ops_per_s,
            "workload_vs_baseline": ratio(hr.ops_per_s, report.baseline.ops_per_s),
            "kprobevm_speedup": ratio(ref, hr.hits_per_s),
            "kprobevm_recorded_speedup": ratio(recorded, hr.hits_per_s),
            **dict(hr.extra),
        }
    hits_per_s: dict[str, float | None] = {name: None for name in REQUIRED}
    hits_per_s.update({hr.name: hr.hits_per_s for hr in report.hit_rates})
    return {
        "environment": dict(report.environment),
        "workload": {"command": "cat /proc/version x500 per process", "function": "do_sys_openat2",
                     "baseline_ops": report.baseline.ops,
                     "baseline_ops_per_s": report.baseline.ops_per_s},
        "hits_per_s": hits_per_s,
        "dense": {
            "function": DENSE_FUNCTION,
            "hits_per_s": {hr.name: hr.hits_per_s for hr in report.dense},
            "hits_per_open": {
                hr.name: hr.hits / hr.run.ops if hr.run and hr.run.ops else None
                for hr in report.dense
            },
        },
        "contenders": contenders,
        "idle": {
            "points": [{"kind": p.kind, "probes": p.probes, "ops_per_s": p.ops_per_s,
                        "samples": list(p.samples), "hits": p.hits} for p in report.idle],
            "slowdown": {k: {str(n): v for n, v in d.items()}
                         for k, d in idle_slowdown(report.idle).items()},
        },
        "idle_paired": _paired_json(report.paired_idle),
        "registration": dict(report.registration),
        "per_hit_us": dict(report.per_hit_us),
        "memory": dict(report.memory),
        "notes": list(report.notes),
    }


def _paired_json(paired: PairedIdle | None) -> dict[str, Any] | None:
    if paired is None:
        return None
    lo, hi = paired.interval()
    return {"probes": paired.probes, "rounds": len(paired.ratios),
            "slowdown_median": paired.median, "slowdown_95": [lo, hi],
            "slowdown_rounds": list(paired.ratios), "hits": paired.hits}


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _times(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}x" if value >= 10 else f"{value:.2f}x"


def _rate_table(
    rates: Sequence[HitRate], ref: float | None, recorded: float | None = None
) -> list[str]:
    """Contenders' hits/s and workload rate, and how many times faster ``ref`` (kprobevm
    stopping at each hit) and ``recorded`` (kprobevm recording) are."""
    both = recorded is not None
    head = "| contender | hits/s | workload opens/s | kprobevm is ... faster |"
    lines = ["", head + (" recorded is ... faster |" if both else ""),
             "|---|---:|---:|---:|" + ("---:|" if both else "")]
    for hr in rates:
        if hr.available:
            cells = [_num(hr.hits_per_s, 1), _num(hr.ops_per_s), _times(ratio(ref, hr.hits_per_s))]
            if both:
                cells.append(_times(ratio(recorded, hr.hits_per_s)))
            lines.append(f"| {hr.description} | " + " | ".join(cells) + " |")
        else:
            lines.append(f"| {hr.description} | not available: {hr.reason} |"
                         + " |" * (3 if both else 2))
    return lines


def markdown(report: BenchReport) -> str:
    """The README's tables: hit rates with ratios, idle cost, registration, one hit's time."""
    env = report.environment
    ref = _reference_rate(report)
    lines = [
        f"Run {env.get('date', '?')} on {env.get('cpu_model', '?')} ({env.get('cpus', '?')} cpus,"
        f" load {env.get('loadavg_start', '?')}), QEMU {env.get('qemu_version', '?')}"
        f" ({env.get('accel', '?')}), guest kernel {env.get('kernel_release', '?')}.",
        f"Workload: opens of /proc/version, 500 per `cat`, hot function `do_sys_openat2`;"
        f" unprobed {_num(report.baseline.ops_per_s)} opens/s.",
    ]
    lines += _rate_table(report.hit_rates, ref, _reference_rate(report, RECORDED))
    if report.dense:
        dense_ref = next((h.hits_per_s for h in report.dense if h.name == REFERENCE), None)
        lines += ["", f"The same on `{DENSE_FUNCTION}`, hit about 4 times per open (less of the"
                  " guest's own work in each hit):"]
        lines += _rate_table(report.dense, dense_ref)
    slow = idle_slowdown(report.idle)
    if slow:
        counts = sorted({p.probes for p in report.idle})
        lines += ["", "Idle cost: the workload's opens/s with N probes on functions it never calls"
                  " (median of rounds), and the slowdown against 0 probes (median of each"
                  " round's own ratio).", "",
                  "| armed | " + " | ".join(str(n) for n in counts) + " |",
                  "|---|" + "---:|" * len(counts)]
        for kind, by_n in slow.items():
            rates = {p.probes: p.ops_per_s for p in report.idle if p.kind == kind}
            cells = [f"{_num(rates.get(n))} ({by_n[n]:+.1%})" if n in by_n else "n/a"
                     for n in counts]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    paired = report.paired_idle
    if paired is not None and paired.ratios:
        lo, hi = paired.interval()
        lines += ["", f"kprobevm's idle cost at {paired.probes:,} armed probes, by"
                  f" {len(paired.ratios)} paired rounds (armed and disarmed back to back, in"
                  f" alternating order): median slowdown {paired.median:+.1%}, 95% bootstrap"
                  f" interval {lo:+.1%} to {hi:+.1%}."]
    if report.registration:
        reg = report.registration
        ns = sorted({int(k.split("_")[1]) for k in reg if k.startswith("register_")})
        lines += ["", "| probes (batch) | " + " | ".join(str(n) for n in ns) + " |",
                  "|---|" + "---:|" * len(ns)]
        for verb in ("register", "unregister"):
            cells = [_num(report.registration.get(f"{verb}_{n}_s"), 3) + " s" for n in ns]
            lines.append(f"| {verb} | " + " | ".join(cells) + " |")
    if report.per_hit_us:
        parts = ", ".join(f"{k} {v:,.0f}" for k, v in report.per_hit_us.items())
        lines += ["", f"One kprobevm hit, microseconds: {parts}."]
    if report.memory:
        parts = ", ".join(f"{k} {v:,.0f}" for k, v in report.memory.items())
        lines += [f"At 1,000 probes: {parts}."]
    lines += ["", "Ratios, not absolute times, are the claims: absolute rates on this shared"
              " machine move up to 2x between runs."]
    return "\n".join(lines) + "\n"
