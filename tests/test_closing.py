"""A busy, probed session ends in time, three ways, on 2 and 4 vCPUs, and leaves the
guest as it found it: close() by an exception, SIGTERM, and SIGTERM twice (exit at
once, then ``recover``). ``scripts/close-under-load`` runs the same rounds many times
and reports the times; here they only guard against a hang."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from kprobevm.bench.closing import HOW, GuestFacts, How, guest_facts, run_round
from kprobevm.guest.launcher import boot
from kprobevm.guest.vm import VM

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module", params=[2, 4], ids=["smp2", "smp4"])
def busy_guest(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VM, GuestFacts, int]]:
    smp: int = request.param
    with boot(smp=smp, name=f"closing-smp{smp}") as vm:
        yield vm, guest_facts(vm, tmp_path_factory.mktemp("closing")), smp


@pytest.mark.parametrize("how", HOW)
def test_a_busy_session_ends_in_time_and_leaves_the_guest_whole(
    busy_guest: tuple[VM, GuestFacts, int], how: How, tmp_path: Path,
) -> None:
    vm, facts, smp = busy_guest
    for seed in range(2):
        r = run_round(vm, facts, how, smp, tmp_path / "session.journal",
                      rng=random.Random(seed))
        assert not r.hung and r.ok, r
        # RuntimeError out of the with; SIGTERM; a second SIGTERM that lands after the
        # restore, as Python shuts down, may find the default handler back
        assert r.exit_code in ({1} if how == "close" else {143, -15}), r
