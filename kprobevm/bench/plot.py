"""The benchmark's figure: hits per second by contender, and the idle cost by probe count."""

from __future__ import annotations

from pathlib import Path

from kprobevm.bench.report import BenchReport, idle_slowdown

__all__ = ["save_plot"]


def save_plot(report: BenchReport, path: Path) -> None:
    """Two panels in one PNG: (1) hits/s, log scale; (2) workload rate vs armed probes."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    rates = [(hr.name, hr.hits_per_s) for hr in report.hit_rates if hr.hits_per_s]
    names = [n for n, _ in rates]
    values = [v for _, v in rates if v is not None]
    colors = ["tab:blue" if n.startswith("kprobevm") else "tab:gray" for n in names]
    bars = left.barh(names[::-1], values[::-1], color=colors[::-1])
    left.bar_label(bars, labels=[f"{v:,.1f}" for v in values[::-1]], padding=3)
    left.set_xscale("log")
    left.set_xlabel("hits per second on do_sys_openat2 (log scale)")
    left.set_title("(1) hot function, same guest and workload")
    left.set_xlim(right=max(values, default=1) * 8)

    for kind, by_n in idle_slowdown(report.idle).items():
        counts = sorted(by_n)
        xs = [max(n, 1) for n in counts]  # 0 probes drawn at 1 on the log axis
        right.plot(xs, [100 * (1 - by_n[n]) for n in counts], marker="o", label=kind)
    right.set_xscale("log")
    right.set_xlabel("probes armed on functions the workload never calls (0 drawn at 1)")
    right.set_ylabel("workload rate, % of the 0-probe rate")
    right.set_title("(2) idle cost")
    right.axhline(95, color="tab:red", linestyle=":", label="5% slowdown")
    right.legend()
    env = report.environment
    fig.suptitle(f"kprobevm benchmark {env.get('date', '')}, {env.get('cpu_model', '')},"
                 f" QEMU {env.get('qemu_version', '')} {env.get('accel', '')}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
