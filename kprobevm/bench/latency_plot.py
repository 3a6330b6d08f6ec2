"""funclatency's figure: a function's latency histogram as bars, one per log2 bucket."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kprobevm.kprobes.aggregations import Bucket
from kprobevm.tracing.maps import _bucket_label

__all__ = ["save_latency_plot"]


def save_latency_plot(
    buckets: Sequence[tuple[int | None, int | None, int]], path: Path, *, title: str, unit: str
) -> None:
    """The buckets with calls (``(lo, hi, calls)``, in value order, empty ones between
    them drawn as zero) as a bar chart labelled as bpftrace labels buckets."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    shown: list[Bucket] = []
    for lo, hi, n in buckets:
        while shown and (last := shown[-1].hi) is not None and lo is not None and last < lo:
            shown.append(Bucket(last, 2 * last, 0))  # an empty bucket between two
        shown.append(Bucket(lo, hi, n))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    labels = [_bucket_label(b, True) for b in shown]
    bars = ax.bar(range(len(shown)), [b.count for b in shown], color="tab:blue")
    ax.bar_label(bars, labels=[f"{b.count:,}" for b in shown], padding=2, fontsize=8)
    ax.set_xticks(range(len(shown)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("calls (log scale)")
    ax.set_xlabel(f"latency, {unit} (log2 buckets)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
