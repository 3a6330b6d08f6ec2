"""What a user would script without kprobevm: gdb 13 on the same gdbstub, counting hits.

``gdb_python``: a ``gdb.Breakpoint`` subclass whose ``stop()`` counts and returns False.
``gdb_commands``: ``break *ADDR`` with ``commands / silent / continue / end``. gdb is
driven over GDB/MI (pygdbmi) while the workload runs over SSH. Every breakpoint stop
makes QEMU flush its whole TCG cache, so these get a small workload.
The VM's own gdbstub client must not be open: QEMU serves one gdb at a time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import select
import tempfile
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kprobevm.bench.report import HitRate
from kprobevm.bench.workload import HOT_FUNCTION, Run, run_opens
from kprobevm.errors import GdbError, GdbTimeout
from kprobevm.gdbstub.gdbmi_client import GdbMiClient
from kprobevm.gdbstub.mi import BASE_SETTINGS

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = ["measure_gdb_commands", "measure_gdb_python"]

SIGINT = 2
_PYTHON_BREAKPOINT = """
import gdb

class CountingBreakpoint(gdb.Breakpoint):
    \"\"\"Counts hits in $bench_hits and never stops.\"\"\"

    def stop(self):
        hits = gdb.convenience_variable("bench_hits")
        gdb.set_convenience_variable("bench_hits", int(hits or 0) + 1)
        return False

gdb.set_convenience_variable("bench_hits", 0)
CountingBreakpoint("*{addr:#x}")
"""


def _gdb_run(
    vm: VM, name: str, description: str, opens: int, python: bool, function: str = HOT_FUNCTION
) -> HitRate:
    if vm.endpoints.gdb is None:
        return HitRate(name, description, reason="no gdbstub address")
    addr = vm.symbols[function]
    with tempfile.TemporaryDirectory(prefix="kprobevm-bench-") as tmp:
        script = Path(tmp) / "count.py"
        script.write_text(textwrap.dedent(_PYTHON_BREAKPOINT).format(addr=addr))
        with GdbMiClient(vm.endpoints.gdb, timeout=30.0, settings=BASE_SETTINGS) as gdb:
            try:
                if python:
                    gdb.command(f'-interpreter-exec console "source {script}"')
                else:
                    number = gdb.command(f"-break-insert *{addr:#x}")["bkpt"]["number"]
                    gdb.command(f'-break-commands {number} "silent" "continue"')
                gdb.cont()
                run = _run_draining(gdb, vm, opens)
                _interrupt(gdb)
                if python:
                    hits = int(gdb.command("-data-evaluate-expression $bench_hits")["value"])
                else:
                    # not -break-info: pygdbmi 0.11 loops forever parsing its script={...}
                    listing = gdb.console(f"info breakpoints {number}")
                    found = re.search(r"already hit (\d+) time", listing)
                    hits = int(found[1]) if found else 0
                gdb.command("-break-delete")
                gdb.command("-target-detach")  # the VM runs on, no breakpoint left
            except GdbError as exc:
                return HitRate(name, description, reason=f"gdb failed: {exc}")
    return HitRate(name, description, hits, run)


def _run_draining(gdb: GdbMiClient, vm: VM, opens: int) -> Run:
    """The workload on a worker thread while this one reads gdb's output (each hit of a
    ``commands`` breakpoint prints records; a full pipe would stall gdb and the VM)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(run_opens, vm, opens)
        while not job.done():
            select.select([gdb.fileno()], [], [], 0.1)
            gdb.drain()
        return job.result()


def _interrupt(gdb: GdbMiClient, tries: int = 20) -> None:
    """Stop the VM and wait for *our* SIGINT stop. A ``commands ... continue`` breakpoint
    leaves a ``*stopped`` record per hit, and an interrupt that reaches gdb while it
    handles one is refused: send it again until a SIGINT stop comes back."""
    for _ in range(tries):
        with contextlib.suppress(GdbError):
            gdb.command("-exec-interrupt")
        deadline = time.monotonic() + 3.0
        try:
            while True:
                stop = gdb.next_stop(max(0.0, deadline - time.monotonic()))
                if stop.signal == SIGINT:
                    return
        except GdbTimeout:
            continue
    raise GdbTimeout(f"gdb did not stop the VM after {tries} interrupts")


def measure_gdb_python(
    vm: VM, opens: int, *, function: str = HOT_FUNCTION, name: str = "gdb_python"
) -> HitRate:
    """gdb's Python breakpoint that counts and never stops."""
    return _gdb_run(vm, name, "gdb 13, Python breakpoint (stop() -> False)", opens,
                    python=True, function=function)


def measure_gdb_commands(vm: VM, opens: int) -> HitRate:
    """gdb's ``commands; silent; continue; end`` breakpoint."""
    return _gdb_run(vm, "gdb_commands", "gdb 13, break + commands/continue", opens, python=False)
