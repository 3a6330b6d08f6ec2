"""The soak: probes on hot functions registered and unregistered every second, for
minutes, on an SMP guest kept busy on every vCPU, and the goals checked at the end.

This process boots the guest, gathers its facts (:mod:`.guestfacts`), starts a loop per
vCPU in the guest (fork and exec, then a file written, read, listed and removed) and,
from here, network traffic over SSH (output pulled, input pushed, fresh connections).
A separate host process (the session) attaches through the gdbstub and churns: each
cycle it unregisters the oldest probes and registers as many on functions that had
none, each function taking the probe kinds in turn (stopping, recorded, return, or
count-only). The session samples its own RSS, folds every probe's figures in once the
probe is gone and its hits in flight are counted, and detaches. Then this process
checks the guest: text, IDT gate and slot PMD entry as before, a clean console, still
answering. The goals: no oops, no recorded hit lost without being counted in
``nmissed``, RSS after the warm-up (the first fifth of the run) grown less than 10%,
no engine error, every function hit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kprobevm
from kprobevm.bench.guestfacts import GuestFacts, console_trouble, guest_facts, read_state
from kprobevm.errors import GdbConnectionClosed, KprobeVMError, ProbeRefused, VMLost
from kprobevm.guest.shell import GuestShell
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.kretprobes import Kretprobe, KretprobeInstance
from kprobevm.kprobes.recorder import Recorder, RecordSpec

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM
    from kprobevm.x86.ptregs import PtRegs

__all__ = [
    "HOT",
    "KINDS",
    "KindFigures",
    "SessionResult",
    "SoakConfig",
    "SoakResult",
    "report",
    "run",
    "run_session",
]

HOT = (
    # fork, exec, wait, exit
    "kernel_clone", "copy_process", "wake_up_new_task", "kernel_wait4", "mm_release",
    "bprm_execve", "release_task",
    # files
    "do_sys_openat2", "vfs_read", "vfs_write", "do_unlinkat", "getname_flags", "vfs_open",
    "__fput",
    # the network, by SSH
    "tcp_sendmsg", "tcp_recvmsg", "tcp_v4_rcv", "__dev_queue_xmit", "tcp_ack", "ip_output",
)  # fmt: skip
"""Twenty functions the workload runs through hundreds of times a second (TCG, 4 vCPUs),
none blacklisted, each returning to its caller (so each can take a return probe)."""
KINDS = ("stopping", "recorded", "return", "count")
"""Probe kinds: a stopping kprobe (pre_handler), a recorded one, a kretprobe, a
count-only kprobe."""
SOAK_KINDS = ("stopping", "recorded", "return")
GUEST_COUNTED = ("recorded", "count")
"""Kinds whose hits the guest counts itself: ``nhit + nmissed`` must equal ``guest_hits``."""
STOP_FILE = "/tmp/kprobevm-soak.stop"
"""The workload loops end when it exists (the guest's busybox has no pkill)."""
LOOP = (
    f"i=0; while [ ! -e {STOP_FILE} ]; do i=$((i+1)); f=/tmp/soak.$$.$i;"
    " sh -c true; /bin/true;"
    " echo $i >$f; cat $f /proc/version >/dev/null; ls /tmp >/dev/null; rm -f $f; done"
)
"""One vCPU's workload: fork and exec, then a file written, read, listed and removed."""
NET_PULL = 256 * 1024
"""Bytes one network command sends from the guest to the host."""
NET_PUSH = 4096
"""Bytes one network command sends to the guest (in its command line)."""
NET_CONNECT_EVERY = 10
"""Every this many network commands, one goes over a new SSH connection."""
WARMUP = 0.2
"""The warm-up: the first fifth of the run, whose RSS growth (caches, first slot pages,
the BTF and record ring set up on first use) does not count."""
RSS_GROWTH_LIMIT = 0.10
TEARDOWN = 240.0
"""Seconds the session may take past its minutes (attach, the final settle, close)."""

SESSION = (
    "import json, sys; from kprobevm.bench.soak import run_session;"
    " print(json.dumps(run_session(json.loads(sys.argv[1])).to_json()), flush=True)"
)
"""The session process: runs :func:`run_session` and prints its result as one line."""


@dataclass(frozen=True)
class SoakConfig:
    """What to soak: how long, how many vCPUs, which functions and probe kinds."""

    minutes: float
    smp: int = 4
    functions: tuple[str, ...] = HOT
    kinds: tuple[str, ...] = SOAK_KINDS
    live: int = 10
    """Functions probed at once."""
    swap: int = 5
    """Probes unregistered (and as many registered elsewhere) each cycle."""
    period: float = 1.0
    """Seconds per cycle."""
    network: bool = True
    qemu: str | None = None
    name: str = "soak"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SoakConfig:
        """The config :func:`dataclasses.asdict` gave, through JSON (lists for tuples)."""
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in data.items()}  # fmt: skip
        return cls(**fields)

    def __post_init__(self) -> None:
        if not set(self.kinds) <= set(KINDS) or not self.kinds:
            raise ValueError(f"probe kinds are some of {', '.join(KINDS)}: {self.kinds}")
        if not 0 < self.swap <= self.live <= len(self.functions):
            raise ValueError(f"need 0 < swap ({self.swap}) <= live ({self.live})"
                             f" <= functions ({len(self.functions)})")  # fmt: skip


@dataclass(frozen=True)
class KindFigures:
    """One probe kind's figures over the run, summed over every probe of that kind."""

    probes: int = 0
    hits: int = 0
    """Hits whose handler ran (returns handled, for return probes)."""
    missed: int = 0
    guest_hits: int = 0
    """Hits the guest counted (recorded and count-only probes)."""
    lost: int = 0
    """Guest-counted hits neither handled nor counted in nmissed (must be 0)."""
    handler_errors: int = 0

    def plus(self, probe: Kprobe | Kretprobe, kind: str) -> KindFigures:
        """These figures with one more unregistered probe's (its hits in flight settled)."""
        lost = 0
        guest = 0
        if isinstance(probe, Kprobe) and kind in GUEST_COUNTED:
            guest = probe.guest_hits
            lost = abs(guest - probe.nhit - probe.nmissed)
        return KindFigures(
            self.probes + 1, self.hits + probe.nhit, self.missed + probe.nmissed,
            self.guest_hits + guest, self.lost + lost, self.handler_errors + probe.nerrors,
        )  # fmt: skip


@dataclass(frozen=True)
class SessionResult:
    """What the session process measured: cycles, figures, RSS and errors."""

    cycles: int
    seconds: float
    kinds: dict[str, KindFigures]
    function_hits: dict[str, int]
    rss: tuple[tuple[float, int], ...]
    """(seconds since the churn began, VmRSS in kB), every few seconds."""
    errors: dict[str, int]
    """Engine errors by message (register, unregister, settle)."""
    unknown_records: int
    """Records of a probe id nobody owned, live or retiring (lost; must be 0)."""
    lost_guest: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionResult:
        return cls(
            cycles=data["cycles"], seconds=data["seconds"],
            kinds={k: KindFigures(**v) for k, v in data["kinds"].items()},
            function_hits=data["function_hits"],
            rss=tuple((float(t), int(kb)) for t, kb in data["rss"]),
            errors=data["errors"], unknown_records=data["unknown_records"],
            lost_guest=data["lost_guest"],
        )  # fmt: skip


@dataclass(frozen=True)
class SoakResult:
    """A soak's figures and the goals it met."""

    minutes: float
    smp: int
    cycles: int
    hits: dict[str, int]
    """Per probe kind, and ``total``."""
    missed: dict[str, int]
    lost: int
    oopses: int
    console_trouble: tuple[str, ...]
    rss_start: int
    """VmRSS (kB) of the session at the end of the warm-up."""
    rss_end: int
    rss_peak: int
    rss_growth: float
    text_identical: bool
    differs: tuple[str, ...]
    unhit: tuple[str, ...]
    errors: dict[str, int]
    workload: dict[str, int]
    guest_answers: bool
    session_exit: int | None
    """The session's exit status (None: it did not end in time)."""
    kinds: dict[str, KindFigures] = field(default_factory=dict)
    function_hits: dict[str, int] = field(default_factory=dict)
    rss: tuple[tuple[float, int], ...] = ()

    @property
    def goals(self) -> dict[str, bool]:
        return {
            "no oops": self.oopses == 0,
            "nothing lost uncounted": self.lost == 0,
            "RSS flat after warm-up": self.rss_start > 0 and self.rss_growth < RSS_GROWTH_LIMIT,
            "text identical": self.text_identical,
            "no engine error": not self.errors and self.session_exit == 0,
            "every function hit": not self.unhit and self.cycles > 0,
            "guest answers": self.guest_answers,
        }

    @property
    def ok(self) -> bool:
        return all(self.goals.values())

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["goals"] = self.goals
        data["ok"] = self.ok
        return data

    def summary(self) -> str:
        """The figures in one line: minutes, hits, oopses, missed, lost, RSS."""
        return (f"soak: {self.minutes:g} min, smp {self.smp}, {self.cycles} cycles,"
                f" hits {self.hits['total']:,} ({_per_kind(self.hits)}),"
                f" oopses {self.oopses}, missed {self.missed['total']:,}"
                f" ({_per_kind(self.missed)}), lost {self.lost},"
                f" RSS {self.rss_start:,} -> {self.rss_end:,} kB ({self.rss_growth:+.1%}),"
                f" text {'identical' if self.text_identical else 'CHANGED'}")  # fmt: skip


def _per_kind(figures: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in figures.items() if k != "total")


# -- the session process ---------------------------------------------------------------


@dataclass(eq=False)
class _Placed:
    function: str
    kind: str
    probe: Kprobe | Kretprobe


def _on_entry(kp: Kprobe, regs: PtRegs) -> None:
    """Reads the first argument, as a real handler would. Returns None: a true return
    would say the handler moved ``regs.ip`` itself, and the hit would run again."""
    _ = regs.di


def _on_return(ri: KretprobeInstance, regs: PtRegs) -> None:
    """Reads the return value."""
    _ = regs.ax


def _make_probe(function: str, kind: str) -> Kprobe | Kretprobe:
    """A probe of ``kind`` on ``function``."""
    if kind == "stopping":
        return Kprobe(symbol_name=function, pre_handler=_on_entry)
    if kind == "recorded":
        return Kprobe(symbol_name=function, pre_handler=_on_entry, record=RecordSpec())
    if kind == "return":
        return Kretprobe(symbol_name=function, handler=_on_return)
    return Kprobe(symbol_name=function, record=RecordSpec(count_only=True))


class _Churn:
    """The probes in place, the functions waiting for one, and the figures so far."""

    def __init__(self, vm: VM, config: SoakConfig, log: Callable[[str], None]) -> None:
        self.vm = vm
        self.config = config
        self.log = log
        self.waiting: deque[str] = deque(config.functions)
        self.placed: deque[_Placed] = deque()
        self.settling: list[_Placed] = []
        """Gone from the guest; their hits in flight are still being counted."""
        self.turns: Counter[str] = Counter()
        self.kinds = {kind: KindFigures() for kind in config.kinds}
        self.function_hits: Counter[str] = Counter({f: 0 for f in config.functions})
        self.errors: Counter[str] = Counter()

    def cycle(self) -> None:
        """Unregister the oldest probes, register as many on functions that had none."""
        settled = [p for p in self.settling
                   if isinstance(p.probe, Kprobe) and not p.probe.settling]  # fmt: skip
        if settled:  # their figures are final
            self._fold(settled)
            self.settling = [p for p in self.settling if p not in settled]
        going: list[_Placed] = []
        if len(self.placed) >= self.config.live:
            going = [self.placed.popleft() for _ in range(self.config.swap)]
        self.unregister(going)
        want = self.config.live - len(self.placed)
        self.register([self.waiting.popleft() for _ in range(min(want, len(self.waiting)))])

    def register(self, functions: Sequence[str]) -> None:
        new = []
        for function in functions:
            offset = self.config.functions.index(function)
            kind = self.config.kinds[(offset + self.turns[function]) % len(self.config.kinds)]
            self.turns[function] += 1
            new.append(_Placed(function, kind, _make_probe(function, kind)))
        kprobes = [p for p in new if not isinstance(p.probe, Kretprobe)]
        try:
            self.vm.register_kprobes([p.probe for p in kprobes if isinstance(p.probe, Kprobe)])
            self.placed.extend(kprobes)
        except (VMLost, GdbConnectionClosed):
            raise
        except KprobeVMError as exc:  # all or nothing: none of the batch is in
            self._error("register", exc)
            self.waiting.extend(p.function for p in kprobes)
        for p in new:
            if isinstance(p.probe, Kretprobe):
                try:
                    self.vm.register_kretprobe(p.probe)
                    self.placed.append(p)
                except (VMLost, GdbConnectionClosed):
                    raise
                except KprobeVMError as exc:
                    self._error("register", exc)
                    self.waiting.append(p.function)

    def unregister(self, going: Sequence[_Placed]) -> None:
        kprobes = [p.probe for p in going if isinstance(p.probe, Kprobe)]
        try:
            if kprobes:
                self.vm.unregister_kprobes(kprobes)
            for p in going:
                if isinstance(p.probe, Kretprobe):
                    self.vm.unregister_kretprobe(p.probe)
        except (VMLost, GdbConnectionClosed):
            raise
        except KprobeVMError as exc:
            self._error("unregister", exc)
        for p in going:
            self.waiting.append(p.function)
            if p.kind in GUEST_COUNTED:
                self.settling.append(p)
            else:
                self._fold([p])

    def finish(self) -> None:
        """Unregister everything, wait for the hits in flight, fold the last figures."""
        self.unregister(list(self.placed))
        self.placed.clear()
        try:
            self.vm.settle_records(timeout=60.0)
        except KprobeVMError as exc:
            self._error("settle", exc)
        self._fold(self.settling)
        self.settling = []

    def _fold(self, gone: Sequence[_Placed]) -> None:
        for p in gone:
            self.kinds[p.kind] = self.kinds[p.kind].plus(p.probe, p.kind)
            self.function_hits[p.function] += p.probe.nhit

    def _error(self, what: str, exc: KprobeVMError) -> None:
        message = f"{what}: {type(exc).__name__}: {exc}"
        self.errors[message] += 1
        self.log(message)

    def unknown_records(self) -> int:
        channel = self.vm.kprobes.installed_channel
        recorder = getattr(channel, "recorder", None)
        return recorder.late if isinstance(recorder, Recorder) else 0


def _rss_kb() -> int:
    """This process's resident set (VmRSS), in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise KprobeVMError("no VmRSS in /proc/self/status: not Linux?")


def run_session(spec: dict[str, Any]) -> SessionResult:
    """The session process: attach, churn for the configured minutes, finish, detach.

    ``spec``: ``config`` (:class:`SoakConfig` fields) and ``facts`` (gdb, kallsyms,
    cmdline, vmlinux, journal).
    """
    config = SoakConfig.from_json(spec["config"])
    facts = spec["facts"]

    def log(message: str) -> None:
        print(f"soak session: {message}", file=sys.stderr, flush=True)

    vm = kprobevm.attach(gdb=facts["gdb"], kallsyms=facts["kallsyms"],
                         kernel_cmdline=facts["cmdline"], vmlinux=facts["vmlinux"],
                         name=config.name)  # fmt: skip
    vm.journal_path = Path(facts["journal"])
    rss: list[tuple[float, int]] = []
    lost_guest = False
    with vm:
        for function in config.functions:
            if vm.symbols[function] in vm.kprobe_blacklist:
                raise ProbeRefused("EINVAL", "blacklisted: not a soak function",
                                   symbol=function)  # fmt: skip
        churn = _Churn(vm, config, log)
        duration = config.minutes * 60
        every = min(5.0, max(duration / 30, 0.5))
        started = time.monotonic()
        next_sample, cycles = 0.0, 0
        try:
            while (now := time.monotonic() - started) < duration:
                if now >= next_sample:
                    rss.append((round(now, 2), _rss_kb()))
                    next_sample = now + every
                churn.cycle()
                cycles += 1
                if cycles % 60 == 0:
                    hits = sum(f.hits for f in churn.kinds.values())
                    log(f"{cycles} cycles, {hits:,} hits, RSS {rss[-1][1]:,} kB,"
                        f" {sum(churn.errors.values())} errors")  # fmt: skip
                time.sleep(max(0.0, started + cycles * config.period - time.monotonic()))
            rss.append((round(time.monotonic() - started, 2), _rss_kb()))
            churn.finish()
        except (VMLost, GdbConnectionClosed) as exc:
            churn._error("guest lost", exc)
            lost_guest = True
        unknown = churn.unknown_records()
        seconds = time.monotonic() - started
    return SessionResult(
        cycles=cycles, seconds=round(seconds, 1), kinds=churn.kinds,
        function_hits=dict(churn.function_hits), rss=tuple(rss), errors=dict(churn.errors),
        unknown_records=unknown, lost_guest=lost_guest,
    )  # fmt: skip


# -- the workload ------------------------------------------------------------------------


class _Network:
    """SSH traffic from the host while the soak runs: output pulled, input pushed, and a
    new connection now and then (the guest's TCP stack, its SSH server's forks)."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.stop = threading.Event()
        self.figures: Counter[str] = Counter()
        self.last_error = ""
        self.thread = threading.Thread(target=self._run, name="soak-network", daemon=True)

    def _run(self) -> None:
        push = "n" * NET_PUSH
        command = (f"head -c {NET_PULL} /dev/zero; echo {push} >/tmp/soak-net;"
                   " wc -c </tmp/soak-net >&2; rm -f /tmp/soak-net")  # fmt: skip
        while not self.stop.is_set():
            self.figures["commands"] += 1
            try:
                if self.figures["commands"] % NET_CONNECT_EVERY == 0:
                    self._connect()
                else:
                    result = self.vm.run(command, timeout=120)
                    self.figures["bytes"] += len(result.stdout) + NET_PUSH
            except KprobeVMError as exc:
                self.figures["errors"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.stop.wait(1.0)

    def _connect(self) -> None:
        ssh = self.vm.endpoints.ssh
        assert ssh is not None
        with GuestShell(ssh, user=self.vm.endpoints.ssh_user, key=self.vm.endpoints.ssh_key,
                        connect_timeout=60) as shell:  # fmt: skip
            shell.run("true", timeout=60, check=True)
        self.figures["connections"] += 1


def _start_loops(vm: VM, smp: int) -> None:
    """One workload loop per vCPU, in the background in the guest."""
    vm.run(f"rm -f {STOP_FILE}; for c in $(seq {smp}); do"
           f" (sh -c '{LOOP}' >/dev/null 2>&1 &); done", timeout=60, check=True)  # fmt: skip


# -- the whole soak ------------------------------------------------------------------------


def run(config: SoakConfig, *, log: Callable[[str], None] | None = None,
        console: Path | None = None) -> SoakResult:
    """Boot a guest, soak it as ``config`` says, check it, power it off (its serial log
    written to ``console`` when given)."""
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory(prefix="kprobevm-soak-") as tmp, \
            kprobevm.boot(smp=config.smp, qemu=config.qemu, name=config.name) as vm:
        facts = guest_facts(vm, Path(tmp), config.functions)
        log_start = len(vm.serial_log())
        _start_loops(vm, config.smp)
        network = _Network(vm)
        if config.network:
            network.thread.start()
        say(f"soak: {config.minutes:g} min on {config.smp} vCPUs, {len(config.functions)}"
            f" functions, {config.live} probed at once, {config.swap} swapped a cycle")
        try:
            session, code = _session(config, facts, Path(tmp) / "soak.journal", say)
        finally:
            network.stop.set()
            if config.network:
                network.thread.join(timeout=180)
            vm.run(f"touch {STOP_FILE}", timeout=60)
        state = read_state(facts)
        trouble = console_trouble(vm, log_start)
        if console is not None:
            console.write_text(vm.serial_log())
        try:
            answers = vm.run("echo ok", timeout=30).stdout.strip() == "ok"
        except KprobeVMError:
            answers = False
    if network.last_error:
        say(f"soak: network: {network.figures['errors']} errors, the last: {network.last_error}")
    return _result(config, session, code, facts, state, trouble, answers, network.figures)


def _session(config: SoakConfig, facts: GuestFacts, journal: Path,
             say: Callable[[str], None]) -> tuple[SessionResult | None, int | None]:
    """Run the session process to its end; its result and exit status (None: hung)."""
    spec = {
        "config": dataclasses.asdict(config),
        "facts": {"gdb": facts.gdb, "kallsyms": str(facts.kallsyms), "cmdline": facts.cmdline,
                  "vmlinux": str(facts.vmlinux), "journal": str(journal)},
    }  # fmt: skip
    env = dict(os.environ)
    root = str(Path(kprobevm.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    child = subprocess.Popen([sys.executable, "-c", SESSION, json.dumps(spec)],
                             stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        out, _ = child.communicate(timeout=config.minutes * 60 + TEARDOWN)
    except subprocess.TimeoutExpired:
        say("soak: the session did not end in time: SIGTERM (it restores the guest)")
        child.send_signal(signal.SIGTERM)
        try:
            child.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
        return None, None
    lines = out.strip().splitlines()
    if child.returncode != 0 or not lines:
        say(f"soak: the session exited {child.returncode}")
        return None, child.returncode
    return SessionResult.from_json(json.loads(lines[-1])), child.returncode


def _result(config: SoakConfig, session: SessionResult | None, code: int | None,
            facts: GuestFacts, state: dict[str, bytes], trouble: tuple[str, ...],
            answers: bool, network: Counter[str]) -> SoakResult:
    """The figures and goals from what the session and the checks found."""
    s = session or SessionResult(0, 0.0, {}, {}, (), {"the session failed": 1}, 0)
    hits = {k: f.hits for k, f in s.kinds.items()}
    missed = {k: f.missed for k, f in s.kinds.items()}
    hits["total"], missed["total"] = sum(hits.values()), sum(missed.values())
    warm = config.minutes * 60 * WARMUP
    after = [kb for t, kb in s.rss if t >= warm]
    start, end = (after[0], after[-1]) if after else (0, 0)
    differs = tuple(name for name in facts.before if state.get(name) != facts.before[name])
    return SoakResult(
        minutes=config.minutes, smp=config.smp, cycles=s.cycles, hits=hits, missed=missed,
        lost=sum(f.lost for f in s.kinds.values()) + s.unknown_records,
        oopses=len(trouble), console_trouble=trouble[:20],
        rss_start=start, rss_end=end, rss_peak=max(after, default=0),
        rss_growth=round((end - start) / start, 4) if start else 0.0,
        text_identical=not differs, differs=differs,
        unhit=tuple(f for f, n in s.function_hits.items() if n == 0),
        errors=s.errors, workload=dict(network), guest_answers=answers,
        session_exit=code, kinds=s.kinds, function_hits=s.function_hits, rss=s.rss,
    )  # fmt: skip


def report(result: SoakResult, json_out: Path | None) -> int:
    """Print the figures and each goal, write the JSON when asked; the exit status
    (0 when every goal was met)."""
    print(result.summary())
    for goal, met in result.goals.items():
        print(f"  {'ok  ' if met else 'FAIL'} {goal}")
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return 0 if result.ok else 1
