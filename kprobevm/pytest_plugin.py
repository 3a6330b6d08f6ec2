"""The kprobevm pytest plugin (pytest11 entry point): the ``vm`` marker for guest tests."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: the test needs a real QEMU guest")
