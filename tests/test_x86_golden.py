"""Every guest program produces the bytes (and stop addresses) recorded in tests/data.

The golden file was written by the hand-encoded programs, before the assembler layer:
an encoder change that moves a single byte of any program fails here.
"""

from __future__ import annotations

import json

import pytest

from tests._x86_programs import GOLDEN, Facts, cases

CASES = cases()


def _golden() -> dict[str, Facts]:
    loaded: dict[str, Facts] = json.loads(GOLDEN.read_text())
    return loaded


def test_every_case_has_a_golden_entry() -> None:
    assert sorted(CASES) == sorted(_golden())


@pytest.mark.parametrize("name", sorted(CASES))
def test_program_matches_golden(name: str) -> None:
    assert CASES[name]().facts == _golden()[name]
