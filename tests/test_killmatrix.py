"""The kill matrix, each phase once: a host SIGKILLed mid-work leaves a guest that runs
on, and ``recover`` restores its text, IDT gate and slot PMD entry byte for byte."""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

import kprobevm
from kprobevm.bench.killmatrix import PHASES, GuestFacts, guest_facts, run_round
from kprobevm.guest.vm import VM

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VM, GuestFacts, Path]]:
    """One guest for every phase; one vCPU, since hot sites are promoted only there."""
    tmp = tmp_path_factory.mktemp("killmatrix")
    with kprobevm.boot(smp=1, name="killmatrix") as vm:
        yield vm, guest_facts(vm, tmp), tmp


@pytest.mark.parametrize("phase", PHASES)
def test_a_host_killed_at_each_phase_leaves_a_guest_recover_restores(
    guest: tuple[VM, GuestFacts, Path], phase: str,
) -> None:
    vm, facts, tmp = guest
    seed = secrets.randbits(32)
    r = run_round(vm, facts, phase, 1, tmp / f"{phase}.journal", rng=random.Random(seed))
    assert r.ok, f"seed {seed}: {r!r}"
    if phase not in ("kretprobe", "handler"):
        assert r.killed_at_point, f"seed {seed}: the child did not die at {r.point}: {r!r}"
    if phase == "kretprobe":
        assert r.returns_given_back > 0, r
