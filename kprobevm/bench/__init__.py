"""The side-by-side benchmark: kprobevm against gdb, gdb/MI and the guest's kprobes.

One module per contender (:mod:`.engine`, :mod:`.gdbscript`, :mod:`.guest`), the idle
cost and registration figures (:mod:`.idle`), the runner that puts them in one run on
the same guest image and workload (:mod:`.runner`), and the outputs (:mod:`.report`,
:mod:`.plot`). ``scripts/bench`` and ``kprobevm bench`` call :func:`main`.
"""

from __future__ import annotations

from kprobevm.bench.runner import BenchConfig, main, run

__all__ = ["BenchConfig", "main", "run"]
