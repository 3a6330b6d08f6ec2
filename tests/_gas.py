"""Assemble a listing with GNU as and read back its ``.text``, for the x86 tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

GAS = shutil.which("as")
needs_gas = pytest.mark.skipif(GAS is None, reason="GNU as (binutils) is not installed")


def gas_text(listing: str) -> bytes:
    """The ``.text`` bytes ``as --64`` makes of ``listing``.

    Fails when gas left a relocation in ``.text``: its bytes there would be a
    placeholder, not what the listing means.
    """
    assert GAS is not None
    with tempfile.TemporaryDirectory() as tmp:
        src, obj = Path(tmp, "p.s"), Path(tmp, "p.o")
        src.write_text(listing)
        done = subprocess.run(
            [GAS, "--64", "-o", str(obj), str(src)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        with obj.open("rb") as f:
            elf = ELFFile(f)
            assert elf.get_section_by_name(".rela.text") is None, "gas left relocations"
            text = elf.get_section_by_name(".text")
            assert text is not None
            return bytes(text.data())
