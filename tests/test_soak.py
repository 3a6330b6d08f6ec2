"""The soak: its schedule and figures on fakes, then ``scripts/soak`` for one minute on
4 vCPUs, every goal met (no oops, nothing lost uncounted, RSS flat after the warm-up,
text identical, no engine error, every function hit). ``scripts/soak --minutes 30``
runs the same for longer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from kprobevm.bench.guestfacts import GuestFacts
from kprobevm.bench.soak import (
    HOT,
    KindFigures,
    SessionResult,
    SoakConfig,
    _Churn,
    _result,
)
from kprobevm.guest.vm import VM
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.kretprobes import Kretprobe
from kprobevm.kprobes.recorder import RecordSpec

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class _Kprobes:
    installed_channel: None = None


@dataclass
class _FakeVM:
    """What the churn calls on a VM; records what is in place."""

    kprobes: _Kprobes = field(default_factory=_Kprobes)
    placed: dict[str, str] = field(default_factory=dict)
    registrations: Counter[str] = field(default_factory=Counter)
    unsettled: list[Kprobe] = field(default_factory=list)

    def register_kprobes(self, kps: list[Kprobe]) -> None:
        for kp in kps:
            assert kp.symbol_name is not None and kp.symbol_name not in self.placed
            self.placed[kp.symbol_name] = "recorded" if kp.record else "stopping"
            self.registrations[kp.symbol_name] += 1

    def register_kretprobe(self, rp: Kretprobe) -> None:
        assert rp.symbol_name is not None and rp.symbol_name not in self.placed
        self.placed[rp.symbol_name] = "return"
        self.registrations[rp.symbol_name] += 1

    def unregister_kprobes(self, kps: list[Kprobe]) -> None:
        for kp in kps:
            assert kp.symbol_name is not None
            del self.placed[kp.symbol_name]
            kp.nhit, kp.guest_hits = 3, 3 if kp.record else 0
            if kp.record:  # its hits in flight: counted a little later
                kp.settling = 1
                self.unsettled.append(kp)

    def unregister_kretprobe(self, rp: Kretprobe) -> None:
        assert rp.symbol_name is not None
        del self.placed[rp.symbol_name]
        rp.nhit = 2

    def settle_records(self, timeout: float = 10.0) -> None:
        for kp in self.unsettled:
            kp.guest_hits += 1  # a record that arrived after the unregister
            kp.nmissed += 1
            kp.settling = 0
        self.unsettled.clear()


def test_the_churn_keeps_ten_in_place_swaps_five_and_turns_the_kinds() -> None:
    vm = _FakeVM()
    churn = _Churn(cast("VM", vm), SoakConfig(minutes=1), lambda message: None)
    kinds_of: dict[str, set[str]] = {f: set() for f in HOT}
    for cycle in range(12):
        before = set(vm.placed)
        if cycle % 2:
            vm.settle_records()  # the figures of some are final only a cycle later
        churn.cycle()
        assert len(vm.placed) == 10
        if cycle:
            assert len(before - set(vm.placed)) == 5  # the five oldest went
        for function, kind in vm.placed.items():
            kinds_of[function].add(kind)
    churn.finish()
    assert not vm.placed and not churn.errors
    assert sum(vm.registrations.values()) == 10 + 11 * 5
    assert min(vm.registrations.values()) >= 3  # each in its turn, none left waiting
    assert all(len(kinds) == 3 for kinds in kinds_of.values())  # each took every kind
    figures = churn.kinds
    assert sum(f.probes for f in figures.values()) == sum(vm.registrations.values())
    recorded = figures["recorded"]
    assert recorded.guest_hits == recorded.hits + recorded.missed == 4 * recorded.probes
    assert not recorded.lost
    assert sum(churn.function_hits.values()) == sum(f.hits for f in figures.values())


def test_a_recorded_hit_neither_handled_nor_missed_is_lost() -> None:
    kp = Kprobe(symbol_name="f", record=RecordSpec())
    kp.nhit, kp.nmissed, kp.guest_hits = 10, 2, 13
    assert KindFigures().plus(kp, "recorded").lost == 1
    kp.guest_hits = 12
    assert KindFigures().plus(kp, "recorded") == KindFigures(1, 10, 2, 12, 0, 0)
    assert KindFigures().plus(kp, "stopping").lost == 0  # the host is its only counter


def test_rss_growth_counts_from_the_end_of_the_warm_up() -> None:
    session = SessionResult(
        cycles=60, seconds=60.0, kinds={"stopping": KindFigures(1, 5, 0, 0, 0, 0)},
        function_hits={"f": 5}, rss=((0.0, 50_000), (6.0, 90_000), (12.0, 100_000),
                                     (30.0, 104_000), (60.0, 109_000)),
        errors={}, unknown_records=0,
    )  # fmt: skip
    facts = GuestFacts("gdb", Path("k"), "", Path("v"), {}, {"f": b"\x0f"})
    result = _result(SoakConfig(minutes=1), session, 0, facts, {"f": b"\x0f"}, (), True, Counter())
    assert (result.rss_start, result.rss_end, result.rss_growth) == (100_000, 109_000, 0.09)
    assert result.ok
    worse = _result(SoakConfig(minutes=1), session, 0, facts, {"f": b"\xcc"}, ("Oops: 0003",),
                    True, Counter())  # fmt: skip
    assert not worse.goals["text identical"] and not worse.goals["no oops"]
    assert worse.differs == ("f",) and worse.oopses == 1


@pytest.mark.vm
def test_a_one_minute_soak_on_four_vcpus_meets_every_goal(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))  # fmt: skip
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak"), "--minutes", "1", "--smp", "4",
         "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert run.returncode == 0 and result["ok"], (run.stdout, run.stderr[-3000:], result)
    assert all(result["goals"].values())
    assert result["cycles"] >= 50 and result["oopses"] == 0 and result["lost"] == 0
    assert all(result["hits"][kind] > 0 for kind in ("stopping", "recorded", "return"))
    assert result["text_identical"] and result["rss_growth"] < 0.10
    assert result["workload"]["commands"] > 0 and result["workload"]["connections"] > 0
