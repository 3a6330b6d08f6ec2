"""The stack benchmark's arithmetic: per-hit figures from the fastest runs, and the VM
stops of the runs they come from."""

from __future__ import annotations

from kprobevm.bench.stacks import StackFigures


def test_figures_come_from_the_fastest_runs_with_their_stops() -> None:
    fig = StackFigures(reads=1000, stack_size=4096)
    fig.runs.update(unprobed=[1_000_000, 990_000], recorded=[1_150_000, 1_140_000],
                    recorded_stack=[1_330_000, 1_420_000])  # fmt: skip
    fig.hits.update(recorded=[1000, 1000], recorded_stack=[1000, 1000])
    fig.stops.update(recorded=[1, 0], recorded_stack=[2, 9])
    assert fig.per_hit("recorded") == 150.0
    assert fig.per_hit("recorded_stack") == 340.0
    assert fig.ratio == 340.0 / 150.0
    assert (fig.fastest_stops("recorded"), fig.fastest_stops("recorded_stack")) == (0, 2)
    assert fig.fastest_stops("unprobed") == 0  # never stopped: no stops noted
