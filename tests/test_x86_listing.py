"""Every guest program's listing, assembled by GNU as, gives the program's own bytes.

The listing is what a reader checks the generated code against; this keeps it honest
for each representative case of ``tests._x86_programs`` (the golden set).
"""

from __future__ import annotations

import pytest

from tests._gas import gas_text, needs_gas
from tests._x86_programs import cases

CASES = cases()


@needs_gas
@pytest.mark.parametrize("name", sorted(CASES))
def test_listing_assembles_to_the_program(name: str) -> None:
    built = CASES[name]()
    assert gas_text(built.listing) == built.code


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if not n.startswith("slot_")])
def test_generated_programs_are_instructions_not_bytes(name: str) -> None:
    # Only slot code carries bytes it did not encode: the probed instruction's copy.
    assert ".byte" not in CASES[name]().listing
