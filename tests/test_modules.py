"""Probes in modules on the shared guest: by ``MOD:SYM`` and by bare name, a return
probe, a ``.cold`` part, trace definitions the guest's own tracefs accepts alike, and the
text left as found."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kprobevm.errors import KprobeError
from kprobevm.guest.vm import VM
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.journal import pending_writes
from kprobevm.kprobes.kretprobes import Kretprobe, KretprobeInstance
from kprobevm.kprobes.modules import WATCHED_FUNCTION
from kprobevm.tracing import ProbeEvent, parse_event
from kprobevm.tracing.session import TraceSession, plan_events
from kprobevm.x86.ptregs import PtRegs

pytestmark = pytest.mark.vm

MODULE = "virtio_net"
FUNCTION = "start_xmit"
"""virtio_net's transmit: every packet the guest sends (SSH replies) goes through it."""
TRACEFS = "/sys/kernel/tracing"


@pytest.fixture(autouse=True)
def _no_probe_left(vm: VM) -> Iterator[None]:
    yield
    assert not vm.kprobes.table, f"probes left: {vm.list_kprobes()}"
    assert vm.kprobes.modules.probe is None, "the module unload probe outlived the last probe"


def _cold_part(vm: VM) -> str:
    colds = [s.name for s in vm.symbols.functions(MODULE) if s.name.endswith(".cold")]
    assert colds, f"{MODULE} has no .cold part in this kernel"
    return colds[0]


def test_module_probes_by_mod_sym_bare_name_return_and_cold_part(vm: VM) -> None:
    entry = vm.symbols.symbol(f"{MODULE}:{FUNCTION}")
    assert entry.module == MODULE and vm.symbols[FUNCTION] == entry.address
    cold = vm.symbols.symbol(f"{MODULE}:{_cold_part(vm)}")
    text = {s.address: vm.read(s.address, s.size) for s in (entry, cold)}
    returns: list[int] = []

    def ret(ri: KretprobeInstance, regs: PtRegs) -> None:
        returns.append(regs.ax)

    by_mod = Kprobe(symbol_name=f"{MODULE}:{FUNCTION}", pre_handler=lambda kp, regs: None)
    by_name = Kprobe(symbol_name=FUNCTION, pre_handler=lambda kp, regs: None)
    at_cold = Kprobe(symbol_name=f"{MODULE}:{cold.name}", pre_handler=lambda kp, regs: None)
    rp = Kretprobe(symbol_name=f"{MODULE}:{FUNCTION}", handler=ret)
    vm.register_kprobes([by_mod, by_name, at_cold])
    vm.register_kretprobe(rp)
    try:
        assert by_mod.addr == by_name.addr == entry.address and at_cold.addr == cold.address
        listing = vm.list_kprobes()
        assert f"{FUNCTION}+0x0  {MODULE}" in listing and WATCHED_FUNCTION not in listing
        vm.run("cat /proc/version", check=True)  # its output is sent through start_xmit
    finally:
        vm.unregister_kretprobe(rp)
        vm.unregister_kprobes([by_mod, by_name, at_cold])
    assert by_mod.nhit >= 1 and by_name.nhit == by_mod.nhit
    assert rp.nhit >= 1 and set(returns) == {0}, returns  # NETDEV_TX_OK
    assert not (by_mod.nerrors or rp.nerrors)
    for address, before in text.items():
        assert vm.read(address, len(before)) == before


def _event(text: str) -> ProbeEvent:
    event = parse_event(text)
    assert isinstance(event, ProbeEvent)
    return event


@pytest.mark.parametrize("definition", [
    f"p:kprobes/n {MODULE}:{FUNCTION}",
    f"r:kprobes/rr {MODULE}:{FUNCTION}",
    f"p:kprobes/b {FUNCTION}",
])  # fmt: skip
def test_module_definitions_are_placed_where_the_guests_tracefs_places_them(
    vm: VM, definition: str
) -> None:
    """Side by side: the guest's own tracefs takes the definition, and so do we, at the
    same address and with hits."""
    kernel = vm.run(
        f"echo '{definition}' >> {TRACEFS}/kprobe_events && cat {TRACEFS}/kprobe_events;"
        f" echo '-:{definition.split()[0].split(':')[1]}' >> {TRACEFS}/kprobe_events",
    )
    assert kernel.returncode == 0, kernel.stderr
    assert FUNCTION in kernel.stdout
    (planned,) = plan_events(vm, [_event(definition)])
    assert planned.resolved.address == vm.symbols[f"{MODULE}:{FUNCTION}"]
    session = TraceSession(vm, [planned])
    with session:
        vm.run("cat /proc/version", check=True)
    assert not session.handler_errors()
    hits = list(session.drain())
    assert hits and all(f"{FUNCTION}" in h.line() for h in hits), [h.line() for h in hits]


SPARE = "binfmt_misc"
"""A module the image carries unloaded; reading its status file runs bm_status_read."""
MOUNT = "/proc/sys/fs/binfmt_misc"


def test_rmmod_takes_a_modules_probes_out_before_its_memory_is_freed(vm: VM) -> None:
    vm.run(f"insmod /lib/modules/{SPARE}.ko && mount -t binfmt_misc none {MOUNT}", check=True)
    loaded = True
    try:
        # loaded after kallsyms was first read: the name is found by reading it again
        kp = Kprobe(symbol_name=f"{SPARE}:bm_status_read", pre_handler=lambda kp, regs: None)
        vm.register_kprobe(kp)
        addr = kp.addr
        assert addr is not None and vm.kprobes.modules.probe is not None
        vm.run(f"cat {MOUNT}/status", check=True)
        assert kp.nhit >= 1
        assert any(e.address == addr for e in pending_writes(_journal(vm)))

        unloads = vm.kprobes.modules.unloads  # the shared guest's earlier tests count too
        vm.run(f"umount {MOUNT} && rmmod {SPARE}", check=True)
        loaded = False
        assert vm.kprobes.modules.unloads == unloads + 1
        assert kp.gone and kp.registered and addr not in vm.kprobes.table
        assert "[GONE]" in vm.list_kprobes()
        assert f"{SPARE}:bm_status_read" not in vm.symbols  # no stale name to place by
        # the int3 was taken out while the module's text was still there
        assert not any(e.address == addr for e in pending_writes(_journal(vm)))
        with pytest.raises(KprobeError, match="gone"):
            vm.disable_kprobe(kp)
        vm.unregister_kprobe(kp)
        assert not kp.registered and kp.addr is None
    finally:
        if loaded:
            vm.run(f"umount {MOUNT}; rmmod {SPARE}")
    # loaded again, the module runs as it should (often at the same address)
    vm.run(f"insmod /lib/modules/{SPARE}.ko && mount -t binfmt_misc none {MOUNT}"
           f" && cat {MOUNT}/status && umount {MOUNT} && rmmod {SPARE}", check=True)  # fmt: skip


def _journal(vm: VM) -> Path:
    assert vm.journal_path is not None
    return vm.journal_path


def test_a_batch_naming_a_module_loaded_since_is_looked_up_before_the_vm_is_held(
    vm: VM,
) -> None:
    """kallsyms is read again over SSH before the batch holds the VM stopped (SSH
    cannot answer then)."""
    vm.run(f"insmod /lib/modules/{SPARE}.ko", check=True)
    try:
        kps = [Kprobe(symbol_name="do_sys_openat2", pre_handler=lambda kp, regs: None),
               Kprobe(symbol_name=f"{SPARE}:bm_status_read", pre_handler=lambda kp, regs: None)]
        vm.register_kprobes(kps)
        assert all(kp.registered for kp in kps)
        vm.unregister_kprobes(kps)
    finally:
        vm.run(f"rmmod {SPARE}")
